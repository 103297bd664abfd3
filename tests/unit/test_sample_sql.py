"""Pure parts of the sample loader and workload: MariaDB literals, statement splitting, key pools."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest
from branchline.infra.sample import churn, count, rows
from branchline.infra.sample.generate import _Rand
from branchline.infra.sample.loader import _quote, insert_statements, mysql_time, schema_sql, to_mariadb
from branchline.infra.sample.workload import ChurnReport, _Pool


@pytest.mark.parametrize(
    ("value", "literal"),
    [
        (timedelta(0), "00:00:00.000000"),
        (timedelta(hours=838, minutes=59, seconds=59), "838:59:59.000000"),
        (-timedelta(hours=838, minutes=59, seconds=59), "-838:59:59.000000"),
        (-timedelta(hours=12, seconds=1), "-12:00:01.000000"),  # a naive split says -13:59:59
        (-timedelta(microseconds=1), "-00:00:00.000001"),
        (timedelta(days=2, hours=1, microseconds=5), "49:00:00.000005"),
    ],
)
def test_mysql_time_keeps_the_sign_apart_from_the_magnitude(value: timedelta, literal: str) -> None:
    assert mysql_time(value) == literal


def test_quote_escapes_what_ends_or_bends_a_single_quoted_literal() -> None:
    assert _quote("a'b\"c\\d\ne\rf\x00g\x1ah 😀") == "'a\\'b\"c\\\\d\ne\rf\\0g\x1ah 😀'"
    assert _quote("plain 中文") == "'plain 中文'"


def test_insert_statements_cover_every_row_once_and_respect_the_size() -> None:
    statements = list(insert_statements("customers", rows("customers", 300), max_bytes=10_000))
    assert len(statements) > 3
    assert sum(n for _, n in statements) == count("customers", 300)
    assert all(len(text) < 10_000 + 2_000 for text, _ in statements)
    first = statements[0][0]
    assert first.startswith("INSERT INTO `customers` (`id`, `code`, `name`,")
    products = "".join(text for text, _ in insert_statements("products", rows("products", 10)))
    assert "X'00ff0027225c0a0d1a" in products  # bytes go as hex, untouched by text escaping
    assert ",X''," in products  # the empty BLOB stays empty, not NULL


def test_to_mariadb_converts_only_what_the_driver_cannot_send() -> None:
    row = next(iter(rows("stock_movements", 3)))
    params = dict(zip(row, to_mariadb("stock_movements", row), strict=True))
    assert params["clock_offset"] == "-838:59:59.000000"
    assert params["tracking_hash"] == 2**64 - 1
    assert params["reason_codes"] == ""
    assert params["recorded_at"].tzinfo is None


def test_schema_sql_drops_before_it_creates() -> None:
    for database, tables in (("erp", 8), ("crm", 4)):
        statements = schema_sql(database)
        drops = [s for s in statements if s.startswith("DROP TABLE IF EXISTS")]
        creates = [s for s in statements if s.startswith("CREATE TABLE")]
        assert len(drops) == len(creates) == tables
        assert statements.index(drops[-1]) < statements.index(creates[0])


def test_pool_picks_only_live_keys() -> None:
    pool = _Pool([1, 2, 3])
    pool.add(4)
    pool.add(4)
    pool.remove(2)
    pool.remove(99)
    rng = _Rand(1, "pool")
    assert sorted(pool.keys) == [1, 3, 4]
    assert {pool.pick(rng) for _ in range(200)} == {1, 3, 4}
    for key in (1, 3, 4):
        pool.remove(key)
    assert len(pool) == 0 and pool.pick(rng) is None


def test_rand_draws_stay_in_range() -> None:
    rng = _Rand(3, "range")
    draws = [rng.between(1, 3) for _ in range(500)]
    assert set(draws) == {1, 2, 3}
    assert all(0 <= rng.below(10) < 10 for _ in range(500))
    assert random.Random("3:range").random() == _Rand(3, "range").random()


def test_churn_report_summary_counts_by_op() -> None:
    report = ChurnReport("crm")
    report.counts.update({"insert": 5, "update": 7, "delete": 2, "transactions": 4, "toast_unchanged": 3})
    report.seconds = 2.0
    assert report.changes == 14
    assert report.summary() == "crm: 4 transactions, insert=5 update=7 delete=2 toast_unchanged=3 in 2.0s (7 changes/s)"

def test_churn_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="`rate` must be > 0"):
        churn("erp", rate=0, duration=1)
    with pytest.raises(ValueError, match="`target` must be erp, crm or all"):
        churn("hr", rate=1, duration=1)
    with pytest.raises(ValueError, match="`duration` must be set"):
        churn("erp", rate=1, duration=None)
