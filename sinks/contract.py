"""The sink contract. Imports no implementation; `branchline.sinks.build` is the one place that
turns a pipeline file's sink section into a concrete sink."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from branchline.events import ChangeEvent, TableSchema
from pydantic import BaseModel, ConfigDict


class SinkCapabilities(BaseModel):
    """What a sink can do, as data, so callers check instead of guessing."""

    model_config = ConfigDict(frozen=True)

    deletes: bool = True
    soft_deletes: bool = False
    """Deleted rows stay, flagged `_bl_deleted`."""
    truncate: bool = True
    add_columns: bool = True
    max_identifier_length: int = 63
    durable_on_write: bool = True
    """True: a batch is durable when `write_batch` returns. False: only after `flush` returns, so the
    caller must hold acknowledgements until then (the Delta sink buffers and commits on an interval)."""
    commit_interval_s: float | None = None
    """For a buffering sink: how often the caller should call `flush` (and then acknowledge)."""


class TextRows(Protocol):
    """One table's collapsed changes as the rows of a PostgreSQL text COPY (`branchline.runtime.text_rows`
    makes them from a PostgreSQL source's spooled rows). A sink that offers ``async write_text(table, rows)
    -> bool`` writes them with the guarantees of `Sink.write_batch`, or returns False without writing when
    the table does not take text; the caller then writes the same changes as events."""

    schema: TableSchema
    body: str
    """One escaped line per change: the schema's columns, then position, op code, commit time."""
    count: int
    deletes: int
    min_position: int

    @property
    def inserts_only(self) -> bool: ...

    def describe(self, line: int) -> str:
        """The key and position of line ``line`` (1-based), for an error message."""
        ...


@runtime_checkable
class Sink(Protocol):
    """A writer into one target store.

    A sink that is durable on write may also offer ``async probe()``: one round trip to the store, with
    its retries and errors. The runtimes call it instead of writing a heartbeat row, so an unreachable
    store stops heartbeats and lag rises on idle tables too.
    """

    capabilities: SinkCapabilities

    async def write_batch(self, table: TableSchema, events: Sequence[ChangeEvent]) -> None:
        """Write one table's batch of changes.

        Guarantees: when it returns, the batch is durable if ``capabilities.durable_on_write``; otherwise
        it is durable once a later `flush` returns. Must be idempotent: may be called again with the same
        batch (or an older one) after a crash; a row's stored position only moves forward. ``events`` may
        hold several changes of one key in position order. Raises `RetryableSinkError` (the sink's own
        bounded retries are spent) or `FatalSinkError`, never a driver error.
        """
        ...

    async def flush(self) -> None:
        """Make everything written so far durable; after it returns the caller may acknowledge it.

        A no-op for sinks that are durable on write. Same errors as `write_batch`.
        """
        ...

    async def close(self) -> None:
        """Release connections. Does not flush: unflushed batches were never acknowledged and will be
        replayed. Not guaranteed to be called on abrupt shutdown."""
        ...
