"""Capture against the real stack: Debezium on Kafka Connect, operated by `branchline connectors`.

Each run copies the sample ERP tables into a private MariaDB database and the sample CRM tables into a
private PostgreSQL schema (same column types, same rows), and captures only those under a private
branch id, so its topics, slot and connectors are its own. Values are compared row by row with what
the databases hold, through the streams stage's decoder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pymysql
import pytest
from branchline.cli import cli
from branchline.config import PipelineConfig, load_pipeline
from branchline.connectors.connect import ConnectClient
from branchline.connectors.debezium import connector_config
from branchline.connectors.operate import retire
from branchline.connectors.setup_sql import setup_statements
from branchline.connectors.topics import Record, delete_topics, read_topics
from branchline.events import UNCHANGED, Column, ColumnType, Json, Op
from branchline.streams.decode import EnvelopeDecoder, RowChange, Tombstone
from click.testing import CliRunner

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ERP_TABLES = ("customers", "products", "warehouses", "sales_orders", "order_lines", "invoices", "stock_movements",
              "legacy_price_list")
CRM_TABLES = ("accounts", "contacts", "opportunities", "activities")


@dataclass
class Capture:
    pipeline: PipelineConfig
    file: Path
    namespace: str
    client: ConnectClient
    erp_port: int
    crm_port: int

    @property
    def bootstrap(self) -> str:
        assert self.pipeline.kafka is not None
        return self.pipeline.kafka.bootstrap_servers

    def records(self) -> list[Record]:
        prefixes = tuple(f"{s.topic_prefix}." for s in self.pipeline.sources)
        return read_topics(self.bootstrap, lambda t: t.startswith(prefixes))

    def erp(self) -> pymysql.Connection:  # type: ignore[type-arg]
        return pymysql.connect(host="127.0.0.1", port=self.erp_port, user="root", password="", autocommit=True,
                               database=self.namespace, charset="utf8mb4", init_command="SET time_zone = '+00:00'")

    def crm(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(host="127.0.0.1", port=self.crm_port, user="postgres", dbname="crm", autocommit=True)
        conn.execute("SET TIME ZONE 'UTC'")
        return conn


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = 120.0, every_s: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def snapshot_flag(record: Record) -> str | None:
    if record.value is None:
        return None
    payload = json.loads(record.value).get("payload") or {}
    return (payload.get("source") or {}).get("snapshot") if isinstance(payload, dict) else None


def operation(record: Record) -> str | None:
    if record.value is None:
        return None
    payload = json.loads(record.value).get("payload") or {}
    return payload.get("op") if isinstance(payload, dict) else None


def decode_all(capture: Capture, records: list[Record]) -> list[tuple[Record, Any]]:
    decoders = {s.topic_prefix: EnvelopeDecoder(s.name, s.branch, keep_update_before=True)
                for s in capture.pipeline.sources}
    out = []
    for record in records:
        prefix = ".".join(record.topic.split(".")[:2])
        out.append((record, decoders[prefix].decode(record.topic, record.key, record.value)))
    return out


def changes(decoded: list[tuple[Record, Any]], table: str) -> list[RowChange]:
    return [d for _, d in decoded if isinstance(d, RowChange) and d.event.table.table == table]


def row_records(decoded: list[tuple[Record, Any]], table: str) -> list[tuple[Record, RowChange]]:
    return [(r, d) for r, d in decoded if isinstance(d, RowChange) and d.event.table.table == table]


# ------------------------------------------------------------------------------ value comparison


def _iso_interval(text: str) -> timedelta:
    """Debezium's ISO 8601 interval text -> timedelta (months as 30 days, years as 365, like psycopg)."""
    match = re.fullmatch(r"P(-?\d+)Y(-?\d+)M(-?\d+)DT(-?\d+)H(-?\d+)M(-?[\d.]+)S", text)
    assert match, text
    years, months, days, hours, minutes = (int(g) for g in match.groups()[:5])
    seconds = Decimal(match.group(6))
    micros = int(seconds * 1_000_000)
    return timedelta(days=years * 365 + months * 30 + days, hours=hours, minutes=minutes, microseconds=micros)


def normalized(value: Any, column: Column) -> Any:
    """A database value in the form the decoded event carries (see branchline.events)."""
    if value is None:
        return None
    kind = column.type
    if kind is ColumnType.TIMESTAMPTZ and value.tzinfo is None:
        return value.replace(tzinfo=UTC)  # MariaDB TIMESTAMP read in a UTC session
    if kind is ColumnType.SET:
        return [v for v in value.split(",") if v] if isinstance(value, str) else sorted(value)
    if kind is ColumnType.BITS:
        return format(int.from_bytes(value, "big"), f"0{column.length}b")
    if kind is ColumnType.JSON:
        return Json(value)
    if kind is ColumnType.BYTES:
        return bytes(value)
    return value


def event_value(value: Any, column: Column) -> Any:
    if isinstance(value, str) and (column.source_type or "").startswith("interval"):
        return _iso_interval(value)
    if column.type is ColumnType.SET and isinstance(value, list):
        return value
    return value


def row_mismatches(table: str, key: Any, event_row: dict[str, Any], db_row: dict[str, Any],
                   columns: tuple[Column, ...]) -> list[str]:
    out = []
    for column in columns:
        got = event_value(event_row.get(column.name), column)
        want = normalized(db_row.get(column.name), column)
        if column.type is ColumnType.SET and isinstance(got, list) and isinstance(want, list):
            got, want = sorted(got), sorted(want)
        if got != want:
            out.append(f"{table} {key} {column.name} ({column.source_type}): event {got!r} != database {want!r}")
    return out


def erp_rows(capture: Capture, table: str) -> list[dict[str, Any]]:
    conn = capture.erp()
    with conn.cursor(pymysql.cursors.DictCursor) as cursor:
        cursor.execute(f"SELECT * FROM `{table}`")
        rows = list(cursor.fetchall())
    conn.close()
    return rows


def crm_rows(capture: Capture, table: str) -> list[dict[str, Any]]:
    from psycopg.rows import dict_row

    with capture.crm() as conn, conn.cursor(row_factory=dict_row) as cursor:
        cursor.execute(f'SELECT * FROM "{capture.namespace}"."{table}"')
        return list(cursor.fetchall())


def key_of(row: dict[str, Any], names: tuple[str, ...]) -> tuple[Any, ...]:
    return tuple(row[n] for n in names)


# -------------------------------------------------------------------------------------- the fixture


def _ensure_sample(erp_port: int, crm_port: int) -> None:
    conn = pymysql.connect(host="127.0.0.1", port=erp_port, user="root", password="")
    with conn.cursor() as cursor:
        cursor.execute("SELECT COUNT(*) FROM information_schema.tables WHERE table_schema='erp'")
        have = cursor.fetchone()[0]
    conn.close()
    if have < len(ERP_TABLES):
        subprocess.run([sys.executable, "-m", "branchline.cli", "sample", "load", "--rows", "200"], check=True,
                       cwd=ROOT)


@pytest.fixture(scope="module")
def capture(erp: Any, crm: Any, kafka: Any, connect: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Capture]:
    _ensure_sample(erp.port, crm.port)
    tag = uuid.uuid4().hex[:6]
    namespace = f"cap_{tag}"
    path = tmp_path_factory.mktemp("capture") / "pipeline.yaml"
    path.write_text(f"""
name: capture_test
branch: t{tag}
sources:
  - name: erp
    kind: mariadb
    host: {erp.host}
    port: {erp.port}
    user: branchline
    password: branchline
    databases: [{namespace}]
    heartbeat_interval_ms: 2000
  - name: crm
    kind: postgres
    host: {crm.host}
    port: {crm.port}
    user: postgres
    database: crm
    schemas: [{namespace}]
    heartbeat_interval_ms: 2000
kafka: {{bootstrap_servers: "{kafka.address}"}}
connect: {{url: "http://{connect.address}"}}
""")
    pipeline = load_pipeline(path, env={})
    erp_source, crm_source = pipeline.sources

    # a private copy of the sample tables, set up as a DBA would (setup SQL), as root/postgres
    conn = pymysql.connect(host=erp.host, port=erp.port, user="root", password="", autocommit=True)
    with conn.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE `{namespace}` CHARACTER SET utf8mb4")
        for table in ERP_TABLES:
            cursor.execute(f"CREATE TABLE `{namespace}`.`{table}` LIKE erp.`{table}`")
            cursor.execute(f"INSERT INTO `{namespace}`.`{table}` SELECT * FROM erp.`{table}`")
        for statement in setup_statements(erp_source, password="branchline", user_host="127.0.0.1"):
            if not statement.startswith("CREATE USER"):
                cursor.execute(statement)
    conn.close()
    with psycopg.connect(host=crm.host, port=crm.port, user="postgres", dbname="crm", autocommit=True) as pg:
        pg.execute(f'CREATE SCHEMA "{namespace}"')
        for table in CRM_TABLES:
            pg.execute(f'CREATE TABLE "{namespace}"."{table}" (LIKE public."{table}" INCLUDING ALL)')
            pg.execute(f'INSERT INTO "{namespace}"."{table}" SELECT * FROM public."{table}"')
        pg.execute(f'ALTER TABLE "{namespace}".contacts REPLICA IDENTITY FULL')  # before images of updates
        for statement in setup_statements(crm_source, publication=False):
            if "ROLE" not in statement:
                pg.execute(statement)

    client = ConnectClient(pipeline.connect.url)  # type: ignore[union-attr]
    result = CliRunner().invoke(cli, ["connectors", "apply", str(path)])
    assert result.exit_code == 0, result.output
    cap = Capture(pipeline, path, namespace, client, erp.port, crm.port)
    try:
        expected = {**{t: len(erp_rows(cap, t)) for t in ERP_TABLES}, **{t: len(crm_rows(cap, t)) for t in CRM_TABLES}}

        def snapshots_complete() -> bool:
            """Both snapshots ended, and every table's read events are on its topic: a snapshot's records
            reach their topics in separate producer batches, so its "last" record can show up first."""
            records = cap.records()
            if {r.topic.split(".")[1] for r in records if snapshot_flag(r) == "last"} != {"erp", "crm"}:
                return False
            reads = Counter(r.topic.rsplit(".", 1)[1] for r in records if operation(r) == "r")
            return all(reads[table] >= count for table, count in expected.items())

        wait_for("the initial snapshots", snapshots_complete, 300, 2)
        yield cap
    finally:
        for source in pipeline.sources:
            retire(client, source.connector_name)
        retire(client, f"branchline.t{tag}.broken")
        client.close()
        with psycopg.connect(host=crm.host, port=crm.port, user="postgres", dbname="crm", autocommit=True) as pg:
            for _ in range(30):
                row = pg.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                                 (crm_source.slot,)).fetchone()  # type: ignore[union-attr]
                if row is None or not row[0]:
                    break
                time.sleep(1)
            if row is not None:
                pg.execute("SELECT pg_drop_replication_slot(%s)", (crm_source.slot,))  # type: ignore[union-attr]
            pg.execute(f'DROP PUBLICATION IF EXISTS "{crm_source.publication}"')  # type: ignore[union-attr]
            pg.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                       "WHERE slot_name = %s AND NOT active", (f"branchline_t{tag}_broken",))
            pg.execute(f'DROP SCHEMA "{namespace}" CASCADE')
        conn = pymysql.connect(host=erp.host, port=erp.port, user="root", password="", autocommit=True)
        with conn.cursor() as cursor:
            cursor.execute(f"DROP DATABASE `{namespace}`")
            cursor.execute(f"REVOKE SELECT, LOCK TABLES ON `{namespace}`.* FROM 'branchline'@'127.0.0.1'")
        conn.close()
        delete_topics(cap.bootstrap, lambda t: f"t{tag}." in t)


# ------------------------------------------------------------------------------------------ the tests


def test_snapshot_read_events_carry_exact_values_of_every_row_and_column(capture: Capture) -> None:
    decoded = decode_all(capture, capture.records())
    problems: list[str] = []
    for table, rows_of in [*((t, erp_rows) for t in ERP_TABLES), *((t, crm_rows) for t in CRM_TABLES)]:
        reads = [c for c in changes(decoded, table) if c.event.op is Op.READ]
        assert reads, f"no read events for {table}"
        schema = reads[0].schema
        names = schema.primary_key or tuple(c.name for c in schema.columns)
        db = rows_of(capture, table)
        db_by_key = {key_of({k: normalized(v, schema.column(k)) for k, v in r.items()}, names): r for r in db}
        event_by_key = {key_of(c.event.after or {}, names): c.event.after for c in reads}
        assert len(reads) == len(db), f"{table}: {len(reads)} read events for {len(db)} rows"
        assert set(event_by_key) == set(db_by_key), f"{table}: keys differ"
        for key, row in event_by_key.items():
            problems += row_mismatches(table, key, row or {}, db_by_key[key], schema.columns)
    assert not problems, "\n".join(problems[:20])


def test_publication_lists_exactly_the_captured_and_control_tables(capture: Capture) -> None:
    crm = capture.pipeline.source("crm")
    with capture.crm() as pg:
        published = {f"{n}.{t}" for n, t in pg.execute(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
            (crm.publication,))}  # type: ignore[union-attr]
        plugin = pg.execute("SELECT plugin FROM pg_replication_slots WHERE slot_name = %s",
                            (crm.slot,)).fetchone()  # type: ignore[union-attr]
    assert published == {*(f"{capture.namespace}.{t}" for t in CRM_TABLES), "branchline.debezium_signal",
                         "branchline.debezium_heartbeat"}
    assert plugin == ("pgoutput",)


def test_insert_update_delete_and_truncate_carry_the_right_images(capture: Capture) -> None:
    ns = capture.namespace
    conn = capture.erp()
    with conn.cursor(pymysql.cursors.DictCursor) as cursor:
        cursor.execute("INSERT INTO warehouses (id, code, name, city, opened, is_active, opens_at, closes_at) VALUES "
                       "(900, 'WH0900', 'Test ☃ 仓库', 'Zürich', 2155, 1, '-838:59:59', '838:59:59')")
        cursor.execute("SELECT * FROM warehouses WHERE id = 900")
        inserted = cursor.fetchone()
        cursor.execute("UPDATE warehouses SET name = 'Renamed', closes_at = '23:59:59.000000' WHERE id = 900")
        cursor.execute("SELECT * FROM warehouses WHERE id = 900")
        updated = cursor.fetchone()
        cursor.execute("DELETE FROM warehouses WHERE id = 900")
        cursor.execute("UPDATE products SET external_id = 18446744073709551615, unit_price = 0.0001 "
                       "WHERE id = (SELECT MIN(id) FROM (SELECT id FROM products) p)")
        cursor.execute("TRUNCATE TABLE legacy_price_list")
    conn.close()
    with capture.crm() as pg:
        contact = pg.execute(f'INSERT INTO "{ns}".contacts (id, account_id, first_name, last_name, tags, preferences, '
                             f'last_seen, created_at) VALUES ((SELECT max(id) + 1000 FROM "{ns}".contacts), '
                             "gen_random_uuid(), 'Zoë', 'O''Neil', ARRAY['a,b', 'c'], "
                             """'{"lang": "de"}', '2024-02-29 23:59:59.999999', now()) RETURNING id""").fetchone()[0]
        pg.execute(f'UPDATE "{ns}".contacts SET last_name = \'Ünal\', tags = NULL WHERE id = %s', (contact,))
        pg.execute(f'DELETE FROM "{ns}".contacts WHERE id = %s', (contact,))
        toasted = pg.execute(f'SELECT id FROM "{ns}".activities WHERE length(body) > 8192 ORDER BY id LIMIT 1'
                             ).fetchone()[0]
        pg.execute(f'UPDATE "{ns}".activities SET done = NOT done WHERE id = %s', (toasted,))
        pg.execute(f'TRUNCATE "{ns}".opportunities')

    def truncates_seen() -> list[tuple[Record, Any]] | None:
        decoded = decode_all(capture, capture.records())
        ops = {(c.event.table.table, c.event.op) for _, c in decoded if isinstance(c, RowChange)}
        return decoded if {("legacy_price_list", Op.TRUNCATE), ("opportunities", Op.TRUNCATE)} <= ops else None

    decoded = wait_for("both truncates", truncates_seen, 120, 2)

    warehouse = [(r, c) for r, c in row_records(decoded, "warehouses") if c.event.key.get("id") == 900]
    assert [c.event.op for _, c in warehouse] == [Op.CREATE, Op.UPDATE, Op.DELETE]
    (_, create), (_, update), (d_rec, delete) = warehouse
    columns = create.schema.columns
    assert create.event.before is None
    assert not row_mismatches("warehouses", 900, create.event.after or {}, inserted, columns)
    assert create.event.after["opens_at"] == timedelta(hours=-838, minutes=-59, seconds=-59)  # type: ignore[index]
    assert not row_mismatches("warehouses", 900, update.event.before or {}, inserted, columns)
    assert not row_mismatches("warehouses", 900, update.event.after or {}, updated, columns)
    assert not row_mismatches("warehouses", 900, delete.event.before or {}, updated, columns)
    assert delete.event.after is None
    tombstones = [(r, d) for r, d in decoded if isinstance(d, Tombstone) and r.topic.endswith(".warehouses")]
    assert [d.key for _, d in tombstones] == [{"id": 900}]
    assert tombstones[0][0].offset == d_rec.offset + 1  # right after the delete, same partition

    product = [c for c in changes(decoded, "products") if c.event.op is Op.UPDATE]
    assert product and product[-1].event.after["external_id"] == 18446744073709551615  # type: ignore[index]
    assert product[-1].event.after["unit_price"] == Decimal("0.0001")  # type: ignore[index]

    people = [(r, c) for r, c in row_records(decoded, "contacts") if c.event.key.get("id") == contact]
    assert [c.event.op for _, c in people] == [Op.CREATE, Op.UPDATE, Op.DELETE]
    assert people[0][1].event.after["tags"] == ["a,b", "c"]  # type: ignore[index]
    before = people[1][1].event.before  # REPLICA IDENTITY FULL on this table
    assert before is not None and before["last_name"] == "O'Neil" and before["tags"] == ["a,b", "c"]
    assert people[1][1].event.after["last_name"] == "Ünal" and people[1][1].event.after["tags"] is None  # type: ignore[index]
    assert people[2][1].event.before["last_name"] == "Ünal" and people[2][1].event.after is None  # type: ignore[index]

    activity = [(r, c) for r, c in row_records(decoded, "activities")
                if c.event.op is Op.UPDATE and c.event.key["id"] == toasted]
    assert activity and activity[-1][1].event.after["body"] is UNCHANGED  # type: ignore[index]
    assert activity[-1][1].event.before is None  # default REPLICA IDENTITY: no old row

    truncated = [c for c in changes(decoded, "legacy_price_list") if c.event.op is Op.TRUNCATE]
    assert len(truncated) == 1 and truncated[0].event.after is None


def test_restart_and_pause_resume_without_a_new_snapshot(capture: Capture) -> None:
    runner = CliRunner()
    reads_before = sum(1 for r in capture.records() if snapshot_flag(r) in ("true", "first", "last",
                                                                              "first_in_data_collection",
                                                                              "last_in_data_collection"))
    result = runner.invoke(cli, ["connectors", "restart", str(capture.file)])
    assert result.exit_code == 0 and "restart requested" in result.output, result.output
    for source in capture.pipeline.sources:
        assert capture.client.wait_for(source.connector_name, {"RUNNING"}, 120).healthy

    result = runner.invoke(cli, ["connectors", "pause", str(capture.file)])
    assert result.exit_code == 0, result.output
    for source in capture.pipeline.sources:
        capture.client.wait_for(source.connector_name, {"PAUSED"}, 60)
    status = runner.invoke(cli, ["connectors", "status", str(capture.file), "--json", "--no-snapshots"])
    assert status.exit_code == 1 and {s["state"] for s in json.loads(status.output)} == {"PAUSED"}

    conn = capture.erp()  # changes made while paused arrive after resume
    with conn.cursor() as cursor:
        cursor.execute("INSERT INTO warehouses (id, code, name, city, opened, is_active, opens_at, closes_at) "
                       "VALUES (901, 'WH0901', 'While paused', 'Oslo', 2001, 0, '08:00', '17:00')")
    conn.close()
    with capture.crm() as pg:
        pg.execute(f'UPDATE "{capture.namespace}".accounts SET name = \'while paused\' '
                   f'WHERE id = (SELECT id FROM "{capture.namespace}".accounts ORDER BY id LIMIT 1)')

    result = runner.invoke(cli, ["connectors", "resume", str(capture.file)])
    assert result.exit_code == 0, result.output
    for source in capture.pipeline.sources:
        capture.client.wait_for(source.connector_name, {"RUNNING"}, 60)

    def arrived() -> list[tuple[Record, Any]] | None:
        decoded = decode_all(capture, capture.records())
        ok = any(c.event.op is Op.CREATE and c.event.key.get("id") == 901 for c in changes(decoded, "warehouses"))
        ok = ok and any(c.event.op is Op.UPDATE and (c.event.after or {}).get("name") == "while paused"
                        for c in changes(decoded, "accounts"))
        return decoded if ok else None

    decoded = wait_for("the changes made while paused", arrived, 120, 2)
    reads_after = sum(1 for r, _ in decoded if snapshot_flag(r) in ("true", "first", "last",
                                                                     "first_in_data_collection",
                                                                     "last_in_data_collection"))
    assert reads_after == reads_before, "a restart must resume from the offsets, not snapshot again"
    status = runner.invoke(cli, ["connectors", "status", str(capture.file)])
    assert status.exit_code == 0, status.output
    assert status.output.count("task 0: RUNNING") == 2


def test_apply_is_idempotent_and_updates_a_changed_config(capture: Capture) -> None:
    runner = CliRunner()
    again = runner.invoke(cli, ["connectors", "apply", str(capture.file)])
    assert again.exit_code == 0, again.output
    assert again.output.count(": unchanged") == 2, again.output
    changed = capture.file.with_name("changed.yaml")
    changed.write_text(capture.file.read_text().replace("heartbeat_interval_ms: 2000", "heartbeat_interval_ms: 3000", 1))
    result = runner.invoke(cli, ["connectors", "apply", str(changed), "--source", "erp"])
    assert result.exit_code == 0 and ": updated, RUNNING" in result.output, result.output
    stored = capture.client.config(capture.pipeline.source("erp").connector_name)
    assert stored is not None and stored["heartbeat.interval.ms"] == "3000"
    back = runner.invoke(cli, ["connectors", "apply", str(capture.file), "--source", "erp"])
    assert back.exit_code == 0 and ": updated" in back.output


def test_incremental_snapshot_completes_while_churn_runs(capture: Capture) -> None:
    stop = threading.Event()
    errors: list[BaseException] = []
    churned = [0]

    def churn() -> None:
        try:
            conn = capture.erp()
            with conn.cursor() as cursor:
                i = 0
                while not stop.is_set():
                    i += 1
                    cursor.execute("UPDATE sales_orders SET total = total + 1, note = %s "
                                   "WHERE id = (SELECT id FROM (SELECT id FROM sales_orders WHERE total < 1000000 "
                                   "ORDER BY RAND() LIMIT 1) s)",  # the sample holds DECIMAL(18,4)'s maximum
                                   (f"churn {i}",))
                    if i % 5 == 0:
                        cursor.execute("INSERT INTO sales_orders (order_no, customer_id, warehouse_id, status, "
                                       "ordered_at, total, currency) VALUES (%s, 1, 1, 'draft', NOW(6), 1.5, 'EUR')",
                                       (f"SO-CH-{i:06d}",))
                    if i % 7 == 0:
                        cursor.execute("DELETE FROM sales_orders ORDER BY RAND() LIMIT 1")
                    churned[0] = i
                    time.sleep(0.02)
            conn.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        time.sleep(1)
        result = CliRunner().invoke(cli, ["snapshot", str(capture.file), "erp", f"{capture.namespace}.sales_orders",
                                          "--wait", "--timeout", "180"])
        assert result.exit_code == 0, result.output
        assert "COMPLETED" in result.output, result.output
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors
    assert churned[0] > 10, "the churn must have run during the snapshot"
    status = CliRunner().invoke(cli, ["connectors", "status", str(capture.file), "--source", "erp"])
    assert status.exit_code == 0 and "incremental snapshot: COMPLETED" in status.output, status.output

    conn = capture.erp()  # a marker change: once it is on Kafka, everything before it is too
    with conn.cursor() as cursor:
        cursor.execute("UPDATE sales_orders SET note = 'final marker' WHERE id = (SELECT MIN(id) FROM "
                       "(SELECT id FROM sales_orders) s)")
    conn.close()

    def caught_up() -> list[tuple[Record, Any]] | None:
        decoded = decode_all(capture, capture.records())
        done = any((c.event.after or {}).get("note") == "final marker" for c in changes(decoded, "sales_orders"))
        return decoded if done else None

    decoded = wait_for("the final marker", caught_up, 120, 2)
    incremental = [r for r, d in decoded if r.topic.endswith(".sales_orders") and snapshot_flag(r) == "incremental"]
    db = erp_rows(capture, "sales_orders")
    assert len(incremental) >= len(db) - churned[0], "the incremental snapshot must read the table"

    state: dict[Any, dict[str, Any]] = {}  # replay every change in topic order: last one wins per key
    for c in changes(decoded, "sales_orders"):
        key = c.event.key["id"]
        if c.event.op is Op.DELETE:
            state.pop(key, None)
        elif c.event.op is Op.TRUNCATE:
            state.clear()
        else:
            state[key] = c.event.after or {}
    columns = changes(decoded, "sales_orders")[0].schema.columns
    assert set(state) == {r["id"] for r in db}
    problems = [p for r in db for p in row_mismatches("sales_orders", r["id"], state[r["id"]], r, columns)]
    assert not problems, "\n".join(problems[:20])


def test_status_shows_the_trace_of_a_failed_task(capture: Capture) -> None:
    """A PostgreSQL connector told to use a publication that does not exist passes Connect's validation
    and then fails in its task: `status` shows that trace and exits 2."""
    broken = capture.file.with_name("broken.yaml")
    text = capture.file.read_text().replace("name: crm", "name: broken", 1).replace(
        "    database: crm\n", "    database: crm\n    password: not-shown-anywhere\n    publication: bl_missing_pub\n"
        "    debezium: {publication.autocreate.mode: disabled}\n", 1)
    broken.write_text(text)
    pipeline = load_pipeline(broken, env={})
    source = pipeline.source("broken")
    capture.client.put_config(source.connector_name, connector_config(source, pipeline))
    state = capture.client.wait_for(source.connector_name, {"RUNNING"}, 120)
    assert not state.healthy
    result = CliRunner().invoke(cli, ["connectors", "status", str(broken), "--source", "broken", "--no-snapshots"])
    assert result.exit_code == 2, result.output
    assert "task 0: FAILED" in result.output and "Publication autocreation is disabled" in result.output, result.output
    assert "not-shown-anywhere" not in result.output
    deleted = CliRunner().invoke(cli, ["connectors", "delete", str(broken), "--source", "broken"])
    assert deleted.exit_code == 0 and f"{source.connector_name}: deleted" in deleted.output
    assert capture.client.config(source.connector_name) is None
    again = CliRunner().invoke(cli, ["connectors", "delete", str(broken), "--source", "broken"])
    assert f"{source.connector_name}: not present" in again.output


# ------------------------------------------------------------- restarting a Kafka Connect worker process


class PrivateConnect:
    """A second Kafka Connect worker of its own group (own config/offset/status topics, own port), started
    with the stack worker's command line and plugins, so this test can kill and restart a real worker
    process without disturbing the shared one."""

    def __init__(self, tag: str) -> None:
        from branchline.paths import state_dir

        base = state_dir() / "connect"
        pid_file = base / "connect.pid"
        if not pid_file.exists() or not Path(f"/proc/{pid_file.read_text().strip()}/cmdline").exists():
            message = f"`Kafka Connect` of the stack must run with its pid in {pid_file}; got none"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        command = Path(f"/proc/{pid_file.read_text().strip()}/cmdline").read_bytes().split(b"\0")
        command = [c.decode() for c in command if c]
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"bl-connect-{tag}"
        self.dir.mkdir(parents=True, exist_ok=True)
        props = {}
        for line in (base / "connect.properties").read_text().splitlines():
            if "=" in line and not line.startswith("#"):
                key, value = line.split("=", 1)
                props[key] = value
        props.update({
            "group.id": f"bl-capture-{tag}", "config.storage.topic": f"bl-capture-{tag}-configs",
            "offset.storage.topic": f"bl-capture-{tag}-offsets", "status.storage.topic": f"bl-capture-{tag}-status",
            "listeners": f"http://127.0.0.1:{self.port}", "rest.advertised.port": str(self.port),
            "offset.flush.interval.ms": "1000",
        })
        self.properties = self.dir / "connect.properties"
        self.properties.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        self.command = [c if not c.startswith("-Dbranchline.log.file=") else f"-Dbranchline.log.file={self.dir}/connect.log"
                        for c in command[:-1]] + [str(self.properties)]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.topics = (f"bl-capture-{tag}-configs", f"bl-capture-{tag}-offsets", f"bl-capture-{tag}-status")

    def start(self) -> None:
        import httpx

        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        cwd=self.dir)

        def ready() -> bool:
            try:
                return httpx.get(f"{self.url}/connector-plugins", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for("the private Kafka Connect worker", ready, 180, 1)

    def stop(self) -> None:
        """SIGTERM, as an operator or a service manager stops a worker; SIGKILL after 60 s."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


def test_restart_of_a_kafka_connect_worker_resumes_without_a_new_snapshot(capture: Capture) -> None:
    tag = uuid.uuid4().hex[:6]
    worker = PrivateConnect(tag)
    text = capture.file.read_text()
    branch = re.search(r"branch: (\w+)", text).group(1)  # type: ignore[union-attr]
    text = text.replace(f"branch: {branch}", f"branch: {branch}w").replace(
        re.search(r'url: "[^"]+"', text).group(0), f'url: "{worker.url}"')  # type: ignore[union-attr]
    path = capture.file.with_name("restart.yaml")
    path.write_text(text)
    pipeline = load_pipeline(path, env={})
    own = tuple(f"{s.topic_prefix}." for s in pipeline.sources)

    def records() -> list[Record]:
        return read_topics(capture.bootstrap, lambda t: t.startswith(own))

    def reads(rs: list[Record]) -> int:
        return sum(1 for r in rs if snapshot_flag(r) not in (None, "false", "incremental"))

    worker.start()
    client = ConnectClient(worker.url)
    try:
        result = CliRunner().invoke(cli, ["connectors", "apply", str(path)])
        assert result.exit_code == 0, result.output
        wait_for("the snapshots on the private worker", lambda: {r.topic.split(".")[1] for r in records()
                                                                 if snapshot_flag(r) == "last"} == {"erp", "crm"}, 300, 2)
        time.sleep(3)  # let the worker flush offsets (offset.flush.interval.ms=1000)
        before = reads(records())

        worker.stop()  # the whole worker process goes away; changes keep happening at the sources
        conn = capture.erp()
        with conn.cursor() as cursor:
            cursor.execute("INSERT INTO warehouses (id, code, name, city, opened, is_active, opens_at, closes_at) "
                           "VALUES (902, 'WH0902', 'While Connect was down', 'Lyon', 1999, 1, '07:00', '19:00')")
        conn.close()
        with capture.crm() as pg:
            pg.execute(f'UPDATE "{capture.namespace}".accounts SET domain = \'while-down.example\' '
                       f'WHERE id = (SELECT id FROM "{capture.namespace}".accounts ORDER BY id DESC LIMIT 1)')

        worker.start()
        for source in pipeline.sources:
            assert client.wait_for(source.connector_name, {"RUNNING"}, 180).healthy

        def arrived() -> list[Record] | None:
            rs = records()
            text = b"".join(r.value or b"" for r in rs if r.topic.endswith((".warehouses", ".accounts")))
            return rs if b"While Connect was down" in text and b"while-down.example" in text else None

        after = wait_for("the changes made while Connect was down", arrived, 180, 2)
        assert reads(after) == before, "the restarted worker must resume from its offsets, not snapshot again"
    finally:
        for source in pipeline.sources:
            with contextlib.suppress(Exception):  # cleanup goes on
                retire(client, source.connector_name)
        client.close()
        worker.stop()
        with capture.crm() as pg:
            for source in pipeline.sources:
                if source.kind == "postgres":
                    pg.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                               "WHERE slot_name = %s", (source.slot,))  # type: ignore[union-attr]
                    pg.execute(f'DROP PUBLICATION IF EXISTS "{source.publication}"')  # type: ignore[union-attr]
        delete_topics(capture.bootstrap, lambda t: t.startswith(own) or t in worker.topics
                      or t.endswith(tuple(f".{s.topic_prefix}" for s in pipeline.sources)))


def test_snapshot_of_a_table_without_a_primary_key_is_refused(capture: Capture) -> None:
    result = CliRunner().invoke(cli, ["snapshot", str(capture.file), "erp", f"{capture.namespace}.legacy_price_list"])
    assert result.exit_code != 0
    assert "must exist and have a primary key" in str(result.exception)


def test_heartbeat_query_moves_the_slot_while_captured_tables_are_idle(capture: Capture) -> None:
    """WAL written outside the captured tables is released: the heartbeat write lets the slot confirm it."""
    crm = capture.pipeline.source("crm")
    scratch = f"public.{capture.namespace}_idle"
    with capture.crm() as pg:
        pg.execute(f"CREATE TABLE {scratch} (id int PRIMARY KEY, filler text)")
        pg.execute(f"INSERT INTO {scratch} SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g")
        target = pg.execute("SELECT pg_current_wal_lsn()").fetchone()[0]  # type: ignore[index]
        pg.execute(f"DROP TABLE {scratch}")

        def confirmed() -> bool:
            row = pg.execute("SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots "
                             "WHERE slot_name = %s", (target, crm.slot)).fetchone()  # type: ignore[union-attr]
            return bool(row and row[0])

        wait_for(f"slot {crm.slot} to confirm past {target}", confirmed, 90, 2)  # type: ignore[union-attr]


def test_an_added_column_appears_in_later_envelopes_and_the_ddl_on_the_schema_topic(capture: Capture) -> None:
    ns = capture.namespace
    conn = capture.erp()
    with conn.cursor() as cursor:
        cursor.execute("ALTER TABLE warehouses ADD COLUMN manager VARCHAR(40) NULL")
        cursor.execute("INSERT INTO warehouses (id, code, name, city, opened, is_active, opens_at, closes_at, manager) "
                       "VALUES (903, 'WH0903', 'After DDL', 'Porto', 2020, 1, '06:00', '22:00', 'Inês')")
    conn.close()
    with capture.crm() as pg:
        pg.execute(f'ALTER TABLE "{ns}".accounts ADD COLUMN region text')
        pg.execute(f'UPDATE "{ns}".accounts SET region = \'EMEA\' '
                   f'WHERE id = (SELECT id FROM "{ns}".accounts ORDER BY id LIMIT 1)')

    def arrived() -> list[tuple[Record, Any]] | None:
        decoded = decode_all(capture, capture.records())
        erp = [c for c in changes(decoded, "warehouses") if c.event.key.get("id") == 903]
        crm = [c for c in changes(decoded, "accounts") if (c.event.after or {}).get("region") == "EMEA"]
        return decoded if erp and crm else None

    decoded = wait_for("the changes after the DDL", arrived, 120, 2)
    erp = next(c for c in changes(decoded, "warehouses") if c.event.key.get("id") == 903)
    assert erp.event.after["manager"] == "Inês"  # type: ignore[index]
    assert erp.schema.column("manager").source_type == "varchar(40)"
    crm = next(c for c in changes(decoded, "accounts") if (c.event.after or {}).get("region") == "EMEA")
    assert crm.schema.column("region").type is ColumnType.STRING
    schema_topic = capture.pipeline.source("erp").topic_prefix  # the schema-change topic is the prefix itself
    ddl = [json.loads(r.value)["payload"].get("ddl", "")
           for r in read_topics(capture.bootstrap, lambda t: t == schema_topic) if r.value]
    assert any("ADD COLUMN manager" in statement for statement in ddl)
