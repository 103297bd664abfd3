"""Deduplication on primary keys, in two layers, both pure.

1. `collapse`: inside one batch, keep the last change per (table, key) by source position, so that a
   set-based upsert never sees a key twice. A delete replaces a pending upsert; a truncate or a
   schema change ends the segment. Ordering is by position, never by arrival, so any interleaving of
   the same changes collapses to the same segments.
2. `AppliedPositions`: across batches and restarts, the last applied position per (source, table, key)
   in a mapping (a Faust table in the worker): a redelivered or older change is dropped and counted.

Both are correct only when every change of one key reaches the same partition (the worker checks
the topics' keys at start-up); positions order changes within one source only.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from branchline.events import (
    OP_CREATE,
    OP_READ,
    OP_TRUNCATE,
    OP_UPDATE,
    UNCHANGED,
    ChangeEvent,
    TableId,
    TableSchema,
)

_UPSERTS = (OP_CREATE, OP_UPDATE, OP_READ)
_UNCHANGED_ID = id(UNCHANGED)


@dataclass(slots=True)
class Segment:
    """Changes of one table that one `Sink.write_batch` call may take: at most one per key, in
    position order, one schema; or a truncate alone."""

    schema: TableSchema
    events: list[ChangeEvent] = field(default_factory=list)

    @property
    def table(self) -> TableId:
        return self.schema.id

    @property
    def is_truncate(self) -> bool:
        return len(self.events) == 1 and self.events[0].op is OP_TRUNCATE


def key_token(event: ChangeEvent) -> Any:
    """A hashable token for the event's key (lists and dicts of a keyless table made hashable)."""
    values = tuple(event.key.values())
    try:
        hash(values)
    except TypeError:
        return orjson.dumps(list(values), default=repr, option=orjson.OPT_PASSTHROUGH_DATETIME)
    return values


def _merge_unchanged(newer: ChangeEvent, older: ChangeEvent) -> ChangeEvent:
    """Fill `UNCHANGED` values of a newer update from the pending older upsert it replaces, so that
    collapsing never forgets a value the older change wrote (PostgreSQL TOAST)."""
    after = newer.after
    if after is None or older.op not in _UPSERTS or older.after is None:
        return newer
    if _UNCHANGED_ID not in map(id, after.values()):  # by identity, in C: the common case, nothing to fill
        return newer
    missing = [name for name, value in after.items() if value is UNCHANGED]
    if not missing:
        return newer
    merged = dict(after)
    for name in missing:
        merged[name] = older.after.get(name, UNCHANGED)
    return newer.model_copy(update={"after": merged})


def _by_table(changes: Iterable[tuple[ChangeEvent, TableSchema]]) -> dict[TableId, list[tuple[ChangeEvent, TableSchema]]]:
    """The changes of each table, in arrival order."""
    per_table: dict[TableId, list[tuple[ChangeEvent, TableSchema]]] = {}
    by_id: dict[int, list[tuple[ChangeEvent, TableSchema]]] = {}
    for pair in changes:
        table = pair[0].table
        bucket = by_id.get(id(table))  # hashing a TableId (pydantic, five fields) once per object, not per event
        if bucket is None:
            bucket = per_table.get(table)
            if bucket is None:
                per_table[table] = bucket = []
            by_id[id(table)] = bucket
        bucket.append(pair)
    return per_table


def collapse(changes: Iterable[tuple[ChangeEvent, TableSchema]]) -> list[Segment]:
    """Collapse one batch to segments (see module doc). Segments of one table come out in position
    order and must be written in that order; segments of different tables are independent."""
    per_table = _by_table(changes)
    segments: list[Segment] = []
    for bucket in per_table.values():
        # sort indexes by a list of positions: a C-level key (list.__getitem__) instead of a Python
        # function call per change
        positions = [pair[0].position for pair in bucket]
        order = sorted(range(len(bucket)), key=positions.__getitem__)
        pending: dict[Any, ChangeEvent] = {}
        schema: TableSchema | None = None
        for index in order:
            event, event_schema = bucket[index]
            fields = event.__dict__  # one attribute lookup (a pydantic model's cost ~70 ns each), then dict reads
            op = fields["op"]
            if op is OP_TRUNCATE:
                if pending and schema is not None:
                    segments.append(Segment(schema, list(pending.values())))
                pending = {}
                segments.append(Segment(event_schema, [event]))
                schema = event_schema
                continue
            if schema is not None and event_schema is not schema and event_schema != schema:
                if pending:
                    segments.append(Segment(schema, list(pending.values())))
                pending = {}
            schema = event_schema
            token = tuple(fields["key"].values())
            try:
                older = pending.pop(token, None)
            except TypeError:  # a list or dict in the key (a keyless table's row)
                token = key_token(event)
                older = pending.pop(token, None)
            if older is not None and op is OP_UPDATE:
                event = _merge_unchanged(event, older)
            pending[token] = event  # popped and re-added: the dict stays in position order
        if pending and schema is not None:
            segments.append(Segment(schema, list(pending.values())))
    return segments



def _close(segments: list[Segment], schema: TableSchema | None, pending: dict[str, ChangeEvent],
           names: dict[int, str]) -> None:
    """End a segment of `AppliedPositions.dedupe`: its events, and their store keys for `record`."""
    if pending and schema is not None:
        segments.append(Segment(schema, list(pending.values())))
        names.update(zip(map(id, pending.values()), pending.keys()))


# -- across batches ---------------------------------------------------------------------------------

_TRUNCATE_KEY = "*truncate*"


def _table_prefix(table: TableId) -> str:
    return orjson.dumps([table.source, table.branch, table.qualified]).decode()[:-1]


def guard_key(table: TableId, key: dict[str, Any] | None) -> str:
    """The store key of one row: (source, branch, table, primary key values) as compact JSON.

    A string, so that a store persisted as JSON (the Faust table's changelog) gives back equal keys."""
    return _table_prefix(table) + "," + _key_json(key) + "]"


def _key_json(key: dict[str, Any] | None) -> str:
    if key is None:
        return '"' + _TRUNCATE_KEY + '"'
    if len(key) == 1:
        (value,) = key.values()
        if value.__class__ is int:  # the common key, written as orjson writes it (not bool: a subclass)
            return f"[{value}]"
    return orjson.dumps(list(key.values()), default=str).decode()


@dataclass(slots=True)
class GuardStats:
    """What the guard did with one batch."""

    admitted: int = 0
    dropped: int = 0
    """Redelivered or older changes that were not applied."""
    dropped_tables: dict[TableId, int] = field(default_factory=dict)
    """`dropped` per table (for the duplicates metric)."""

    def drop(self, table: TableId) -> None:
        self.dropped += 1
        self.dropped_tables[table] = self.dropped_tables.get(table, 0) + 1


class AppliedPositions:
    """Last applied position per (source, table, key) over any mutable mapping.

    `admit` before writing drops what is not newer than what was applied; `record` after the sink
    made the batch durable stores the new positions. A truncate is stored per table: a change older
    than an applied truncate is dropped even if it arrives later from another partition.
    """

    def __init__(self, store: MutableMapping[str, int]) -> None:
        self.store = store
        self._prefixes: dict[int, tuple[TableId, str]] = {}
        self._names: dict[int, str] = {}
        """Store keys that `admit` or `dedupe` computed, for `record`, by event identity: building a
        key is most of the guard's cost. Only ids of events in `_held` are in it, so an id found there is the
        same live event (ids of live objects are unique)."""
        self._held: list[Any] = []

    def _prefix(self, table: TableId) -> str:
        cached = self._prefixes.get(id(table))
        if cached is None or cached[0] is not table:
            cached = (table, _table_prefix(table) + ",")
            if len(self._prefixes) > 10_000:
                self._prefixes.clear()
            self._prefixes[id(table)] = cached
        return cached[1]

    def _key(self, table: TableId, key: dict[str, Any] | None) -> str:
        return self._prefix(table) + _key_json(key) + "]"

    def applied(self, table: TableId, key: dict[str, Any] | None) -> int | None:
        return self.store.get(self._key(table, key))

    def admit(self, changes: Sequence[tuple[ChangeEvent, TableSchema]],
              stats: GuardStats | None = None) -> list[tuple[ChangeEvent, TableSchema]]:
        """The changes newer than the last applied change of their key and their table's last truncate."""
        stats = stats if stats is not None else GuardStats()
        kept: list[tuple[ChangeEvent, TableSchema]] = []
        truncated: dict[int, tuple[TableId, int | None, str]] = {}
        get = self.store.get
        names = self._names
        names.clear()
        self._held = kept
        for pair in changes:
            event = pair[0]
            fields = event.__dict__  # one attribute lookup (a pydantic model's cost ~70 ns each), then dict reads
            table = fields["table"]
            floor_of = truncated.get(id(table))
            if floor_of is None or floor_of[0] is not table:
                # (table, its last truncate, its key prefix): per table, not per change
                floor_of = truncated[id(table)] = (table, get(self._key(table, None)), self._prefix(table))
            floor = floor_of[1]
            position = fields["position"]
            if floor is not None and position <= floor:
                stats.drop(table)
                continue
            if fields["op"] is not OP_TRUNCATE:
                key = fields["key"]
                if len(key) == 1 and (value := next(iter(key.values()))).__class__ is int:
                    name = f"{floor_of[2]}[{value}]]"  # the common key, inline: as `_key_json` writes it
                else:
                    name = floor_of[2] + _key_json(key) + "]"
                last = get(name)
                if last is not None and position <= last:
                    stats.drop(table)
                    continue
                names[id(event)] = name
            kept.append(pair)
        stats.admitted += len(kept)
        return kept

    def dedupe(self, changes: Iterable[tuple[ChangeEvent, TableSchema]],
               stats: GuardStats | None = None) -> list[Segment]:
        """``collapse(self.admit(changes))`` in one pass over each table's changes in position order.

        Why: each change's store key is built once and serves as its collapse token too, and each
        change is read once: admit and collapse were a fifth of the streams stages' instructions, and
        one pass saves about 4,000 per event. A unit test checks that both give the same segments."""
        stats = stats if stats is not None else GuardStats()
        get = self.store.get
        names = self._names
        names.clear()
        segments: list[Segment] = []
        self._held = segments  # keeps every event whose id is in `names` alive until the next call
        total, dropped_before = 0, stats.dropped
        for table, bucket in _by_table(changes).items():
            total += len(bucket)
            floor = get(self._key(table, None))
            prefix = self._prefix(table)
            positions = [pair[0].position for pair in bucket]
            pending: dict[str, ChangeEvent] = {}
            schema: TableSchema | None = None
            for index in sorted(range(len(bucket)), key=positions.__getitem__):
                event, event_schema = bucket[index]
                position = positions[index]
                if floor is not None and position <= floor:
                    stats.drop(table)
                    continue
                fields = event.__dict__  # one attribute lookup (a pydantic model's cost ~70 ns each), then dict reads
                op = fields["op"]
                if op is OP_TRUNCATE:
                    _close(segments, schema, pending, names)
                    pending = {}
                    segments.append(Segment(event_schema, [event]))
                    schema = event_schema
                    continue
                if schema is not None and event_schema is not schema and event_schema != schema:
                    _close(segments, schema, pending, names)
                    pending = {}
                schema = event_schema
                key = fields["key"]
                if len(key) == 1 and (value := next(iter(key.values()))).__class__ is int:
                    name = f"{prefix}[{value}]]"  # the common key, inline: as `_key_json` writes it
                else:
                    name = prefix + _key_json(key) + "]"
                last = get(name)
                if last is not None and position <= last:
                    stats.drop(table)
                    continue
                older = pending.pop(name, None)
                if older is not None and op is OP_UPDATE:
                    event = _merge_unchanged(event, older)
                pending[name] = event  # popped and re-added: the dict stays in position order
            _close(segments, schema, pending, names)
        stats.admitted += total - (stats.dropped - dropped_before)
        return segments

    def record(self, segments: Iterable[Segment]) -> None:
        """Store the positions of a batch the sink has made durable."""
        store = self.store
        names = self._names
        for segment in segments:
            for event in segment.events:
                name = names.get(id(event))
                if name is None:
                    name = self._key(event.table, None if event.op is OP_TRUNCATE else event.key)
                last = store.get(name)
                position = event.position
                if last is None or position > last:
                    store[name] = position
        if segments is self._held:  # the last batch `dedupe` made is recorded: let its events go
            names.clear()
            self._held = []
