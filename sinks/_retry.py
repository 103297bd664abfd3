"""The one retry loop of the sinks: bounded, logged with the attempt number, only for retryable errors.

It is also where sink retries and sink errors become metrics (`branchline.metrics`): each new attempt
counts one ``branchline_retries_total{component, name}``, and the error that ends the loop (fatal, or
retryable with the attempts spent) counts one ``branchline_errors_total{component, name, kind}`` and
becomes the sink's last error in `branchline status`. Both runtimes see them, whichever calls the sink.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from branchline import metrics
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
    name: str,
    component: str = "sink",
) -> T:
    """Run ``call`` until it succeeds, raises a non-retryable error, or ``max_attempts`` are spent.

    ``call`` must be safe to repeat (a sink's batch is one transaction, so a failed attempt left
    nothing behind). The last retryable error is raised unchanged when attempts run out. ``name`` (the
    sink's name in the pipeline file) and ``component`` label the metrics.
    """
    attempt = 1
    while True:
        try:
            return await call()
        except Exception as exc:
            if not is_retryable(exc) or attempt >= max_attempts:
                metrics.observe_error(component, name, exc)
                raise
            delay = min(max_backoff_s, backoff_s * 2 ** (attempt - 1))
            log.warning(
                "%s failed (attempt %d of %d), retrying in %.2fs: %s", what, attempt, max_attempts, delay, exc
            )
            metrics.observe_retry(component, name)
            await asyncio.sleep(delay)
            attempt += 1
