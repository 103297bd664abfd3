"""The one place where psycopg's exceptions become Branchline's error tree, by SQLSTATE class.

Retryable: 08 (connection), 40 (rollback: deadlock, serialization), 53 (insufficient resources),
57P (server shutting down / starting up), a lost connection without SQLSTATE and a pool timeout.
Everything else is fatal — notably 22 (data) and 23 (integrity) — because sending the same batch again
would fail the same way.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import psycopg
from branchline.errors import FatalSinkError, RetryableSinkError, SinkError
from psycopg_pool import PoolTimeout

_RETRYABLE_CLASSES = ("08", "40", "53", "57P")
_COPY_LINE = re.compile(r"COPY \S+, line (\d+)")
_CONFIG_HINTS = (
    "certificate verify failed",
    "password authentication failed",
    "no pg_hba.conf entry",
    "pg_hba.conf rejects",
    "server does not support SSL",
    "does not exist",
    "root certificate file",
)


def is_retryable_sqlstate(sqlstate: str | None) -> bool:
    return sqlstate is not None and sqlstate.startswith(_RETRYABLE_CLASSES)


def map_error(
    exc: BaseException,
    *,
    table: str,
    describe_copy_line: Callable[[int], str] | None = None,
    where: str = "",
) -> SinkError:
    """Translate ``exc`` (raised while writing into ``table``) into a `SinkError`.

    ``describe_copy_line`` names the key and position of the COPY row an error points at; ``where``
    names the batch (position range) when the error points at no row.
    """
    if isinstance(exc, SinkError):
        return exc
    sqlstate = getattr(exc, "sqlstate", None)
    detail = _first_line(exc)
    row = ""
    diag: Any = getattr(exc, "diag", None)
    context = getattr(diag, "context", None) if diag is not None else None
    if context and describe_copy_line is not None:
        match = _COPY_LINE.search(context)
        if match:
            row = describe_copy_line(int(match.group(1)))
    location = row or where
    message = f"writing `{table}`{' ' + location if location else ''} failed"
    message += f" [{sqlstate}]: {detail}" if sqlstate else f": {detail}"
    if isinstance(exc, PoolTimeout):
        return RetryableSinkError(message)
    if is_retryable_sqlstate(sqlstate):
        return RetryableSinkError(message)
    if sqlstate is None and isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError | OSError):
        if any(hint in detail for hint in _CONFIG_HINTS):
            return FatalSinkError(message)  # the server answered and refused us: retrying cannot help
        return RetryableSinkError(message)  # connection refused or lost: libpq gives no SQLSTATE
    return FatalSinkError(message)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
