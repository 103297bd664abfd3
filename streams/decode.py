"""Decode Debezium JSON envelopes (JsonConverter, ``schemas.enable=true``) into `ChangeEvent`.

Why a per-schema plan: the Connect schema travels with every record but changes only when a table
changes, so it is turned once into a `TableSchema` plus a short list of column converters, cached
by the schema's raw bytes. Per record only the payload is parsed (orjson) and only the columns that
need it are converted. Values come out as the exact types `branchline.events` documents: decimals are
built from the unscaled integer (never a float), DATETIME from epoch arithmetic (never the host's
time zone).

Non-row records come out as their own types (`Tombstone`, `Heartbeat`, `TransactionMarker`,
`SchemaChangeRecord`, `OtherRecord`) so that no stage mistakes them for rows.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import MAX_PREC, Context, Decimal
from typing import Any

import orjson
from branchline.errors import BadRecordError
from branchline.events import (
    OP_CREATE,
    OP_DELETE,
    OP_READ,
    OP_TRUNCATE,
    OP_UPDATE,
    UNCHANGED,
    ChangeEvent,
    Column,
    ColumnType,
    Json,
    TableId,
    TableSchema,
    binlog_position,
    iso_interval,
    lsn_position,
)
from branchline.streams._construct import new_event

PLACEHOLDER = "__debezium_unavailable_value"
"""Debezium's default ``unavailable.value.placeholder`` for unchanged TOASTed PostgreSQL values."""

HEARTBEAT_PREFIX = "__debezium-heartbeat"
"""Debezium's default ``topic.heartbeat.prefix``."""

_EPOCH = datetime(1970, 1, 1)
_EPOCH_UTC = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_OPS = {"c": OP_CREATE, "u": OP_UPDATE, "d": OP_DELETE, "r": OP_READ, "t": OP_TRUNCATE}
_SNAPSHOT_TRUE = {"true", "first", "last", "first_in_data_collection", "last_in_data_collection",
                  "last_in_data_collection_and_last", "incremental"}
_SCHEMA_HEAD = b'{"schema":'
_PAYLOAD_SEP = b',"payload":'
_BEFORE_OBJECT = b'{"before":{'
_AFTER_KEY = b',"after":'
_CLOSE = ord("}")
"""A record's last byte, compared as an int: cheaper than ``endswith``, which parses its arguments."""

Converter = Callable[[Any], Any]


# -- results ------------------------------------------------------------------------------------


@dataclass(slots=True)
class RowChange:
    """A change of rows (or a truncate) with the schema of its table at that change.

    Not frozen: a frozen dataclass's ``__init__`` costs four times as much, once per change."""

    event: ChangeEvent
    schema: TableSchema


@dataclass(frozen=True, slots=True)
class Tombstone:
    """The null-valued record Debezium writes after a delete so that log compaction can drop the key."""

    topic: str
    key: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A heartbeat: the connector is alive; carries its source offset, not a row."""

    topic: str
    ts: datetime | None


@dataclass(frozen=True, slots=True)
class TransactionMarker:
    """BEGIN or END of a source transaction (``provide.transaction.metadata=true``)."""

    status: str
    id: str
    event_count: int | None
    ts: datetime | None


@dataclass(frozen=True, slots=True)
class SchemaChangeRecord:
    """A record of the connector's schema-change topic (DDL text); the new schema itself arrives
    with the next row change, so it needs no action here."""

    topic: str
    ddl: str | None


@dataclass(frozen=True, slots=True)
class OtherRecord:
    """A record that is neither a row nor one of the above (e.g. a PostgreSQL logical message)."""

    topic: str
    kind: str


Decoded = RowChange | Tombstone | Heartbeat | TransactionMarker | SchemaChangeRecord | OtherRecord


# -- value converters -----------------------------------------------------------------------------


_b64 = binascii.a2b_base64
_EXACT = Context(prec=MAX_PREC)  # scaleb rounds to the context's precision: make that unlimited


def _decimal_from_unscaled(unscaled: int, scale: int) -> Decimal:
    return Decimal(unscaled) if scale == 0 else Decimal(unscaled).scaleb(-scale, _EXACT)


def _decimal_bytes(scale: int) -> Converter:
    """Connect Decimal (base64 two's complement, big-endian) -> Decimal, exact: one context call scales
    the unscaled integer (``Decimal(n).scaleb(...)`` parses its arguments twice and converts the
    exponent on every call)."""
    from_bytes = int.from_bytes
    exponent = Decimal(-scale)

    def convert(value: str) -> Decimal:
        if value.__class__ is not str:
            raise TypeError(f"`decimal` must arrive as base64 bytes; got {value!r}")
        return _EXACT.scaleb(from_bytes(_b64(value), "big", signed=True), exponent)

    convert.inline = "SCALEB(FROM_BYTES(B64(v), 'big', signed=True), {f}_exponent)"  # type: ignore[attr-defined]
    convert.exponent = exponent  # type: ignore[attr-defined]
    return convert


def _unsigned_bytes(value: Any) -> int:
    # bigint.unsigned.handling.mode=precise: Connect Decimal, scale 0, two's complement big-endian.
    number = int.from_bytes(_b64(value), "big", signed=True)
    if number < 0:
        raise ValueError(f"`bigint unsigned` must not be negative; got {number!r}")
    return number


def _variable_scale_decimal(value: Any) -> Decimal:
    # io.debezium.data.VariableScaleDecimal: struct {scale: int32, value: bytes}
    return _decimal_from_unscaled(int.from_bytes(_b64(value["value"]), "big", signed=True), value["scale"])


def _decimal_string(value: Any) -> Decimal:
    # decimal.handling.mode=string: the exact decimal text.
    return Decimal(value)


_DATES: dict[int, date] = {}
"""Days since the epoch -> date, shared by every decoder: a table's dates cluster on few days (order,
due and posting dates), and a dict hit costs a tenth of building the date. Dates are immutable."""
_DATES_MAX = 8192


def _date(value: int) -> date:
    found = _DATES.get(value)
    if found is None:
        found = date.fromordinal(_EPOCH_ORDINAL + value)
        if len(_DATES) >= _DATES_MAX:
            _DATES.clear()
        _DATES[value] = found
    return found


# A unit timedelta times the count: exact integer arithmetic, and no constructor argument parsing
# (timedelta(0, 0, v) parses its arguments as keywords: about 40% more per value).
_MICROSECOND = timedelta(microseconds=1)
_MILLISECOND = timedelta(milliseconds=1)


def _time_millis(value: int) -> timedelta:
    return _MILLISECOND * value


def _time_micros(value: int) -> timedelta:
    return _MICROSECOND * value


def _time_nanos(value: int) -> timedelta:
    return _MICROSECOND * (value // 1000)


def _timestamp_millis(value: int) -> datetime:
    return _EPOCH + _MILLISECOND * value


def _timestamp_micros(value: int) -> datetime:
    return _EPOCH + _MICROSECOND * value


def _timestamp_nanos(value: int) -> datetime:
    return _EPOCH + _MICROSECOND * (value // 1000)


_date.inline = "(DATES_GET(v) or DATE(v))"  # type: ignore[attr-defined]
_time_micros.inline = "MICROSECOND * v"  # type: ignore[attr-defined]
_timestamp_millis.inline = "EPOCH + MILLISECOND * v"  # type: ignore[attr-defined]
_timestamp_micros.inline = "EPOCH + MICROSECOND * v"  # type: ignore[attr-defined]


def _zoned_timestamp(value: str) -> datetime:
    # io.debezium.time.ZonedTimestamp: ISO-8601 with offset, Debezium normalises to UTC ("...Z").
    parsed = datetime.fromisoformat(value)
    tz = parsed.tzinfo
    if tz is UTC:
        return parsed
    if tz is None:
        raise ValueError(f"`ZonedTimestamp` must carry an offset; got {value!r}")
    return parsed.astimezone(UTC)


_zoned_timestamp.inline = "(p if (p := FROMISO(v)).tzinfo is UTC else {f}(v))"  # type: ignore[attr-defined]


def _json(value: str) -> Json:
    return Json(orjson.loads(value))


def _enum_set(value: str) -> list[str]:
    return value.split(",") if value else []


_json.inline = "JSON(LOADS(v))"  # type: ignore[attr-defined]
_enum_set.inline = "(v.split(',') if v else [])"  # type: ignore[attr-defined]


def _bits(length: int) -> Converter:
    # io.debezium.data.Bits: little-endian bytes holding `length` bits -> '0101...' (MSB first),
    # the text form PostgreSQL's bit(n) takes and the embedded reader produces.
    def convert(value: Any) -> str:
        return format(int.from_bytes(_b64(value), "little"), f"0{length}b")

    return convert


def _uuid(value: str) -> uuid.UUID:
    return uuid.UUID(value)


def _geometry(value: Any) -> bytes:
    # io.debezium.data.geometry.*: struct {wkb: bytes, srid: int}; keep the WKB.
    return _b64(value["wkb"])


def _array(item: Converter | None) -> Converter:
    if item is None:
        return list

    def convert(value: list[Any]) -> list[Any]:
        return [None if v is None else item(v) for v in value]

    return convert


def _json_array(item: Converter | None) -> Converter:
    inner = _array(item)

    def convert(value: list[Any]) -> Json:
        return Json(inner(value))

    return convert


def _map_json(value: Any) -> Json:
    # A Connect map arrives as an object (string keys) or as a list of [key, value] pairs.
    if isinstance(value, list):
        return Json({k: v for k, v in value})
    return Json(value)


# -- schema -> column + converter ------------------------------------------------------------------


def _source_type(field: dict[str, Any]) -> str | None:
    parameters = field.get("parameters") or {}
    name = parameters.get("__debezium.source.column.type")
    if name is None:
        return None
    length = parameters.get("__debezium.source.column.length")
    scale = parameters.get("__debezium.source.column.scale")
    if length is not None and scale is not None:
        return f"{name.lower()}({length},{scale})"
    if length is not None:
        return f"{name.lower()}({length})"
    return name.lower()


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def column_plan(field: dict[str, Any]) -> tuple[Column, Converter | None]:
    """One Connect field schema -> (`Column`, converter or None when the JSON value is already exact)."""
    kind = field["type"]
    logical = field.get("name")
    parameters = field.get("parameters") or {}
    source_type = _source_type(field)
    source_upper = (parameters.get("__debezium.source.column.type") or "").upper()
    length = _int_or_none(parameters.get("__debezium.source.column.length"))
    precision: int | None = None
    scale: int | None = None
    converter: Converter | None = None
    column_type: ColumnType

    if logical == "org.apache.kafka.connect.data.Decimal":
        scale = int(parameters.get("scale", 0))
        precision = _int_or_none(parameters.get("connect.decimal.precision")) or length
        if scale == 0 and "UNSIGNED" in source_upper and "BIGINT" in source_upper:
            column_type, converter, precision = ColumnType.UINT64, _unsigned_bytes, None
        else:
            column_type, converter = ColumnType.DECIMAL, _decimal_bytes(scale)
    elif logical == "io.debezium.data.VariableScaleDecimal":
        column_type, converter = ColumnType.DECIMAL, _variable_scale_decimal
    elif logical in ("io.debezium.time.Date", "org.apache.kafka.connect.data.Date"):
        column_type, converter = ColumnType.DATE, _date
    elif logical in ("io.debezium.time.Time", "org.apache.kafka.connect.data.Time"):
        column_type, converter = ColumnType.TIME, _time_millis
    elif logical == "io.debezium.time.MicroTime":
        column_type, converter = ColumnType.TIME, _time_micros
    elif logical == "io.debezium.time.NanoTime":
        column_type, converter = ColumnType.TIME, _time_nanos
    elif logical in ("io.debezium.time.Timestamp", "org.apache.kafka.connect.data.Timestamp"):
        column_type, converter = ColumnType.TIMESTAMP, _timestamp_millis
    elif logical == "io.debezium.time.MicroTimestamp":
        column_type, converter = ColumnType.TIMESTAMP, _timestamp_micros
    elif logical == "io.debezium.time.NanoTimestamp":
        column_type, converter = ColumnType.TIMESTAMP, _timestamp_nanos
    elif logical == "io.debezium.time.ZonedTimestamp":
        column_type, converter = ColumnType.TIMESTAMPTZ, _zoned_timestamp
    elif logical == "io.debezium.time.ZonedTime":
        column_type = ColumnType.STRING  # timetz has no exact Python type; keep Debezium's text
    elif logical == "io.debezium.time.Year":
        column_type = ColumnType.YEAR
    elif logical == "io.debezium.time.MicroDuration":
        column_type, converter = ColumnType.INTERVAL, _time_micros
    elif logical == "io.debezium.time.Interval":
        # ISO-8601 duration text (months do not fit a timedelta), its seconds rounded back to microseconds
        column_type, converter = ColumnType.STRING, iso_interval
    elif logical == "io.debezium.data.Json":
        column_type, converter = ColumnType.JSON, _json
    elif logical == "io.debezium.data.Enum":
        column_type = ColumnType.ENUM
    elif logical == "io.debezium.data.EnumSet":
        column_type, converter = ColumnType.SET, _enum_set
    elif logical == "io.debezium.data.Bits":
        length = int(parameters.get("length") or length or 1)
        column_type, converter = ColumnType.BITS, _bits(length)
    elif logical == "io.debezium.data.Uuid":
        column_type, converter = ColumnType.UUID, _uuid
    elif logical is not None and logical.startswith("io.debezium.data.geometry."):
        column_type, converter = ColumnType.BYTES, _geometry
    elif kind == "array":
        item_column, item_converter = column_plan({**field["items"], "field": field.get("field", "")})
        if item_column.type in (ColumnType.STRING, ColumnType.ENUM):
            column_type, converter = ColumnType.STRING_ARRAY, _array(item_converter)
        else:
            column_type, converter = ColumnType.JSON, _json_array(item_converter)
    elif kind == "map":
        column_type, converter = ColumnType.JSON, _map_json
    elif kind == "bytes":
        column_type, converter = ColumnType.BYTES, _b64
    elif kind == "string":
        if source_upper in ("DECIMAL", "NUMERIC", "DEC", "FIXED", "MONEY") or source_upper.startswith(
            ("DECIMAL ", "NUMERIC ")
        ):
            # decimal.handling.mode=string
            column_type, converter = ColumnType.DECIMAL, _decimal_string
            precision, scale = length, _int_or_none(parameters.get("__debezium.source.column.scale"))
        else:
            column_type = ColumnType.STRING
    elif kind == "boolean":
        column_type = ColumnType.BOOLEAN
    elif kind in ("int8", "int16"):
        column_type = ColumnType.INT16
    elif kind == "int32":
        column_type = ColumnType.INT32
    elif kind == "int64":
        column_type = ColumnType.INT64
    elif kind == "float32":
        column_type = ColumnType.FLOAT32
    elif kind == "float64":
        column_type = ColumnType.FLOAT64
    else:
        raise ValueError(f"`{field.get('field')}` must have a supported Connect type; got {kind!r}/{logical!r}")

    column = Column(
        name=field.get("field", ""),
        type=column_type,
        nullable=bool(field.get("optional", True)),
        precision=precision,
        scale=scale,
        length=length,
        source_type=source_type,
    )
    return column, converter


def _toast_aware(converter: Converter | None, column_type: ColumnType, placeholder: str) -> Converter | None:
    """Wrap a converter so that Debezium's placeholder becomes `UNCHANGED` (PostgreSQL TOAST)."""
    if column_type in (ColumnType.STRING, ColumnType.JSON, ColumnType.ENUM, ColumnType.SET,
                       ColumnType.DECIMAL, ColumnType.UUID, ColumnType.BITS):
        marker: Any = placeholder
    elif column_type is ColumnType.BYTES:
        marker = base64.b64encode(placeholder.encode()).decode()
    elif column_type is ColumnType.STRING_ARRAY:
        marker = [placeholder]
    else:
        return converter
    base = converter

    def convert(value: Any) -> Any:
        if value == marker:
            return UNCHANGED
        if isinstance(value, list) and value and value[0] == placeholder:  # any array of a TOASTed column
            return UNCHANGED
        return value if base is None else base(value)

    return convert


# -- plans ---------------------------------------------------------------------------------------

class ColumnValueError(ValueError):
    """A value that does not convert, with its column's name."""

    def __init__(self, column: str | None, value: Any, error: Exception) -> None:
        shown = repr(value) if len(repr(value)) <= 200 else repr(value)[:200] + "..."
        super().__init__(f"column `{column}` value {shown}: {type(error).__name__}: {error}")
        self.column = column


_INLINE_NAMES: dict[str, Any] = {
    "SCALEB": _EXACT.scaleb, "FROM_BYTES": int.from_bytes, "B64": _b64, "EXACT": _EXACT, "DATES_GET": _DATES.get,
    "DATE": _date, "MICROSECOND": _MICROSECOND, "MILLISECOND": _MILLISECOND, "EPOCH": _EPOCH, "JSON": Json, "LOADS": orjson.loads,
    "FROMISO": datetime.fromisoformat, "UTC": UTC,
}


def compile_row_converter(converters: tuple[tuple[str, Converter], ...]) -> Callable[[dict[str, Any]], None]:
    """One function that converts a row image in place, with the common conversions written out.

    Why: a loop over (column, function) pairs costs a call and a tuple unpack per column, which is
    a third of the decode time of a typical ERP row. The generated code holds only column names as
    `repr` literals and expressions fixed in this module; no text from a record reaches it."""
    namespace = dict(_INLINE_NAMES)
    namespace["ColumnValueError"] = ColumnValueError
    lines = ["def convert(row):", "    get = row.get", "    name = v = None", "    try:"]
    for i, (name, function) in enumerate(converters):
        namespace[f"f{i}"] = function
        if hasattr(function, "exponent"):
            namespace[f"f{i}_exponent"] = function.exponent
        expression = (getattr(function, "inline", None) or "{f}(v)").replace("{f}", f"f{i}")
        lines.append(f"        name = {name!r}")
        lines.append(f"        v = get({name!r})")
        lines.append("        if v is not None:")
        lines.append(f"            row[{name!r}] = {expression}")
    lines.append("        return None")
    lines.append("    except Exception as exc:")
    lines.append("        raise ColumnValueError(name, v, exc) from exc")
    exec("\n".join(lines), namespace)  # noqa: S102 - generated from fixed templates, see docstring
    compiled: Callable[[dict[str, Any]], None] = namespace["convert"]
    return compiled


@dataclass(slots=True)
class _RowPlan:
    """What one value schema means: the table's columns and how to convert a row image."""

    kind: str  # "row", "heartbeat", "transaction", "schema_change", "other"
    postgres: bool
    fields: tuple[Column, ...]
    converters: tuple[tuple[str, Converter], ...]
    convert: Callable[[dict[str, Any]], None] | None
    schema_name: str | None
    schemas: dict[tuple[TableId, tuple[str, ...]], TableSchema]
    """TableSchema per (table, primary key), built once per plan."""
    before_separable: bool = False
    """The payload's ``before`` image can be cut off unparsed (see `_before_separable`)."""


def _classify(schema: dict[str, Any], topic: str) -> str:
    name = schema.get("name") or ""
    if name == "io.debezium.connector.common.Heartbeat" or topic.startswith(HEARTBEAT_PREFIX):
        return "heartbeat"
    if name.endswith("TransactionMetadataValue"):
        return "transaction"
    if name.endswith("SchemaChangeValue"):
        return "schema_change"
    if name.endswith(".MessageValue"):
        return "other"
    field_names = {f.get("field") for f in schema.get("fields") or ()}
    if {"op", "source"} <= field_names and ({"after", "before"} & field_names):
        return "row"
    if topic.endswith(".transaction") and "status" in field_names:
        return "transaction"
    return "other"


def build_plan(schema: dict[str, Any], topic: str, *, postgres: bool, placeholder: str = PLACEHOLDER) -> _RowPlan:
    """Turn a value schema into a plan: columns from the ``after`` (or ``before``) struct."""
    kind = _classify(schema, topic)
    if kind != "row":
        return _RowPlan(kind, postgres, (), (), None, schema.get("name"), {})
    row_struct = None
    for field in schema["fields"]:
        if field.get("field") in ("after", "before") and field.get("type") == "struct":
            row_struct = field
            if field["field"] == "after":
                break
    if row_struct is None:
        raise ValueError(f"`{topic}` value schema must have a `before`/`after` struct; got {schema.get('name')!r}")
    columns = []
    converters = []
    for field in row_struct["fields"]:
        column, converter = column_plan(field)
        if postgres:
            converter = _toast_aware(converter, column.type, placeholder)
        columns.append(column)
        if converter is not None:
            converters.append((column.name, converter))
    return _RowPlan("row", postgres, tuple(columns), tuple(converters), compile_row_converter(tuple(converters)),
                    row_struct.get("name"), {}, _before_separable(schema, row_struct))


def _before_separable(schema: dict[str, Any], row_struct: dict[str, Any]) -> bool:
    """Whether the first ``,"after":`` in a payload that starts with a ``before`` object is the
    payload's own ``after`` key.

    Why it can be: inside a JSON string every quote is escaped, so ``,"`` never occurs there; the
    only other place is a key named ``after`` inside the ``before`` image, which needs a column (or a
    struct field) of that name or a map column (any keys). The payload must also list ``before``
    first, as Debezium's envelope schema does.
    """
    order = [field.get("field") for field in schema.get("fields") or ()]
    return order[:2] == ["before", "after"] and not _may_hold_after_key(row_struct)


def _may_hold_after_key(field: dict[str, Any]) -> bool:
    if field.get("type") == "map":
        return True
    items = field.get("items")
    return any(child.get("field") == "after" or _may_hold_after_key(child) for child in field.get("fields") or ()) or (
        isinstance(items, dict) and _may_hold_after_key(items))


def _ts(source_or_payload: dict[str, Any]) -> datetime | None:
    us = source_or_payload.get("ts_us")
    if us is not None:
        return _EPOCH_UTC + _MICROSECOND * us
    ms = source_or_payload.get("ts_ms")
    if ms is not None:
        return _EPOCH_UTC + _MILLISECOND * ms
    return None


def position_of(source: dict[str, Any], snapshot_kind: str | None) -> int:
    """The change's `position`: binlog file/pos/row for MariaDB/MySQL, LSN for PostgreSQL.

    MariaDB/MySQL: the binlog is in commit order, and an initial snapshot reads at the binlog
    position it then streams from, so file/pos/row orders everything.

    PostgreSQL: a streamed change gets the LSN of its WAL record (index 1). Per key that follows
    commit order: a second writer of a row waits for the first to commit. Rows of an initial (or
    blocking) snapshot get position 0: every streamed change of the slot committed after the
    snapshot, but a transaction that was open while the slot was created can carry a WAL LSN below
    the snapshot's, so the snapshot's LSN would wrongly win over it (Debezium itself stopped
    filtering streamed events by the snapshot LSN for this reason: DBZ-2288, debezium/debezium#1697).
    The embedded runtime gives its snapshot rows position 0 too (connectors/embedded/postgres.py). Rows of an incremental
    snapshot (``snapshot=incremental``) get the streaming LSN they were read at (index 0).
    """
    connector = source.get("connector")
    if connector == "postgresql":
        if snapshot_kind is not None and snapshot_kind != "incremental":
            return 0
        lsn = source.get("lsn")
        if lsn is None:
            # incremental-snapshot rows carry no lsn, only sequence = [last committed, current]
            lsn = _sequence_lsn(source.get("sequence"))
        if lsn is None:
            raise ValueError(f"`source.lsn` or `source.sequence` must be set for a PostgreSQL change; got {source!r}")
        return lsn_position(int(lsn), 0 if snapshot_kind == "incremental" else 1)
    file = source.get("file")
    if file is None:
        raise ValueError(f"`source.file` must be set for a {connector} change; got {source!r}")
    return binlog_position(file, int(source.get("pos") or 0), int(source.get("row") or 0))


def _sequence_lsn(sequence: Any) -> int | None:
    """The newest LSN of Debezium's PostgreSQL ``source.sequence`` (a JSON text ``["lsn", "lsn"]``)."""
    if not sequence:
        return None
    values = [int(v) for v in orjson.loads(sequence) if v is not None]
    return max(values) if values else None


def _txid(source: dict[str, Any], payload: dict[str, Any]) -> str | None:
    transaction = payload.get("transaction")
    if transaction and transaction.get("id") is not None:
        return str(transaction["id"])
    value = source.get("txId")  # PostgreSQL
    if value is None:
        value = source.get("gtid")  # MariaDB/MySQL
    return None if value is None else str(value)


class EnvelopeDecoder:
    """Decodes one source's records. Keeps plans per schema; not thread-safe (one per agent)."""

    def __init__(self, source: str, branch: str, *, placeholder: str = PLACEHOLDER, max_plans: int = 4096,
                 keep_update_before: bool = False) -> None:
        self.source = source
        self.branch = branch
        self.placeholder = placeholder
        self.keep_update_before = keep_update_before
        """Decode the ``before`` image of updates too. Off by default: sinks write ``after`` (or
        the key of a delete), PostgreSQL's default replica identity sends no old row anyway, and
        decoding it doubles the cost of an update."""
        self._tables: dict[tuple[Any, Any, Any], TableId] = {}
        self._last_table: tuple[Any, TableId | None] = (None, None)
        self._last_schema: tuple[Any, Any, Any, TableSchema | None] = (None, None, None, None)
        """(plan, table, key names, schema) of the last row: one table's records share them."""
        self._files: dict[str, int] = {}
        self._last_ts: tuple[Any, datetime | None] = (None, None)
        self._plans: dict[bytes, _RowPlan] = {}
        self._last: dict[str, tuple[bytes, _RowPlan, bytes]] = {}
        """Per topic: (schema bytes, plan, the record prefix up to the payload) of its last record."""
        self._keys: dict[bytes, tuple[str, ...]] = {}
        self._last_key: dict[str, tuple[bytes, tuple[str, ...], bytes]] = {}
        self._max_plans = max_plans

    # -- splitting -----------------------------------------------------------------------------

    @staticmethod
    def _split(raw: bytes) -> tuple[bytes, Any]:
        """(schema bytes, parsed payload). Fast path: JsonConverter writes schema then payload,
        compact, so the payload is parsed alone and the schema bytes serve as the cache key."""
        if raw.startswith(_SCHEMA_HEAD):
            index = raw.find(_PAYLOAD_SEP)
            if index > 0 and raw.endswith(b"}"):
                try:
                    return raw[len(_SCHEMA_HEAD):index], orjson.loads(raw[index + len(_PAYLOAD_SEP):-1])
                except orjson.JSONDecodeError:
                    pass  # unusual layout: parse the whole record below
        document = orjson.loads(raw)
        if not isinstance(document, dict) or "schema" not in document or "payload" not in document:
            raise ValueError("record must be a JsonConverter envelope with schemas.enable=true "
                             "({\"schema\": ..., \"payload\": ...})")
        return orjson.dumps(document["schema"]), document["payload"]

    def _plan(self, topic: str, schema_bytes: bytes, postgres_hint: bool | None) -> _RowPlan:
        last = self._last.get(topic)
        if last is not None and last[0] == schema_bytes:
            return last[1]
        plan = self._plans.get(schema_bytes)
        if plan is None:
            schema = orjson.loads(schema_bytes)
            postgres = postgres_hint if postgres_hint is not None else _looks_postgres(schema)
            plan = build_plan(schema, topic, postgres=postgres, placeholder=self.placeholder)
            if len(self._plans) >= self._max_plans:
                self._plans.clear()
            self._plans[schema_bytes] = plan
        self._last[topic] = (schema_bytes, plan, _prefix(schema_bytes))
        return plan

    def _key_names(self, topic: str, key: bytes | None, parse: bool = True) -> tuple[tuple[str, ...], Any]:
        """Primary-key column names from the key schema (and the key payload when `parse`)."""
        if key is None:
            return (), None
        if not parse:
            last_key = self._last_key.get(topic)
            if last_key is not None and key.startswith(last_key[2]) and key.endswith(b"}"):
                return last_key[1], None
        if not parse and key.startswith(_SCHEMA_HEAD) and (index := key.find(_PAYLOAD_SEP)) > 0:
            schema_bytes, payload = key[len(_SCHEMA_HEAD):index], None
        else:
            schema_bytes, payload = self._split(key)
        last = self._last_key.get(topic)
        if last is not None and last[0] == schema_bytes:
            return last[1], payload
        names = self._keys.get(schema_bytes)
        if names is None:
            schema = orjson.loads(schema_bytes)
            if schema is None:
                names = ()
            elif schema.get("type") == "struct":
                names = tuple(f["field"] for f in schema.get("fields") or ())
            else:
                names = ()
            self._keys[schema_bytes] = names
        self._last_key[topic] = (schema_bytes, names, _prefix(schema_bytes))
        return names, payload

    # -- decoding ------------------------------------------------------------------------------

    def decode(self, topic: str, key: bytes | None, value: bytes | None) -> Decoded:
        """One Kafka record -> a `RowChange` or a non-row result. Raises `BadRecordError` naming the
        topic, and the table, key and position when they are known."""
        try:
            if value is None:
                _, key_payload = self._key_names(topic, key)
                return Tombstone(topic, key_payload if isinstance(key_payload, dict) else None)
            last = self._last.get(topic)
            if last is not None and value.startswith(last[2]) and value[-1] == _CLOSE:
                # the schema of this topic's last record: compare bytes, parse the payload only
                plan = last[1]
                start = len(last[2])
                if plan.before_separable and not self.keep_update_before and value.startswith(_BEFORE_OBJECT, start):
                    payload = self._payload_without_before(value, start)
                else:
                    payload = orjson.loads(memoryview(value)[start:-1])
            else:
                schema_bytes, payload = self._split(value)
                plan = self._plan(topic, schema_bytes, None)
        except BadRecordError:
            raise
        except Exception as exc:
            raise BadRecordError(f"`{topic}` record must be a Debezium JSON envelope; got {exc}") from exc
        if plan.kind == "row":
            return self._row(topic, key, payload, plan)
        if plan.kind == "heartbeat":
            return Heartbeat(topic, _ts(payload) if isinstance(payload, dict) else None)
        if plan.kind == "transaction":
            return TransactionMarker(str(payload.get("status")), str(payload.get("id")),
                                     payload.get("event_count"), _ts(payload))
        if plan.kind == "schema_change":
            return SchemaChangeRecord(topic, payload.get("ddl") if isinstance(payload, dict) else None)
        return OtherRecord(topic, plan.schema_name or "unknown")

    @staticmethod
    def _payload_without_before(value: bytes, start: int) -> Any:
        """The payload parsed from its ``after`` key on; ``before`` is parsed only for a delete.

        Why: an update's ``before`` image is about half its payload, and only a delete uses it
        (unless `keep_update_before`); parsing it for nothing was ~4% of the streams stages."""
        split = value.find(_AFTER_KEY, start + len(_BEFORE_OBJECT))
        if split < 0:  # no `after` key: parse it all, and let the checks below name what is wrong
            return orjson.loads(memoryview(value)[start:-1])
        payload = orjson.loads(b"{" + value[split + 1:-1])
        if isinstance(payload, dict) and payload.get("op") == "d":
            payload["before"] = orjson.loads(memoryview(value)[start + len(_BEFORE_OBJECT) - 1:split])
        return payload

    def _source_ts(self, source: dict[str, Any]) -> datetime | None:
        """`_ts` with the last value cached: the changes of one transaction share their commit time."""
        stamp = source.get("ts_us") or source.get("ts_ms")
        last = self._last_ts
        if last[0] == stamp and stamp is not None:
            return last[1]
        value = _ts(source)
        self._last_ts = (stamp, value)
        return value

    def _table(self, name: tuple[Any, Any, Any]) -> TableId:
        """The `TableId` of (db, schema, table) from a source block; `_row` checks the last one inline."""
        table = self._tables.get(name)
        if table is None:
            table = TableId(source=self.source, branch=self.branch, database=name[0] or "",
                            schema_=name[1], table=name[2] or "")
            self._tables[name] = table
        self._last_table = (name, table)
        return table

    def _row(self, topic: str, key: bytes | None, payload: dict[str, Any], plan: _RowPlan) -> RowChange:
        source = payload.get("source") or {}
        table_id: TableId | None = None
        position: int | None = None
        key_values: Any = None
        try:
            op = _OPS[payload["op"]]
            flag = source.get("snapshot")
            if flag is None or flag == "false" or flag is False:
                snapshot_kind = "true" if op is OP_READ else None
            else:
                snapshot_kind = str(flag) if str(flag) in _SNAPSHOT_TRUE else None
            name = (source.get("db"), source.get("schema"), source.get("table"))
            last_table = self._last_table
            table_id = last_table[1] if last_table[0] == name else self._table(name)
            file = source.get("file")
            if file is not None:  # MariaDB/MySQL: the file's sequence number is cached
                sequence = self._files.get(file)
                if sequence is None:
                    sequence = self._files[file] = binlog_position(file, 0, 0)
                # no int(): a position that is not an integer fails the shift or the `|` (TypeError)
                position = sequence | ((source.get("pos") or 0) << 24) | (source.get("row") or 0)
                if position >> 64 != sequence >> 64:
                    raise ValueError(f"`source.pos` must fit 40 bits; got {source.get('pos')!r}")
            else:
                position = position_of(source, snapshot_kind if op is OP_READ else None)
            last_key = self._last_key.get(topic)
            if last_key is not None and key is not None and key.startswith(last_key[2]) and key[-1] == _CLOSE:
                pk = last_key[1]  # this topic's key schema again: compared as bytes, nothing parsed
            else:
                pk = self._key_names(topic, key, parse=False)[0]
            before = payload.get("before")
            after = payload.get("after")
            converters = plan.converters
            if op is OP_UPDATE and not self.keep_update_before:
                before = None
            if before is not None:
                if op is OP_DELETE and plan.postgres:
                    # REPLICA IDENTITY DEFAULT: only the key is real, the other columns hold
                    # Debezium's fillers ("" for a NOT NULL uuid...): convert what converts
                    _convert_lenient(before, converters, pk)
                else:
                    plan.convert(before)  # type: ignore[misc]
            if after is not None:
                plan.convert(after)  # type: ignore[misc]
            image = before if op is OP_DELETE else after
            if op is OP_TRUNCATE:
                key_values = {}
            elif image is None:
                raise ValueError(f"`{payload['op']}` change must carry a row image")
            elif pk:
                key_values = {pk[0]: image[pk[0]]} if len(pk) == 1 else {name: image[name] for name in pk}
            else:
                key_values = dict(image)
            last_schema = self._last_schema
            if last_schema[0] is plan and last_schema[1] is table_id and last_schema[2] is pk:
                schema = last_schema[3]
            else:  # hashing a TableId (pydantic, five fields) costs more than this comparison
                schema = plan.schemas.get((table_id, pk))
                if schema is None:
                    schema = TableSchema(id=table_id, columns=plan.fields, primary_key=pk)
                    plan.schemas[(table_id, pk)] = schema
                self._last_schema = (plan, table_id, pk, schema)
            # commit time and transaction id, inline: the changes of one transaction share them
            stamp = source.get("ts_us") or source.get("ts_ms")
            last_ts = self._last_ts
            source_ts = last_ts[1] if stamp is not None and last_ts[0] == stamp else self._source_ts(source)
            if payload.get("transaction") is None:
                txid = source.get("txId")  # PostgreSQL
                if txid is None:
                    txid = source.get("gtid")  # MariaDB/MySQL
                if txid is not None and txid.__class__ is not str:
                    txid = str(txid)
            else:
                txid = _txid(source, payload)
            event = new_event({
                "op": op, "table": table_id, "key": key_values, "before": before, "after": after,
                "position": position, "source_ts": source_ts, "txid": txid, "snapshot": snapshot_kind is not None,
            })
        except Exception as exc:
            where = table_id.qualified if table_id is not None else topic
            if key_values is None and key is not None:
                key_values = _raw_key(key)
            raise BadRecordError(
                f"`{where}` change must decode (topic {topic}, key {key_values!r}, position {position!r}); "
                f"got {type(exc).__name__}: {exc}"
            ) from exc
        return RowChange(event, schema)


def _prefix(schema_bytes: bytes) -> bytes:
    """``{"schema":<schema_bytes>,"payload":``: a record that starts with it (and ends with ``}``) has
    that schema, found with one memory compare instead of a parse."""
    return _SCHEMA_HEAD + schema_bytes + _PAYLOAD_SEP


def _raw_key(key: bytes) -> Any:
    """The key record's payload as sent (for error messages about records that did not decode)."""
    try:
        document = orjson.loads(key)
    except orjson.JSONDecodeError:
        return key[:200]
    return document.get("payload") if isinstance(document, dict) else document


def _convert(row: dict[str, Any], converters: tuple[tuple[str, Converter], ...]) -> None:
    for name, convert in converters:
        value = row.get(name)
        if value is not None:
            row[name] = convert(value)


def _convert_lenient(row: dict[str, Any], converters: tuple[tuple[str, Converter], ...],
                     key: tuple[str, ...]) -> None:
    for name, convert in converters:
        value = row.get(name)
        if value is not None:
            try:
                row[name] = convert(value)
            except (ValueError, TypeError, ArithmeticError, binascii.Error):
                if name in key:
                    raise
                row[name] = None


def _looks_postgres(schema: dict[str, Any]) -> bool:
    """True when the envelope's source block is the PostgreSQL connector's (it has ``lsn``)."""
    for field in schema.get("fields") or ():
        if field.get("field") == "source":
            names = (schema_name := field.get("name") or "", {f.get("field") for f in field.get("fields") or ()})
            return "postgresql" in schema_name or "lsn" in names[1]
    return False


__all__ = [
    "PLACEHOLDER",
    "Decoded",
    "EnvelopeDecoder",
    "Heartbeat",
    "OtherRecord",
    "RowChange",
    "SchemaChangeRecord",
    "Tombstone",
    "TransactionMarker",
    "build_plan",
    "column_plan",
    "position_of",
]
