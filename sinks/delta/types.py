"""Source column types -> Arrow/Delta types, and event values -> Arrow values.

| ColumnType  | Delta (Arrow)                         | note                                              |
|-------------|---------------------------------------|---------------------------------------------------|
| BOOLEAN     | boolean                               |                                                   |
| INT16/YEAR  | short (int16)                         |                                                   |
| INT32       | integer (int32)                       |                                                   |
| INT64       | long (int64)                          |                                                   |
| UINT64      | decimal(20,0)                         | Delta has no unsigned types                       |
| DECIMAL     | decimal(p,s); string if unconstrained | Delta decimals stop at 38 digits                  |
| FLOAT32/64  | float / double                        |                                                   |
| STRING/ENUM | string                                |                                                   |
| BYTES       | binary                                |                                                   |
| DATE        | date                                  |                                                   |
| TIME        | long: microseconds                    | MySQL TIME may be negative or > 24 h; no Delta type |
| INTERVAL    | long: microseconds                    |                                                   |
| TIMESTAMP   | timestamp_ntz (microseconds)          | needs the timestampNtz table feature              |
| TIMESTAMPTZ | timestamp (UTC, microseconds)         |                                                   |
| JSON        | string (JSON text)                    |                                                   |
| UUID        | string                                |                                                   |
| SET / STRING_ARRAY | array<string>                  |                                                   |
| BITS        | string of 0/1                         |                                                   |
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pyarrow as pa
from branchline.events import Column, ColumnType, Json
from branchline.sinks._values import bits_text

_MICRO = timedelta(microseconds=1)

_FIXED: dict[ColumnType, pa.DataType] = {
    ColumnType.BOOLEAN: pa.bool_(),
    ColumnType.INT16: pa.int16(),
    ColumnType.YEAR: pa.int16(),
    ColumnType.INT32: pa.int32(),
    ColumnType.INT64: pa.int64(),
    ColumnType.UINT64: pa.decimal128(20, 0),
    ColumnType.FLOAT32: pa.float32(),
    ColumnType.FLOAT64: pa.float64(),
    ColumnType.STRING: pa.string(),
    ColumnType.ENUM: pa.string(),
    ColumnType.BYTES: pa.binary(),
    ColumnType.DATE: pa.date32(),
    ColumnType.TIME: pa.int64(),
    ColumnType.INTERVAL: pa.int64(),
    ColumnType.TIMESTAMP: pa.timestamp("us"),
    ColumnType.TIMESTAMPTZ: pa.timestamp("us", tz="UTC"),
    ColumnType.JSON: pa.string(),
    ColumnType.UUID: pa.string(),
    ColumnType.SET: pa.list_(pa.string()),
    ColumnType.STRING_ARRAY: pa.list_(pa.string()),
    ColumnType.BITS: pa.string(),
}

POSITION = pa.decimal128(38, 0)
UTC_TS = pa.timestamp("us", tz="UTC")


def arrow_type(column: Column) -> pa.DataType:
    if column.type is ColumnType.DECIMAL:
        if column.precision is None or column.precision > 38:
            return pa.string()
        return pa.decimal128(column.precision, column.scale or 0)
    return _FIXED[column.type]


Converter = Callable[[Any], Any]


def _json(value: Any) -> Any:
    if isinstance(value, Json):
        return orjson.dumps(value.value, default=lambda d: orjson.Fragment(str(d))).decode()
    if isinstance(value, bytes):
        return value.decode()
    return value


def _micros(value: Any) -> Any:
    return value // _MICRO if isinstance(value, timedelta) else value


def _decimal(value: Any) -> Any:
    return Decimal(value) if isinstance(value, int) else value


def _naive(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC).replace(tzinfo=None)
    return value


def _aware(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _text(value: Any) -> Any:
    return str(value)


def _set(value: Any) -> Any:
    if isinstance(value, str):
        return value.split(",") if value else []
    return list(value)


def converter(column: Column) -> Converter | None:
    kind = column.type
    if kind is ColumnType.JSON:
        return _json
    if kind in (ColumnType.TIME, ColumnType.INTERVAL):
        return _micros
    if kind is ColumnType.UINT64:
        return _decimal
    if kind is ColumnType.DECIMAL:
        return _text if arrow_type(column) == pa.string() else _decimal
    if kind is ColumnType.TIMESTAMP:
        return _naive
    if kind is ColumnType.TIMESTAMPTZ:
        return _aware
    if kind is ColumnType.UUID:
        return _text
    if kind is ColumnType.BITS:
        length = column.length
        return lambda value: bits_text(value, length)
    if kind in (ColumnType.SET, ColumnType.STRING_ARRAY):
        return _set
    return None
