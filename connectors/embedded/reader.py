"""What an embedded reader hands the runner: changes, resume points and schema changes.

Readers run in a thread (their drivers block); the runner batches what they yield, writes it to
the spool, and only then acknowledges a `Checkpoint` back to the reader (which for PostgreSQL
advances the replication slot).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from branchline.events import ChangeEvent, TableId, TableSchema


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A resume point reached after a committed transaction: reading again from here loses nothing.

    ``data`` is reader-specific and JSON-serialisable (MariaDB: gtid/file/pos; PostgreSQL: lsn).
    ``position`` is the event position (see `binlog_position`/`lsn_position`) of the commit, so
    that changes already spooled can be recognised when a restart replays them.
    """

    data: dict[str, Any]
    position: int


@dataclass(slots=True)
class Changes:
    """Changes in source order. ``checkpoint`` is set when they end at a transaction boundary."""

    events: list[ChangeEvent]
    checkpoint: Checkpoint | None = None
    schemas: list[TableSchema] = field(default_factory=list)
    """Tables whose schema changed (or was seen first) before these events."""


class EmbeddedReader(Protocol):
    """A capture reader of one source database."""

    source: str

    def tables(self) -> list[TableSchema]:
        """Every captured table with its columns and primary key, read from the catalog."""
        ...

    def schema(self, table: TableId) -> TableSchema:
        """One table's current schema (re-read from the catalog)."""
        ...

    def start_position(self) -> Checkpoint:
        """Where streaming starts when there is no checkpoint yet: the current end of the log.

        For PostgreSQL this creates the replication slot.
        """
        ...

    def snapshot(self, schema: TableSchema, position: int, chunk_rows: int,
                 after: tuple[Any, ...] | None = None) -> Iterator[tuple[list[ChangeEvent], tuple[Any, ...]]]:
        """Read a table in primary-key chunks after key ``after``; yields (events, last key).

        Events are `Op.READ` with ``snapshot=True`` and the given ``position``.
        """
        ...

    def stream(self, start: Checkpoint, stop: threading.Event) -> Iterator[Changes]:
        """Changes from ``start`` on, until ``stop`` is set. Yields empty `Changes` when idle."""
        ...

    def acknowledge(self, checkpoint: Checkpoint) -> None:
        """Everything up to ``checkpoint`` is durable downstream; the source may release it."""
        ...

    def retention_seconds(self) -> float | None:
        """How long the source keeps its log for a reader that stopped (None: unknown/unbounded)."""
        ...

    def close(self) -> None:
        ...
