"""`branchline worker` serves /metrics with its monitoring beside it, on the real distributed path: a
Debezium connector (applied by `branchline connectors apply`) captures a private CRM schema into Kafka,
the real worker command writes it into the cloud PostgreSQL, and its /metrics show the connector and
task states from Connect, the consumer group's lag, the slot's retained WAL, the source's clock skew,
and the lag of a table that never changes, kept true by Debezium's heartbeat rows alone.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample /metrics serves, keyed by name and labels."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(url: str, name: str, **labels: str) -> float | None:
    wanted = set(labels.items())
    found = [v for (n, have), v in scrape(url).items() if n == name and wanted <= have]
    return found[0] if len(found) == 1 else None


def test_the_worker_command_serves_connect_states_consumer_lag_and_heartbeat_driven_lag(
    crm: Any, cloud: Any, kafka: Any, connect: Any, tmp_path: Path, wait_for: Any, free_port: Any
) -> None:
    from branchline.config import load_pipeline
    from branchline.connectors.connect import ConnectClient
    from branchline.connectors.operate import retire
    from branchline.connectors.setup_sql import setup_statements
    from branchline.connectors.topics import delete_topics, topic_names

    suffix = secrets.token_hex(3)
    branch, schema = f"mw{suffix}", f"mwk_{suffix}"
    crm_dsn = f"host={crm.host} port={crm.port} user=postgres dbname=crm"
    cloud_dsn = f"host={cloud.host} port={cloud.port} user=postgres dbname=cloud"
    port = free_port()
    with psycopg.connect(crm_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        for table in ("live", "idle"):
            conn.execute(f'CREATE TABLE "{schema}".{table} (id int PRIMARY KEY, note text)')
            conn.execute(f"INSERT INTO \"{schema}\".{table} VALUES (0, 'snapshot')")
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "name": branch, "branch": branch,
        "sources": [{"name": "crm", "kind": "postgres", "host": crm.host, "port": crm.port, "user": "postgres",
                     "database": "crm", "schemas": [schema], "heartbeat_interval_ms": 1000}],
        "kafka": {"bootstrap_servers": kafka.address},
        "connect": {"url": f"http://{connect.address}"},
        "sinks": {"cloud": {"kind": "postgres", "host": cloud.host, "port": cloud.port, "user": "postgres",
                            "database": "cloud", "schema": "{branch}_{source}"}},
        "worker": {"batch_size": 200, "batch_within_s": 0.3},
        "metrics": {"port": port, "poll_interval_s": 1, "heartbeat": {"interval_s": 1}},
    }))
    pipeline = load_pipeline(path, env={})
    (source,) = pipeline.sources
    # the signal and heartbeat tables must exist before the connector builds its publication (as the
    # DBA's setup SQL makes them; a fresh stack has none)
    with psycopg.connect(crm_dsn, autocommit=True) as conn:
        for statement in setup_statements(source, publication=False):
            if "ROLE" not in statement:
                conn.execute(statement)
    connector, prefix = source.connector_name, source.topic_prefix
    live_topic, idle_topic = f"{prefix}.{schema}.live", f"{prefix}.{schema}.idle"
    heartbeat_topic = f"{prefix}.branchline.debezium_heartbeat"
    branchline = str(Path(sys.executable).with_name("branchline"))
    url = f"http://127.0.0.1:{port}"
    process: subprocess.Popen[bytes] | None = None
    client = ConnectClient(f"http://{connect.address}")
    try:
        applied = subprocess.run([branchline, "connectors", "apply", str(path), "--skip-preflight"],
                                 capture_output=True, text=True, timeout=180, check=False)
        assert applied.returncode == 0, applied.stdout + applied.stderr
        # the worker may start before Debezium's first heartbeat: it makes the heartbeat topic itself
        wait_for("the table topics", lambda: {live_topic, idle_topic} <= set(topic_names(kafka.address)))
        with (tmp_path / "worker.log").open("w") as log:
            process = subprocess.Popen([branchline, "worker", str(path), "--no-key-check"], stdout=log,
                                       stderr=subprocess.STDOUT)
        started = time.monotonic()

        def alive() -> BaseException | None:
            assert process is not None
            code = process.poll()
            return None if code is None else RuntimeError(
                f"branchline worker exited {code}: {(tmp_path / 'worker.log').read_text()[-3000:]}")

        wait_for("/metrics of the worker", lambda: value(url, "branchline_build_info", runtime="worker"), failed=alive)
        assert heartbeat_topic in topic_names(kafka.address)
        # Connect's states, polled by the worker
        wait_for("the connector RUNNING", lambda: value(
            url, "branchline_connector_state", connector=connector, state="RUNNING") == 1, failed=alive)
        assert value(url, "branchline_connector_task_state", connector=connector, task="0", state="RUNNING") == 1
        assert value(url, "branchline_connector_state", connector=connector, state="FAILED") == 0

        # a live change travels Debezium -> Kafka -> worker -> sink
        with psycopg.connect(crm_dsn, autocommit=True) as conn:
            conn.execute(f"INSERT INTO \"{schema}\".live SELECT g, 'row ' || g FROM generate_series(1, 20) g")
        wait_for("21 rows written", lambda: (value(url, "branchline_rows_written_total", table=f"{schema}.live",
                                                   sink="cloud") or 0) >= 21, failed=alive)
        live_lag = value(url, "branchline_replication_lag_seconds", table=f"{schema}.live", sink="cloud")
        assert live_lag is not None and 0 <= live_lag < 60

        # the worker's consumer group has drained the live topic
        group = f"branchline-{branch}"
        wait_for("consumer lag 0 on the live topic", lambda: value(
            url, "branchline_kafka_consumer_lag", group=group, topic=live_topic, partition="0") == 0, failed=alive)

        # source-side pollers: the connector's slot, and the source's clock (the worker writes no heartbeat)
        retained = wait_for("the slot's retained WAL", lambda: value(
            url, "branchline_slot_wal_retained_bytes", source="crm", slot=source.slot), failed=alive)
        assert retained is not None and retained >= 0
        skew = wait_for("the clock skew", lambda: value(url, "branchline_source_clock_skew_seconds", source="crm",
                                                        branch=branch) is not None, failed=alive)
        assert skew and abs(value(url, "branchline_source_clock_skew_seconds", source="crm", branch=branch)
                            or 0) < 1
        assert value(url, "branchline_heartbeats_written_total", source="crm", branch=branch) is None
        assert value(url, "branchline_source_up", source="crm", branch=branch) == 1

        # the idle table only ever had its snapshot row, yet its lag is known and stays low on heartbeats
        wait_for("20 s of an idle table with its lag held low", lambda: time.monotonic() - started > 20 and (
            (v := value(url, "branchline_replication_lag_seconds", table=f"{schema}.idle", sink="cloud")) is not None
            and v < 5), failed=alive)
        assert value(url, "branchline_rows_written_total", table="branchline.debezium_heartbeat") is None

        # the DBA's screen reads the same worker
        status = subprocess.run([branchline, "status", str(path), "--json"], capture_output=True, text=True,
                                timeout=60, check=False)
        report = json.loads(status.stdout)
        assert report["runtime"]["reachable"], report
        (seen,) = report["connect"]["connectors"]
        assert seen["name"] == connector and seen["state"] == "RUNNING"
        (idle,) = [t for t in report["tables"] if t["table"] == f"{schema}.idle"]
        assert idle["replication_lag_s"] < 5
        assert any(entry["group"] == group and entry["topic"] == live_topic for entry in report["kafka_consumer_lag"])
        assert status.returncode == 0, report["problems"]
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        retire(client, connector)
        client.close()
        with psycopg.connect(crm_dsn, autocommit=True) as conn:
            for _ in range(30):  # the connector lets go of its slot shortly after it is deleted
                row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                                   (source.slot,)).fetchone()
                if row is None or not row[0]:
                    break
                time.sleep(1)
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
                         (source.slot,))
            conn.execute(f'DROP PUBLICATION IF EXISTS "{source.publication}"')
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        with psycopg.connect(cloud_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{branch}_crm" CASCADE')
        delete_topics(kafka.address, lambda t: t.startswith((prefix + ".", f"branchline-{branch}-"))
                      or t.endswith("." + prefix))
