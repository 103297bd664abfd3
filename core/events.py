"""The change event: one model shared by both runtimes, every stream stage and every sink.

Why a pydantic model built with ``model_construct`` on the hot path: decoders have already checked
every value, and validating again costs more than the whole decode (see streams benchmarks).
Values are exact Python types: ``Decimal`` (never float) for DECIMAL/NUMERIC, naive ``datetime``
for DATETIME/timestamp, aware ``datetime`` in UTC for TIMESTAMP/timestamptz, ``date``, ``timedelta``
for TIME/interval (MySQL TIME may be negative or exceed 24 h), ``bytes``, ``int`` (unsigned 64-bit
included), ``str``, ``list[str]`` for SET and arrays, parsed JSON wrapped in `Json`.
"""

from __future__ import annotations

import enum
import re
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict


class Op(str, enum.Enum):
    """What happened to the row; the letters are Debezium's."""

    CREATE = "c"
    UPDATE = "u"
    DELETE = "d"
    READ = "r"  # a row read by a snapshot
    TRUNCATE = "t"


# The members as module globals, for the per-change paths: `Op.UPDATE` is an attribute lookup through
# the enum's metaclass (~100 ns on this machine), a global ~20 ns, and a change meets several.
OP_CREATE, OP_UPDATE, OP_DELETE, OP_READ, OP_TRUNCATE = Op.CREATE, Op.UPDATE, Op.DELETE, Op.READ, Op.TRUNCATE


class _Unchanged:
    """An unchanged TOASTed PostgreSQL value: the source did not send it; keep what the target has."""

    _instance: _Unchanged | None = None

    def __new__(cls) -> _Unchanged:  # noqa: PYI034 - a singleton: always the one instance, never a subclass
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"

    def __reduce__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Any = _Unchanged()
"""Sentinel for a value the source did not send (PostgreSQL TOAST); never written to a target."""


class Json:
    """A parsed JSON document, kept apart from plain strings so that sinks store it as JSON."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Json) and self.value == other.value

    def __hash__(self) -> int:
        return hash(repr(self.value))

    def __repr__(self) -> str:
        return f"Json({self.value!r})"


class TableId(BaseModel):
    """Which source table a change belongs to. ``branch`` is the site the source runs at."""

    model_config = ConfigDict(frozen=True)

    source: str
    """The source's name in the pipeline file."""
    branch: str
    """The branch (site) id; part of target keys when branch keys are on."""
    database: str
    """MariaDB/MySQL database, or PostgreSQL database."""
    schema_: str | None = None
    """PostgreSQL schema; None for MariaDB/MySQL."""
    table: str

    @property
    def qualified(self) -> str:
        """``database.table`` or ``schema.table``, as Debezium names it in topics."""
        return f"{self.schema_ or self.database}.{self.table}"


class ColumnType(str, enum.Enum):
    """Source-independent column types; sinks map each to their own (see sinks' type mapping)."""

    BOOLEAN = "boolean"
    INT16 = "int16"
    INT32 = "int32"
    INT64 = "int64"
    UINT64 = "uint64"
    DECIMAL = "decimal"  # precision/scale in Column; None precision = variable scale
    FLOAT32 = "float32"
    FLOAT64 = "float64"
    STRING = "string"
    BYTES = "bytes"
    DATE = "date"
    TIME = "time"  # MySQL TIME / PostgreSQL time: a timedelta, may be negative in MySQL
    TIMESTAMP = "timestamp"  # naive: DATETIME, PostgreSQL timestamp
    TIMESTAMPTZ = "timestamptz"  # instant in UTC: MySQL TIMESTAMP, PostgreSQL timestamptz
    INTERVAL = "interval"
    JSON = "json"
    UUID = "uuid"
    ENUM = "enum"  # text in the target
    SET = "set"  # list[str]; text[] in the target
    BITS = "bits"  # bit string of `length`
    YEAR = "year"
    STRING_ARRAY = "string_array"


class Column(BaseModel):
    """One column of a source table as the sinks need it to create and evolve the target."""

    model_config = ConfigDict(frozen=True)

    name: str
    type: ColumnType
    nullable: bool = True
    precision: int | None = None
    """DECIMAL precision, or fractional-second digits for times and timestamps."""
    scale: int | None = None
    length: int | None = None
    """BIT length, or the declared VARCHAR length (informative)."""
    source_type: str | None = None
    """The type as the source declares it, e.g. ``decimal(18,4)`` or ``bigint unsigned``."""


class TableSchema(BaseModel):
    """A source table's columns and primary key. An empty key means the table has none."""

    model_config = ConfigDict(frozen=True)

    id: TableId
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]

    def column(self, name: str) -> Column:
        for column in self.columns:
            if column.name == name:
                return column
        raise KeyError(name)


class ChangeEvent(BaseModel):
    """One change of one row, in the order the source committed it.

    ``position`` orders changes within one source (see `binlog_position` and `lsn_position`);
    sinks store it per row and never apply a lower position over a higher one.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    op: Op
    table: TableId
    key: dict[str, Any]
    """Primary-key values; for a table without a key, every column of the row."""
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    position: int
    source_ts: datetime | None = None
    """When the source committed the change (UTC)."""
    txid: str | None = None
    snapshot: bool = False

    @property
    def row(self) -> dict[str, Any] | None:
        """The row image a sink writes: ``after``, or ``before`` for a delete."""
        return self.before if self.op is Op.DELETE else self.after


# Position encoding: one integer per change, comparable within a source, small enough for
# numeric(38) and Delta's decimal(38,0). Low 24 bits: the change's index inside its event.
_ROW_BITS = 24
_POS_BITS = 40


def binlog_position(file: str, pos: int, row: int = 0) -> int:
    """Order of a MariaDB/MySQL change: binlog file sequence, event position, row within the event."""
    sequence = int(file.rsplit(".", 1)[-1])
    if pos >= 1 << _POS_BITS or row >= 1 << _ROW_BITS:
        raise ValueError(f"`binlog position` must fit 40/24 bits; got pos={pos!r} row={row!r}")
    return (sequence << (_POS_BITS + _ROW_BITS)) | (pos << _ROW_BITS) | row


def lsn_position(lsn: int, index: int = 0) -> int:
    """Order of a PostgreSQL change: its WAL LSN (and an index for changes sharing one)."""
    return (lsn << _ROW_BITS) | index


def parse_lsn(text: str) -> int:
    """``'16/B374D848'`` -> integer LSN."""
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(lsn: int) -> str:
    """Integer LSN -> ``'16/B374D848'``."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


# -- value conventions shared by both runtimes ---------------------------------------------------

_ISO_INTERVAL = re.compile(
    r"P(?:(?P<y>-?\d+)Y)?(?:(?P<mo>-?\d+)M)?(?:(?P<d>-?\d+)D)?"
    r"(?:T(?:(?P<h>-?\d+)H)?(?:(?P<mi>-?\d+)M)?(?:(?P<s>-?\d+(?:\.\d+)?)S)?)?$")


def iso_interval(text: str) -> str:
    """An ISO 8601 interval -> the spelling both runtimes give an INTERVAL value: Debezium's
    ``interval.handling.mode=string`` text, exact to the microsecond.

    Debezium spells every field (``P1Y2M3DT4H5M6.5S``, ``P0Y0M-3DT2H0M0S``) with the seconds' trailing
    zeros stripped; months stay months (a timedelta could not hold them exactly). Debezium passes the
    seconds through a double and cuts them to nine digits (``11.743671`` arrives as ``11.743670999``):
    PostgreSQL keeps microseconds, so rounding to six digits gives back the stored value on both paths.
    """
    match = _ISO_INTERVAL.match(text)
    if not match:
        raise ValueError(f"interval must be ISO 8601; got {text!r}")
    part = {k: v or "0" for k, v in match.groupdict().items()}
    seconds = Decimal(part["s"]).quantize(_MICROSECOND, ROUND_HALF_EVEN)
    seconds_text = "0" if seconds == 0 else format(seconds.normalize(), "f")
    return (f"P{int(part['y'])}Y{int(part['mo'])}M{int(part['d'])}DT{int(part['h'])}H{int(part['mi'])}M"
            f"{seconds_text}S")


_MICROSECOND = Decimal("0.000001")
