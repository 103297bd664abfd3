"""The replication connection's pieces that need no server: its session formats and the sorting of
psycopg2 errors into retryable and fatal (the integration tests raise the real ones)."""

from __future__ import annotations

import psycopg2
import pytest
from branchline.connectors.embedded.pgoutput import SESSION_GUCS, SESSION_OPTIONS, SESSION_SETTINGS
from branchline.connectors.embedded.postgres import map_psycopg2_error
from branchline.errors import FatalSourceError, RetryableSourceError


def test_walsender_options_and_sql_settings_carry_the_same_formats():
    assert SESSION_OPTIONS.split() == [part for name, value in SESSION_GUCS.items()
                                       for part in ("-c", f"{name}={value}")]  # libpq splits on spaces
    assert SESSION_SETTINGS.split("; ") == [f"SET {name}='{value}'" for name, value in SESSION_GUCS.items()]


def _with_state(state: str) -> psycopg2.Error:
    error_class = type("ServerError", (psycopg2.DatabaseError,), {"pgcode": state})
    return error_class(f"server said {state}\nDETAIL: more")


@pytest.mark.parametrize("error", [
    psycopg2.OperationalError("server closed the connection unexpectedly"),
    psycopg2.InterfaceError("connection already closed"),
    psycopg2.DatabaseError("error with status PGRES_COPY_BOTH and no message from the libpq"),
    _with_state("57P01"),  # terminating connection due to administrator command
    _with_state("08006"),
    _with_state("55006"),  # replication slot is active for another PID
])
def test_lost_connections_and_a_busy_slot_are_retryable(error):
    mapped = map_psycopg2_error(error, "replication slot s of crm")
    assert isinstance(mapped, RetryableSourceError)
    assert mapped.args[0].startswith("`replication slot s of crm` must") and "\n" not in mapped.args[0]


@pytest.mark.parametrize("error", [
    _with_state("42704"),  # the publication or slot does not exist
    _with_state("42501"),  # no replication privilege
    psycopg2.ProgrammingError("a bug of ours"),
])
def test_server_refusals_and_bugs_are_fatal(error):
    assert isinstance(map_psycopg2_error(error, "replication slot s of crm"), FatalSourceError)
