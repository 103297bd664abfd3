"""The local stack that `branchline infra up` starts: every service answers a real query, the
settings CDC depends on are in force, Connect lists the Debezium plugins, and `up` is idempotent.
The last tests run private throwaway instances (free ports, a temporary state folder) to prove the
error paths: a taken port, a server that will not start, a crash, an unreachable Maven Central."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import stat
import tempfile
import time
import tomllib
import uuid
from pathlib import Path

import httpx
import psycopg
import pymysql
import pytest
from branchline.errors import InfraError
from branchline.infra import _install, _proc, stack
from branchline.infra._pins import STACK_TOML, load_pins
from branchline.infra._services import kafka_metadata

pytestmark = pytest.mark.integration

PINS = tomllib.loads(STACK_TOML.read_text())


def _missing(what: str) -> None:
    """A tool the test needs is absent: a failure in CI, a skip elsewhere."""
    message = f"{what} must be installed (run `branchline infra up`)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


# --- the running stack -------------------------------------------------------------------------------


def test_erp_binlog_is_row_full_with_metadata_and_gtid(erp):
    conn = pymysql.connect(host=erp.host, port=erp.port, user="root", password="", database="erp")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT @@log_bin, @@binlog_format, @@binlog_row_image, @@binlog_row_metadata, "
                        "@@gtid_strict_mode, @@log_slave_updates, @@server_id, @@character_set_server, "
                        "@@bind_address")
            settings = cur.fetchone()
    finally:
        conn.close()
    assert settings == (1, "ROW", "FULL", "FULL", 1, 1, 1, "utf8mb4", "127.0.0.1")


def test_erp_replication_user_can_read_the_binlog(erp):
    conn = pymysql.connect(host=erp.host, port=erp.port, user="branchline", password="branchline")
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW MASTER STATUS")
            status = cur.fetchone()
            cur.execute("SHOW BINARY LOGS")
            logs = [row[0] for row in cur.fetchall()]
            cur.execute("SHOW GRANTS")
            grants = " ".join(row[0] for row in cur.fetchall())
            cur.execute("SELECT @@gtid_binlog_pos")
            gtid = cur.fetchone()
    finally:
        conn.close()
    assert status is not None and status[0] in logs
    assert gtid is not None
    for privilege in ("REPLICATION SLAVE", "BINLOG MONITOR", "RELOAD", "SHOW DATABASES", "LOCK TABLES", "SELECT"):
        assert privilege in grants


def test_crm_has_logical_wal_and_takes_a_pgoutput_slot(crm):
    slot = f"infra_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(host=crm.host, port=crm.port, user="postgres", dbname="crm", autocommit=True) as conn:
        wal_level, slots, senders = conn.execute(
            "SELECT current_setting('wal_level'), current_setting('max_replication_slots')::int, "
            "current_setting('max_wal_senders')::int").fetchone()
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        try:
            found = conn.execute("SELECT plugin, database FROM pg_replication_slots WHERE slot_name = %s",
                                 (slot,)).fetchone()
        finally:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    assert (wal_level, slots >= 10, senders >= 10) == ("logical", True, True)
    assert found == ("pgoutput", "crm")


def test_cloud_is_a_separate_cluster_with_its_database(crm, cloud):
    def identity(svc, dbname):
        with psycopg.connect(host=svc.host, port=svc.port, user="postgres", dbname=dbname) as conn:
            return conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0]

    assert identity(cloud, "cloud") != identity(crm, "crm")


def test_kafka_node_registers_and_round_trips_a_record(kafka):
    brokers, cluster_id = kafka_metadata(kafka.host, kafka.port)
    assert brokers == [kafka.address] and cluster_id
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    topic = f"infra-test-{uuid.uuid4().hex[:12]}"
    payload = uuid.uuid4().bytes

    async def round_trip() -> list[bytes]:
        producer = AIOKafkaProducer(bootstrap_servers=kafka.address)
        await producer.start()
        try:
            await producer.send_and_wait(topic, payload)
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka.address, auto_offset_reset="earliest")
        await consumer.start()
        try:
            batches = await consumer.getmany(timeout_ms=10_000)
        finally:
            await consumer.stop()
        return [m.value for messages in batches.values() for m in messages]

    assert asyncio.run(round_trip()) == [payload]


def test_connect_lists_the_pinned_debezium_plugins(connect):
    response = httpx.get(f"http://{connect.address}/connector-plugins", timeout=10)
    response.raise_for_status()
    listed = {p["class"]: p["version"] for p in response.json()}
    versions = PINS["versions"]
    assert listed.get("io.debezium.connector.mariadb.MariaDbConnector") == versions["debezium_mariadb"]
    assert listed.get("io.debezium.connector.postgresql.PostgresConnector") == versions["debezium"]
    assert listed.get("io.debezium.connector.mysql.MySqlConnector") == versions["debezium"]
    worker = httpx.get(f"http://{connect.address}/", timeout=10).json()
    assert worker["version"] == versions["kafka"]


def test_status_sees_every_service_healthy_with_its_pid(erp, crm, cloud, kafka, connect):
    statuses = {s.name: s for s in stack.status()}
    assert {name: s.healthy for name, s in statuses.items()} == dict.fromkeys(stack.SERVICE_NAMES, True)
    assert all(s.pid for s in statuses.values()), {n: s.pid for n, s in statuses.items()}
    classes = {p["class"] for p in stack.connector_plugins(list(statuses.values()))}
    assert "io.debezium.connector.mariadb.MariaDbConnector" in classes


def test_status_command_prints_json_with_connect_plugins_and_exits_zero(erp, crm, cloud, kafka, connect):
    from branchline.infra.cli import infra
    from click.testing import CliRunner

    outcome = CliRunner().invoke(infra, ["status", "--json"])
    assert outcome.exit_code == 0, outcome.output
    report = json.loads(outcome.output)
    assert report["healthy"] is True
    assert [s["name"] for s in report["services"]] == list(stack.SERVICE_NAMES)
    assert {"io.debezium.connector.mariadb.MariaDbConnector", "io.debezium.connector.postgresql.PostgresConnector"} <= {
        p["class"] for p in report["connector_plugins"]}


def test_second_up_changes_nothing(erp, crm, cloud, kafka, connect):
    before = {s.name: s.pid for s in stack.status()}
    result = stack.up()
    after = {s.name: s.pid for s in stack.status()}
    assert result.started == [] and sorted(result.already_running) == sorted(stack.SERVICE_NAMES)
    assert after == before


# --- error paths, on private throwaway instances --------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def private_stack(monkeypatch):
    """A separate state folder and free ports, so the shared stack is never touched. The folder is
    not under pytest's tmp_path: that one is closed to others, and PostgreSQL runs as `postgres`."""
    state = Path(tempfile.mkdtemp(prefix="branchline-test-stack-"))
    state.chmod(0o755)
    monkeypatch.setenv("BRANCHLINE_STATE", str(state))
    for name in ("erp", "crm", "cloud", "kafka", "kafka_controller", "connect"):
        monkeypatch.setenv(f"BRANCHLINE_{name.upper()}_PORT", str(_free_port()))
    try:
        yield state
    finally:
        stack.down()
        shutil.rmtree(state, ignore_errors=True)


def test_taken_port_is_one_sentence_naming_port_owner_and_fix(private_stack):
    port = load_pins().ports["erp"]
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with pytest.raises(InfraError) as caught:
            stack.up(only=["erp", "crm"])
    message = str(caught.value)
    assert f"Port {port} for `erp`" in message
    assert f"pid {os.getpid()}" in message and "BRANCHLINE_ERP_PORT" in message and "infra/stack.toml" in message
    # nothing was created, let alone started: only the lock that serialises `up`s is there
    assert [p.name for p in private_stack.iterdir()] == [".infra.lock"]


def test_server_that_will_not_start_shows_its_log_and_nothing_stays_up(private_stack):
    if not Path(f"/usr/lib/postgresql/{PINS['versions']['postgres']}/bin/initdb").exists():
        _missing("PostgreSQL")
    stack.up(only=["crm", "cloud"])
    stack.down(only=["crm"])
    with (private_stack / "crm" / "data" / "postgresql.conf").open("a") as conf:
        conf.write("shared_buffers = 'plenty'\n")
    with pytest.raises(InfraError) as caught:
        stack.up(only=["crm", "cloud"])
    message = str(caught.value)
    assert message.startswith("`crm` (PostgreSQL on 127.0.0.1:")
    assert 'invalid value for parameter "shared_buffers"' in message
    statuses = {s.name: s for s in stack.status()}
    assert statuses["crm"].pid is None and not statuses["crm"].healthy
    assert statuses["cloud"].healthy  # it was running before this `up`: left alone


def test_up_after_a_crash_recovers(private_stack):
    if not shutil.which("mariadbd", path=os.environ.get("PATH", "") + ":/usr/sbin"):
        _missing("MariaDB")
    stack.up(only=["erp"])
    pid = next(s.pid for s in stack.status() if s.name == "erp")
    assert pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    result = stack.up(only=["erp"])
    erp = next(s for s in stack.status() if s.name == "erp")
    assert result.started == ["erp"] and erp.healthy and erp.pid not in (None, pid)
    assert stack.down() == ["erp"]
    assert not _proc.alive(erp.pid)  # gone (at most a zombie until init reaps it)
    assert [s.name for s in stack.status() if s.pid or s.healthy] == []


def test_unreachable_maven_central_is_one_sentence_and_leaves_no_partial_jars(tmp_path, monkeypatch):
    real_mvn = shutil.which("mvn")
    java = _install._java_17_or_newer()
    if not real_mvn or not java:
        _missing("Maven and Java 17")
    settings = tmp_path / "settings.xml"
    settings.write_text(
        "<settings><mirrors><mirror><id>closed</id><mirrorOf>*</mirrorOf>"
        "<url>https://127.0.0.1:1/maven2</url></mirror></mirrors></settings>")
    wrapper = tmp_path / "bin" / "mvn"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {real_mvn} -s {settings} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    cache = tmp_path / "cache"
    monkeypatch.setenv("BRANCHLINE_CACHE", str(cache))
    pins = load_pins()
    tools = _install.Tools(mariadbd=Path("/bin/false"), mariadb_install_db=Path("/bin/false"),
                           pg_bin=Path("/bin"), java=java, mvn=wrapper, promtool=Path("/bin/false"))
    with pytest.raises(InfraError) as caught:
        _install.resolve_jars(pins, tools)
    assert str(caught.value).startswith("Maven Central is unreachable (")
    assert "run `branchline infra up` again" in str(caught.value)
    assert not _install.kafka_libs(pins).exists() and not (cache / "jars.json").exists()
