"""The one retry loop of the sinks: bounded, logged with the attempt number, only for retryable errors."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from branchline.errors import is_retryable

T = TypeVar("T")

log = logging.getLogger("branchline.sinks.retry")


async def retrying(
    call: Callable[[], Awaitable[T]],
    *,
    what: str,
    max_attempts: int,
    backoff_s: float,
    max_backoff_s: float,
) -> T:
    """Run ``call`` until it succeeds, raises a non-retryable error, or ``max_attempts`` are spent.

    ``call`` must be safe to repeat (a sink's batch is one transaction, so a failed attempt left
    nothing behind). The last retryable error is raised unchanged when attempts run out.
    """
    attempt = 1
    while True:
        try:
            return await call()
        except Exception as exc:
            if not is_retryable(exc) or attempt >= max_attempts:
                raise
            delay = min(max_backoff_s, backoff_s * 2 ** (attempt - 1))
            log.warning(
                "%s failed (attempt %d of %d), retrying in %.2fs: %s", what, attempt, max_attempts, delay, exc
            )
            await asyncio.sleep(delay)
            attempt += 1
