"""Source-side metrics move under real conditions: a slot retains WAL as the source writes, binlog files
behind grows when the server rotates its log, Kafka consumer lag is what the group has left, and
Connect's states come from its REST API."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import psycopg
import pymysql
import pytest
from branchline import metrics
from branchline.monitoring import poll_binlog, poll_connect, poll_kafka_consumer_lag, poll_postgres_slot
from pydantic import SecretStr

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def fresh_metrics() -> Iterator[None]:
    metrics.reset()
    yield
    metrics.reset()


def test_slot_wal_retained_grows_while_nobody_consumes(crm: Any) -> None:
    slot = f"bl_metrics_{secrets.token_hex(3)}"
    dsn = f"host={crm.host} port={crm.port} user=postgres dbname=crm"
    source = SimpleNamespace(kind="postgres", name="crm", branch="t1", host=crm.host, port=crm.port, user="postgres",
                             password=SecretStr(""), database="crm", slot=slot)
    labels = {"branch": "t1", "source": "crm", "slot": slot}
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        try:
            before = poll_postgres_slot(source)
            assert before is not None and before["slot"] == slot and before["active"] is False
            conn.execute(f"CREATE TABLE public.{slot} AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 20000) g")
            conn.execute(f"DROP TABLE public.{slot}")
            after = poll_postgres_slot(source)
            assert after is not None
            assert after["retained_bytes"] > before["retained_bytes"] + 1_000_000
            assert metrics.sample("branchline_slot_wal_retained_bytes", labels) == after["retained_bytes"]
            assert metrics.sample("branchline_slot_active", labels) == 0
            assert metrics.sample("branchline_source_up", {"branch": "t1", "source": "crm"}) == 1
        finally:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    assert poll_postgres_slot(source) is None  # a dropped slot is reported as missing, not as zero


def test_binlog_files_behind_grows_when_the_server_rotates(erp: Any) -> None:
    source = SimpleNamespace(kind="mariadb", name="erp", branch="t1", host=erp.host, port=erp.port, user="root",
                             password=SecretStr(""))
    first = poll_binlog(source)
    reader_file = first["head_file"]
    assert reader_file and first["files"] >= 1
    conn = pymysql.connect(host=erp.host, port=erp.port, user="root", password="", autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute("FLUSH BINARY LOGS")
    finally:
        conn.close()
    second = poll_binlog(source, reader_file=reader_file)
    assert second["files_behind"] == 1
    assert metrics.sample("branchline_binlog_files_behind", {"branch": "t1", "source": "erp"}) == 1
    if second["retention_s"]:
        assert metrics.sample("branchline_binlog_retention_seconds",
                              {"branch": "t1", "source": "erp"}) == second["retention_s"]


def test_kafka_consumer_lag_is_what_the_group_has_left(kafka: Any) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.structs import OffsetAndMetadata

    topic, group = f"bl-metrics-{secrets.token_hex(3)}", f"bl-metrics-{secrets.token_hex(3)}"

    async def scenario() -> dict[tuple[str, int], int]:
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        admin = AIOKafkaAdminClient(bootstrap_servers=kafka.address)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
            producer = AIOKafkaProducer(bootstrap_servers=kafka.address)
            await producer.start()
            try:
                for i in range(10):
                    await producer.send_and_wait(topic, f"m{i}".encode())
            finally:
                await producer.stop()
            consumer = AIOKafkaConsumer(bootstrap_servers=kafka.address, group_id=group, enable_auto_commit=False)
            await consumer.start()
            try:
                consumer.assign([TopicPartition(topic, 0)])
                await consumer.commit({TopicPartition(topic, 0): OffsetAndMetadata(3, "")})
            finally:
                await consumer.stop()
            return await poll_kafka_consumer_lag(kafka.address, group)
        finally:
            await admin.delete_topics([topic])
            await admin.close()

    lags = asyncio.run(scenario())
    assert lags == {(topic, 0): 7}
    assert metrics.sample("branchline_kafka_consumer_lag", {"group": group, "topic": topic, "partition": "0"}) == 7


def test_connector_states_come_from_connect(connect: Any) -> None:
    url = f"http://{connect.address}"
    everything = httpx.get(f"{url}/connectors", params={"expand": "status"}, timeout=10).json()
    missing = f"branchline.absent.{secrets.token_hex(3)}"
    statuses = poll_connect(url, [*everything, missing])
    for name, entry in everything.items():
        state = entry["status"]["connector"]["state"]
        assert metrics.sample("branchline_connector_state", {"connector": name, "state": state}) == 1
        for task in entry["status"]["tasks"]:
            assert metrics.sample("branchline_connector_task_state",
                                  {"connector": name, "task": str(task["id"]), "state": task["state"]}) == 1
    assert statuses[missing]["status"]["connector"]["state"] == "UNASSIGNED"
    assert metrics.sample("branchline_connector_state", {"connector": missing, "state": "RUNNING"}) == 0


def test_duplicates_counter_rises_when_a_batch_is_replayed(cloud: Any) -> None:
    """The distributed worker's batch logic with a real PostgreSQL sink: Debezium records captured from the
    real connector are applied once, then delivered again (as after a worker crash before its offsets were
    committed). The replay writes nothing and is counted as duplicates dropped."""
    import json
    from pathlib import Path

    from branchline.sinks.build import build_sink
    from branchline.sinks.config import PostgresSinkConfig
    from branchline.streams.app import BatchProcessor, Record, SourceRoute
    from branchline.streams.config import WorkerSettings

    cases = Path(__file__).resolve().parents[1] / "cases" / "debezium" / "rec.crm.public.accounts.jsonl"
    lines = [json.loads(line) for line in cases.read_text().splitlines()]
    records = [Record(x["topic"], x["partition"], x["offset"], x["key"] and x["key"].encode(),
                      x["value"] and x["value"].encode()) for x in lines if x["kind"] in ("c", "u")]
    assert records
    schema = f"mdup_{secrets.token_hex(3)}"
    sink = build_sink(PostgresSinkConfig(host=cloud.host, port=cloud.port, user="postgres", database="cloud",
                                         schema=schema), "cloud")
    labels = {"branch": "rec", "source": "crm", "table": "public.accounts"}

    async def scenario() -> tuple[int, int]:
        processor = BatchProcessor([SourceRoute(name="crm", branch="rec", topic_prefix="rec.crm")], {},
                                   {"cloud": sink}, {}, WorkerSettings())
        try:
            first = await processor.process(records)
            replay = await processor.process(records)
        finally:
            await sink.close()
        return first.written, replay.written

    try:
        written, rewritten = asyncio.run(scenario())
        assert written > 0 and rewritten == 0
        assert metrics.sample("branchline_duplicates_dropped_total", labels) == len(records)
        assert metrics.sample("branchline_rows_written_total", {**labels, "sink": "cloud"}) == written
        assert metrics.sample("branchline_replication_lag_seconds", {**labels, "sink": "cloud"}) is not None
    finally:
        with psycopg.connect(f"host={cloud.host} port={cloud.port} user=postgres dbname=cloud", autocommit=True) as c:
            c.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_debezium_heartbeat_rows_move_the_lag_of_the_whole_source(cloud: Any) -> None:
    """On the distributed path the heartbeat row Debezium's heartbeat.action.query wrote (captured from the
    real connector) is an ordinary change of `branchline.debezium_heartbeat`; once durable it sets the
    source-wide lag from the row's own microsecond `ts`, and idle tables of the source follow it."""
    import json
    from datetime import datetime
    from pathlib import Path

    from branchline.events import TableId
    from branchline.sinks.build import build_sink
    from branchline.sinks.config import PostgresSinkConfig
    from branchline.streams.app import BatchProcessor, Record, SourceRoute
    from branchline.streams.config import WorkerSettings

    cases = Path(__file__).resolve().parents[1] / "cases" / "debezium" / "rec.crm.branchline.debezium_heartbeat.jsonl"
    lines = [json.loads(line) for line in cases.read_text().splitlines()]
    records = [Record(x["topic"], x["partition"], x["offset"], x["key"].encode(), x["value"].encode())
               for x in lines if x["kind"] == "u"]
    beat = max(datetime.fromisoformat(json.loads(x["value"])["payload"]["after"]["ts"]) for x in lines
               if x["kind"] == "u")
    schema = f"mhb_{secrets.token_hex(3)}"
    sink = build_sink(PostgresSinkConfig(host=cloud.host, port=cloud.port, user="postgres", database="cloud",
                                         schema=schema), "cloud")
    idle = TableId(source="crm", branch="rec", database="crm", schema_="public", table="accounts")
    metrics.track_table(idle, "cloud")

    async def scenario() -> None:
        processor = BatchProcessor([SourceRoute(name="crm", branch="rec", topic_prefix="rec.crm")], {},
                                   {"cloud": sink}, {}, WorkerSettings())
        try:
            await processor.process(records)
        finally:
            await sink.close()

    try:
        asyncio.run(scenario())
        expected = metrics._clock() - beat.timestamp()
        for table in ("heartbeat", "public.accounts"):
            lag = metrics.sample("branchline_replication_lag_seconds",
                                 {"branch": "rec", "source": "crm", "table": table, "sink": "cloud"})
            assert lag == pytest.approx(expected, abs=5), table
        assert metrics.sample("branchline_rows_written_total",
                              {"branch": "rec", "source": "crm", "table": "branchline.debezium_heartbeat",
                               "sink": "cloud"}) is None  # heartbeats are not user rows
    finally:
        with psycopg.connect(f"host={cloud.host} port={cloud.port} user=postgres dbname=cloud", autocommit=True) as c:
            c.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_heartbeats_need_only_the_grants_of_the_setup_sql(erp: Any, crm: Any) -> None:
    """The replication user of `branchline preflight --print-setup-sql` may INSERT/UPDATE the heartbeat
    table but not CREATE: the writer must not issue DDL when the table is there."""
    from branchline.heartbeat import write_heartbeat

    role = f"bl_hb_{secrets.token_hex(3)}"
    dsn = f"host={crm.host} port={crm.port} user=postgres dbname=crm"
    with psycopg.connect(dsn, autocommit=True) as conn:
        write_heartbeat(SimpleNamespace(kind="postgres", name="crm", branch="t1", host=crm.host, port=crm.port,
                                        user="postgres", password=SecretStr(""), database="crm"))
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT USAGE ON SCHEMA branchline TO {role}")
        conn.execute(f"GRANT SELECT, INSERT, UPDATE ON branchline.debezium_heartbeat TO {role}")
        try:
            stamp = write_heartbeat(SimpleNamespace(kind="postgres", name="crm", branch="t1", host=crm.host,
                                                    port=crm.port, user=role, password=SecretStr(""),
                                                    database="crm"), create=True)
        finally:
            conn.execute(f"REVOKE ALL ON branchline.debezium_heartbeat FROM {role}")
            conn.execute(f"REVOKE ALL ON SCHEMA branchline FROM {role}")
            conn.execute(f"DROP ROLE {role}")
    assert metrics.sample("branchline_heartbeats_written_total", {"branch": "t1", "source": "crm"}) == 2
    assert stamp.tzinfo is not None

    user = f"bl_hb_{secrets.token_hex(3)}"
    root = pymysql.connect(host=erp.host, port=erp.port, user="root", password="", autocommit=True)
    try:
        with root.cursor() as cur:
            write_heartbeat(SimpleNamespace(kind="mariadb", name="erp", branch="t1", host=erp.host, port=erp.port,
                                            user="root", password=SecretStr("")))
            cur.execute(f"CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY 'pw'")
            cur.execute(f"GRANT SELECT, INSERT, UPDATE ON branchline.debezium_heartbeat TO '{user}'@'127.0.0.1'")
        try:
            write_heartbeat(SimpleNamespace(kind="mariadb", name="erp", branch="t1", host=erp.host, port=erp.port,
                                            user=user, password=SecretStr("pw")), create=True)
        finally:
            with root.cursor() as cur:
                cur.execute(f"DROP USER '{user}'@'127.0.0.1'")
    finally:
        root.close()
    assert metrics.sample("branchline_heartbeats_written_total", {"branch": "t1", "source": "erp"}) == 2


def test_heartbeat_topics_exist_before_debeziums_first_heartbeat(kafka: Any) -> None:
    """A worker subscribes to the topics present at start-up: the heartbeat topic is made ahead of
    Debezium, with the partitions of the source's table topics; nothing is made for a source with none."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from branchline.monitoring import ensure_heartbeat_topics

    branch = f"mhb{secrets.token_hex(3)}"
    ready = SimpleNamespace(name="crm", topic_prefix=f"{branch}.crm", heartbeat_table="branchline.debezium_heartbeat",
                            table_topic=lambda ns, t: f"{branch}.crm.{ns}.{t}")
    empty = SimpleNamespace(name="erp", topic_prefix=f"{branch}.erp", heartbeat_table="branchline.debezium_heartbeat",
                            table_topic=lambda ns, t: f"{branch}.erp.{ns}.{t}")
    heartbeat_topic = f"{branch}.crm.branchline.debezium_heartbeat"

    async def scenario() -> tuple[list[str], list[str], int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka.address)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(f"{branch}.crm.public.accounts", num_partitions=3,
                                                replication_factor=1)])
            first = await ensure_heartbeat_topics(kafka.address, [ready, empty])
            again = await ensure_heartbeat_topics(kafka.address, [ready, empty])
            (described,) = await admin.describe_topics([heartbeat_topic])
            return first, again, len(described["partitions"])
        finally:
            names = [t for t in await admin.list_topics() if t.startswith(branch + ".")]
            await admin.delete_topics(names)
            await admin.close()

    first, again, partitions = asyncio.run(scenario())
    assert first == [heartbeat_topic] and again == [] and partitions == 3
