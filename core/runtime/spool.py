"""The durable local spool between capture and sink: SQLite in WAL mode in the state folder.

Why a spool: capture must not stop when the cloud store is unreachable (a stopped reader lets the
source purge its binlog, or pins WAL on the source's disk). Each batch is one SQLite transaction
that also stores the source's resume `Checkpoint` (and snapshot progress), so the checkpoint can
never run ahead of what the spool holds; only after that commit is the source acknowledged (the
PostgreSQL slot advanced). The drain reads batches in sequence order and deletes them once the sink
has made them durable, so the spool replays nothing that is confirmed and loses nothing that is not.
"""

from __future__ import annotations

import json
import marshal
import pickle
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

from branchline.connectors.embedded.pgoutput import TextRow
from branchline.connectors.embedded.reader import BinlogRows, Checkpoint
from branchline.events import ChangeEvent, Op, TableSchema
from branchline.runtime.text_rows import TextBatch
from branchline.streams._construct import new_event

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    events INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    spooled_at REAL NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    source TEXT PRIMARY KEY,
    data TEXT NOT NULL,
    position TEXT NOT NULL,  -- binlog positions exceed 64 bits
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshot_tables (
    source TEXT NOT NULL,
    qualified TEXT NOT NULL,
    position TEXT NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    rows INTEGER NOT NULL DEFAULT 0,
    last_key BLOB,
    PRIMARY KEY (source, qualified)
);
"""

_OPS = {op.value: op for op in Op}


class SpooledBatch:
    """One batch read back from the spool, in capture order.

    A batch of PostgreSQL text rows (``text``) is decoded into events only when ``events`` is first read:
    the runner's text path (`branchline.runtime.text_rows`) writes most of them without events."""

    __slots__ = ("_events", "_schemas", "bytes", "count", "marks", "seq", "source", "text")

    def __init__(self, seq: int, source: str, events: list[ChangeEvent] | None, schemas: dict[Any, TableSchema] | None,
                 bytes: int, marks: list[Any] | None = None, text: TextBatch | None = None, count: int = 0) -> None:
        self.seq = seq
        self.source = source
        self._events = events
        self._schemas = schemas
        self.bytes = bytes
        self.marks = marks
        """What `metrics.observe_changes_read` needs of ``events`` (`ReadMark` objects), when the decoder knew
        it without a pass over the events; None: give it the events."""
        self.text = text
        self.count = len(events) if events is not None else count
        """Row changes in the batch (a text row whose primary key changed becomes two events)."""

    @property
    def events(self) -> list[ChangeEvent]:
        if self._events is None:
            assert self.text is not None
            self._events = self.text.events()
        return self._events

    @property
    def schemas(self) -> dict[Any, TableSchema]:
        if self._schemas is None:
            assert self.text is not None
            self._schemas = self.text.schemas()
        return self._schemas


@dataclass(slots=True)
class ReadMark:
    """The fields of an event that `metrics.observe_changes_read` reads: for a text batch, one per commit
    time and one at the highest position stand for all the batch's events (it keeps the maxima only)."""

    position: int
    source_ts: Any
    snapshot: bool = False


_TEXT = b"BLT1"
"""Leads a batch that holds PostgreSQL `TextRow` rows (`_encode_text`); any other batch is one pickle."""
_ROWS = b"BLT2"
"""Leads a batch that holds MariaDB/MySQL `BinlogRows` (`_encode_rows`)."""
_MARSHAL, _PICKLE = b"M", b"P"
"""How a `_ROWS` batch's groups are written: marshal, or pickle when a value is not marshal-safe."""


def encode(events: list[Any], schemas: dict[Any, TableSchema]) -> bytes:
    """Events as compact tuples plus each table's schema once: pickling models per event costs 10x.

    Tables are told apart by identity first (a reader hands out one `TableId` object per table): hashing a
    `TableId` goes through pydantic's Python hash function (about a tenth of this function in a micro-benchmark).
    A batch with PostgreSQL rows still in their text form (`TextRow`) takes `_encode_text`."""
    kinds = set(map(type, events))
    if BinlogRows in kinds:
        return _encode_rows(events, schemas)
    if TextRow in kinds:
        return _encode_text(events, schemas)
    index: dict[int, int] = {}
    slots: dict[Any, int] = {}
    tables: list[TableSchema] = []
    rows: list[tuple[Any, ...]] = []
    append = rows.append
    for event in events:
        table = event.table
        slot = index.get(id(table))
        if slot is None:
            slot = slots.get(table)  # an equal TableId from another object: the same slot
            if slot is None:
                slot = slots[table] = len(tables)
                tables.append(schemas[table])
            index[id(table)] = slot
        append((event.op.value, slot, event.key, event.before, event.after, event.position,
                event.source_ts, event.txid, event.snapshot))
    return pickle.dumps((tables, rows), protocol=pickle.HIGHEST_PROTOCOL)


def batch_schemas(events: list[ChangeEvent], schemas: dict[Any, TableSchema]) -> dict[Any, TableSchema]:
    """The schemas of the tables in ``events``, as they are now (a copy: ``schemas`` may change later).

    Consecutive events of one table share one `TableId` object, so identity spares nearly every hash
    (a `TableId` hashes through pydantic's Python hash function)."""
    tables: dict[int, Any] = {}
    last = None
    for event in events:
        table = event.table
        if table is not last:
            tables[id(table)] = last = table
    return {table: schemas[table] for table in tables.values()}


class _TableSlots:
    """Numbers the tables of one batch for its head, which lists each table's schema once: by object
    identity first (a reader hands out one `TableId` object per table), then by equality."""

    def __init__(self, schemas: dict[Any, TableSchema]) -> None:
        self.schemas = schemas
        self.tables: list[TableSchema] = []
        self._by_id: dict[int, int] = {}

    def __call__(self, table: Any) -> int:
        slot = self._by_id.get(id(table))
        if slot is None:
            for slot, known in enumerate(self.tables):  # an equal TableId from another object: the same slot
                if known.id == table:
                    break
            else:
                slot = len(self.tables)
                self.tables.append(self.schemas[table])
            self._by_id[id(table)] = slot
        return slot


def _encode_text(events: list[Any], schemas: dict[Any, TableSchema]) -> bytes:
    """A batch holding `TextRow` rows: ``_TEXT``, the length of the pickled head, the head (schemas, each
    relation's columns, commit times, whole events), then every row as one marshal of plain tuples.

    Why: a `TextRow`'s values are str/None/Ellipsis, which marshal writes and reads many times faster than
    pickle writes decoded values (Decimal, datetime) inside row dicts; the capture process then costs about
    what reading the stream costs. Relations, commit times and tables are told apart by identity (one object
    each per relation / transaction / table in a reader's output)."""
    table_slot = _TableSlots(schemas)
    tables = table_slot.tables
    relation_slots: dict[int, int] = {}
    relations: list[tuple[int, tuple[tuple[str, int, int], ...]]] = []
    stamp_slots: dict[int, int] = {}
    stamps: list[Any] = []
    others: list[tuple[Any, ...]] = []
    rows: list[tuple[Any, ...]] = []
    append = rows.append

    last_relation = last_stamp = slot = stamp_slot = None  # runs share them: a dict lookup per run, not per row
    for event in events:
        if event.__class__ is not TextRow:
            append(("E", len(others), event.position))
            others.append((event.op.value, table_slot(event.table), event.key, event.before, event.after,
                           event.position, event.source_ts, event.txid, event.snapshot))
            continue
        change = event.change
        relation = change.relation
        if relation is not last_relation:
            last_relation = relation
            slot = relation_slots.get(id(relation))
            if slot is None:
                slot = relation_slots[id(relation)] = len(relations)
                relations.append((table_slot(event.table), tuple(c[:3] for c in relation.columns)))
        stamp = event.source_ts
        if stamp is not last_stamp or stamp_slot is None:
            last_stamp = stamp
            stamp_slot = stamp_slots.get(id(stamp))
            if stamp_slot is None:
                stamp_slot = stamp_slots[id(stamp)] = len(stamps)
                stamps.append(stamp)
        append((change.kind, slot, event.position, stamp_slot, event.txid, change.old, change.new, change.old_is_key))
    head = pickle.dumps((tables, relations, stamps, others), protocol=pickle.HIGHEST_PROTOCOL)
    return b"".join((_TEXT, len(head).to_bytes(4, "big"), head, marshal.dumps(rows)))


def _encode_rows(events: list[Any], schemas: dict[Any, TableSchema]) -> bytes:
    """A batch holding `BinlogRows`: ``_ROWS``, the length of the pickled head, the head (schemas, whole
    events), then the groups as one marshal (``_MARSHAL``) of plain tuples, or one pickle (``_PICKLE``) when a
    value is not marshal-safe (a column tagged `AS_IS`, a JSON document holding a decimal).

    Why: a group's values are ints, strs and the arguments that rebuild decimals and datetimes, column by
    column, which marshal writes many times faster than pickle writes events with row dicts of decoded values;
    the capture process then costs little more than reading the binlog. Tables are told apart by identity
    first (a reader hands out one `TableId` object per table)."""
    from branchline.connectors.embedded.mariadb import AS_IS

    table_slot = _TableSlots(schemas)
    tables = table_slot.tables
    others: list[tuple[Any, ...]] = []
    groups: list[tuple[Any, ...]] = []
    append = groups.append
    exotic = False

    for event in events:
        if event.__class__ is not BinlogRows:
            append(("E", len(others)))
            others.append((event.op.value, table_slot(event.table), event.key, event.before, event.after,
                           event.position, event.source_ts, event.txid, event.snapshot))
            continue
        before, after = event.before, event.after
        if before is not None and AS_IS in before[0] or after is not None and AS_IS in after[0]:
            exotic = True
        append((event.kind, table_slot(event.table), event.position, event.timestamp, event.txid, event.count,
                event.names, before, after))
    head = pickle.dumps((tables, others), protocol=pickle.HIGHEST_PROTOCOL)
    body = None
    if not exotic:
        try:
            body = _MARSHAL + marshal.dumps(groups)
        except ValueError:  # a value marshal cannot write, inside a container
            body = None
    if body is None:
        body = _PICKLE + pickle.dumps(groups, protocol=pickle.HIGHEST_PROTOCOL)
    return b"".join((_ROWS, len(head).to_bytes(4, "big"), head, body))


def _decode_rows(data: bytes) -> tuple[list[ChangeEvent], dict[Any, TableSchema], list[Any] | None]:
    """`_encode_rows`' inverse: the events `MariaDbReader.stream` makes by default (built here, in the runner,
    which has CPU to spare; marks: None, the runner takes them from the events)."""
    from branchline.connectors.embedded.mariadb import binlog_row_events

    size = int.from_bytes(data[4:8], "big")
    tables, others = pickle.loads(data[8:8 + size])
    body = data[8 + size:]
    groups = marshal.loads(body[1:]) if body[:1] == _MARSHAL else pickle.loads(body[1:])
    ids = [t.id for t in tables]
    whole = [new_event({"op": _OPS[op], "table": ids[slot], "key": key, "before": before, "after": after,
                        "position": position, "source_ts": ts, "txid": txid, "snapshot": snap})
             for op, slot, key, before, after, position, ts, txid, snap in others]
    return binlog_row_events(groups, tables, whole), {t.id: t for t in tables}, None


def text_marks(text: TextBatch) -> list[Any] | None:
    """A text batch's `SpooledBatch.marks`: one `ReadMark` at the highest position and one per commit time
    (None when the batch holds whole events or a row without a commit time)."""
    rows, stamps = text.rows, text.stamps
    if not rows or None in stamps or text.others:
        return None
    positions = list(map(_third, rows))
    top = max(positions)
    marks = [ReadMark(top, stamps[rows[positions.index(top)][3]])]
    marks.extend(ReadMark(top, stamp) for stamp in stamps)
    return marks


_third = itemgetter(2)


def decode(data: bytes) -> tuple[list[ChangeEvent], dict[Any, TableSchema]]:
    events, schemas, _ = decode_batch(data)
    return events, schemas


def decode_batch(data: bytes) -> tuple[list[ChangeEvent], dict[Any, TableSchema], list[Any] | None]:
    """A spooled batch's events and schemas, and its `SpooledBatch.marks`."""
    if data[:4] == _TEXT:
        text = TextBatch(data)
        return text.events(), text.schemas(), text_marks(text)
    if data[:4] == _ROWS:
        return _decode_rows(data)
    tables, rows = pickle.loads(data)
    ids = [t.id for t in tables]
    events = [new_event({"op": _OPS[op], "table": ids[slot], "key": key, "before": before, "after": after,
                         "position": position, "source_ts": ts, "txid": txid, "snapshot": snap})
              for op, slot, key, before, after, position, ts, txid, snap in rows]
    return events, {t.id: t for t in tables}, None


class Spool:
    """One SQLite file; safe to use from the capture threads and the drain at once.

    Writes (capture) and reads/deletes (drain) use separate connections: WAL lets a reader run while
    a writer commits.
    """

    def __init__(self, path: Path, *, synchronous: str = "FULL", memory_bytes: int = 64 * 1024**2,
                 shared: bool = False) -> None:
        self.path = path
        self.shared = shared
        """True when another process appends or drains too: sizes are then read from the file."""
        self._memory: dict[int, tuple[list[ChangeEvent], dict[Any, TableSchema]]] = {}
        """seq -> the batch as appended: the drain skips unpickling what this process spooled itself."""
        self._memory_sizes: dict[int, int] = {}
        self._memory_bytes = 0
        self._memory_limit = memory_bytes
        self._memory_lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._synchronous = synchronous
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._writer = self._open(synchronous)
        self._writer.executescript(_SCHEMA)
        self._reader = self._open(synchronous)
        self._bytes, self._count = self._writer.execute(
            "SELECT COALESCE(SUM(bytes), 0), COUNT(*) FROM batches").fetchone()
        self.changed = threading.Condition()

    def _open(self, synchronous: str) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        return conn

    # -- capture side ----------------------------------------------------------------------------

    def append(self, source: str, events: list[ChangeEvent], schemas: dict[Any, TableSchema],
               checkpoint: Checkpoint | None = None,
               snapshot_progress: tuple[str, int, Any, bool] | None = None, count: int | None = None) -> int:
        """Store one batch (and the source's new checkpoint / snapshot progress) in one durable commit.

        Returns the bytes the batch takes. ``snapshot_progress`` = (qualified table, rows read so far,
        last key, done). ``count``: the row changes ``events`` hold when not one each (`BinlogRows`).
        """
        data = encode(events, schemas) if events else b""
        now = time.time()
        with self._write_lock:
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                seq = None
                if events:
                    seq = conn.execute(
                        "INSERT INTO batches (source, events, bytes, spooled_at, data) VALUES (?,?,?,?,?)",
                        (source, len(events) if count is None else count, len(data), now, data)).lastrowid
                if checkpoint is not None:
                    conn.execute(
                        "INSERT INTO checkpoints (source, data, position, updated_at) VALUES (?,?,?,?)"
                        " ON CONFLICT (source) DO UPDATE SET data=excluded.data, position=excluded.position,"
                        " updated_at=excluded.updated_at",
                        (source, json.dumps(checkpoint.data), str(checkpoint.position), now))
                if snapshot_progress is not None:
                    qualified, rows, last_key, done = snapshot_progress
                    conn.execute("UPDATE snapshot_tables SET rows=?, last_key=?, done=? WHERE source=? AND qualified=?",
                                 (rows, pickle.dumps(last_key), int(done), source, qualified))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            if events:
                self._bytes += len(data)
                self._count += 1
                if seq is not None and self._memory_bytes + len(data) <= self._memory_limit \
                        and data[:4] not in (_TEXT, _ROWS):  # the drain needs events: these decode from data
                    with self._memory_lock:
                        self._memory[seq] = (list(events), batch_schemas(events, schemas))
                        self._memory_sizes[seq] = len(data)
                        self._memory_bytes += len(data)
        if events:
            with self.changed:
                self.changed.notify_all()
        return len(data)

    def checkpoint(self, source: str) -> Checkpoint | None:
        with self._read_lock:
            row = self._reader.execute("SELECT data, position FROM checkpoints WHERE source=?", (source,)).fetchone()
        return None if row is None else Checkpoint(json.loads(row[0]), int(row[1]))

    def plan_snapshot(self, source: str, start: Checkpoint, tables: list[str], position: int) -> None:
        """Record the stream start and the tables to snapshot, together: a restart resumes both."""
        with self._write_lock:
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(
                    "INSERT INTO checkpoints (source, data, position, updated_at) VALUES (?,?,?,?)"
                    " ON CONFLICT (source) DO UPDATE SET data=excluded.data, position=excluded.position",
                    (source, json.dumps(start.data), str(start.position), time.time()))
                conn.executemany("INSERT OR IGNORE INTO snapshot_tables (source, qualified, position) VALUES (?,?,?)",
                                 [(source, t, str(position)) for t in tables])
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def snapshot_state(self, source: str) -> dict[str, tuple[int, bool, int, Any]]:
        """qualified table -> (position, done, rows read, last key)."""
        with self._read_lock:
            rows = self._reader.execute(
                "SELECT qualified, position, done, rows, last_key FROM snapshot_tables WHERE source=?",
                (source,)).fetchall()
        return {q: (int(p), bool(d), r, pickle.loads(k) if k is not None else None) for q, p, d, r, k in rows}

    # -- drain side ------------------------------------------------------------------------------

    def read(self, limit_events: int, after_seq: int = 0) -> Iterator[SpooledBatch]:
        """Undelivered batches in sequence order, up to about ``limit_events`` events.

        The batches that fit are chosen from their sizes first; only theirs are read. (Reading the next 64
        batches' data and using one of them copied ~30 MB per 5,000-change round through a backlog.)"""
        with self._read_lock:
            heads = self._reader.execute(
                "SELECT seq, source, events, bytes FROM batches WHERE seq > ? ORDER BY seq LIMIT 64",
                (after_seq,)).fetchall()
        chosen = []
        total = 0
        for head in heads:
            if total and total + head[2] > limit_events:
                break
            chosen.append(head)
            total += head[2]
        if not chosen:
            return
        with self._memory_lock:
            in_memory = json.dumps([head[0] for head in chosen if head[0] in self._memory])
        with self._read_lock:  # only appends (higher seqs) and this drain's own deletes change the file meanwhile
            data = dict(self._reader.execute(
                "SELECT seq, CASE WHEN seq IN (SELECT value FROM json_each(?)) THEN NULL ELSE data END"
                " FROM batches WHERE seq BETWEEN ? AND ?", (in_memory, chosen[0][0], chosen[-1][0])).fetchall())
        for seq, source, _count, size in chosen:
            with self._memory_lock:
                cached = self._memory.get(seq)
            if cached is None and data.get(seq) is None:  # left the memory cache meanwhile: read it now
                with self._read_lock:
                    row = self._reader.execute("SELECT data FROM batches WHERE seq = ?", (seq,)).fetchone()
                if row is None:  # deleted meanwhile: what follows would be out of order
                    return
                data[seq] = row[0]
            if cached is not None:
                yield SpooledBatch(seq, source, cached[0], cached[1], size)
            elif data[seq][:4] == _TEXT:
                text = TextBatch(data[seq])
                yield SpooledBatch(seq, source, None, None, size, text_marks(text), text, count=len(text.rows))
            else:
                events, schemas, marks = decode_batch(data[seq])
                yield SpooledBatch(seq, source, events, schemas, size, marks)

    def delete_through(self, seq: int) -> None:
        """The sink has made every batch up to ``seq`` durable.

        Committed without waiting for the disk: a delete lost to a power cut only replays batches the
        sinks apply idempotently, and the next durable append flushes it anyway."""
        with self._write_lock:
            if self._synchronous != "NORMAL":
                self._writer.execute("PRAGMA synchronous=NORMAL")
            try:
                self._writer.execute("DELETE FROM batches WHERE seq <= ?", (seq,))
            finally:
                if self._synchronous != "NORMAL":
                    self._writer.execute(f"PRAGMA synchronous={self._synchronous}")
            with self._memory_lock:
                for done in [s for s in self._memory if s <= seq]:
                    del self._memory[done]
                    self._memory_bytes -= self._memory_sizes.pop(done)
            self._bytes, self._count = self._writer.execute(
                "SELECT COALESCE(SUM(bytes), 0), COUNT(*) FROM batches").fetchone()
        with self.changed:
            self.changed.notify_all()

    def refresh(self) -> None:
        """Re-read size and count from the file: another process (capture or drain) may have changed them."""
        with self._read_lock:
            self._bytes, self._count = self._reader.execute(
                "SELECT COALESCE(SUM(bytes), 0), COUNT(*) FROM batches").fetchone()

    @property
    def size_bytes(self) -> int:
        if self.shared:
            self.refresh()
        return int(self._bytes)

    @property
    def batches(self) -> int:
        if self.shared:
            self.refresh()
        return int(self._count)

    def oldest_spooled_at(self) -> float | None:
        with self._read_lock:
            row = self._reader.execute("SELECT MIN(spooled_at) FROM batches").fetchone()
        return row[0] if row else None

    def wait_below(self, limit_bytes: int, stop: threading.Event, timeout: float = 1.0) -> bool:
        """Block the capture while the spool is over its limit; False when asked to stop."""
        with self.changed:
            while self.size_bytes >= limit_bytes and not stop.is_set():
                self.changed.wait(0.2 if self.shared else timeout)
        return not stop.is_set()

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            self._writer.close()
            self._reader.close()
