"""SQLSTATE classes decide retry or stop; the retry loop is bounded, retries only what may succeed, and
feeds the retry and error metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import psycopg
import pytest
from branchline import metrics
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
        asyncio.run(retrying(flaky, what="w", max_attempts=3, backoff_s=0, max_backoff_s=0, name="cloud"))
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
        asyncio.run(retrying(broken, what="w", max_attempts=5, backoff_s=0, max_backoff_s=0, name="cloud"))
    assert calls == 1


def test_refused_by_the_server_is_fatal_not_retried() -> None:
    for text in (
        'connection failed: connection to server at "h" failed: SSL error: certificate verify failed',
        'connection failed: FATAL:  password authentication failed for user "x"',
        'connection failed: FATAL:  database "nope" does not exist',
    ):
        assert isinstance(map_error(psycopg.OperationalError(text), table="t"), FatalSinkError)


@pytest.fixture
def fresh_metrics() -> Iterator[None]:
    metrics.reset()
    yield
    metrics.reset()


def _count(metric: str, **labels: str) -> float:
    return metrics.sample(metric, {"component": "sink", **labels}) or 0.0


def test_each_retry_is_counted_and_the_final_error_by_kind(fresh_metrics: None) -> None:
    calls = 0

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        raise RetryableSinkError("down")

    with pytest.raises(RetryableSinkError):
        asyncio.run(retrying(flaky, what="w", max_attempts=3, backoff_s=0, max_backoff_s=0, name="lake"))
    assert calls == 3
    assert _count("branchline_retries_total", name="lake") == 2  # before attempts 2 and 3
    assert _count("branchline_errors_total", name="lake", kind="RetryableSinkError") == 1  # the final one
    (last,) = metrics.snapshot()["errors"]
    assert (last["component"], last["name"], last["kind"], last["message"]) == (
        "sink",
        "lake",
        "RetryableSinkError",
        "down",
    )


def test_a_fatal_error_is_counted_once_without_retries(fresh_metrics: None) -> None:
    async def broken() -> None:
        raise FatalSinkError("no")

    with pytest.raises(FatalSinkError):
        asyncio.run(retrying(broken, what="w", max_attempts=5, backoff_s=0, max_backoff_s=0, name="cloud"))
    assert _count("branchline_retries_total", name="cloud") == 0
    assert _count("branchline_errors_total", name="cloud", kind="FatalSinkError") == 1


def test_a_retry_that_succeeds_counts_retries_and_no_error(fresh_metrics: None) -> None:
    failures = iter([RetryableSinkError("blip")])

    async def recovers() -> str:
        for exc in failures:
            raise exc
        return "ok"

    result = asyncio.run(
        retrying(
            recovers, what="w", max_attempts=3, backoff_s=0, max_backoff_s=0, name="cloud", component="sink"
        )
    )
    assert result == "ok"
    assert _count("branchline_retries_total", name="cloud") == 1
    assert metrics.snapshot()["errors"] == []
    assert _count("branchline_errors_total", name="cloud", kind="RetryableSinkError") == 0
