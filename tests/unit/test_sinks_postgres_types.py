"""Type mapping into PostgreSQL and the widening rules for a changed source column."""

from __future__ import annotations

import uuid

import orjson
import pytest
from branchline.events import Column, ColumnType, Json
from branchline.sinks.postgres.types import converter, merge_types, target_type


@pytest.mark.parametrize(
    ("column", "expected"),
    [
        (Column(name="c", type=ColumnType.DECIMAL, precision=18, scale=4), "numeric(18,4)"),
        (Column(name="c", type=ColumnType.DECIMAL), "numeric"),
        (Column(name="c", type=ColumnType.UINT64), "numeric(20,0)"),
        (Column(name="c", type=ColumnType.TIMESTAMP), "timestamp(6) without time zone"),
        (Column(name="c", type=ColumnType.TIMESTAMP, precision=3), "timestamp(3) without time zone"),
        (Column(name="c", type=ColumnType.TIMESTAMPTZ, precision=0), "timestamp(0) with time zone"),
        (Column(name="c", type=ColumnType.JSON), "jsonb"),
        (Column(name="c", type=ColumnType.ENUM), "text"),
        (Column(name="c", type=ColumnType.SET), "text[]"),
        (Column(name="c", type=ColumnType.BITS, length=7), "bit varying(7)"),
        (Column(name="c", type=ColumnType.TIME), "interval"),
        (Column(name="c", type=ColumnType.YEAR), "smallint"),
    ],
)
def test_target_type(column: Column, expected: str) -> None:
    assert target_type(column) == expected


def test_every_column_type_has_a_target() -> None:
    for kind in ColumnType:
        assert target_type(Column(name="c", type=kind))


@pytest.mark.parametrize(
    ("existing", "wanted", "merged"),
    [
        ("integer", "bigint", "bigint"),
        ("bigint", "integer", "bigint"),
        ("bigint", "numeric(20,0)", "numeric(20,0)"),
        ("numeric(10,2)", "numeric(12,4)", "numeric(12,4)"),
        ("numeric(10,2)", "numeric(8,4)", "numeric(12,4)"),  # 8 whole digits and 4 decimals fit both
        ("numeric(12,4)", "numeric(10,2)", "numeric(12,4)"),
        ("numeric(10,2)", "numeric", "numeric"),
        ("real", "double precision", "double precision"),
        (
            "timestamp(3) without time zone",
            "timestamp(6) without time zone",
            "timestamp(6) without time zone",
        ),
        ("bit varying(4)", "bit varying(8)", "bit varying(8)"),
        ("text", "text", "text"),
        ("integer", "text", None),
        ("timestamp(6) without time zone", "timestamp(6) with time zone", None),
        ("jsonb", "text", None),
    ],
)
def test_merge_types_only_widens(existing: str, wanted: str, merged: str | None) -> None:
    assert merge_types(existing, wanted) == merged


def test_json_null_stays_a_document_and_text_passes_unparsed() -> None:
    convert = converter(Column(name="c", type=ColumnType.JSON))
    assert convert is not None
    assert orjson.dumps(convert(Json(None))) == b"null"
    assert orjson.dumps(convert('{"a":1}')) == b'{"a":1}'
    assert convert(Json({"a": 1})) == {"a": 1}


def test_bits_from_int_bytes_and_bool() -> None:
    convert = converter(Column(name="c", type=ColumnType.BITS, length=10))
    assert convert is not None
    assert convert(5) == "0000000101"
    assert convert(b"\x02\x01") == "1000000001"
    assert convert(True) == "1"
    assert convert("101") == "101"


def test_uuid_from_text_and_bytes() -> None:
    convert = converter(Column(name="c", type=ColumnType.UUID))
    u = uuid.uuid4()
    assert convert is not None and convert(str(u)) == u and convert(u.bytes) == u
