"""The sample generator: deterministic, the promised edge values present, every value fits its column."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from importlib import resources

import pytest
from branchline.events import ColumnType, Json
from branchline.infra.sample import PRIMARY_KEYS, columns, count, database_of, rows
from branchline.infra.sample.generate import BIG_BODY_BYTES, account_id
from branchline.infra.sample.tables import ENUM_VALUES, TABLES

T = ColumnType
N = 40
ALL_TABLES = list(PRIMARY_KEYS)


def values(table: str, column: str, n: int = N) -> list[object]:
    return [row[column] for row in rows(table, n)]


@pytest.mark.parametrize("table", ALL_TABLES)
def test_same_seed_gives_equal_rows_and_another_seed_differs(table: str) -> None:
    first, again = list(rows(table, N, seed=7)), list(rows(table, N, seed=7))
    assert first == again
    assert [repr(r) for r in first] == [repr(r) for r in again]  # types and Decimal scales too
    assert list(rows(table, N, seed=8)) != first


@pytest.mark.parametrize("table", ALL_TABLES)
@pytest.mark.parametrize("n", [0, 1, 2, 9, 123])
def test_row_count_matches_count(table: str, n: int) -> None:
    assert sum(1 for _ in rows(table, n)) == count(table, n)


def test_main_tables_have_exactly_n_rows_and_others_scale() -> None:
    assert {t: count(t, 1000) for t in ("customers", "sales_orders", "accounts", "contacts", "activities")} == dict.fromkeys(
        ("customers", "sales_orders", "accounts", "contacts", "activities"), 1000)
    assert count("order_lines", 1000) == sum(1 + i % 3 for i in range(1, 1001))
    assert count("warehouses", 1000) == 3 and count("warehouses", 100_000) == 200
    assert count("products", 100_000) == 25_000


def test_unknown_table_is_refused() -> None:
    with pytest.raises(KeyError, match="`table` must be one of"):
        rows("orders", 3)


@pytest.mark.parametrize("table", ALL_TABLES)
def test_primary_keys_are_unique_and_complete(table: str) -> None:
    key = PRIMARY_KEYS[table]
    if not key:
        return
    keys = [tuple(r[k] for k in key) for r in rows(table, N)]
    assert len(set(keys)) == len(keys)
    assert all(v is not None for k in keys for v in k)


def test_unsigned_values_above_2_63_are_present() -> None:
    assert 2**64 - 1 in values("products", "external_id")
    assert 2**63 in values("products", "external_id")
    above = [v for v in values("stock_movements", "tracking_hash", 200) if isinstance(v, int) and v > 2**63]
    assert len(above) > 50  # random 64-bit hashes: about half


def test_text_has_emoji_outside_the_bmp_and_chinese() -> None:
    names = [str(v) for v in values("customers", "name")] + [str(v) for v in values("accounts", "name")]
    assert any(any(ord(ch) > 0xFFFF for ch in name) for name in names)
    assert any(re.search(r"[\u4e00-\u9fff]", name) for name in names)
    assert "👨‍👩‍👧" in "".join(names)  # a ZWJ sequence


def test_time_values_include_negative_and_above_24_hours() -> None:
    offsets = [v for v in values("stock_movements", "clock_offset") if isinstance(v, timedelta)]
    assert any(v < timedelta(0) for v in offsets)
    assert -timedelta(hours=838, minutes=59, seconds=59) in offsets
    assert any(v.microseconds for v in offsets)
    closes = [v for v in values("warehouses", "closes_at") if isinstance(v, timedelta)]
    assert timedelta(hours=838, minutes=59, seconds=59) in closes
    assert any(v < timedelta(0) for v in values("warehouses", "opens_at") if isinstance(v, timedelta))


def test_decimal_extremes_and_datetime_micros_are_present() -> None:
    limits = values("customers", "credit_limit")
    assert Decimal("99999999999999.9999") in limits and Decimal("-99999999999999.9999") in limits
    assert Decimal("0.0001") in limits
    assert Decimal("123456789012345678901234567890.123456789012345") in values("opportunities", "amount")
    stamps = [v for v in values("customers", "created_at") if isinstance(v, datetime)]
    assert datetime(9999, 12, 31, 23, 59, 59, 999_999) in stamps
    assert sum(1 for v in stamps if v.microsecond) > N // 2


def test_crm_edge_values_are_present() -> None:
    tags = values("accounts", "tags")
    assert ["a,b", 'say "hi"', "back\\slash", "{brace}", "NULL", " padded ", "😀", "中文", ""] in tags
    assert [] in tags
    cycles = [v for v in values("opportunities", "sales_cycle") if isinstance(v, timedelta)]
    assert any(v < timedelta(0) for v in cycles)
    assert {v for v in values("opportunities", "stage")} <= set(ENUM_VALUES[("opportunities", "stage")])
    ids = values("accounts", "id")
    assert all(isinstance(v, uuid.UUID) and v.version == 4 for v in ids)
    assert ids[4] == account_id(20240601, 5)


def test_every_16th_activity_body_is_large_and_incompressible() -> None:
    bodies = values("activities", "body")
    large = [b for b in bodies if isinstance(b, str) and len(b.encode()) > 8000]
    assert len(large) == len(range(1, N + 1, 16))
    assert all(len(b.encode()) > BIG_BODY_BYTES * 4 // 3 for b in large)
    assert len(set(large)) == len(large)


def test_legacy_table_holds_exact_duplicates() -> None:
    legacy = [tuple(sorted(r.items())) for r in rows("legacy_price_list", N)]
    assert len(set(legacy)) < len(legacy)


def test_references_point_at_generated_rows() -> None:
    n = 60
    orders = {r["id"] for r in rows("sales_orders", n)}
    assert {r["order_id"] for r in rows("order_lines", n)} <= orders
    assert {r["order_id"] for r in rows("invoices", n)} <= orders
    customers = {r["id"] for r in rows("customers", n)}
    assert {r["customer_id"] for r in rows("sales_orders", n)} <= customers
    accounts = {r["id"] for r in rows("accounts", n)}
    for table in ("contacts", "opportunities", "activities"):
        assert {r["account_id"] for r in rows(table, n)} <= accounts
    contacts = {r["id"] for r in rows("contacts", n)}
    assert {r["contact_id"] for r in rows("activities", n)} - {None} <= contacts


_CANONICAL: dict[ColumnType, tuple[type, ...]] = {
    T.INT16: (int,), T.INT32: (int,), T.INT64: (int,), T.UINT64: (int,), T.YEAR: (int,), T.BITS: (int,),
    T.DECIMAL: (Decimal,), T.STRING: (str,), T.ENUM: (str,), T.BYTES: (bytes,), T.BOOLEAN: (bool,),
    T.DATE: (date,), T.TIME: (timedelta,), T.INTERVAL: (timedelta,), T.TIMESTAMP: (datetime,),
    T.TIMESTAMPTZ: (datetime,), T.JSON: (Json,), T.SET: (list,), T.STRING_ARRAY: (list,), T.UUID: (uuid.UUID,),
}
_MARIADB_TIME_LIMIT = timedelta(hours=838, minutes=59, seconds=59)


@pytest.mark.parametrize("table", ALL_TABLES)
def test_every_value_has_its_canonical_type_and_fits_its_column(table: str) -> None:
    erp = database_of(table) == "erp"
    for row in rows(table, N):
        assert list(row) == [c.name for c in columns(table)]
        for column in columns(table):
            value = row[column.name]
            where = f"{table}.{column.name}={value!r}"
            if value is None:
                assert column.nullable, where
                continue
            assert type(value) in _CANONICAL[column.type], where  # exact type: no bool for int, no str subclass
            assert not (column.type is not T.BOOLEAN and isinstance(value, bool)), where
            kind = column.type
            if kind is T.DECIMAL and column.scale is not None and column.precision is not None:
                exponent = value.as_tuple().exponent
                assert exponent == -column.scale, where  # exact scale: reads back with equal repr
                assert abs(value) < Decimal(10) ** (column.precision - column.scale), where
            if kind in (T.STRING,) and column.length:
                assert len(value) <= column.length, where
            if kind is T.UINT64:
                assert 0 <= value < 2**64, where
            if kind in (T.ENUM,) or kind is T.SET:
                allowed = ENUM_VALUES[(table, column.name)]
                chosen = [value] if kind is T.ENUM else value
                assert all(v in allowed for v in chosen), where
                if kind is T.SET:
                    assert chosen == sorted(chosen, key=allowed.index), where
            if kind is T.YEAR:
                assert 1901 <= value <= 2155, where
            if kind is T.BITS:
                assert 0 <= value < 2 ** (column.length or 64), where
            if kind is T.TIME and erp:
                assert -_MARIADB_TIME_LIMIT <= value <= _MARIADB_TIME_LIMIT, where
            if kind is T.TIMESTAMP:
                assert value.tzinfo is None, where
                if erp:
                    assert 1000 <= value.year <= 9999, where
            if kind is T.TIMESTAMPTZ:
                assert value.tzinfo is UTC, where
                if erp:
                    assert datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC) <= value <= datetime(2038, 1, 19, 3, 14, 7, tzinfo=UTC)
                    assert value.microsecond == 0 or column.precision == 6, where
            if kind is T.STRING_ARRAY:
                assert all(isinstance(v, str) for v in value), where
            if kind is T.JSON and not erp:
                assert "\x00" not in repr(value.value), where  # jsonb refuses \u0000


def _declared_columns(database: str) -> dict[str, list[str]]:
    text = resources.files("branchline.infra.sample").joinpath(f"{database}.sql").read_text()
    found: dict[str, list[str]] = {}
    for name, body in re.findall(r"CREATE TABLE (\w+) \((.*?)\n\)", text, flags=re.DOTALL):
        names = [line.split()[0] for line in body.strip().splitlines()]
        found[name] = [n for n in names if n not in ("PRIMARY", "UNIQUE", "KEY")]
    return found


@pytest.mark.parametrize("database", ["erp", "crm"])
def test_schema_files_create_the_declared_tables_and_columns(database: str) -> None:
    assert _declared_columns(database) == {t: [c.name for c in columns(t)] for t in TABLES[database]}
