"""SQLSTATE classes decide retry or stop; the retry loop is bounded and retries only what may succeed."""

from __future__ import annotations

import asyncio
import logging

import psycopg
import pytest
from branchline.errors import FatalSinkError, RetryableSinkError
from branchline.sinks._retry import retrying
from branchline.sinks.postgres.errors import map_error
from psycopg import errors


@pytest.mark.parametrize("sqlstate", ["08006", "40001", "40P01", "53300", "57P01", "57P03"])
def test_retryable_sqlstate_classes(sqlstate: str) -> None:
    exc = errors.lookup(sqlstate)("boom")
    assert isinstance(map_error(exc, table="s.t"), RetryableSinkError)


@pytest.mark.parametrize("sqlstate", ["22003", "22021", "23505", "42P01", "42703"])
def test_fatal_sqlstate_classes(sqlstate: str) -> None:
    mapped = map_error(errors.lookup(sqlstate)("bad value"), table="s.t", where="(positions 1..2)")
    assert isinstance(mapped, FatalSinkError)
    assert "`s.t`" in str(mapped) and "(positions 1..2)" in str(mapped) and sqlstate in str(mapped)


def test_lost_connection_without_sqlstate_is_retryable() -> None:
    assert isinstance(
        map_error(psycopg.OperationalError("server closed the connection"), table="t"), RetryableSinkError
    )


def test_retries_are_bounded_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        raise RetryableSinkError("down")

    with caplog.at_level(logging.WARNING), pytest.raises(RetryableSinkError):
        asyncio.run(retrying(flaky, what="w", max_attempts=3, backoff_s=0, max_backoff_s=0))
    assert calls == 3
    assert [r.getMessage().split(" (")[1][:17] for r in caplog.records] == [
        "attempt 1 of 3), ",
        "attempt 2 of 3), ",
    ]


def test_fatal_errors_are_not_retried() -> None:
    calls = 0

    async def broken() -> None:
        nonlocal calls
        calls += 1
        raise FatalSinkError("no")

    with pytest.raises(FatalSinkError):
        asyncio.run(retrying(broken, what="w", max_attempts=5, backoff_s=0, max_backoff_s=0))
    assert calls == 1


def test_refused_by_the_server_is_fatal_not_retried() -> None:
    for text in (
        'connection failed: connection to server at "h" failed: SSL error: certificate verify failed',
        'connection failed: FATAL:  password authentication failed for user "x"',
        'connection failed: FATAL:  database "nope" does not exist',
    ):
        assert isinstance(map_error(psycopg.OperationalError(text), table="t"), FatalSinkError)
