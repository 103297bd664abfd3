"""Type mapping into PostgreSQL and the widening rules for a changed source column."""

from __future__ import annotations

import uuid

import orjson
import pytest
from branchline.events import Column, ColumnType, Json
from branchline.sinks.postgres.types import converter, is_normalizer, merge_types, target_type


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


def _base_type(pg_type: str) -> str:
    """`numeric(20,0)` -> `numeric`, `timestamp(6) with time zone` -> `timestamptz`, as psycopg names them."""
    base = pg_type.split("(")[0].strip()
    if pg_type.startswith("timestamp"):
        return "timestamptz" if "with time zone" in pg_type else "timestamp"
    return {"double precision": "float8", "real": "float4", "bit varying": "varbit"}.get(base, base)


def _fast_path(kind: ColumnType) -> bool:
    """Columns whose values reach psycopg unconverted when the event contract holds."""
    column = Column(name="c", type=kind, precision=10, scale=2, length=8)
    return converter(column) is None or is_normalizer(column)


@pytest.mark.parametrize("kind", [k for k in ColumnType if _fast_path(k)])
def test_unchanged_is_refused_by_the_dumper_of_every_fast_path_type_but_the_listed_ones(
    kind: ColumnType,
) -> None:
    """The writer looks for `UNCHANGED` by identity only in `DUMPS_ANY_OBJECT` columns (and in columns
    with a converter, which always take the careful path); everywhere else it relies on psycopg's binary
    dumper raising TypeError. A psycopg upgrade that loosens a dumper must fail here, not store garbage."""
    from branchline.events import UNCHANGED
    from branchline.sinks.postgres.types import DUMPS_ANY_OBJECT
    from psycopg import postgres
    from psycopg._copy_base import format_row_binary
    from psycopg.adapt import Transformer
    from psycopg.pq import Format

    pg_type = target_type(Column(name="c", type=kind, precision=10, scale=2, length=8))
    transformer = Transformer()
    transformer.set_dumper_types([postgres.types.get_oid(_base_type(pg_type))], Format.BINARY)
    out = bytearray()
    if kind in DUMPS_ANY_OBJECT:
        format_row_binary([UNCHANGED], transformer, out)  # accepted: hence the identity check
        assert out
    else:
        with pytest.raises(TypeError):
            format_row_binary([UNCHANGED], transformer, out)
