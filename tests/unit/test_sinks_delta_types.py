"""Type mapping into Delta (Arrow) types and the value conversions that keep values exact."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pyarrow as pa
import pytest
from branchline.events import Column, ColumnType, Json
from branchline.sinks.delta.types import arrow_type, converter


@pytest.mark.parametrize(
    ("column", "expected"),
    [
        (Column(name="c", type=ColumnType.UINT64), pa.decimal128(20, 0)),
        (Column(name="c", type=ColumnType.DECIMAL, precision=18, scale=4), pa.decimal128(18, 4)),
        (Column(name="c", type=ColumnType.DECIMAL), pa.string()),
        (Column(name="c", type=ColumnType.DECIMAL, precision=65, scale=30), pa.string()),
        (Column(name="c", type=ColumnType.TIMESTAMP), pa.timestamp("us")),
        (Column(name="c", type=ColumnType.TIMESTAMPTZ), pa.timestamp("us", tz="UTC")),
        (Column(name="c", type=ColumnType.TIME), pa.int64()),
        (Column(name="c", type=ColumnType.SET), pa.list_(pa.string())),
        (Column(name="c", type=ColumnType.JSON), pa.string()),
    ],
)
def test_arrow_type(column: Column, expected: pa.DataType) -> None:
    assert arrow_type(column) == expected


def test_every_column_type_has_an_arrow_type() -> None:
    for kind in ColumnType:
        assert arrow_type(Column(name="c", type=kind)) is not None


def test_conversions_are_exact() -> None:
    def convert(kind: ColumnType, value: object, **extra: object) -> object:
        function = converter(Column(name="c", type=kind, **extra))  # type: ignore[arg-type]
        assert function is not None
        return function(value)

    assert convert(ColumnType.UINT64, 2**64 - 1) == Decimal(2**64 - 1)
    assert convert(ColumnType.TIME, timedelta(hours=-838, microseconds=-1)) == -(838 * 3600 * 10**6) - 1
    assert convert(ColumnType.JSON, Json({"a": Decimal("1.10")})) == '{"a":1.10}'
    assert convert(ColumnType.JSON, Json(None)) == "null"
    u = uuid.uuid4()
    assert convert(ColumnType.UUID, u) == str(u)
    aware = datetime(2026, 1, 1, 12, tzinfo=timezone(timedelta(hours=2)))
    assert convert(ColumnType.TIMESTAMP, aware) == datetime(2026, 1, 1, 10)
    assert convert(ColumnType.TIMESTAMPTZ, datetime(2026, 1, 1)) == datetime(2026, 1, 1, tzinfo=UTC)
    assert convert(ColumnType.BITS, 5, length=4) == "0101"
    assert convert(ColumnType.DECIMAL, Decimal("1E-40")) == "1E-40"
