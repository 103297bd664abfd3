"""The runner's text path: PostgreSQL row changes from the spool into a text-format COPY, undecoded.

Why: the walsender sends every value in PostgreSQL's text form, and a PostgreSQL target reads that same
form in ``COPY ... FROM STDIN``. The event path decodes each value into Python (Decimal, datetime) and the
sink encodes it again into COPY's binary format: on `branchline bench embedded` that round trip was most
of the runner's CPU per row, and the runner is one process. Here the runner collapses a table's rows on
the text of their key columns (the last change of a key wins, as `branchline.streams.dedupe.collapse`)
and writes the COPY text itself; the sink runs the same guarded statements on it (`PostgresSink.write_text`).

Only what gives the same target rows as the event path takes it (`tests/integration/test_text_path.py`
compares the two row by row):
- columns of the types in `SAFE_OIDS` with values the event path's decoder reads the same way (`_CHECKS`:
  a value it would reject, like ``infinity`` or a BC date, sends the table down the event path, which
  names it);
- keyed tables that no transform touches, and no heartbeat table;
- whole row images: an unchanged TOAST value, a changed primary key or a truncate sends the table's
  rows of the round down the event path.
Anything else takes the event path, a table at a time and in order, so nothing is lost or reordered.
"""

from __future__ import annotations

import marshal
import pickle
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import repeat
from operator import itemgetter, le
from typing import Any, NamedTuple

from branchline.events import ChangeEvent, Op, TableId, TableSchema
from branchline.streams._construct import new_event

_OPS = {op.value: op for op in Op}
_OP_CODE = {"I": "c", "U": "u", "D": "d"}
_OP_OF = {"I": Op.CREATE, "U": Op.UPDATE, "D": Op.DELETE}

_FIVE_DIGIT_YEAR = re.compile("\n[0-9]{5}")


def _plain_number(joined: str) -> bool:
    """numeric, double precision: NaN and (-)Infinity take the event path (PostgreSQL prints no other letter)."""
    return "N" not in joined and "I" not in joined


def _plain_time(joined: str) -> bool:
    """date, timestamp, timestamptz: ``infinity``, BC dates and years past 9999 are values the event path's
    decoder (`datetime.fromisoformat`) rejects, naming them; they take that path."""
    return ("i" not in joined and "B" not in joined and not joined[:5].isdigit()
            and _FIVE_DIGIT_YEAR.search(joined) is None)


_CHECKS: dict[int, Callable[[str], bool] | None] = {
    16: None, 20: None, 21: None, 23: None,  # boolean, bigint, smallint, integer: always plain
    25: None, 1042: None, 1043: None,  # text, char(n), varchar(n): any text (escaped for COPY)
    1700: _plain_number, 701: _plain_number,  # numeric, double precision
    1082: _plain_time, 1114: _plain_time, 1184: _plain_time,  # date, timestamp, timestamptz
    2950: None,  # uuid: always the canonical form
}
"""Type OID -> a check of its values (joined by newlines) before they take the text path: the target parses
each type's text into exactly the value the event path's decoder makes and the sink writes, given the
formats `pgoutput.SESSION_GUCS` fixes on the walsender's session (UTC, ISO dates, shortest exact floats)."""
SAFE_OIDS = frozenset(_CHECKS)
KEY_OIDS = frozenset({16, 20, 21, 23, 25, 1042, 1043, 1082, 1114, 1184, 2950})
"""Types a primary key column may have on the text path: one text per value, so equal texts are equal keys
(``1.0`` and ``1.00`` are one numeric key, two texts)."""


class WrittenMark(NamedTuple):
    """What `metrics.observe_batch_written` reads of each written change."""

    op: Op
    source_ts: datetime | None
    snapshot: bool = False


def _stamp_text(stamp: datetime | None) -> str:
    """A commit time as COPY text for ``_bl_source_ts`` (timestamptz); a naive one is UTC, as in the sink."""
    if stamp is None:
        return "\\N"
    return (stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=UTC)).isoformat()


class TextBatch:
    """A spooled batch of `TextRow` rows, read back but not decoded (`branchline.runtime.spool`)."""

    __slots__ = ("others", "relations", "rows", "stamps", "tables")

    def __init__(self, data: bytes) -> None:
        size = int.from_bytes(data[4:8], "big")
        self.tables: list[TableSchema]
        self.relations: list[tuple[int, tuple[tuple[str, int, int], ...]]]
        """(table slot, each column's (name, type OID, typmod)) per relation slot."""
        self.tables, self.relations, self.stamps, self.others = pickle.loads(data[8:8 + size])
        self.rows: list[tuple[Any, ...]] = marshal.loads(data[8 + size:])
        """(kind, relation slot, position, stamp slot, txid, old, new, old is key) per row, or ("E", index into
        ``others``, position) for an event spooled whole (a truncate)."""

    def events(self, rows: list[tuple[Any, ...]] | None = None) -> list[ChangeEvent]:
        """The events of ``rows`` (default: all of the batch's), as `PostgresReader.stream` makes them."""
        from branchline.connectors.embedded.pgoutput import text_decoders
        from branchline.connectors.embedded.postgres import text_row_events

        specs = []
        for table_slot, columns in self.relations:
            decoders = _decoders.get(columns)
            if decoders is None:
                decoders = _decoders[columns] = text_decoders(columns)
            specs.append((tuple(c[0] for c in columns), decoders, self.tables[table_slot]))
        ids = [t.id for t in self.tables]
        whole = [new_event({"op": _OPS[op], "table": ids[slot], "key": key, "before": before, "after": after,
                            "position": position, "source_ts": ts, "txid": txid, "snapshot": snap})
                 for op, slot, key, before, after, position, ts, txid, snap in self.others]
        return text_row_events(self.rows if rows is None else rows, specs, self.stamps, whole)

    def schemas(self) -> dict[TableId, TableSchema]:
        return {t.id: t for t in self.tables}


_decoders: dict[tuple[tuple[str, int, int], ...], tuple[Any, ...]] = {}
"""Relation columns -> their decoders: built once per relation, not per batch."""


@dataclass
class _Chunk:
    """One spooled batch's rows of one table (one relation: one column layout)."""

    batch: TextBatch
    relation: int
    rows: list[tuple[Any, ...]] = field(default_factory=list)


@dataclass
class TextSegment:
    """One table's collapsed changes of a round, as the rows of a text COPY (what `PostgresSink.write_text`
    writes). ``body``: one line per change, in the sink's column order (the schema's columns, then
    ``_bl_position``, ``_bl_op``, ``_bl_source_ts``), escaped for COPY; the sink adds ``_bl_branch`` and
    ``_bl_unchanged`` where its layout has them."""

    schema: TableSchema
    body: str
    count: int
    deletes: int
    min_position: int
    inserts_only: bool
    marks: list[WrittenMark]
    keys: list[tuple[str | None, ...]]
    positions: list[int]
    chunks: list[_Chunk]
    """The rows it came from, uncollapsed: `events` rebuilds the event path's input from them."""

    @property
    def table(self) -> TableId:
        return self.schema.id

    @property
    def rows(self) -> int:
        """The row changes it came from, before the collapse."""
        return sum(len(chunk.rows) for chunk in self.chunks)

    def describe(self, line: int) -> str:
        """Line ``line`` (1-based) of the COPY, as an error message names it: key and position."""
        if not 1 <= line <= len(self.keys):
            return ""
        pairs = ", ".join(f"{k}={v!r}" for k, v in zip(self.schema.primary_key, self.keys[line - 1], strict=False))
        return f"key ({pairs}) at position {self.positions[line - 1]}"

    def events(self) -> list[ChangeEvent]:
        """The table's events of the round, uncollapsed: for the event path, when a sink cannot take text."""
        events: list[ChangeEvent] = []
        for chunk in self.chunks:
            events.extend(chunk.batch.events(chunk.rows))
        return events


@dataclass
class TextRound:
    """A round of spooled batches split between the two paths."""

    segments: list[TextSegment]
    """Tables whose changes take the text path, one segment per table (and column layout)."""
    events: list[tuple[ChangeEvent, TableSchema]]
    """Every other change, decoded, with its schema, in spool order: the event path's input."""


def split_round(batches: Sequence[Any], accepts: Callable[[TableSchema], bool]) -> TextRound:
    """Split one drain round: rows of `TextBatch` batches whose table `accepts` (keyed, no transform, not a
    heartbeat) and whose columns are all of `SAFE_OIDS` become `TextSegment` objects; everything else, and
    every table that also has events in the round (a snapshot batch, a truncate), stays events.

    ``batches``: `SpooledBatch` objects in spool order (``text`` set for a `TextBatch`, else ``events`` and
    ``schemas``)."""
    refused: set[TableId] = set()
    """Tables that stay events: with events in the round, or a relation the text path does not take."""
    for batch in batches:
        text = batch.text
        if text is None:
            refused.update(batch.schemas)
            continue
        refused.update(text.tables[other[1]].id for other in text.others)
        for table_slot, columns in text.relations:
            schema = text.tables[table_slot]
            key = set(schema.primary_key)
            if not (key and all(c[1] in SAFE_OIDS and (c[0] not in key or c[1] in KEY_OIDS) for c in columns)
                    and accepts(schema)):
                refused.add(schema.id)
    chunks: dict[TableId, list[_Chunk]] = {}
    events: list[tuple[ChangeEvent, TableSchema]] = []
    for batch in batches:
        text = batch.text
        if text is None:
            events.extend(_paired(batch.events, batch.schemas))
            continue
        taken = [text.tables[table_slot].id not in refused for table_slot, _ in text.relations]
        rest: list[tuple[Any, ...]] = []
        last_slot, last_chunk = None, None
        for row in text.rows:
            slot = row[1]
            if row[0] == "E" or not taken[slot]:
                rest.append(row)
                continue
            if slot != last_slot:
                last_slot = slot
                table = text.tables[text.relations[slot][0]].id
                table_chunks = chunks.setdefault(table, [])
                if not table_chunks or table_chunks[-1].batch is not text or table_chunks[-1].relation != slot:
                    table_chunks.append(_Chunk(text, slot))
                last_chunk = table_chunks[-1]
            last_chunk.rows.append(row)
        if rest:
            events.extend(_paired(text.events(rest), text.schemas()))
    segments: list[TextSegment] = []
    for table_chunks in chunks.values():
        built = _segments(table_chunks)
        if built is None:  # a row the text path does not take: the table's rows go the event path
            for chunk in table_chunks:
                events.extend(_paired(chunk.batch.events(chunk.rows), chunk.batch.schemas()))
        else:
            segments.extend(built)
    return TextRound(segments, events)


def _paired(events: list[ChangeEvent], schemas: dict[TableId, TableSchema]) -> list[tuple[ChangeEvent, TableSchema]]:
    """Each event with its table's schema. A run of one table's events shares its `TableId` object: one
    lookup per run (a `TableId` hashes through pydantic's Python hash function)."""
    if len(schemas) == 1:
        return list(zip(events, repeat(next(iter(schemas.values())))))
    pairs = []
    last, schema = None, None
    for event in events:
        if event.table is not last:
            last = event.table
            schema = schemas[last]
        pairs.append((event, schema))
    return pairs


def _segments(chunks: list[_Chunk]) -> list[TextSegment] | None:
    """One table's chunks -> segments, a new one where the column layout or schema changes; None when a
    row needs the event path."""
    segments: list[TextSegment] = []
    start = 0
    for index in range(1, len(chunks) + 1):
        if index == len(chunks) or _layout(chunks[index]) != _layout(chunks[start]):
            segment = _segment(chunks[start:index])
            if segment is None:
                return None
            segments.append(segment)
            start = index
    return segments


def _layout(chunk: _Chunk) -> tuple[Any, ...]:
    table_slot, columns = chunk.batch.relations[chunk.relation]
    return columns, chunk.batch.tables[table_slot]


def _segment(chunks: list[_Chunk]) -> TextSegment | None:
    """Collapse one table's rows (one layout) per key and write them as COPY text; None if one cannot be."""
    first = chunks[0].batch
    table_slot, columns = first.relations[chunks[0].relation]
    schema = first.tables[table_slot]
    index_of = {c[0]: i for i, c in enumerate(columns)}
    names = [c.name for c in schema.columns]
    if set(names) != set(index_of) or len(names) != len(index_of):
        return None  # the relation and the schema disagree (a DDL in flight): the event path sorts it out
    rows: list[tuple[Any, ...]] = []
    stamps: list[datetime | None] = []
    for chunk in chunks:
        rows.extend(chunk.rows)
        stamps.extend(map(chunk.batch.stamps.__getitem__, map(_stamp_slot, chunk.rows)))
    positions = list(map(_position, rows))
    if not all(map(le, positions, positions[1:])):  # collapse in position order, as the event path does
        order = sorted(range(len(rows)), key=positions.__getitem__)
        rows = [rows[i] for i in order]
        stamps = [stamps[i] for i in order]
    kinds = list(map(_kind, rows))
    images = [row[5] if row[0] == "D" else row[6] for row in rows] if "D" in kinds else list(map(_new, rows))
    if None in images:
        return None
    key_at = itemgetter(*[index_of[k] for k in schema.primary_key])
    single = len(schema.primary_key) == 1
    keys = list(map(key_at, images))
    olds = list(map(_old, rows))
    if olds.count(None) != len(olds) and any(
            kind == "U" and old is not None and key_at(old) != key for kind, old, key in zip(kinds, olds, keys)):
        return None  # a changed primary key: the event path makes it a delete and a create
    last = dict(zip(keys, range(len(rows))))
    """Each key's last change: later indexes overwrite earlier ones (C loops, no Python per row)."""
    if len(last) == len(rows):
        picked: Sequence[int] = range(len(rows))
        kept = rows
    else:
        picked = sorted(last.values())  # in the order of each key's last change, as the event path's net
        kept = [rows[i] for i in picked]
        images = [images[i] for i in picked]
        keys = [keys[i] for i in picked]
    values = list(zip(*images)) if images else []
    raw: list[Sequence[str | None]] = []
    """Each COPY column's values, None for NULL."""
    text_columns: list[Sequence[str]] = []
    """The same with NULL as ``\\N``."""
    nulls = 0
    for name in names:
        i = index_of[name]
        column = values[i]
        if ... in column:
            return None  # an unchanged TOAST value: only the staging path of events keeps the stored one
        raw.append(column)
        present = column
        if None in column:
            nulls += column.count(None)
            present = [v for v in column if v is not None]
            column = ["\\N" if v is None else v for v in column]
        check = _CHECKS[columns[i][1]]
        if check is not None and present and not check("\n".join(present)):
            return None  # a value the event path's decoder rejects or reads differently (NaN, infinity, BC)
        text_columns.append(column)
    stamp_texts = {key: _stamp_text(s) for key, s in dict(zip(map(id, stamps), stamps)).items()}
    kept_stamps = [stamps[i] for i in picked]
    ops = list(map(_kind, kept))
    kept_positions = list(map(_position, kept))
    bookkeeping = (list(map(str, kept_positions)), list(map(_OP_CODE.__getitem__, ops)),
                   [stamp_texts[id(s)] for s in kept_stamps])
    text_columns.extend(bookkeeping)
    lines = list(map("\t".join, zip(*text_columns)))
    body = "\n".join(lines) + "\n" if lines else ""
    width = len(text_columns)
    if (body.count("\t") != len(lines) * (width - 1) or body.count("\n") != len(lines)
            or body.count("\\") != nulls or "\r" in body):
        body = _escaped([*raw, *bookkeeping])  # a value holds a tab, newline or backslash
    # tuple.__new__ builds each mark in C: the NamedTuple's own __new__ is a Python frame per change
    marks = list(map(tuple.__new__, repeat(WrittenMark),
                     zip(map(_OP_OF.__getitem__, ops), kept_stamps, repeat(False))))
    if single:
        keys = [(key,) for key in keys]
    return TextSegment(schema, body, len(kept), ops.count("D"), min(kept_positions), ops.count("I") == len(ops),
                       marks, keys, kept_positions, chunks)


def _escaped(columns: list[Sequence[str | None]]) -> str:
    """The COPY text of ``columns`` with backslash, tab, newline and carriage return escaped and NULL as
    ``\\N`` (the slow path of `_segment`, for values that hold them)."""

    def escape(value: str | None) -> str:
        if value is None:
            return "\\N"
        return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")

    return "".join("\t".join(map(escape, line)) + "\n" for line in zip(*columns))


_kind = itemgetter(0)
_position = itemgetter(2)
_stamp_slot = itemgetter(3)
_old = itemgetter(5)
_new = itemgetter(6)
