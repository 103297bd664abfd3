"""Both runtimes on the same sample data: the embedded readers must emit the same changes (op, key,
position, row images) as Debezium on Kafka Connect decoded by the streams stage, and both paths must
produce the same target tables, compared row by row.

A private copy of the sample ERP tables (MariaDB database) and CRM tables (PostgreSQL schema) is
captured by Debezium connectors (`branchline connectors apply`) and, at the same time, by the
embedded readers (their own server id, slot and publication). After both snapshots, a churn of
updates, deletes and re-inserts runs over every table; each path then writes its own target schema.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pymysql
import pytest
from branchline.cli import cli
from branchline.config import PipelineConfig, load_pipeline
from branchline.connectors.connect import ConnectClient
from branchline.connectors.embedded.reader import Checkpoint
from branchline.connectors.operate import retire
from branchline.connectors.setup_sql import setup_statements
from branchline.connectors.topics import Record, delete_topics, read_topics
from branchline.events import ChangeEvent, Op
from branchline.runtime.runner import Runner, build_reader
from branchline.sinks.config import PostgresSinkConfig
from branchline.sinks.postgres.sink import PostgresSink
from branchline.streams.decode import EnvelopeDecoder, RowChange
from branchline.streams.dedupe import collapse
from click.testing import CliRunner

pytestmark = pytest.mark.integration

ERP_TABLES = ("customers", "products", "warehouses", "sales_orders", "order_lines", "invoices", "stock_movements")
CRM_TABLES = ("accounts", "contacts", "opportunities", "activities")


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = 180.0, every_s: float = 2.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out waiting for {what}")


def snapshot_flag(record: Record) -> str | None:
    if not record.value or b'"snapshot"' not in record.value:
        return None
    import orjson

    payload = orjson.loads(record.value).get("payload") or {}
    return str((payload.get("source") or {}).get("snapshot"))


@dataclass
class Both:
    pipeline: PipelineConfig
    path: Path
    embedded_path: Path
    namespace: str
    tag: str
    erp_port: int
    crm_port: int
    cloud_port: int
    starts: dict[str, Checkpoint]

    def records(self) -> list[Record]:
        prefixes = tuple(f"{s.topic_prefix}.{self.namespace}." for s in self.pipeline.sources)
        assert self.pipeline.kafka is not None
        return read_topics(self.pipeline.kafka.bootstrap_servers, lambda t: t.startswith(prefixes))


def _ensure_sample(erp_port: int) -> None:
    import subprocess
    import sys

    conn = pymysql.connect(host="127.0.0.1", port=erp_port, user="root", password="")
    with conn.cursor() as cursor:
        cursor.execute("SELECT COUNT(*) FROM information_schema.tables WHERE table_schema='erp'")
        have = cursor.fetchone()[0]
    conn.close()
    if have < len(ERP_TABLES):
        subprocess.run([sys.executable, "-m", "branchline.cli", "sample", "load", "--rows", "200"], check=True)


@pytest.fixture(scope="module")
def both(erp: Any, crm: Any, cloud: Any, kafka: Any, connect: Any,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Both]:
    _ensure_sample(erp.port)
    tag = uuid.uuid4().hex[:6]
    namespace = f"cmp_{tag}"
    work = tmp_path_factory.mktemp("both")
    sources = f"""
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
"""
    path = work / "debezium.yaml"
    path.write_text(f"""name: cmp_dbz
branch: c{tag}
sources:{sources}
kafka: {{bootstrap_servers: "{kafka.address}"}}
connect: {{url: "http://{connect.address}"}}
""")
    erp_part, crm_part = sources.split("  - name: crm")
    embedded_sources = (erp_part.replace("    databases:", "    server_id: 3141593\n    databases:")
                        + "  - name: crm" + crm_part.replace("heartbeat_interval_ms: 2000",
                                                            f"slot: {namespace}_emb\n    publication: {namespace}_emb"))
    embedded_path = work / "embedded.yaml"
    embedded_path.write_text(f"""name: cmp_emb
branch: c{tag}
sources:{embedded_sources}
sinks:
  cloud:
    kind: postgres
    host: {cloud.host}
    port: {cloud.port}
    user: postgres
    database: cloud
    schema: "{namespace}_emb_{{source}}"
runtime:
  batch_interval_ms: 20
metrics:
  enabled: false
""")
    pipeline = load_pipeline(path, env={})
    erp_source, crm_source = pipeline.sources

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
        for statement in setup_statements(crm_source, publication=False):
            if "ROLE" not in statement:
                pg.execute(statement)

    client = ConnectClient(pipeline.connect.url)  # type: ignore[union-attr]
    result = CliRunner().invoke(cli, ["connectors", "apply", str(path)])
    assert result.exit_code == 0, result.output
    embedded = load_pipeline(embedded_path, env={})
    starts = {}
    for source in embedded.sources:  # the embedded readers' stream starts, recorded before any churn
        reader = build_reader(source, embedded.runtime)  # type: ignore[arg-type]
        starts[source.name] = reader.start_position()
        reader.close()
    state = Both(pipeline, path, embedded_path, namespace, tag, erp.port, crm.port, cloud.port, starts)
    try:
        wait_for("the Debezium snapshots", lambda: {r.topic.split(".")[1] for r in state.records()
                                                   if snapshot_flag(r) == "last"} == {"erp", "crm"}, 300)
        yield state
    finally:
        for source in pipeline.sources:
            retire(client, source.connector_name)
        client.close()
        with psycopg.connect(host=crm.host, port=crm.port, user="postgres", dbname="crm", autocommit=True) as pg:
            for slot in (crm_source.slot, f"{namespace}_emb"):  # type: ignore[union-attr]
                for _ in range(30):
                    row = pg.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
                    if row is None or not row[0]:
                        break
                    time.sleep(1)
                pg.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                           " WHERE slot_name = %s", (slot,))
            for publication in (crm_source.publication, f"{namespace}_emb"):  # type: ignore[union-attr]
                pg.execute(f'DROP PUBLICATION IF EXISTS "{publication}"')
            pg.execute(f'DROP SCHEMA "{namespace}" CASCADE')
        conn = pymysql.connect(host=erp.host, port=erp.port, user="root", password="", autocommit=True)
        with conn.cursor() as cursor:
            cursor.execute("SET SESSION lock_wait_timeout = 30")
            cursor.execute(f"DROP DATABASE `{namespace}`")
            cursor.execute(f"REVOKE SELECT, LOCK TABLES ON `{namespace}`.* FROM 'branchline'@'127.0.0.1'")
        conn.close()
        with psycopg.connect(host=cloud.host, port=cloud.port, user="postgres", dbname="cloud",
                             autocommit=True) as target:
            for suffix in ("emb_erp", "emb_crm", "dbz_erp", "dbz_crm"):
                target.execute(f'DROP SCHEMA IF EXISTS "{namespace}_{suffix}" CASCADE')
        delete_topics(pipeline.kafka.bootstrap_servers, lambda t: f"c{tag}." in t)  # type: ignore[union-attr]


def _churn(both: Both) -> dict[str, int]:
    """Updates, deletes and re-inserts (the same rows, changed) over every copied table; returns how
    many row changes each source logged (each statement's row count: every matched row changes)."""
    changed = {"erp": 0, "crm": 0}
    ns = both.namespace
    conn = pymysql.connect(host="127.0.0.1", port=both.erp_port, user="root", password="", autocommit=True,
                           init_command="SET time_zone = '+00:00'")
    with conn, conn.cursor() as cursor:
        for table in ERP_TABLES:
            cursor.execute("SELECT COLUMN_NAME, DATA_TYPE FROM information_schema.COLUMNS WHERE TABLE_SCHEMA=%s"
                           " AND TABLE_NAME=%s ORDER BY ORDINAL_POSITION", (ns, table))
            columns = cursor.fetchall()
            cursor.execute("SELECT COLUMN_NAME FROM information_schema.KEY_COLUMN_USAGE WHERE TABLE_SCHEMA=%s"
                           " AND TABLE_NAME=%s AND CONSTRAINT_NAME='PRIMARY' ORDER BY ORDINAL_POSITION", (ns, table))
            key = cursor.fetchone()[0]
            numeric = [c for c, t in columns if t in ("decimal", "int", "smallint") and c != key]
            cursor.execute("BEGIN")
            if numeric:
                column = numeric[-1]  # a real change (MariaDB logs no row whose values stay the same)
                changed["erp"] += cursor.execute(
                    f"UPDATE `{ns}`.`{table}` SET `{column}` = CASE WHEN `{column}` > 0"
                    f" THEN `{column}` - 1 ELSE `{column}` + 1 END WHERE `{key}` % 5 = 1")
            cursor.execute(f"CREATE TEMPORARY TABLE `{ns}`.`saved_{table}` AS SELECT * FROM `{ns}`.`{table}`"
                           f" WHERE `{key}` % 7 = 2")
            changed["erp"] += cursor.execute(f"DELETE FROM `{ns}`.`{table}` WHERE `{key}` % 7 = 2")
            cursor.execute("COMMIT")
            changed["erp"] += cursor.execute(
                f"INSERT INTO `{ns}`.`{table}` SELECT * FROM `{ns}`.`saved_{table}` WHERE `{key}` % 2 = 0")
    with psycopg.connect(host="127.0.0.1", port=both.crm_port, user="postgres", dbname="crm",
                         autocommit=True) as pg:
        for table in CRM_TABLES:
            with pg.transaction():
                changed["crm"] += pg.execute(
                    f'UPDATE "{ns}"."{table}" SET id = id WHERE abs(hashtext(id::text)) % 5 = 1').rowcount
                pg.execute(f'CREATE TEMP TABLE "saved_{table}" AS SELECT * FROM "{ns}"."{table}" WHERE abs(hashtext(id::text)) % 7 = 2')
                changed["crm"] += pg.execute(
                    f'DELETE FROM "{ns}"."{table}" WHERE abs(hashtext(id::text)) % 7 = 2').rowcount
            changed["crm"] += pg.execute(
                f'INSERT INTO "{ns}"."{table}" SELECT * FROM "saved_{table}" WHERE abs(hashtext(id::text)) % 2 = 0').rowcount
    return changed


def _debezium_changes(both: Both, want_tables: set[str]) -> dict[str, list[tuple[ChangeEvent, Any]]]:
    decoders = {s.name: EnvelopeDecoder(s.name, s.branch) for s in both.pipeline.sources}
    out: dict[str, list[tuple[ChangeEvent, Any]]] = {}
    for record in both.records():
        source = record.topic.split(".")[1]
        result = decoders[source].decode(record.topic, record.key, record.value)
        if isinstance(result, RowChange):
            out.setdefault(source, []).append((result.event, result.schema))
    return out


def _embedded_stream(both: Both, source_name: str, count: int) -> list[ChangeEvent]:
    embedded = load_pipeline(both.embedded_path, env={})
    source = embedded.source(source_name)
    reader = build_reader(source, embedded.runtime)  # type: ignore[arg-type]
    stop = threading.Event()
    events: list[ChangeEvent] = []
    deadline = time.monotonic() + 120
    try:
        for changes in reader.stream(both.starts[source_name], stop):
            events.extend(e for e in changes.events if e.table.table in ERP_TABLES + CRM_TABLES)
            if (len(events) >= count and changes.checkpoint is not None) or time.monotonic() > deadline:
                break
    finally:
        stop.set()
        reader.close()
    return events


def _comparable(event: ChangeEvent, postgres: bool) -> tuple[Any, ...]:
    # `before` matters to the sinks only for deletes (the decoder leaves it out of MariaDB updates)
    before = event.before if event.op is Op.DELETE else None
    if postgres and before is not None:  # default replica identity: only the key is real
        before = {k: v for k, v in before.items() if k in event.key}
    return (event.table.qualified, event.op, event.key, event.position, before, event.after)


def test_embedded_readers_emit_the_same_changes_as_debezium(both: Both) -> None:
    expected = _churn(both)
    assert all(expected.values()), f"the churn must change rows in both sources; got {expected}"

    # Debezium's streamed changes of the churn, decoded by the streams stage: every one of them, however
    # slowly the connectors deliver on a loaded machine
    def churned() -> dict[str, list[ChangeEvent]] | None:
        decoded = _debezium_changes(both, set())
        streamed = {s: [e for e, _ in pairs if not e.snapshot] for s, pairs in decoded.items()}
        if all(len(streamed.get(s, [])) >= count for s, count in expected.items()):
            return streamed
        return None

    streamed = wait_for("the churn on the Debezium topics", churned)
    assert {s: len(streamed[s]) for s in expected} == expected
    for source, postgres in (("erp", False), ("crm", True)):
        theirs = sorted((_comparable(e, postgres) for e in streamed[source]), key=lambda c: (c[3], str(c[2])))
        mine_events = _embedded_stream(both, source, len(theirs))
        mine = sorted((_comparable(e, postgres) for e in mine_events), key=lambda c: (c[3], str(c[2])))
        assert len(mine) == len(theirs), f"{source}: {len(mine)} embedded vs {len(theirs)} Debezium changes"
        for a, b in zip(mine, theirs, strict=True):
            assert a == b, f"{source}: embedded {a!r}\n != Debezium {b!r}"


def test_both_runtimes_produce_the_same_target_tables(both: Both) -> None:
    # the Debezium path: every record decoded, collapsed and written by the same sink code
    decoded = _debezium_changes(both, set())
    sink_config = PostgresSinkConfig(host="127.0.0.1", port=both.cloud_port, user="postgres", database="cloud",
                                     schema=f"{both.namespace}_dbz_{{source}}")

    async def write_debezium_path() -> None:
        sink = PostgresSink(sink_config, name="dbz")
        try:
            for pairs in decoded.values():
                for segment in collapse(pairs):
                    await sink.write_batch(segment.schema, segment.events)
        finally:
            await sink.close()

    asyncio.run(write_debezium_path())
    # the embedded path: branchline run's runner, snapshot then stream, until idle
    embedded = load_pipeline(both.embedded_path, env={})
    runner = Runner(embedded, spool_path=both.embedded_path.with_suffix(".sqlite"), exit_when_idle_s=3)
    asyncio.run(runner.run())

    with psycopg.connect(host="127.0.0.1", port=both.cloud_port, user="postgres", dbname="cloud") as cloud:
        compared = 0
        for source, tables in (("erp", ERP_TABLES), ("crm", CRM_TABLES)):
            for table in tables:
                a, b = f'"{both.namespace}_dbz_{source}"."{table}"', f'"{both.namespace}_emb_{source}"."{table}"'
                columns = [r[0] for r in cloud.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s"
                    " AND column_name NOT IN ('_bl_synced_at', '_bl_source_ts', '_bl_position', '_bl_op')"
                    " ORDER BY ordinal_position", (f"{both.namespace}_dbz_{source}", table))]
                assert columns, f"{a} must exist"
                cols = ", ".join(f'"{c}"' for c in columns)
                count_a = cloud.execute(f"SELECT count(*) FROM {a}").fetchone()[0]  # type: ignore[index]
                count_b = cloud.execute(f"SELECT count(*) FROM {b}").fetchone()[0]  # type: ignore[index]
                assert count_a == count_b > 0, f"{table}: {count_a} rows via Debezium, {count_b} embedded"
                only_a = cloud.execute(f"SELECT {cols} FROM {a} EXCEPT SELECT {cols} FROM {b} LIMIT 5").fetchall()
                only_b = cloud.execute(f"SELECT {cols} FROM {b} EXCEPT SELECT {cols} FROM {a} LIMIT 5").fetchall()
                assert not only_a and not only_b, f"{table}: Debezium-only {only_a!r}; embedded-only {only_b!r}"
                # rows whose last change was streamed carry the same source position on both paths
                key = [r[0] for r in cloud.execute(
                    "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
                    " AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s::regclass AND i.indisprimary",
                    (a.replace('"', ''),))]
                join = " AND ".join(f'x."{k}" = y."{k}"' for k in key)
                differing = cloud.execute(
                    f"SELECT count(*) FROM {a} x JOIN {b} y ON {join} WHERE x._bl_op <> 'r' AND y._bl_op <> 'r'"
                    " AND x._bl_position <> y._bl_position").fetchone()[0]  # type: ignore[index]
                assert differing == 0, f"{table}: {differing} streamed rows with different positions"
                compared += count_a
        assert compared > 0
