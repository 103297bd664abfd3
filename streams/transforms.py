"""Per-table transforms, compiled once against the table's real columns, applied to every change.

Why compile: `TableTransforms` is checked against the `TableSchema` at start-up (an unknown table or
column is a `ConfigError` naming both, every problem at once), and the per-row work is reduced to
a precomputed list of (target column, source column, function). Row filters are data — (column,
operator, value) with the value converted to the column's type up front — never code.

A row that stops matching the filters on an update becomes a delete of its key, so the target holds
exactly the source rows that match. Deletes pass unfiltered (deleting a row the target never had is
harmless). A filter column whose value is `UNCHANGED` (TOAST) counts as matching.
"""

from __future__ import annotations

import hashlib
import operator
import string
from collections.abc import Callable, Mapping
from datetime import date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
from branchline.errors import BadRecordError, ConfigError
from branchline.events import (
    OP_DELETE,
    OP_TRUNCATE,
    OP_UPDATE,
    UNCHANGED,
    ChangeEvent,
    Column,
    ColumnType,
    Json,
    TableId,
    TableSchema,
)
from branchline.streams._construct import new_event
from branchline.streams.config import (
    CastTarget,
    HashMask,
    Mask,
    RedactMask,
    RowFilter,
    ScalarValue,
    TableTransforms,
)

Fn = Callable[[Any], Any]

_CAST_TYPES: dict[str, ColumnType] = {
    "string": ColumnType.STRING, "int64": ColumnType.INT64, "decimal": ColumnType.DECIMAL,
    "float64": ColumnType.FLOAT64, "boolean": ColumnType.BOOLEAN, "date": ColumnType.DATE,
    "timestamp": ColumnType.TIMESTAMP, "json": ColumnType.JSON,
}
_NUMERIC = {ColumnType.INT16, ColumnType.INT32, ColumnType.INT64, ColumnType.UINT64, ColumnType.DECIMAL,
            ColumnType.FLOAT32, ColumnType.FLOAT64, ColumnType.YEAR, ColumnType.BOOLEAN}
_CAST_FROM: dict[str, set[ColumnType] | None] = {
    "string": None,  # anything has a text form
    "int64": _NUMERIC | {ColumnType.STRING, ColumnType.ENUM},
    "decimal": _NUMERIC | {ColumnType.STRING},
    "float64": _NUMERIC | {ColumnType.STRING},
    "boolean": _NUMERIC | {ColumnType.STRING, ColumnType.BITS},
    "date": {ColumnType.DATE, ColumnType.TIMESTAMP, ColumnType.TIMESTAMPTZ, ColumnType.STRING},
    "timestamp": {ColumnType.DATE, ColumnType.TIMESTAMP, ColumnType.STRING},
    "json": {ColumnType.STRING, ColumnType.JSON},
}
_TEMPLATE_NAMES = {"branch", "source", "database", "table", "schema"}


# -- casts ------------------------------------------------------------------------------------------


def _to_string(value: Any) -> str:
    if value.__class__ is str or isinstance(value, str):
        return value
    if isinstance(value, Json):
        return orjson.dumps(value.value).decode()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    number = Decimal(str(value).strip()) if not isinstance(value, Decimal) else value
    if number != number.to_integral_value():
        raise ValueError(f"`int64` cast must not drop a fraction; got {value!r}")
    return int(number)


def _to_decimal(value: Any) -> Decimal:
    if isinstance(value, Decimal):
        return value
    if isinstance(value, bool):
        return Decimal(int(value))
    if isinstance(value, float):
        return Decimal(repr(value))  # the shortest text of the float, not its binary expansion
    try:
        return Decimal(str(value).strip())
    except InvalidOperation as exc:
        raise ValueError(f"`decimal` cast must get a number; got {value!r}") from exc


def _to_float(value: Any) -> float:
    return float(value)


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "t", "yes", "y", "1"):
            return True
        if text in ("false", "f", "no", "n", "0"):
            return False
        raise ValueError(f"`boolean` cast must get true/false; got {value!r}")
    if isinstance(value, int | float | Decimal):
        return value != 0
    raise TypeError(f"`boolean` cast must get a number or true/false; got {value!r}")


def _to_date(value: Any) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(str(value).strip())


def _to_timestamp(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day)
    parsed = datetime.fromisoformat(str(value).strip())
    if parsed.tzinfo is not None:
        raise ValueError(f"`timestamp` cast must get a time without offset; got {value!r}")
    return parsed


def _to_json(value: Any) -> Json:
    if isinstance(value, Json):
        return value
    return Json(orjson.loads(value))


_CASTS: dict[str, Fn] = {
    "string": _to_string, "int64": _to_int, "decimal": _to_decimal, "float64": _to_float,
    "boolean": _to_bool, "date": _to_date, "timestamp": _to_timestamp, "json": _to_json,
}


# -- masks ------------------------------------------------------------------------------------------


_DIGESTS_MAX = 32_768
"""Digests kept per masked column (about 7 MB for e-mail addresses at most)."""


def _mask_fn(mask: Mask) -> Fn:
    if isinstance(mask, HashMask):
        salted = hashlib.sha256(mask.salt.get_secret_value().encode())
        digests: dict[str, str] = {}

        def hash_value(value: Any) -> str:
            # masked columns (e-mail, phone, tax id) repeat: in every update of a row and in every
            # order of a customer; a dict hit costs a twentieth of a salted SHA-256
            if value.__class__ is str:
                found = digests.get(value)
                if found is None:
                    digest = salted.copy()
                    digest.update(value.encode())
                    found = digest.hexdigest()
                    if len(digests) >= _DIGESTS_MAX:
                        digests.clear()
                    digests[value] = found
                return found
            digest = salted.copy()
            digest.update(_to_string(value).encode())
            return digest.hexdigest()

        return hash_value
    if isinstance(mask, RedactMask):
        return lambda value: None
    keep, fill = mask.keep, mask.fill

    def keep_last(value: Any) -> str:
        text = _to_string(value)
        hidden = max(0, len(text) - keep)
        return fill * hidden + text[hidden:]

    return keep_last


def _masked_column(column: Column, mask: Mask) -> Column:
    if isinstance(mask, HashMask):
        return Column(name=column.name, type=ColumnType.STRING, nullable=column.nullable, length=64)
    if isinstance(mask, RedactMask):
        return column.model_copy(update={"nullable": True})
    return Column(name=column.name, type=ColumnType.STRING, nullable=column.nullable, length=column.length)


# -- filters ----------------------------------------------------------------------------------------

_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}


def _coerce(value: ScalarValue, column: Column) -> Any:
    """A filter literal as a value of the column's type (raises ValueError/TypeError)."""
    kind = column.type
    if value is None:
        return None
    if kind in (ColumnType.INT16, ColumnType.INT32, ColumnType.INT64, ColumnType.UINT64, ColumnType.YEAR):
        return _to_int(value)
    if kind is ColumnType.DECIMAL:
        return _to_decimal(value)
    if kind in (ColumnType.FLOAT32, ColumnType.FLOAT64):
        return _to_float(value)
    if kind is ColumnType.BOOLEAN:
        return _to_bool(value)
    if kind is ColumnType.DATE:
        return _to_date(value)
    if kind is ColumnType.TIMESTAMP:
        return _to_timestamp(value)
    if kind is ColumnType.TIMESTAMPTZ:
        parsed = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
        if parsed.tzinfo is None:
            raise ValueError(f"a `timestamptz` literal must carry an offset; got {value!r}")
        return parsed
    if kind in (ColumnType.STRING, ColumnType.ENUM, ColumnType.UUID, ColumnType.BITS):
        if not isinstance(value, str):
            raise TypeError(f"a text literal is needed; got {value!r}")
        return value
    raise TypeError(f"columns of type {kind.value} cannot be filtered")


def _predicate(flt: RowFilter, column: Column) -> Callable[[dict[str, Any]], bool]:
    name = flt.column
    op = flt.op
    if op == "is_null":
        return lambda row: row.get(name) is None
    if op == "not_null":
        return lambda row: row.get(name) is not None
    if op in ("in", "not_in"):
        assert isinstance(flt.value, list)
        members = [_coerce(v, column) for v in flt.value]
        if column.type is ColumnType.UUID:
            members = [str(m) for m in members]
        inside = op == "in"

        def member(row: dict[str, Any]) -> bool:
            value = row.get(name)
            if value is UNCHANGED:
                return True
            if value is None:
                return False
            if column.type is ColumnType.UUID:
                value = str(value)
            return (value in members) is inside

        return member
    literal = _coerce(flt.value, column)  # type: ignore[arg-type]
    compare = _COMPARE[op]
    as_text = column.type is ColumnType.UUID

    def check(row: dict[str, Any]) -> bool:
        value = row.get(name)
        if value is UNCHANGED:
            return True
        if value is None:
            return False  # SQL: a comparison with NULL is not true
        return bool(compare(str(value) if as_text else value, literal))

    return check


# -- compilation ------------------------------------------------------------------------------------


class CompiledTransform:
    """`TableTransforms` bound to one table's columns. `schema` is the target's table schema."""

    def __init__(self, source: TableSchema, schema: TableSchema, *, identity: bool = False,
                 drop: tuple[str, ...] = (), fns: tuple[tuple[str, Fn], ...] = (),
                 renames: dict[str, str] | None = None, constants: dict[str, Any] | None = None,
                 predicates: tuple[Callable[[dict[str, Any]], bool], ...] = ()) -> None:
        self.source = source
        self.schema = schema
        self.identity = identity
        self._drop = drop
        self._fns = fns
        self._renames = renames or {}
        self._constants = constants or {}
        self._predicates = predicates
        self._table = schema.id
        self._row_in_place = _compile_in_place(drop, fns, self._renames, self._constants)
        touched = {name for name, _ in fns} | set(self._renames)
        self._key_fns = tuple((name, fn) for name, fn in fns if name in source.primary_key)
        self._key_same = not (touched & set(source.primary_key))
        self._keyed = bool(source.primary_key)
        """Read once: a pydantic model's attribute costs ~70 ns, a plain object's ~20."""

    def _row(self, row: dict[str, Any]) -> dict[str, Any]:
        out = row.copy()
        for name in self._drop:
            out.pop(name, None)
        for name, fn in self._fns:
            value = out.get(name)
            if value is not None and value is not UNCHANGED:
                out[name] = fn(value)
        if self._renames:
            renames = self._renames
            out = {renames.get(k, k): v for k, v in out.items()}
        if self._constants:
            out.update(self._constants)
        return out

    def _key(self, key: dict[str, Any]) -> dict[str, Any]:
        if self._key_same:
            return key
        out = dict(key)
        for name, fn in self._key_fns:
            if out.get(name) is not None:
                out[name] = fn(out[name])
        if self._renames:
            out = {self._renames.get(k, k): v for k, v in out.items()}
        return out

    def _matches(self, row: dict[str, Any] | None) -> bool:
        if row is None:
            return True
        return all(predicate(row) for predicate in self._predicates)

    def apply(self, event: ChangeEvent) -> ChangeEvent | None:
        """The transformed change, or None when the filters drop it. Raises `BadRecordError` naming
        table, column, key and position when a cast fails."""
        if self.identity:
            return event
        op = event.op
        if op is OP_TRUNCATE:
            return event.model_copy(update={"table": self._table})
        if self._predicates and op is not OP_DELETE and not self._matches(event.after):
            if op is not OP_UPDATE:
                return None
            # the row left the filter: delete it from the target by key
            op, before_image = OP_DELETE, event.after
        else:
            before_image = event.before
        try:
            after = None if op is OP_DELETE or event.after is None else self._row(event.after)
            before = None if before_image is None else self._row(before_image)
            key = self._key(event.key) if self._keyed else (after or before or {}).copy()
        except Exception as exc:
            raise BadRecordError(
                f"`{self.source.id.qualified}` change must transform (key {event.key!r}, position "
                f"{event.position}); got {type(exc).__name__}: {exc}"
            ) from exc
        return new_event({
            "op": op, "table": self._table, "key": key, "before": before, "after": after,
            "position": event.position, "source_ts": event.source_ts, "txid": event.txid,
            "snapshot": event.snapshot,
        })


    def apply_owned(self, event: ChangeEvent) -> ChangeEvent | None:
        """`apply` for an event that nobody else holds (just built by the decoder): changes the event
        and its row dicts in place instead of copying them.

        Why: the copies (a new event, a new dict per row image) were a third of the transform stage's
        cost in `branchline.streams.bench`. Truncates and tables with filters take the copying path."""
        if self.identity:
            return event
        if self._predicates or event.op is OP_TRUNCATE:
            return self.apply(event)
        values = event.__dict__  # the model is frozen for its users; its builder may still fill it
        try:
            after = values["after"]
            if after is not None:
                values["after"] = after = self._row_in_place(after)
            before = values["before"]
            if before is not None:
                values["before"] = before = self._row_in_place(before)
            if not self._keyed:
                values["key"] = dict(after or before or {})
            elif not self._key_same:  # most keys pass unchanged: no call for them
                values["key"] = self._key(values["key"])
        except Exception as exc:
            raise BadRecordError(
                f"`{self.source.id.qualified}` change must transform (key {event.key!r}, position "
                f"{event.position}); got {type(exc).__name__}: {exc}"
            ) from exc
        values["table"] = self._table
        return event


def _compile_in_place(drop: tuple[str, ...], fns: tuple[tuple[str, Fn], ...], renames: dict[str, str],
                      constants: dict[str, Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """One function that transforms a row dict in place (a new dict only when columns are renamed),
    with each dropped, masked or cast column and each constant written out.

    Why: looping over the (column, function) pairs and checking each kind of transform per row cost
    about as much as the transforms themselves. The generated code holds only column names as `repr`
    literals; functions and constant values are passed in its namespace, never as text."""
    namespace: dict[str, Any] = {"UNCHANGED": UNCHANGED, "RENAMES": renames}
    lines = ["def row_in_place(row):"]
    lines += [f"    row.pop({name!r}, None)" for name in drop]
    for i, (name, fn) in enumerate(fns):
        namespace[f"f{i}"] = fn
        lines += [f"    v = row.get({name!r})",
                  "    if v is not None and v is not UNCHANGED:",
                  f"        row[{name!r}] = f{i}(v)"]
    if renames:
        lines.append("    row = {RENAMES.get(k, k): v for k, v in row.items()}")
    for i, (name, value) in enumerate(constants.items()):
        namespace[f"c{i}"] = value
        lines.append(f"    row[{name!r}] = c{i}")
    lines.append("    return row")
    exec("\n".join(lines), namespace)  # noqa: S102 - generated from fixed templates, see docstring
    compiled: Callable[[dict[str, Any]], dict[str, Any]] = namespace["row_in_place"]
    return compiled


def identity(schema: TableSchema) -> CompiledTransform:
    """The transform of a table without a ``tables:`` entry: changes pass unchanged."""
    return CompiledTransform(schema, schema, identity=True)


def _template_names(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}


def problems(name: str, transforms: TableTransforms, schema: TableSchema) -> list[str]:
    """Every mismatch between one table's transforms and its real columns, each naming table and column."""
    found: list[str] = []
    columns = {c.name: c for c in schema.columns}
    where = f"tables.{name}"

    def unknown(field: str, column: str) -> None:
        found.append(f"`{where}.{field}` must name a column of table `{name}`; got {column!r}")

    for field_name, names in (("include", transforms.include or ()), ("exclude", transforms.exclude),
                              ("rename_columns", transforms.rename_columns), ("mask", transforms.mask),
                              ("casts", transforms.casts)):
        for column in names:
            if column not in columns:
                unknown(field_name, column)
    for flt in transforms.filters:
        if flt.column not in columns:
            unknown("filters", flt.column)
            continue
        try:
            _predicate(flt, columns[flt.column])
        except (ValueError, TypeError, InvalidOperation) as exc:
            found.append(f"`{where}.filters` value for column `{flt.column}` of table `{name}` must fit "
                         f"type {columns[flt.column].type.value}; got {flt.value!r} ({exc})")
    for column in schema.primary_key:
        if column in transforms.exclude:
            found.append(f"`{where}.exclude` must not drop primary-key column `{column}` of table `{name}`; "
                         f"got {column!r}")
        mask = transforms.mask.get(column)
        if mask is not None and not isinstance(mask, HashMask):
            found.append(f"`{where}.mask` of primary-key column `{column}` of table `{name}` must be sha256 "
                         f"(keys must stay distinct); got {mask.method!r}")
    for column, target in transforms.casts.items():
        if column in columns:
            allowed = _CAST_FROM[target]
            if allowed is not None and columns[column].type not in allowed:
                found.append(f"`{where}.casts` of column `{column}` of table `{name}` must convert from "
                             f"{columns[column].type.value}; got {target!r}")
            if column in transforms.mask:
                found.append(f"`{where}.casts` of column `{column}` of table `{name}` must not be combined "
                             f"with a mask; got {target!r}")
    kept = _kept_columns(transforms, schema)
    targets = [transforms.rename_columns.get(c, c) for c in kept]
    for constant, value in transforms.constants.items():
        if constant in targets:
            found.append(f"`{where}.constants` column `{constant}` of table `{name}` must not collide with a "
                         f"replicated column; got {constant!r}")
        if isinstance(value, str):
            bad = _template_names(value) - _TEMPLATE_NAMES
            if bad:
                found.append(f"`{where}.constants.{constant}` may use only {{{', '.join(sorted(_TEMPLATE_NAMES))}}}"
                             f" placeholders; got {sorted(bad)!r}")
    seen: set[str] = set()
    for target in targets:
        if target in seen:
            found.append(f"`{where}.rename_columns` must give table `{name}` distinct column names; "
                         f"got {target!r} twice")
        seen.add(target)
    return found


def _kept_columns(transforms: TableTransforms, schema: TableSchema) -> list[str]:
    names = [c.name for c in schema.columns]
    if transforms.include is not None:
        wanted = set(transforms.include) | set(schema.primary_key)
        return [n for n in names if n in wanted]
    dropped = set(transforms.exclude)
    return [n for n in names if n not in dropped]


def _constant_value(value: ScalarValue, table: TableId) -> Any:
    if isinstance(value, str):
        return value.format_map({"branch": table.branch, "source": table.source, "database": table.database,
                                 "table": table.table, "schema": table.schema_ or ""})
    return value


def _constant_column(name: str, value: Any) -> Column:
    kind = {bool: ColumnType.BOOLEAN, int: ColumnType.INT64, Decimal: ColumnType.DECIMAL,
            date: ColumnType.DATE, datetime: ColumnType.TIMESTAMP, timedelta: ColumnType.TIME}.get(
        type(value), ColumnType.STRING)
    if isinstance(value, datetime) and value.tzinfo is not None:
        kind = ColumnType.TIMESTAMPTZ
    return Column(name=name, type=kind, nullable=value is None)


def compile_transforms(schema: TableSchema, transforms: TableTransforms | None, *,
                       name: str | None = None) -> CompiledTransform:
    """Bind `transforms` to the table's columns; raises `ConfigError` with every problem found."""
    if transforms is None or transforms == TableTransforms():
        return identity(schema)
    name = name or schema.id.qualified
    found = problems(name, transforms, schema)
    if found:
        raise ConfigError(found)
    columns = {c.name: c for c in schema.columns}
    kept = _kept_columns(transforms, schema)
    fns: list[tuple[str, Fn]] = []
    out_columns = []
    for source_name in kept:
        column = columns[source_name]
        mask = transforms.mask.get(source_name)
        cast = transforms.casts.get(source_name)
        if mask is not None:
            fns.append((source_name, _mask_fn(mask)))
            column = _masked_column(column, mask)
        elif cast is not None:
            fns.append((source_name, _CASTS[cast]))
            column = Column(name=column.name, type=_CAST_TYPES[cast], nullable=column.nullable)
        target = transforms.rename_columns.get(source_name, source_name)
        out_columns.append(column.model_copy(update={"name": target}))
    table = schema.id if transforms.rename is None else schema.id.model_copy(update={"table": transforms.rename})
    constants = {k: _constant_value(v, schema.id) for k, v in transforms.constants.items()}
    out_columns.extend(_constant_column(k, v) for k, v in constants.items())
    renames = {k: v for k, v in transforms.rename_columns.items() if k != v}
    target_schema = TableSchema(id=table, columns=tuple(out_columns),
                                primary_key=tuple(renames.get(k, k) for k in schema.primary_key))
    predicates = tuple(_predicate(f, columns[f.column]) for f in transforms.filters)
    drop = tuple(c.name for c in schema.columns if c.name not in set(kept))
    return CompiledTransform(schema, target_schema, drop=drop, fns=tuple(fns), renames=renames,
                             constants=constants, predicates=predicates)


def validate_tables(tables: Mapping[str, TableTransforms], schemas: Mapping[str, TableSchema],
                    *, source: str | None = None) -> None:
    """Check a source's ``tables:`` section against its real tables (keyed by `TableId.qualified`):
    raises one `ConfigError` listing every unknown table and column."""
    found: list[str] = []
    for name, transforms in tables.items():
        schema = schemas.get(name)
        if schema is None:
            known = ", ".join(sorted(schemas)[:10]) or "none"
            found.append(f"`tables.{name}` must name a captured table of the source (known: {known}); "
                         f"got {name!r}")
            continue
        found.extend(problems(name, transforms, schema))
    if found:
        raise ConfigError(found, source)


__all__ = ["CastTarget", "CompiledTransform", "compile_transforms", "identity", "problems", "validate_tables"]
