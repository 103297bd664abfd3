"""MariaDB reader's pure parts: catalog rows -> columns, and value normalisation for both the
binlog (python-mysql-replication) and the snapshot (pymysql)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from branchline.connectors.embedded.mariadb import (
    _members,
    column_from_catalog,
    float32,
    snapshot_converter,
    stream_converter,
)
from branchline.events import Column, ColumnType, Json


def catalog(data_type: str, column_type: str, **extra) -> dict:
    row = {"COLUMN_NAME": "c", "DATA_TYPE": data_type, "COLUMN_TYPE": column_type, "IS_NULLABLE": "YES",
           "NUMERIC_PRECISION": None, "NUMERIC_SCALE": None, "DATETIME_PRECISION": None,
           "CHARACTER_MAXIMUM_LENGTH": None, "CHARACTER_SET_NAME": None}
    row.update(extra)
    return row


@pytest.mark.parametrize(("data_type", "column_type", "extra", "expected"), [
    ("tinyint", "tinyint(1)", {}, ColumnType.INT16),
    ("smallint", "smallint(5) unsigned", {}, ColumnType.INT32),
    ("int", "int(10) unsigned", {}, ColumnType.INT64),
    ("bigint", "bigint(20) unsigned", {}, ColumnType.UINT64),
    ("bigint", "bigint(20)", {}, ColumnType.INT64),
    ("float", "float", {}, ColumnType.FLOAT32),
    ("double", "double", {}, ColumnType.FLOAT64),
    ("varchar", "varchar(20)", {"CHARACTER_MAXIMUM_LENGTH": 20}, ColumnType.STRING),
    ("varbinary", "varbinary(8)", {}, ColumnType.BYTES),
    ("blob", "blob", {}, ColumnType.BYTES),
    ("datetime", "datetime(3)", {"DATETIME_PRECISION": 3}, ColumnType.TIMESTAMP),
    ("timestamp", "timestamp", {}, ColumnType.TIMESTAMPTZ),
    ("time", "time", {}, ColumnType.TIME),
    ("year", "year(4)", {}, ColumnType.YEAR),
    ("enum", "enum('a','b')", {}, ColumnType.ENUM),
    ("set", "set('a','b')", {}, ColumnType.SET),
    ("bit", "bit(1)", {"NUMERIC_PRECISION": 1}, ColumnType.BOOLEAN),
    ("bit", "bit(5)", {"NUMERIC_PRECISION": 5}, ColumnType.BITS),
    ("longtext", "longtext", {}, ColumnType.STRING),
])
def test_catalog_types_map_like_the_debezium_decoder(data_type, column_type, extra, expected):
    assert column_from_catalog(catalog(data_type, column_type, **extra), set()).type is expected


def test_decimal_keeps_precision_and_scale():
    column = column_from_catalog(catalog("decimal", "decimal(18,4)", NUMERIC_PRECISION=18, NUMERIC_SCALE=4), set())
    assert (column.type, column.precision, column.scale) == (ColumnType.DECIMAL, 18, 4)


def test_mariadb_json_stays_text_like_debezium_and_mysql_json_is_json():
    assert column_from_catalog(catalog("longtext", "longtext"), {"c"}).type is ColumnType.STRING
    assert column_from_catalog(catalog("json", "json"), set()).type is ColumnType.JSON


@pytest.mark.parametrize(("raw", "expected"), [(1.100000023841858, 1.1), (0.0, 0.0), (-3.4028234663852886e38,
                                                                                      -3.4028235e38)])
def test_float_prints_like_java_float_to_string(raw, expected):
    assert float32(raw) == expected


def test_set_members_come_in_definition_order_from_both_paths():
    column = Column(name="s", type=ColumnType.SET, source_type="set('x','y','z')")
    assert stream_converter(column)({"z", "x"}) == ["x", "z"]
    assert snapshot_converter(column)({"z", "x"}) == ["x", "z"]
    assert snapshot_converter(column)("z,x") == ["x", "z"]


def test_enum_and_set_members_with_quotes():
    assert _members("set('a','it''s','b,c')") == ["a", "it's", "b,c"]


def test_bits_are_a_zero_padded_bit_string_from_both_paths():
    column = Column(name="b", type=ColumnType.BITS, length=12)
    assert stream_converter(column)("101") == "000000000101"
    assert snapshot_converter(column)(b"\x00\x05") == "000000000101"


def test_bit1_is_a_boolean_from_both_paths():
    column = Column(name="b", type=ColumnType.BOOLEAN, source_type="bit(1)")
    assert snapshot_converter(column)(b"\x01") is True
    assert stream_converter(column)("0") is False


def test_timestamp_becomes_aware_utc_and_json_is_parsed():
    ts = Column(name="t", type=ColumnType.TIMESTAMPTZ)
    assert stream_converter(ts)(datetime(2024, 1, 1, 12)) == datetime(2024, 1, 1, 12, tzinfo=UTC)
    js = Column(name="j", type=ColumnType.JSON)
    assert stream_converter(js)('{"a": [1, 2.5]}') == Json({"a": [1, 2.5]})


def test_plain_types_need_no_conversion():
    for kind in (ColumnType.INT64, ColumnType.STRING, ColumnType.DECIMAL, ColumnType.TIMESTAMP, ColumnType.TIME):
        assert snapshot_converter(Column(name="c", type=kind)) is None


def test_negative_fractional_time_from_the_binlog_is_corrected():
    from datetime import timedelta

    from branchline.connectors.embedded.mariadb import negative_time

    # what python-mysql-replication 1.0.17 returns -> what MariaDB holds (checked on MariaDB 10.11)
    assert negative_time(-timedelta(seconds=1.75)) == -timedelta(seconds=1.25)
    assert negative_time(-timedelta(seconds=3170, microseconds=52222)) == -timedelta(seconds=3170,
                                                                                     microseconds=947778)
    assert negative_time(-timedelta(microseconds=999999)) == -timedelta(microseconds=1)
    assert negative_time(-timedelta(seconds=2)) == -timedelta(seconds=2)
    assert negative_time(timedelta(seconds=1, microseconds=250000)) == timedelta(seconds=1, microseconds=250000)
