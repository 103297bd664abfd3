"""The sample loaders and workload against the real stack servers.

Each run uses its own databases (`sample_test_erp`, `sample_test_crm`) on the stack's MariaDB and
PostgreSQL, so the demo's `erp` / `crm` data and anyone replicating them are left alone.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import psycopg
import pymysql
import pytest
from branchline.errors import InfraError
from branchline.events import Json
from branchline.infra.sample import (
    CRM_TABLES,
    ERP_TABLES,
    PRIMARY_KEYS,
    Endpoint,
    churn,
    columns,
    count,
    crm_connect,
    database_of,
    erp_connect,
    load,
    read_table,
    rows,
)
from branchline.infra.sample.cli import sample as sample_cli
from branchline.infra.sample.generate import BIG_BODY_EVERY
from branchline.infra.sample.workload import CHURN_APPLICATION
from click.testing import CliRunner

pytestmark = pytest.mark.integration

N = 300
SEED = 424242
ERP_DB, CRM_DB = "sample_test_erp", "sample_test_crm"


@pytest.fixture(scope="module")
def erp_ep(erp: Any) -> Endpoint:
    return Endpoint(name="erp", host=erp.host, port=erp.port, user="root", database=ERP_DB)


@pytest.fixture(scope="module")
def crm_ep(crm: Any) -> Endpoint:
    return Endpoint(name="crm", host=crm.host, port=crm.port, user="postgres", database=CRM_DB)


@pytest.fixture(scope="module")
def loaded(erp_ep: Endpoint, crm_ep: Endpoint) -> list[Any]:
    """Load a different sample first, then the one under test: the second load must replace it all."""
    load("all", 40, seed=1, erp=erp_ep, crm=crm_ep)
    return load("all", N, seed=SEED, erp=erp_ep, crm=crm_ep)


@pytest.fixture()
def erp_conn(erp_ep: Endpoint, loaded: Any) -> Iterator[pymysql.Connection]:
    conn = erp_connect(erp_ep)
    yield conn
    conn.close()


@pytest.fixture()
def crm_conn(crm_ep: Endpoint, loaded: Any) -> Iterator[psycopg.Connection[Any]]:
    with crm_connect(crm_ep) as conn:
        yield conn


def same(a: Any, b: Any) -> bool:
    """Equal values of the same type, recursively: True is not 1, Decimal('1.50') is not Decimal('1.5')."""
    if type(a) is not type(b):
        return False
    if isinstance(a, Json):
        return same(a.value, b.value)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Decimal):
        return a.as_tuple() == b.as_tuple()
    if isinstance(a, datetime):
        return a == b and a.tzinfo == b.tzinfo
    return bool(a == b)


def test_same_tells_types_and_scales_apart() -> None:
    assert not same(True, 1)
    assert not same(Decimal("1.5"), Decimal("1.50"))
    assert not same(Json({"a": True}), Json({"a": 1}))
    assert same(Json({"a": [1, {"b": None}]}), Json({"a": [1, {"b": None}]}))


def test_load_reports_every_table(loaded: list[Any]) -> None:
    assert [(r.database, r.table, r.rows) for r in loaded] == [
        (database_of(t), t, count(t, N)) for t in (*ERP_TABLES, *CRM_TABLES)]


@pytest.mark.parametrize("table", list(PRIMARY_KEYS))
def test_every_loaded_row_reads_back_with_exact_values(
        table: str, erp_conn: pymysql.Connection, crm_conn: psycopg.Connection[Any]) -> None:
    conn = erp_conn if database_of(table) == "erp" else crm_conn
    got = read_table(conn, table)
    expected = list(rows(table, N, SEED))
    key = PRIMARY_KEYS[table]
    if key:
        expected.sort(key=lambda r: tuple(r[k] for k in key))
    else:  # no key, duplicates allowed: compare as sorted multisets
        expected.sort(key=repr)
        got.sort(key=repr)
    assert len(got) == len(expected) == count(table, N)
    for index, (want, have) in enumerate(zip(expected, got, strict=True)):
        wrong = {c.name: (want[c.name], have[c.name]) for c in columns(table) if not same(want[c.name], have[c.name])}
        assert not wrong, f"{table} row {index}: {wrong}"


def test_erp_edge_values_as_the_server_itself_prints_them(erp_conn: pymysql.Connection) -> None:
    """Checked in SQL text, independent of the read-back converters (a symmetric bug would hide there)."""
    with erp_conn.cursor() as cur:
        cur.execute("SELECT CAST(external_id AS CHAR) FROM products ORDER BY id LIMIT 3")
        assert [r[0] for r in cur.fetchall()] == [str(2**64 - 1), str(2**63), str(2**63 - 1)]
        cur.execute("SELECT CAST(clock_offset AS CHAR), CAST(transit_time AS CHAR) FROM stock_movements WHERE id = 1")
        assert cur.fetchone() == ("-838:59:59.000000", "838:59:59")
        cur.execute("SELECT CAST(opens_at AS CHAR), CAST(closes_at AS CHAR), opened FROM warehouses WHERE id = 1")
        assert cur.fetchone() == ("-02:00:00", "838:59:59", 1901)
        cur.execute("SELECT HEX(name), CHAR_LENGTH(name), CAST(credit_limit AS CHAR), flags + 0, tags + 0, "
                    "UNIX_TIMESTAMP(updated_at), JSON_VALUE(attributes, '$.note'), CAST(created_at AS CHAR) "
                    "FROM customers WHERE id IN (2, 3, 5) ORDER BY id")
        two, three, five = cur.fetchall()
        name = "Kraft & Söhne O'Brien 👨‍👩‍👧 𠀀"
        assert two[:5] == (name.encode().hex().upper(), len(name), "-99999999999999.9999", 0, 0)
        assert two[6] == "emoji 😀 and 中文"
        assert three[2] == "0.0001" and three[5] == 1
        assert five[7] == "9999-12-31 23:59:59.999999"
        cur.execute("SELECT HEX(image) FROM products WHERE id IN (1, 2) ORDER BY id")
        assert [r[0] for r in cur.fetchall()] == ["", (b"\x00\xff\x00'\"\\\n\r\x1a" + bytes(range(256))).hex().upper()]
        cur.execute("SELECT @@character_set_database, COUNT(*) FROM legacy_price_list")
        charset, legacy = cur.fetchone()
        assert charset == "utf8mb4" and legacy == count("legacy_price_list", N)


def test_crm_edge_values_as_the_server_itself_prints_them(crm_conn: psycopg.Connection[Any]) -> None:
    first = next(iter(rows("accounts", N, SEED)))
    record = crm_conn.execute(
        "SELECT tags::text, annual_revenue::text, octet_length(logo) FROM accounts WHERE id = %s", (first["id"],)).fetchone()
    assert record == ('{"a,b","say \\"hi\\"","back\\\\slash","{brace}","NULL"," padded ",😀,中文,""}',
                      "999999999999999999.99", len(first["logo"]))
    opportunity = crm_conn.execute(
        "SELECT amount::text, sales_cycle = interval '-3 days -04:00:00.000005', extract(epoch FROM sales_cycle)::text, "
        "expected_close::text FROM opportunities WHERE id = 1").fetchone()
    assert opportunity == ("123456789012345678901234567890.123456789012345", True, "-273600.000005", "0001-01-01")
    third = list(rows("accounts", 3, SEED))[2]
    epoch = crm_conn.execute("SELECT extract(epoch FROM created_at) FROM accounts WHERE id = %s", (third["id"],)).fetchone()
    assert epoch == (Decimal(int(datetime(1900, 1, 1, tzinfo=UTC).timestamp())),)


def test_large_bodies_are_stored_out_of_line(crm_conn: psycopg.Connection[Any]) -> None:
    big = len(range(1, count("activities", N) + 1, BIG_BODY_EVERY))
    sizes = crm_conn.execute(
        "SELECT count(*), min(pg_column_size(body)) FROM activities WHERE octet_length(body) > 8000").fetchone()
    assert sizes is not None and sizes[0] == big
    assert sizes[1] > 8000  # stored size: pglz could not shrink them
    toast = crm_conn.execute("SELECT reltoastrelid::regclass::text FROM pg_class WHERE oid = 'activities'::regclass").fetchone()
    assert toast is not None
    chunks = crm_conn.execute(f"SELECT count(DISTINCT chunk_id), count(*) FROM {toast[0]}").fetchone()
    assert chunks is not None and chunks[0] == big and chunks[1] >= 5 * big


def test_identity_sequences_continue_after_the_loaded_ids(crm_conn: psycopg.Connection[Any]) -> None:
    row = crm_conn.execute(
        "INSERT INTO contacts (account_id, first_name, last_name, created_at) VALUES (%s, 'x', 'y', now()) RETURNING id",
        (uuid.uuid4(),)).fetchone()
    crm_conn.rollback()
    assert row is not None and row[0] == count("contacts", N) + 1


def _table_counts(erp_conn: pymysql.Connection, crm_conn: psycopg.Connection[Any]) -> dict[str, int]:
    found = {}
    with erp_conn.cursor() as cur:
        for table in ERP_TABLES:
            cur.execute(f"SELECT COUNT(*) FROM `{table}`")
            found[table] = cur.fetchone()[0]
    erp_conn.commit()
    for table in CRM_TABLES:
        record = crm_conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        assert record is not None
        found[table] = record[0]
    crm_conn.commit()
    return found


def _keys(conn: Any, table: str) -> set[Any]:
    key = PRIMARY_KEYS[table]
    if isinstance(conn, psycopg.Connection):
        found = {r if len(key) > 1 else r[0] for r in conn.execute(f"SELECT {', '.join(key)} FROM {table}")}
        conn.commit()
        return found
    with conn.cursor() as cur:
        cur.execute(f"SELECT {', '.join(key)} FROM `{table}`")
        found = {tuple(r) if len(key) > 1 else r[0] for r in cur.fetchall()}
    conn.commit()
    return found


def test_churn_changes_rows_as_it_reports(erp_ep: Endpoint, crm_ep: Endpoint, loaded: Any,
                                         erp_conn: pymysql.Connection, crm_conn: psycopg.Connection[Any]) -> None:
    before = _table_counts(erp_conn, crm_conn)
    reports = churn("all", rate=300, duration=3, seed=5, erp=erp_ep, crm=crm_ep)
    after = _table_counts(erp_conn, crm_conn)
    assert set(reports) == {"erp", "crm"}
    for name, report in reports.items():
        assert report.counts["transactions"] > 20, report.summary()
        assert min(report.counts["insert"], report.counts["update"], report.counts["delete"]) > 0, report.summary()
        assert report.changes <= 300 * 3 + 50, report.summary()  # paced, not flat out
        for table in (ERP_TABLES if name == "erp" else CRM_TABLES):
            inserted, deleted = report.by_table[table, "insert"], report.by_table[table, "delete"]
            assert after[table] == before[table] + inserted - deleted, (table, report.by_table)
            if not PRIMARY_KEYS[table]:
                continue
            conn = erp_conn if name == "erp" else crm_conn
            live = _keys(conn, table)
            assert report.inserted.get(table, set()) - report.deleted.get(table, set()) <= live, table
            assert not report.deleted.get(table, set()) & live, table
    crm = reports["crm"]
    assert crm.counts["toast_unchanged"] > 0 and crm.counts["toast_changed"] > 0, crm.summary()
    assert reports["erp"].by_table["legacy_price_list", "update"] > 0


def test_updates_that_skip_the_body_leave_it_intact(crm_ep: Endpoint, loaded: Any,
                                                   crm_conn: psycopg.Connection[Any]) -> None:
    """After churn, every loaded large body is either the generated one or a rewrite, never lost."""
    churn("crm", rate=300, duration=2, seed=9, crm=crm_ep)
    expected = {r["id"]: r["body"] for r in rows("activities", N, SEED)}
    stored = dict(crm_conn.execute("SELECT id, body FROM activities WHERE id <= %s", (count("activities", N),)).fetchall())
    crm_conn.commit()
    unchanged = sum(1 for i, body in stored.items() if body == expected[i])
    rewritten = [body for i, body in stored.items() if body != expected[i]]
    assert unchanged > len(stored) // 2
    assert all(body is not None and len(body) > 8000 for body in rewritten)


def test_cli_load_and_churn_print_figures(erp_ep: Endpoint, crm_ep: Endpoint, loaded: Any,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRANCHLINE_CRM_DATABASE", "sample_test_cli_crm")  # leaves the module's sample alone
    monkeypatch.setenv("BRANCHLINE_ERP_DATABASE", ERP_DB)
    address = ["--erp-host", erp_ep.host, "--erp-port", str(erp_ep.port),
               "--crm-host", crm_ep.host, "--crm-port", str(crm_ep.port)]
    runner = CliRunner()
    result = runner.invoke(sample_cli, ["load", "--rows", "30", "--target", "crm", *address])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"recreating crm ({crm_ep.address}/sample_test_cli_crm) with --rows 30")
    assert "crm.activities" in result.output and "rows/s" in result.output and "erp." not in result.output
    result = runner.invoke(sample_cli, ["churn", "--rate", "100", "--duration", "1", "--target", "erp", *address])
    assert result.exit_code == 0, result.output
    first, summary = result.output.splitlines()
    assert first == f"churning erp ({erp_ep.address}/{ERP_DB}) at ~100 rows/s each for 1 s"
    assert summary.startswith("erp: ") and "insert=" in summary


def test_churn_without_duration_runs_until_stopped(erp_ep: Endpoint, loaded: Any) -> None:
    stop = threading.Event()
    result: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: result.update(churn("erp", rate=200, duration=None, erp=erp_ep, stop=stop)))
    worker.start()
    time.sleep(1.0)
    assert worker.is_alive()
    stop.set()
    worker.join(10)
    assert not worker.is_alive()
    assert result["erp"].counts["transactions"] > 0



def test_reload_keeps_publication_memberships_and_a_type_used_elsewhere(crm: Any) -> None:
    """A pipeline replicating the CRM must not lose its tables when the sample is reloaded."""
    ep = Endpoint(name="crm", host=crm.host, port=crm.port, user="postgres", database="sample_test_pub_crm")
    load("crm", 5, crm=ep)
    with crm_connect(ep, autocommit=True) as conn:
        conn.execute("DROP PUBLICATION IF EXISTS sample_test_pub")
        conn.execute("CREATE PUBLICATION sample_test_pub FOR TABLE accounts, activities")
        conn.execute("DROP SCHEMA IF EXISTS sample_test_copy CASCADE")
        conn.execute("CREATE SCHEMA sample_test_copy")
        conn.execute("CREATE TABLE sample_test_copy.opportunities (id bigint PRIMARY KEY, stage deal_stage)")
    load("crm", 7, crm=ep)
    with crm_connect(ep, autocommit=True) as conn:
        members = conn.execute("SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = 'sample_test_pub' "
                               "ORDER BY tablename").fetchall()
        accounts = conn.execute("SELECT count(*) FROM accounts").fetchone()
        conn.execute("DROP SCHEMA sample_test_copy CASCADE")
        conn.execute("DROP PUBLICATION sample_test_pub")
    assert members == [("public", "accounts"), ("public", "activities")]
    assert accounts == (7,)


def _kill_churn_sessions(crm_ep: Endpoint) -> None:
    with crm_connect(crm_ep, autocommit=True) as admin:
        for _ in range(200):
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s "
                "AND datname = %s", (CHURN_APPLICATION, crm_ep.database)).fetchone()
            if killed and killed[0]:
                return
            time.sleep(0.05)
    raise AssertionError("no churn session to kill")


def test_churn_reconnects_after_its_session_is_killed(crm_ep: Endpoint, loaded: Any) -> None:
    result: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: result.update(churn("crm", rate=200, duration=4, crm=crm_ep, reconnect_for=10)))
    worker.start()
    time.sleep(1.0)
    _kill_churn_sessions(crm_ep)
    worker.join(20)
    assert not worker.is_alive()
    report = result["crm"]
    assert report.counts["reconnects"] == 1, report.summary()
    assert report.counts["transactions"] > 30, report.summary()
    assert 3.5 < report.seconds < 6, report.summary()


def test_churn_stops_with_an_infra_error_when_its_session_is_killed(crm_ep: Endpoint, loaded: Any) -> None:
    failure: list[BaseException] = []

    def run() -> None:
        try:
            churn("crm", rate=100, duration=20, crm=crm_ep, reconnect_for=0)
        except BaseException as exc:  # noqa: BLE001
            failure.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    _kill_churn_sessions(crm_ep)
    worker.join(20)
    assert not worker.is_alive()
    assert len(failure) == 1 and isinstance(failure[0], InfraError), failure
    assert "`crm` must stay reachable while the workload runs" in str(failure[0])


def test_erp_churn_reconnects_after_its_connection_is_killed(erp_ep: Endpoint, loaded: Any) -> None:
    result: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: result.update(churn("erp", rate=200, duration=4, erp=erp_ep, reconnect_for=10)))
    worker.start()
    time.sleep(1.0)
    admin = erp_connect(erp_ep, autocommit=True)
    try:
        with admin.cursor() as cur:
            cur.execute("SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s AND ID <> CONNECTION_ID()", (ERP_DB,))
            sessions = [r[0] for r in cur.fetchall()]
            for session in sessions:
                cur.execute(f"KILL CONNECTION {int(session)}")
    finally:
        admin.close()
    worker.join(20)
    assert sessions and not worker.is_alive()
    report = result["erp"]
    assert report.counts["reconnects"] == 1, report.summary()
    assert report.counts["transactions"] > 30, report.summary()
