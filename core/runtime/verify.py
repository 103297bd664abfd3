"""Compare a source table with its target table by primary key, in chunks.

Per chunk of source keys (keyset order), both sides are read and turned into canonical values
(the same normalisation the embedded readers apply, so a MariaDB FLOAT and a PostgreSQL ``real``
compare equal); counts and an order-independent digest are compared first, and only a chunk whose
digest differs is diffed row by row. Keys that sort differently on the two engines (string keys
under different collations) land in different chunks; they are reconciled at the end, so they are
never reported as missing and extra at once.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import psycopg
from branchline.connectors.embedded.mariadb import float32
from branchline.connectors.embedded.reader import EmbeddedReader
from branchline.errors import ConfigError, FatalSinkError
from branchline.events import UNCHANGED, ColumnType, Json, TableSchema
from branchline.sinks.config import PostgresSinkConfig
from psycopg import sql

_MASK = (1 << 64) - 1


def canonical(value: Any, kind: ColumnType) -> Any:
    """A value as both sides can agree on it (hashable)."""
    if value is None or value is UNCHANGED:
        return value
    if isinstance(value, Json):
        value = value.value
    if kind is ColumnType.FLOAT32 and isinstance(value, float):
        return float32(value)
    if kind is ColumnType.JSON:
        return _freeze(value)
    if isinstance(value, (list, tuple, set)):
        return tuple(canonical(v, ColumnType.STRING) for v in value)
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, time):
        return timedelta(hours=value.hour, minutes=value.minute, seconds=value.second,
                         microseconds=value.microsecond)
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC)
    if isinstance(value, Decimal) and kind in (ColumnType.INT64, ColumnType.UINT64, ColumnType.INT32):
        return int(value)
    if isinstance(value, bool) and kind is not ColumnType.BOOLEAN:
        return int(value)
    return value


def _freeze(value: Any) -> Any:
    """JSON -> hashable: dicts as sorted item tuples, lists as tuples, numbers exact."""
    if isinstance(value, dict):
        return ("{}", tuple(sorted((k, _freeze(v)) for k, v in value.items())))
    if isinstance(value, list):
        return ("[]", tuple(_freeze(v) for v in value))
    if isinstance(value, float) and value.is_integer():
        return Decimal(int(value))
    if isinstance(value, float):
        return Decimal(repr(value))
    return value


@dataclass
class Difference:
    kind: str  # "missing" (in source, not in target), "extra" (in target only), "different"
    key: dict[str, Any]
    columns: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    """column -> (source value, target value), for "different"."""

    def describe(self) -> str:
        key = ", ".join(f"{k}={v!r}" for k, v in self.key.items())
        if self.kind != "different":
            return f"{self.kind:9} {key}"
        cols = "; ".join(f"{c}: source={s!r} target={t!r}" for c, (s, t) in self.columns.items())
        return f"different {key}: {cols}"


@dataclass
class TableReport:
    qualified: str
    target: str
    source_rows: int = 0
    target_rows: int = 0
    chunks: int = 0
    chunks_differing: int = 0
    differences: list[Difference] = field(default_factory=list)
    """The first differences found (up to the verifier's limit)."""
    difference_count: int = 0
    skipped: str | None = None

    @property
    def identical(self) -> bool:
        return self.skipped is None and self.difference_count == 0


@dataclass(frozen=True)
class TargetTable:
    """Where and how a source table lands in a PostgreSQL sink."""

    schema: str
    name: str
    columns: dict[str, str]
    """source column -> target column (compared columns only)."""
    branch: str | None
    """`_bl_branch` value to filter on when the sink uses branch keys."""
    soft_delete: bool


def _digest(rows: dict[tuple[Any, ...], tuple[Any, ...]]) -> tuple[int, int]:
    total = 0
    for key, row in rows.items():
        total = (total + hash((key, row))) & _MASK
    return len(rows), total


class TableVerifier:
    """Compares one source table with its target table."""

    def __init__(self, reader: EmbeddedReader, schema: TableSchema, target: TargetTable,
                 target_conn: psycopg.Connection[Any], chunk_rows: int, max_differences: int = 1000) -> None:
        self.reader = reader
        self.schema = schema
        self.target = target
        self.conn = target_conn
        self.chunk_rows = chunk_rows
        self.max_differences = max_differences
        self.pk = list(schema.primary_key)
        self.compared = [c for c in schema.columns if c.name in target.columns]
        self.kinds = {c.name: c.type for c in schema.columns}

    def _source_chunks(self) -> Iterator[tuple[dict[tuple[Any, ...], tuple[Any, ...]], tuple[Any, ...] | None]]:
        pk, compared = self.pk, self.compared
        for events, _last in self.reader.snapshot(self.schema, 0, self.chunk_rows):
            rows = {}
            last_key: tuple[Any, ...] | None = None
            for event in events:
                row = event.after or {}
                key = tuple(canonical(row[k], self.kinds[k]) for k in pk)
                rows[key] = tuple(canonical(row.get(c.name), c.type) for c in compared)
                last_key = tuple(row[k] for k in pk)
            yield rows, last_key

    def _target_rows(self, lower: tuple[Any, ...] | None, upper: tuple[Any, ...] | None
                     ) -> dict[tuple[Any, ...], tuple[Any, ...]]:
        t = self.target
        pk_target = [sql.Identifier(t.columns.get(k, k)) for k in self.pk]
        key_list = sql.SQL(", ").join(pk_target)
        conditions: list[sql.Composable] = []
        args: list[Any] = []
        if t.branch is not None:
            conditions.append(sql.SQL("_bl_branch = %s"))
            args.append(t.branch)
        if t.soft_delete:
            conditions.append(sql.SQL("NOT _bl_deleted"))
        if lower is not None:
            conditions.append(sql.SQL("({}) > ({})").format(key_list, sql.SQL(", ").join(sql.Placeholder() * len(lower))))
            args.extend(lower)
        if upper is not None:
            conditions.append(sql.SQL("({}) <= ({})").format(key_list, sql.SQL(", ").join(sql.Placeholder() * len(upper))))
            args.extend(upper)
        where = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("")
        select = sql.SQL(", ").join(pk_target + [sql.Identifier(t.columns[c.name]) for c in self.compared])
        query = sql.SQL("SELECT {} FROM {}{} ORDER BY {}").format(
            select, sql.Identifier(t.schema, t.name), where, key_list)
        rows = {}
        width = len(self.pk)
        kinds = [self.kinds[k] for k in self.pk]
        for raw in self.conn.execute(query, args):
            key = tuple(canonical(v, kind) for v, kind in zip(raw[:width], kinds))
            rows[key] = tuple(canonical(v, c.type) for v, c in zip(raw[width:], self.compared))
        return rows

    def run(self, report: TableReport, advance: Callable[[int], None]) -> TableReport:
        if not self.pk:
            report.skipped = "no primary key (the target keeps a change log)"
            return report
        missing: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        extra: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        lower: tuple[Any, ...] | None = None
        exhausted = False
        for source_rows, last_key in self._source_chunks():
            full = len(source_rows) >= self.chunk_rows
            upper = last_key if full else None
            target_rows = self._target_rows(lower, upper)
            report.chunks += 1
            report.source_rows += len(source_rows)
            report.target_rows += len(target_rows)
            if _digest(source_rows) != _digest(target_rows):
                report.chunks_differing += 1
                self._diff(source_rows, target_rows, missing, extra, report)
            advance(len(source_rows))
            lower = last_key
            if not full:
                exhausted = True
        if not exhausted:  # the source ended on a full chunk: whatever the target has beyond it is extra
            target_rows = self._target_rows(lower, None)
            report.target_rows += len(target_rows)
            if target_rows:
                report.chunks += 1
                report.chunks_differing += 1
                self._diff({}, target_rows, missing, extra, report)
        # keys that sorted into different chunks on the two engines
        for key in list(missing):
            if key in extra:
                self._compare_row(key, missing.pop(key), extra.pop(key), report)
        names = self.pk
        for key in missing:
            self._add(report, Difference("missing", dict(zip(names, key))))
        for key in extra:
            self._add(report, Difference("extra", dict(zip(names, key))))
        return report

    def _diff(self, source_rows: dict[Any, Any], target_rows: dict[Any, Any], missing: dict[Any, Any],
              extra: dict[Any, Any], report: TableReport) -> None:
        for key, row in source_rows.items():
            if key not in target_rows:
                missing[key] = row
            elif target_rows[key] != row:
                self._compare_row(key, row, target_rows[key], report)
        for key, row in target_rows.items():
            if key not in source_rows:
                extra[key] = row

    def _compare_row(self, key: tuple[Any, ...], source: tuple[Any, ...], target: tuple[Any, ...],
                     report: TableReport) -> None:
        columns = {c.name: (s, t) for c, s, t in zip(self.compared, source, target) if s != t}
        if columns:
            self._add(report, Difference("different", dict(zip(self.pk, key)), columns))

    def _add(self, report: TableReport, difference: Difference) -> None:
        report.difference_count += 1
        if len(report.differences) < self.max_differences:
            report.differences.append(difference)


def target_table(sink: PostgresSinkConfig, schema: TableSchema, transforms: Any | None,
                 existing: set[str]) -> TargetTable:
    """The target schema/table/columns of a source table in a PostgreSQL sink (renames applied)."""
    from branchline.sinks._batch import render

    name = schema.id.table
    columns = {c.name: c.name for c in schema.columns}
    if transforms is not None:
        name = getattr(transforms, "rename", None) or name
        include = getattr(transforms, "include", None)
        if include is not None:
            columns = {c: c for c in columns if c in include or c in schema.primary_key}
        for column in getattr(transforms, "exclude", ()) or ():
            columns.pop(column, None)
        for column in list(getattr(transforms, "mask", {}) or {}) + list(getattr(transforms, "casts", {}) or {}):
            if column not in schema.primary_key:
                columns.pop(column, None)  # transformed on purpose: not comparable
        for source_name, target_name in (getattr(transforms, "rename_columns", {}) or {}).items():
            if source_name in columns:
                columns[source_name] = target_name
    columns = {s: t for s, t in columns.items() if t in existing or s in schema.primary_key}
    return TargetTable(schema=render(sink.schema_, schema.id), name=name, columns=columns,
                       branch=schema.id.branch if sink.branch_key else None, soft_delete=sink.soft_delete)


def target_columns(conn: psycopg.Connection[Any], schema: str, table: str) -> set[str]:
    rows = conn.execute("SELECT column_name FROM information_schema.columns WHERE table_schema = %s"
                        " AND table_name = %s", (schema, table)).fetchall()
    return {r[0] for r in rows}


def connect_target(sink: PostgresSinkConfig) -> psycopg.Connection[Any]:
    from branchline.sinks.postgres.sink import conninfo

    try:
        conn = psycopg.connect(conninfo(sink), autocommit=True)
    except psycopg.Error as exc:
        raise FatalSinkError(f"`sink` at {sink.host}:{sink.port} must be reachable; got {str(exc)[:200]}") from exc
    conn.execute("SET TimeZone='UTC'")
    return conn


def require_postgres(sink: Any, name: str) -> PostgresSinkConfig:
    if not isinstance(sink, PostgresSinkConfig):
        raise ConfigError(f"`sinks.{name}` must be a postgres sink for verify; got {type(sink).__name__}")
    return sink
