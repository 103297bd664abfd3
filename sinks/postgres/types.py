"""Source column types -> PostgreSQL target types, and which changes of a type the sink can absorb.

The mapping loses nothing (documented in docs of `target_type`); every name is spelled the way
``format_type()`` prints it, so the sink compares the catalog with what it wants as plain strings.

| source (MariaDB/MySQL; PostgreSQL)             | ColumnType  | target                          |
|------------------------------------------------|-------------|---------------------------------|
| BOOL/TINYINT(1); boolean                       | BOOLEAN     | boolean                         |
| TINYINT, SMALLINT; smallint                    | INT16       | smallint                        |
| MEDIUMINT, INT, SMALLINT UNSIGNED; integer     | INT32       | integer                         |
| BIGINT, INT UNSIGNED; bigint                   | INT64       | bigint                          |
| BIGINT UNSIGNED                                | UINT64      | numeric(20,0)                   |
| DECIMAL(p,s); numeric(p,s) / numeric           | DECIMAL     | numeric(p,s) / numeric          |
| FLOAT; real                                    | FLOAT32     | real                            |
| DOUBLE; double precision                       | FLOAT64     | double precision                |
| CHAR, VARCHAR, TEXT...; text, varchar, char    | STRING      | text                            |
| BINARY, VARBINARY, BLOB...; bytea              | BYTES       | bytea                           |
| DATE; date                                     | DATE        | date                            |
| TIME(p) (may be negative or > 24 h); time      | TIME        | interval                        |
| DATETIME(p); timestamp(p)                      | TIMESTAMP   | timestamp(p) without time zone  |
| TIMESTAMP(p); timestamptz(p)                   | TIMESTAMPTZ | timestamp(p) with time zone     |
| -; interval                                    | INTERVAL    | interval                        |
| JSON; json, jsonb                              | JSON        | jsonb                           |
| -; uuid                                        | UUID        | uuid                            |
| ENUM; enum types                               | ENUM        | text                            |
| SET                                            | SET         | text[]                          |
| BIT(n); bit(n), varbit(n)                      | BITS        | bit varying(n)                  |
| YEAR                                           | YEAR        | smallint                        |
| -; text[], varchar[]                           | STRING_ARRAY| text[]                          |

Notes: VARCHAR(n) becomes text (PostgreSQL stores both alike; a length check would only reject rows).
TIME becomes interval because MySQL TIME spans -838:59:59..838:59:59. JSON becomes jsonb, which keeps
the document but not its key order or whitespace. Text containing NUL bytes is rejected by
PostgreSQL: such a row stops the pipeline with its table, key and position.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from branchline.events import Column, ColumnType, Json
from branchline.sinks._values import bits_text

_FIXED: dict[ColumnType, str] = {
    ColumnType.BOOLEAN: "boolean",
    ColumnType.INT16: "smallint",
    ColumnType.INT32: "integer",
    ColumnType.INT64: "bigint",
    ColumnType.UINT64: "numeric(20,0)",
    ColumnType.FLOAT32: "real",
    ColumnType.FLOAT64: "double precision",
    ColumnType.STRING: "text",
    ColumnType.BYTES: "bytea",
    ColumnType.DATE: "date",
    ColumnType.TIME: "interval",
    ColumnType.INTERVAL: "interval",
    ColumnType.JSON: "jsonb",
    ColumnType.UUID: "uuid",
    ColumnType.ENUM: "text",
    ColumnType.SET: "text[]",
    ColumnType.YEAR: "smallint",
    ColumnType.STRING_ARRAY: "text[]",
}


def target_type(column: Column) -> str:
    """The PostgreSQL type that holds every value of ``column``, as ``format_type()`` spells it."""
    kind = column.type
    if kind in _FIXED:
        return _FIXED[kind]
    if kind is ColumnType.DECIMAL:
        if column.precision is None:
            return "numeric"
        return f"numeric({column.precision},{column.scale or 0})"
    if kind in (ColumnType.TIMESTAMP, ColumnType.TIMESTAMPTZ):
        zone = "with" if kind is ColumnType.TIMESTAMPTZ else "without"
        digits = 6 if column.precision is None else min(column.precision, 6)
        return f"timestamp({digits}) {zone} time zone"
    if kind is ColumnType.BITS:
        return f"bit varying({column.length})" if column.length else "bit varying"
    raise ValueError(f"`type` of column {column.name!r} must be a known ColumnType; got {kind!r}")


_INT_DIGITS = {"smallint": 5, "integer": 10, "bigint": 19}
_NUMERIC = re.compile(r"numeric\((\d+),(\d+)\)")
_MODIFIED = re.compile(r"(timestamp|bit varying)\((\d+)\)(.*)")


def merge_types(existing: str, wanted: str) -> str | None:
    """The narrowest type that holds values of both; ``existing`` if it already does; None if none fits.

    Widening only: integers grow into wider integers or numerics, numerics grow in integer digits and
    scale, real into double precision, timestamps in fractional digits, bit varying in length.
    """
    if existing == wanted:
        return existing
    if existing == "numeric" and (wanted in _INT_DIGITS or wanted.startswith("numeric")):
        return existing
    if wanted == "numeric" and (existing in _INT_DIGITS or existing.startswith("numeric")):
        return wanted
    if existing in _INT_DIGITS and wanted in _INT_DIGITS:
        return max(existing, wanted, key=_INT_DIGITS.__getitem__)
    shape1, shape2 = _numeric_shape(existing), _numeric_shape(wanted)
    if shape1 is not None and shape2 is not None:
        (p1, s1), (p2, s2) = shape1, shape2
        scale = max(s1, s2)
        whole = max(p1 - s1, p2 - s2)
        if whole + scale > 1000:
            return "numeric"
        merged = f"numeric({whole + scale},{scale})"
        return existing if merged == existing else merged
    if {existing, wanted} == {"real", "double precision"}:
        return "double precision"
    m1, m2 = _MODIFIED.fullmatch(existing), _MODIFIED.fullmatch(wanted)
    if m1 and m2 and m1.group(1) == m2.group(1) and m1.group(3) == m2.group(3):
        size = max(int(m1.group(2)), int(m2.group(2)))
        return f"{m1.group(1)}({size}){m1.group(3)}"
    if existing == "bit varying" and wanted.startswith("bit varying"):
        return existing
    if wanted == "bit varying" and existing.startswith("bit varying"):
        return wanted
    return None


def _numeric_shape(name: str) -> tuple[int, int] | None:
    """(precision, scale) of a fixed numeric, counting integers as numeric(digits,0)."""
    if name in _INT_DIGITS:
        return _INT_DIGITS[name], 0
    match = _NUMERIC.fullmatch(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


# --- values into COPY --------------------------------------------------------------------------------

Converter = Callable[[Any], Any]


def _json(value: Any) -> Any:
    if isinstance(value, Json):
        # JSON null must stay a document, not become SQL NULL
        return orjson.Fragment(b"null") if value.value is None else value.value
    if isinstance(value, str | bytes):
        return orjson.Fragment(
            value
        )  # already JSON text (e.g. MariaDB's LONGTEXT JSON); the server checks it
    return value


def _bits(length: int | None) -> Converter:
    return lambda value: bits_text(value, length)


def _uuid(value: Any) -> Any:
    if isinstance(value, str):
        return uuid.UUID(value)
    if isinstance(value, bytes):
        return uuid.UUID(bytes=value)
    return value


def _aware(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _naive(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC).replace(tzinfo=None)
    return value


def _set(value: Any) -> Any:
    if isinstance(value, str):
        return value.split(",") if value else []
    return list(value) if isinstance(value, tuple | set | frozenset) else value


def converter(column: Column) -> Converter | None:
    """A function that turns an event value into what COPY needs, or None when it is already right."""
    kind = column.type
    if kind is ColumnType.JSON:
        return _json
    if kind is ColumnType.BITS:
        return _bits(column.length)
    if kind is ColumnType.UUID:
        return _uuid
    if kind is ColumnType.TIMESTAMPTZ:
        return _aware
    if kind is ColumnType.TIMESTAMP:
        return _naive
    if kind in (ColumnType.SET, ColumnType.STRING_ARRAY):
        return _set
    return None


def is_normalizer(column: Column) -> bool:
    """True when `converter` only repairs values outside the event contract (naive vs aware times):
    psycopg raises TypeError on those, so the writer may skip it until it sees one."""
    return column.type in (ColumnType.TIMESTAMP, ColumnType.TIMESTAMPTZ)


TEXT_COPY_TYPES = frozenset({
    ColumnType.BOOLEAN, ColumnType.INT16, ColumnType.INT32, ColumnType.INT64, ColumnType.DECIMAL,
    ColumnType.FLOAT64, ColumnType.STRING, ColumnType.DATE, ColumnType.TIMESTAMP, ColumnType.TIMESTAMPTZ,
    ColumnType.UUID,
})
"""Types whose target column (`target_type`) parses a PostgreSQL source's text form into the value the
binary path writes: a table of only these may take `PostgresSink.write_text`."""

DUMPS_ANY_OBJECT = frozenset({ColumnType.BOOLEAN, ColumnType.TIME, ColumnType.INTERVAL})
"""Types whose psycopg binary dumper accepts any object (bool by truthiness, interval by duck typing).

The writer finds `UNCHANGED` in these columns by identity; in every other column without a converter
psycopg's dumper raises TypeError on it, and the writer looks for it only then. Pinned by
`tests/unit/test_sinks_postgres_types.py`, so a psycopg upgrade that changes a dumper fails a test."""


def staged_as_text(pg_type: str) -> bool:
    """Types psycopg cannot COPY in binary from Python values: staged as text, cast on insert."""
    return pg_type.startswith("bit")
