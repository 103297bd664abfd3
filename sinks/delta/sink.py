"""`DeltaSink`: position-guarded MERGE into Delta tables (delta-rs), committed on an interval.

Why buffered: each Delta commit writes new Parquet files and a log entry, which costs seconds on
object storage, so `write_batch` only buffers and the sink commits every ``commit_interval_s`` (or when
``max_buffered_rows`` wait). ``capabilities.durable_on_write`` is False: the caller acknowledges only
after `flush` returns. Unflushed changes are lost on a crash and come back by replay; a commit that
landed before the crash but was never acknowledged is replayed too, and the position guards make that
replay change nothing.

Per table, one commit per flush: ``MERGE`` on the key (``_bl_branch`` included with branch keys) with
``t._bl_position < s._bl_position`` on every matched clause. Beside each table, a small Delta table
``<parent>/_bl_meta/<table>`` keeps tombstones (key -> position of a hard delete) and truncate marks
(branch -> position), so replays and late older changes never bring a row back. The sink assumes one
writer per table (Branchline routes each table to one sink instance), so it keeps that side table in
memory after reading it once.

A table without a primary key is kept as a change log: one row per change, merged on
(``_bl_branch``,) ``_bl_position`` so that a replay inserts nothing twice.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pyarrow as pa
from branchline.errors import FatalSinkError, RetryableSinkError, SinkError
from branchline.events import UNCHANGED, ChangeEvent, Json, TableSchema
from branchline.sinks._batch import NetChange, collapse, render, split_at_truncates
from branchline.sinks._retry import retrying
from branchline.sinks.config import DeltaSinkConfig
from branchline.sinks.contract import SinkCapabilities
from branchline.sinks.delta.types import POSITION, UTC_TS, arrow_type, converter
from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError, DeltaError, SchemaMismatchError, TableNotFoundError

log = logging.getLogger("branchline.sinks.delta")

_RETRYABLE_HINTS = (
    "timed out",
    "timeout",
    "connection refused",
    "connection reset",
    "error sending request",
    "tcp connect error",
    "503",
    "500 internal",
    "slowdown",
    "slow down",
    "throttl",
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def map_error(exc: BaseException, table: str) -> SinkError:
    """The one place where delta-rs/object-store errors become Branchline's error tree."""
    if isinstance(exc, SinkError):
        return exc
    full = _ANSI.sub("", str(exc)).strip()
    # delta-rs nests causes one per line ("Generic S3 error / error sending request / Connection refused")
    causes = [line.strip(" ↳") for line in full.splitlines() if line.strip(" ↳")] or [type(exc).__name__]
    text = " / ".join(causes[:1] + causes[-1:]) if len(causes) > 1 else causes[0]
    message = f"writing Delta table `{table}` failed: {text}"
    if isinstance(exc, CommitFailedError):
        return RetryableSinkError(message)  # a concurrent commit won; the batch can be merged again
    if isinstance(exc, SchemaMismatchError):
        return FatalSinkError(message)
    if isinstance(exc, OSError | DeltaError) and any(h in full.lower() for h in _RETRYABLE_HINTS):
        return RetryableSinkError(message)
    return FatalSinkError(message)


@dataclass
class _Target:
    """One Delta table, its buffered changes and its tombstones / truncate marks."""

    uri: str
    meta_uri: str
    schema: TableSchema
    events: list[ChangeEvent] = field(default_factory=list)
    loaded: bool = False
    tombstones: dict[tuple[Any, ...], int] = field(default_factory=dict)
    marks: dict[str, int] = field(default_factory=dict)
    buffered_ids: set[tuple[str, int]] | None = None
    """After a failed flush: (branch, position) of every buffered change, so that the caller's replay
    of the unacknowledged batches does not buffer them twice. None while flushes succeed."""


class DeltaSink:
    """Buffers changes per table and merges them into Delta tables on `flush`."""

    def __init__(self, config: DeltaSinkConfig, name: str = "delta") -> None:
        self.config = config
        self.name = name
        self.capabilities = SinkCapabilities(
            deletes=True,
            soft_deletes=config.soft_delete,
            truncate=True,
            add_columns=True,
            max_identifier_length=255,
            durable_on_write=False,
            commit_interval_s=config.commit_interval_s,
        )
        self._targets: dict[str, _Target] = {}
        self._buffered = 0
        self._last_flush = time.monotonic()
        self._lock = asyncio.Lock()

    # --- Sink protocol ---------------------------------------------------------------------------

    async def write_batch(self, table: TableSchema, events: Sequence[ChangeEvent]) -> None:
        """Buffer one table's changes; commits when the interval has passed or the buffer is full.

        Durable only after a later `flush` returns (``capabilities.durable_on_write`` is False).
        """
        if not events:
            return
        target = self._target(table)
        if target.schema != table:
            if target.events:
                async with self._lock:  # columns may differ: never mix two schemas in one merge
                    await self._flush_target(target)
            target.schema = table
        if target.buffered_ids is not None:  # a flush failed: the caller replays what it had not acknowledged
            seen = target.buffered_ids
            events = [e for e in events if (e.table.branch, e.position) not in seen]
            seen.update((e.table.branch, e.position) for e in events)
        target.events.extend(events)
        self._buffered += len(events)
        due = time.monotonic() - self._last_flush >= self.config.commit_interval_s
        if due or self._buffered >= self.config.max_buffered_rows:
            await self.flush()

    async def flush(self) -> None:
        """Merge every buffered change; when it returns, all of them are committed.

        On failure nothing is lost from the buffer: calling `flush` again commits it, and a caller that
        instead writes its unacknowledged batches again (the runtimes' replay) does not buffer them twice.
        """
        async with self._lock:
            try:
                for target in list(self._targets.values()):
                    if target.events:
                        await self._flush_target(target)
                self._last_flush = time.monotonic()
            finally:
                self._buffered = sum(len(t.events) for t in self._targets.values())

    async def close(self) -> None:
        """Drops unflushed changes (they were never acknowledged and will be replayed)."""
        pending = sum(len(t.events) for t in self._targets.values())
        if pending:
            log.warning("closing %s with %d unflushed changes; they will be replayed", self.name, pending)
        self._targets.clear()
        self._buffered = 0

    # --- internals -------------------------------------------------------------------------------

    def _storage(self, uri: str) -> dict[str, str] | None:
        return self.config.s3.storage_options() if uri.startswith(("s3://", "s3a://")) else None

    def _target(self, table: TableSchema) -> _Target:
        relative = render(self.config.table_path, table.id).strip("/")
        uri = self.config.uri.rstrip("/") + "/" + relative
        target = self._targets.get(uri)
        if target is None:
            parent, _, leaf = uri.rpartition("/")
            target = _Target(uri=uri, meta_uri=f"{parent}/_bl_meta/{leaf}", schema=table)
            self._targets[uri] = target
        return target

    async def _flush_target(self, target: _Target) -> None:
        events = list(target.events)

        async def attempt() -> None:
            try:
                await asyncio.to_thread(self._merge_all, target, events)
            except SinkError:
                raise
            except Exception as exc:
                target.loaded = False  # re-read tombstones and marks: a failed commit may have landed
                raise map_error(exc, target.uri) from exc

        try:
            await retrying(
                attempt,
                what=f"merging {len(events)} changes into {target.uri}",
                max_attempts=self.config.max_attempts,
                backoff_s=self.config.retry_backoff_s,
                max_backoff_s=self.config.retry_max_backoff_s,
                name=self.name,
            )
        except BaseException:
            # keep the buffer (a later flush alone must still commit it), but recognise a replay of it
            if target.buffered_ids is None:
                target.buffered_ids = {(e.table.branch, e.position) for e in target.events}
            raise
        del target.events[: len(events)]
        if not target.events:
            target.buffered_ids = None

    # everything below runs in a worker thread: delta-rs calls block

    def _arrow_schema(self, table: TableSchema, side: bool = False) -> pa.Schema:
        fields: list[pa.Field] = []
        if self.config.branch_key:
            fields.append(pa.field("_bl_branch", pa.string(), nullable=side))
        keys = set(table.primary_key)
        for column in table.columns:
            if side and column.name not in keys:
                continue
            fields.append(pa.field(column.name, arrow_type(column), nullable=side or column.name not in keys))
        fields.append(pa.field("_bl_position", POSITION, nullable=False))
        if side:
            fields.append(pa.field("_bl_truncate", pa.bool_(), nullable=False))
            return pa.schema(fields)
        fields += [
            pa.field("_bl_op", pa.string(), nullable=False),
            pa.field("_bl_source_ts", UTC_TS),
            pa.field("_bl_synced_at", UTC_TS, nullable=False),
        ]
        if self.config.soft_delete:
            fields.append(pa.field("_bl_deleted", pa.bool_(), nullable=False))
        return pa.schema(fields)

    def _open(self, target: _Target) -> DeltaTable:
        """The table, created (with partitioning) on first use."""
        storage = self._storage(target.uri)
        try:
            return DeltaTable(target.uri, storage_options=storage)
        except TableNotFoundError:
            schema = self._arrow_schema(target.schema)
            partition_by = list(self.config.partition_by) or None
            missing = [p for p in self.config.partition_by if p not in schema.names]
            if missing:
                raise FatalSinkError(
                    f"`partition_by` must name columns of {target.schema.id.qualified}; got {missing!r}"
                ) from None
            return DeltaTable.create(
                target.uri, schema=schema, partition_by=partition_by, storage_options=storage
            )

    def _load_meta(self, target: _Target) -> None:
        target.tombstones.clear()
        target.marks.clear()
        try:
            side = DeltaTable(target.meta_uri, storage_options=self._storage(target.meta_uri))
        except TableNotFoundError:
            target.loaded = True
            return
        keys = target.schema.primary_key
        for row in side.to_pyarrow_table().to_pylist():
            branch = row.get("_bl_branch") or "" if self.config.branch_key else ""
            position = int(row["_bl_position"])
            if row["_bl_truncate"]:
                target.marks[branch] = max(position, target.marks.get(branch, -1))
            else:
                slot = (branch, tuple(row[k] for k in keys))
                target.tombstones[slot] = max(position, target.tombstones.get(slot, -1))
        target.loaded = True

    def _merge_all(self, target: _Target, events: list[ChangeEvent]) -> None:
        if not target.loaded:
            self._load_meta(target)
        delta = self._open(target)
        for changes, truncate in split_at_truncates(events):
            net = self._guarded(target, collapse(target.schema, changes, self.config.branch_key))
            if net:
                self._merge(target, delta, net)
            if truncate is not None:
                self._truncate(target, delta, truncate)

    def _guarded(self, target: _Target, net: list[NetChange]) -> list[NetChange]:
        """Drop changes older than a truncate or (upserts) than a tombstone of their key."""
        if not target.marks and not target.tombstones:
            return net
        kept = []
        for change in net:
            branch = change.branch if self.config.branch_key else ""
            if change.position <= target.marks.get(branch, -1):
                continue
            if not change.is_delete and change.position <= target.tombstones.get((branch, change.key), -1):
                continue
            kept.append(change)
        return kept

    def _key_predicate(self, keys: Sequence[str]) -> str:
        return " AND ".join(f't."{k}" = s."{k}"' for k in keys)

    def _merge(self, target: _Target, delta: DeltaTable, net: list[NetChange]) -> None:
        table = target.schema
        keyed = bool(table.primary_key)
        soft = self.config.soft_delete
        branch = ("_bl_branch",) if self.config.branch_key else ()
        if keyed:
            self._prefill(target, delta, net)
        source = self._arrow(table, net)
        existing = delta.schema().to_arrow()
        existing = pa.schema(existing) if not isinstance(existing, pa.Schema) else existing
        new_columns = [f.name for f in source.schema if f.name not in existing.names]
        source = self._cast_to_existing(target, source, existing)
        keys = (*branch, *table.primary_key) if keyed else (*branch, "_bl_position")
        merger = delta.merge(
            source,
            predicate=self._key_predicate(keys),
            source_alias="s",
            target_alias="t",
            merge_schema=bool(new_columns),
        )
        guard = "t._bl_position < s._bl_position"
        if not keyed:
            merger = merger.when_not_matched_insert_all()
        elif soft:
            merger = merger.when_matched_update_all(predicate=guard).when_not_matched_insert_all()
        else:
            merger = (
                merger.when_matched_update_all(predicate=f"{guard} AND s._bl_op <> 'd'")
                .when_matched_delete(predicate=f"{guard} AND s._bl_op = 'd'")
                .when_not_matched_insert_all(predicate="s._bl_op <> 'd'")
            )
        if keyed and not soft:
            deletes = [c for c in net if c.is_delete]
            if deletes:
                self._record(target, deletes)  # tombstones first: they only ever make the guard stronger
        merger.execute()

    def _cast_to_existing(self, target: _Target, source: pa.Table, existing: pa.Schema) -> pa.Table:
        """Write into the table's own column types when the source's narrower type fits (safe casts)."""
        columns = []
        for name in source.schema.names:
            column = source.column(name)
            if name in existing.names and existing.field(name).type != column.type:
                try:
                    column = column.cast(existing.field(name).type, safe=True)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise FatalSinkError(
                        f"`type` of {target.uri}.{name} must hold the source's {column.type}; "
                        f"got {existing.field(name).type} in the table ({exc})"
                    ) from exc
            columns.append(column)
        fields = [
            existing.field(n) if n in existing.names else source.schema.field(n) for n in source.schema.names
        ]
        return pa.Table.from_arrays(columns, schema=pa.schema(fields))

    def _prefill(self, target: _Target, delta: DeltaTable, net: list[NetChange]) -> None:
        """Values the source did not send (unchanged TOAST; what a key-only delete image lacks in
        soft-delete mode) are taken from the stored row."""
        names = [c.name for c in target.schema.columns]
        soft = self.config.soft_delete
        wanting = [
            c
            for c in net
            if any(v is UNCHANGED for v in c.row.values())
            or (soft and c.is_delete and any(n not in c.row for n in names))
        ]
        if not wanting:
            return
        first = target.schema.primary_key[0]
        wanted_keys = {c.key[0] for c in wanting}
        stored: dict[tuple[Any, ...], dict[str, Any]] = {}
        try:
            rows = delta.to_pyarrow_table(filters=[(first, "in", list(wanted_keys))]).to_pylist()
        except Exception:  # noqa: BLE001  (a filter the reader cannot push down: read all; rare path)
            rows = delta.to_pyarrow_table().to_pylist()
        for row in rows:
            branch = row.get("_bl_branch") or "" if self.config.branch_key else ""
            stored[(branch, tuple(row[k] for k in target.schema.primary_key))] = row
        by_name = {c.name: c for c in target.schema.columns}
        for change in wanting:
            branch = change.branch if self.config.branch_key else ""
            old = stored.get((branch, change.key), {})
            filled = dict(change.row)
            for name in names:
                if filled.get(name, UNCHANGED) is UNCHANGED and (
                    name in filled or (soft and change.is_delete)
                ):
                    filled[name] = _from_stored(by_name[name].type.value, old.get(name))
            change.row = filled

    def _arrow(self, table: TableSchema, net: list[NetChange]) -> pa.Table:
        schema = self._arrow_schema(table)
        now = datetime.now(UTC)
        columns: dict[str, list[Any]] = {}
        if self.config.branch_key:
            columns["_bl_branch"] = [c.branch for c in net]
        for column in table.columns:
            name = column.name
            convert = converter(column)
            values = []
            for change in net:
                value = change.row.get(name)
                if value is UNCHANGED:
                    value = None
                if value is not None and convert is not None:
                    try:
                        value = convert(value)
                    except (ValueError, TypeError) as exc:
                        raise FatalSinkError(
                            f"`{table.id.qualified}.{name}` value at key {change.key!r} position "
                            f"{change.position} must match its column type; got {exc}"
                        ) from exc
                values.append(value)
            columns[name] = values
        columns["_bl_position"] = [Decimal(c.position) for c in net]
        columns["_bl_op"] = [c.op.value for c in net]
        columns["_bl_source_ts"] = [_utc(c.source_ts) for c in net]
        columns["_bl_synced_at"] = [now] * len(net)
        if self.config.soft_delete:
            columns["_bl_deleted"] = [c.is_delete for c in net]
        try:
            return pa.Table.from_pydict(columns, schema=schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
            raise FatalSinkError(
                f"`{table.id.qualified}` batch at positions {min(c.position for c in net)}.."
                f"{max(c.position for c in net)} must fit the Delta column types; got {exc}"
            ) from exc

    def _side_table(self, target: _Target) -> DeltaTable:
        storage = self._storage(target.meta_uri)
        try:
            return DeltaTable(target.meta_uri, storage_options=storage)
        except TableNotFoundError:
            schema = self._arrow_schema(target.schema, side=True)
            return DeltaTable.create(target.meta_uri, schema=schema, storage_options=storage)

    def _record(self, target: _Target, deletes: list[NetChange]) -> None:
        """Upsert tombstones for hard deletes (position only moves forward)."""
        side = self._side_table(target)
        schema = self._arrow_schema(target.schema, side=True)
        keys = target.schema.primary_key
        by_name = {c.name: c for c in target.schema.columns}
        columns: dict[str, list[Any]] = {}
        if self.config.branch_key:
            columns["_bl_branch"] = [c.branch for c in deletes]
        for index, name in enumerate(keys):
            convert = converter(by_name[name])
            columns[name] = [convert(c.key[index]) if convert else c.key[index] for c in deletes]
        columns["_bl_position"] = [Decimal(c.position) for c in deletes]
        columns["_bl_truncate"] = [False] * len(deletes)
        source = pa.Table.from_pydict(columns, schema=schema)
        branch = ("_bl_branch",) if self.config.branch_key else ()
        predicate = self._key_predicate((*branch, *keys)) + " AND t._bl_truncate = false"
        (
            side.merge(source, predicate=predicate, source_alias="s", target_alias="t")
            .when_matched_update_all(predicate="t._bl_position < s._bl_position")
            .when_not_matched_insert_all()
            .execute()
        )
        for change in deletes:
            slot = (change.branch if self.config.branch_key else "", change.key)
            target.tombstones[slot] = max(change.position, target.tombstones.get(slot, -1))

    def _truncate(self, target: _Target, delta: DeltaTable, event: ChangeEvent) -> None:
        """Rows older than the truncate go (or are flagged); the mark stops older changes coming back."""
        branch = event.table.branch if self.config.branch_key else ""
        side = self._side_table(target)
        schema = self._arrow_schema(target.schema, side=True)
        row: dict[str, list[Any]] = {name: [None] for name in schema.names}
        if self.config.branch_key:
            row["_bl_branch"] = [branch]
        row["_bl_position"] = [Decimal(event.position)]
        row["_bl_truncate"] = [True]
        side.merge(
            pa.Table.from_pydict(row, schema=schema),
            predicate="t._bl_truncate = true"
            + (" AND t._bl_branch = s._bl_branch" if self.config.branch_key else ""),
            source_alias="s",
            target_alias="t",
        ).when_matched_update_all(
            predicate="t._bl_position < s._bl_position"
        ).when_not_matched_insert_all().execute()
        target.marks[branch] = max(event.position, target.marks.get(branch, -1))
        condition = f"_bl_position < {event.position}"
        if self.config.branch_key:
            condition += " AND _bl_branch = '" + branch.replace("'", "''") + "'"
        if self.config.soft_delete:
            updates = {
                "_bl_deleted": "true",
                "_bl_op": "'t'",
                "_bl_synced_at": f"arrow_cast('{datetime.now(UTC).isoformat()}', 'Timestamp(Microsecond, Some(\"UTC\"))')",
            }
            if target.schema.primary_key:
                updates["_bl_position"] = f"arrow_cast({event.position}, 'Decimal128(38, 0)')"
            delta.update(updates=updates, predicate=condition)
        else:
            delta.delete(condition)


def _utc(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _from_stored(kind: str, value: Any) -> Any:
    """A stored Delta value back as the event value the converters expect."""
    if value is None:
        return None
    if kind == "json":
        return Json(orjson.loads(value))
    if kind in ("time", "interval"):
        return timedelta(microseconds=value)
    return value
