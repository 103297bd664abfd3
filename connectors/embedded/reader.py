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
    rows: int | None = None
    """How many row changes ``events`` hold when that is not one each (`BinlogRows` groups); None: len(events)."""


class BinlogRows:
    """The rows of one binlog rows event as the library read them, column by column and in types marshal
    writes (`MariaDbReader.raw_rows`, a capture process): the spool's reader turns them into the events
    `MariaDbReader.stream` makes by default (`mariadb.binlog_row_events`).

    Why: converting values, building row dicts and events and pickling them cost a fifth of the capture
    process's CPU; the runner, on the other core, has time to spare. ``before``/``after`` are each
    (tags, columns) or None: one sequence of values per column in ``names`` order, a tag per column saying
    how its values were made marshal-able (`mariadb.spool_image`). ``timestamp`` is the event header's
    (seconds since the epoch); row ``i`` is at ``position | i``."""

    __slots__ = ("after", "before", "count", "kind", "names", "position", "table", "timestamp", "txid")

    def __init__(self, kind: str, table: TableId, position: int, timestamp: int, txid: str | None,
                 names: tuple[str, ...], before: tuple[tuple[int, ...], list[Any]] | None,
                 after: tuple[tuple[int, ...], list[Any]] | None, count: int) -> None:
        self.kind = kind
        self.table = table
        self.position = position
        self.timestamp = timestamp
        self.txid = txid
        self.names = names
        self.before = before
        self.after = after
        self.count = count


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
