"""A parser of PostgreSQL's pgoutput logical-replication messages (protocol version 1), and the
text-format value decoders shared by the stream and the snapshot.

Pure functions over bytes: no connection. Messages come from a walsender (the payload of each
XLogData message of ``START_REPLICATION ... LOGICAL``) or from ``pg_logical_slot_*_binary_changes``
(one message per row of the result): the bytes are the same; the layout is documented in
"Logical Replication Message Formats" of the PostgreSQL manual.
"""

from __future__ import annotations

import re
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from operator import call
from typing import Any

import orjson
from branchline.errors import BadRecordError
from branchline.events import UNCHANGED, ColumnType, Json, iso_interval

PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01 in microseconds since 1970-01-01

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_BEGIN = struct.Struct("!QqI")
_COMMIT = struct.Struct("!BQQq")

# -- text-format values ----------------------------------------------------------------------


def _bool(text: str) -> bool:
    return text in ("t", "true")


def _bytea(text: str) -> bytes:
    if text.startswith("\\x"):
        return bytes.fromhex(text[2:])
    raise ValueError("bytea must be in hex output format")


def _time(text: str) -> timedelta:
    hours, minutes, seconds = text.split(":")
    whole, _, fraction = seconds.partition(".")
    micros = int((fraction + "000000")[:6]) if fraction else 0
    return timedelta(hours=int(hours), minutes=int(minutes), seconds=int(whole), microseconds=micros)


def _timestamp(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _timestamptz(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _json(text: str) -> Json:
    return Json(orjson.loads(text))


_ARRAY_ITEM = re.compile(r'"((?:[^"\\]|\\.)*)"|([^,{}"]+)')


def text_array(text: str) -> list[str | None]:
    """A one-dimensional PostgreSQL array literal -> list of str (NULL -> None)."""
    if text.startswith("["):  # explicit bounds: [0:1]={a,b}
        text = text[text.index("=") + 1 :]
    if not (text.startswith("{") and text.endswith("}")):
        raise ValueError(f"array must be a {{...}} literal; got {text!r}")
    items: list[str | None] = []
    for quoted, bare in _ARRAY_ITEM.findall(text[1:-1]):
        if bare:
            bare = bare.strip()
            items.append(None if bare == "NULL" else bare)
        else:
            items.append(re.sub(r"\\(.)", r"\1", quoted))
    return items


def _str(text: str) -> str:
    return text


# type OID -> (column type, decoder of the text format)
TYPES: dict[int, tuple[ColumnType, Callable[[str], Any]]] = {
    16: (ColumnType.BOOLEAN, _bool),
    17: (ColumnType.BYTES, _bytea),
    18: (ColumnType.STRING, _str),
    19: (ColumnType.STRING, _str),
    20: (ColumnType.INT64, int),
    21: (ColumnType.INT16, int),
    23: (ColumnType.INT32, int),
    25: (ColumnType.STRING, _str),
    26: (ColumnType.INT64, int),
    114: (ColumnType.JSON, _json),
    700: (ColumnType.FLOAT32, float),
    701: (ColumnType.FLOAT64, float),
    1009: (ColumnType.STRING_ARRAY, text_array),
    1015: (ColumnType.STRING_ARRAY, text_array),
    1042: (ColumnType.STRING, _str),
    1043: (ColumnType.STRING, _str),
    1082: (ColumnType.DATE, date.fromisoformat),
    1083: (ColumnType.TIME, _time),
    1114: (ColumnType.TIMESTAMP, _timestamp),
    1184: (ColumnType.TIMESTAMPTZ, _timestamptz),
    1186: (ColumnType.STRING, iso_interval),  # as Debezium's interval.handling.mode=string
    1560: (ColumnType.BITS, _str),
    1562: (ColumnType.BITS, _str),
    1700: (ColumnType.DECIMAL, Decimal),
    2950: (ColumnType.UUID, uuid.UUID),
    3802: (ColumnType.JSON, _json),
}

SESSION_GUCS = {"TimeZone": "UTC", "DateStyle": "ISO,MDY", "IntervalStyle": "iso_8601",
                "extra_float_digits": "1", "bytea_output": "hex"}
"""Output formats the text decoders expect, on every session whose output functions make the text."""

SESSION_SETTINGS = "; ".join(f"SET {name}='{value}'" for name, value in SESSION_GUCS.items())
"""`SESSION_GUCS` as SQL, for connections that read values as text (snapshot, catalog)."""

SESSION_OPTIONS = " ".join(f"-c {name}={value}" for name, value in SESSION_GUCS.items())
"""`SESSION_GUCS` as the libpq ``options`` of a replication connection: the walsender runs
pgoutput's output functions, so its session needs the same formats as the snapshot's."""


def _bit1(text: str) -> bool:
    return text == "1"


def decoder_for(type_oid: int, typmod: int = -1) -> Callable[[str], Any]:
    """The text decoder of a type; ``bit(1)`` is a boolean, as Debezium maps it."""
    if type_oid == 1560 and typmod == 1:
        return _bit1
    entry = TYPES.get(type_oid)
    return entry[1] if entry else _str


def column_type_for(type_oid: int, typtype: str = "b", typmod: int = -1) -> ColumnType:
    if type_oid == 1560 and typmod == 1:
        return ColumnType.BOOLEAN
    if typtype == "e":
        return ColumnType.ENUM
    entry = TYPES.get(type_oid)
    return entry[0] if entry else ColumnType.STRING


# -- messages --------------------------------------------------------------------------------


@dataclass(slots=True)
class Relation:
    """A 'R' message: the table's columns as the publisher sends them in tuples."""

    relid: int
    namespace: str
    name: str
    replica_identity: str
    columns: list[tuple[str, int, int, bool]]
    """(name, type OID, typmod, part of the replica identity key)."""
    names: tuple[str, ...] = ()
    decoders: tuple[Callable[[str], Any], ...] = ()

    def __post_init__(self) -> None:
        self.names = tuple(c[0] for c in self.columns)
        self.decoders = tuple(decoder_for(c[1], c[2]) for c in self.columns)


@dataclass(slots=True)
class Begin:
    final_lsn: int
    commit_ts: datetime
    xid: int


@dataclass(slots=True)
class Commit:
    commit_lsn: int
    end_lsn: int
    commit_ts: datetime


@dataclass(slots=True)
class RowChange:
    """'I', 'U' or 'D'. ``old`` is the key ('K') or full old row ('O'), when the publisher sent it."""

    kind: str
    relation: Relation
    old: dict[str, Any] | None
    new: dict[str, Any] | None
    old_is_key: bool = False


@dataclass(slots=True)
class Truncate:
    relations: list[Relation]
    cascade: bool
    restart_identity: bool


class TextRow:
    """One row change as the walsender sent it, values undecoded (`PgOutputParser.parse_text`), with what
    the event built from it needs: `text_row_events` turns it into the `ChangeEvent` objects `stream` makes by
    default. ``table`` is the captured table (what the capture loop and `batch_schemas` look at)."""

    __slots__ = ("change", "position", "source_ts", "table", "txid")

    def __init__(self, change: RowChange, table: Any, position: int, source_ts: Any, txid: str | None) -> None:
        self.change = change
        self.table = table
        self.position = position
        self.source_ts = source_ts
        self.txid = txid


def _ts(micros: int) -> datetime:
    return datetime.fromtimestamp((micros + PG_EPOCH_US) / 1_000_000, UTC)


def _cstring(data: bytes, offset: int) -> tuple[str, int]:
    end = data.index(b"\x00", offset)
    return data[offset:end].decode(), end + 1


def _tuple(data: bytes, offset: int, relation: Relation) -> tuple[dict[str, Any], int]:
    (count,) = _I16.unpack_from(data, offset)
    offset += 2
    names, decoders = relation.names, relation.decoders
    if count != len(names):
        raise BadRecordError(
            f"`{relation.namespace}.{relation.name}` tuple must have {len(names)} columns; got {count}")
    row: dict[str, Any] = {}
    for i in range(count):
        kind = data[offset]
        offset += 1
        if kind == 0x74:  # 't'
            (length,) = _I32.unpack_from(data, offset)
            offset += 4
            text = data[offset : offset + length].decode()
            offset += length
            try:
                row[names[i]] = decoders[i](text)
            except (ValueError, ArithmeticError) as exc:
                raise BadRecordError(
                    f"`{relation.namespace}.{relation.name}.{names[i]}` must decode; got {text[:80]!r}"
                ) from exc
        elif kind == 0x6E:  # 'n'
            row[names[i]] = None
        elif kind == 0x75:  # 'u': unchanged TOAST, not sent
            row[names[i]] = UNCHANGED
        else:
            raise BadRecordError(f"pgoutput tuple column kind must be t/n/u; got {chr(kind)!r}")
    return row, offset


def text_tuple(data: bytes, offset: int, relation: Relation) -> tuple[Any, int]:
    """A tuple's values as PostgreSQL's text output, undecoded: str, None for NULL, ``...`` (Ellipsis) for an
    unchanged TOAST value; a tuple when every value is a str, else a list (the decoder's fast path needs no
    scan for NULLs). Returns (values, offset after the tuple).

    Why: the capture process of `branchline run` only carries rows into the spool; splitting the tuple is
    all it needs, and str/None/Ellipsis tuples marshal ~30x faster than pickling decoded values. The
    runner decodes them (`decode_text_tuple`) with the same decoders `_tuple` uses."""
    (count,) = _I16.unpack_from(data, offset)
    offset += 2
    if count != len(relation.names):
        raise BadRecordError(
            f"`{relation.namespace}.{relation.name}` tuple must have {len(relation.names)} columns; got {count}")
    values: list[str | None] = []
    append = values.append
    unpack = _I32.unpack_from
    plain = True
    for _ in range(count):
        kind = data[offset]
        if kind == 0x74:  # 't'
            start = offset + 5
            offset = start + unpack(data, offset + 1)[0]
            append(data[start:offset].decode())
        elif kind == 0x6E:  # 'n'
            append(None)
            offset += 1
            plain = False
        elif kind == 0x75:  # 'u'
            append(...)  # type: ignore[arg-type]
            offset += 1
            plain = False
        else:
            raise BadRecordError(f"pgoutput tuple column kind must be t/n/u; got {chr(kind)!r}")
    return tuple(values) if plain else values, offset  # type: ignore[return-value]


_SAME_IN_C: dict[Any, Any] = {_str: str, _timestamp: datetime.fromisoformat}
"""Decoders whose value a builtin gives without a Python frame (``str`` of a str is the str itself)."""


def text_decoders(columns: tuple[tuple[str, int, int], ...]) -> tuple[Callable[[str], Any], ...]:
    """The decoders of a relation's (name, type OID, typmod) columns, as `Relation.decoders` has them,
    the pure wrappers replaced by the builtins they wrap (`_SAME_IN_C`)."""
    return tuple(_SAME_IN_C.get(d, d) for d in (decoder_for(oid, typmod) for _, oid, typmod in columns))


def decode_text_tuple(names: tuple[str, ...], decoders: tuple[Callable[[str], Any], ...],
                      values: tuple[Any, ...] | list[Any], where: str) -> dict[str, Any]:
    """`text_tuple`'s values -> the row dict `_tuple` makes from the same bytes (``where``: schema.table)."""
    try:
        if values.__class__ is tuple:  # every value a str
            return dict(zip(names, map(call, decoders, values)))
        return {n: d(v) if v.__class__ is str else (None if v is None else UNCHANGED)
                for n, d, v in zip(names, decoders, values)}
    except (ValueError, ArithmeticError) as exc:
        for name, decoder, value in zip(names, decoders, values):  # name the column, as `_tuple` does
            if value.__class__ is str:
                try:
                    decoder(value)
                except (ValueError, ArithmeticError):
                    raise BadRecordError(f"`{where}.{name}` must decode; got {value[:80]!r}") from exc
        raise


_ROW_KINDS = frozenset(b"IUD")
"""Message types that carry row images: insert, update, delete."""


class PgOutputParser:
    """Stateful only in the relations it has seen ('R' precedes the first change of a table)."""

    def __init__(self) -> None:
        self.relations: dict[int, Relation] = {}

    def parse_text(self, data: bytes) -> Begin | Commit | Relation | RowChange | Truncate | None:
        """`parse`, except that a row change's ``old``/``new`` are `text_tuple` values, not decoded dicts."""
        if data[0] in _ROW_KINDS:
            return self._row_change(data, text_tuple)
        return self.parse(data)

    def parse(self, data: bytes) -> Begin | Commit | Relation | RowChange | Truncate | None:
        """One message -> its model; None for messages without row data (Origin, Type, Message)."""
        kind = data[0]
        if kind in _ROW_KINDS:
            return self._row_change(data, _tuple)
        if kind == 0x42:  # 'B'
            final_lsn, ts, xid = _BEGIN.unpack_from(data, 1)
            return Begin(final_lsn, _ts(ts), xid)
        if kind == 0x43:  # 'C'
            _, commit_lsn, end_lsn, ts = _COMMIT.unpack_from(data, 1)
            return Commit(commit_lsn, end_lsn, _ts(ts))
        if kind == 0x52:  # 'R'
            (relid,) = _U32.unpack_from(data, 1)
            namespace, offset = _cstring(data, 5)
            name, offset = _cstring(data, offset)
            identity = chr(data[offset])
            (count,) = _I16.unpack_from(data, offset + 1)
            offset += 3
            columns = []
            for _ in range(count):
                flags = data[offset]
                column, offset = _cstring(data, offset + 1)
                type_oid, typmod = struct.unpack_from("!Ii", data, offset)
                offset += 8
                columns.append((column, type_oid, typmod, bool(flags & 1)))
            relation = Relation(relid, namespace, name, identity, columns)
            self.relations[relid] = relation
            return relation
        if kind == 0x54:  # 'T'
            (count,) = _I32.unpack_from(data, 1)
            options = data[5]
            relids = struct.unpack_from(f"!{count}I", data, 6)
            return Truncate([self._relation(r) for r in relids], bool(options & 1), bool(options & 2))
        if kind in (0x4F, 0x59, 0x4D):  # 'O' origin, 'Y' type, 'M' logical message
            return None
        raise BadRecordError(f"pgoutput message type must be known; got {chr(kind)!r}")

    def _row_change(self, data: bytes, read_tuple: Callable[[bytes, int, Relation], tuple[Any, int]]) -> RowChange:
        """An 'I', 'U' or 'D' message; `read_tuple` reads its row images (decoded dicts, or pgoutput's text)."""
        kind = data[0]
        relation = self._relation(_U32.unpack_from(data, 1)[0])
        if kind == 0x49:  # 'I': byte 5 is 'N'
            return RowChange("I", relation, None, read_tuple(data, 6, relation)[0])
        if kind == 0x44:  # 'D': byte 5 is 'K' (key only) or 'O' (old row)
            return RowChange("D", relation, read_tuple(data, 6, relation)[0], None, data[5] == 0x4B)
        offset = 5
        old = None
        marker = data[offset]
        old_is_key = marker == 0x4B
        if marker in (0x4B, 0x4F):  # 'K' / 'O' before the new row's 'N'
            old, offset = read_tuple(data, offset + 1, relation)
        new, _ = read_tuple(data, offset + 1, relation)
        return RowChange("U", relation, old, new, old_is_key)

    def _relation(self, relid: int) -> Relation:
        try:
            return self.relations[relid]
        except KeyError:
            raise BadRecordError(f"pgoutput relation {relid} must be announced before its rows") from None
