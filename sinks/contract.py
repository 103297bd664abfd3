"""The sink contract. Imports no implementation; `branchline.sinks.build` is the one place that
turns a pipeline file's sink section into a concrete sink."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from branchline.events import ChangeEvent, TableSchema


class SinkCapabilities(BaseModel):
    """What a sink can do, as data, so callers check instead of guessing."""

    model_config = ConfigDict(frozen=True)

    deletes: bool = True
    soft_deletes: bool = False
    truncate: bool = True
    add_columns: bool = True
    max_identifier_length: int = 63


@runtime_checkable
class Sink(Protocol):
    """A writer into one target store."""

    capabilities: SinkCapabilities

    async def write_batch(self, table: TableSchema, events: Sequence[ChangeEvent]) -> None:
        """Make one table's batch of changes durable in the target.

        Guarantees: when it returns, the batch is durable and the caller may acknowledge it.
        Must be idempotent: may be called again with the same batch (or an older one) after a crash;
        a row's stored position only moves forward. ``events`` may hold several changes of one key
        in position order. Raises `RetryableSinkError` or `FatalSinkError`, never a driver error.
        """
        ...

    async def close(self) -> None:
        """Release connections. Not guaranteed to be called on abrupt shutdown."""
        ...
