"""Lag you can watch, under a real fault: `branchline run` replicates the CRM (PostgreSQL) into the cloud
PostgreSQL through a TCP proxy; a real Prometheus scrapes the running pipeline. Cutting the proxy stops
the sink: lag measured by Prometheus rises while capture fills the spool; restoring it drains the spool,
lag falls, and the target matches the source row by row.
"""

from __future__ import annotations

import secrets
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml
from branchline import metrics
from branchline.metrics_config import MetricsConfig

pytestmark = pytest.mark.integration

def scalar(url: str, promql: str) -> float | None:
    answer = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert answer["status"] == "success", answer
    result = answer["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def test_lag_rises_while_the_sink_is_cut_and_falls_after_it_returns(
    crm: Any, cloud: Any, tmp_path: Path, cuttable_proxy: Any, wait_for: Any, prometheus: Any
) -> None:
    from branchline.config import load_pipeline
    from branchline.runtime.runner import Runner

    suffix = secrets.token_hex(3)
    source, table = f"ml{suffix}", f"mlag_{suffix}"
    crm_dsn = f"host={crm.host} port={crm.port} user=postgres dbname=crm"
    cloud_dsn = f"host={cloud.host} port={cloud.port} user=postgres dbname=cloud"
    with psycopg.connect(crm_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE public.{table} (id int PRIMARY KEY, note text)")
        conn.execute(f"INSERT INTO public.{table} SELECT g, 'snapshot ' || g FROM generate_series(1, 10) g")
        # as the DBA does from `branchline preflight --print-setup-sql`
        conn.execute(f'CREATE PUBLICATION "branchline_t1_{source}" FOR TABLE public.{table}')

    proxy = cuttable_proxy(cloud)
    pipeline_file = tmp_path / "pipeline.yaml"
    pipeline_file.write_text(yaml.safe_dump({
        "name": source, "branch": "t1",
        "sources": [{"name": source, "kind": "postgres", "host": crm.host, "port": crm.port, "user": "postgres",
                     "database": "crm", "include": [f"public.{table}"]}],
        "sinks": {"cloud": {"kind": "postgres", "host": "127.0.0.1", "port": proxy.port, "user": "postgres",
                            "database": "cloud", "max_attempts": 1, "connect_timeout_s": 2}},
        "runtime": {"spool": {"path": str(tmp_path / "spool.sqlite")}, "batch_interval_ms": 50},
        "metrics": {"port": 0},
    }))
    pipeline = load_pipeline(pipeline_file)
    metrics.reset()
    server = metrics.serve_metrics(MetricsConfig(port=0), runtime="run")
    assert server is not None
    runner = Runner(pipeline)
    errors: list[BaseException] = []

    def run() -> None:
        import asyncio

        try:
            asyncio.run(runner.run())
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    thread = threading.Thread(target=run, name="branchline-run", daemon=True)

    def until(what: str, check: Callable[[], Any]) -> Any:
        return wait_for(what, check, failed=lambda: runner.stats.error or (errors[0] if errors else None))

    labels = f'source="{source}",table="public.{table}",sink="cloud"'
    lag_query = f"branchline_replication_lag_seconds{{{labels}}}"
    rows_query = f"sum(branchline_rows_written_total{{{labels}}})"

    def insert(first: int, last: int, note: str) -> None:
        with psycopg.connect(crm_dsn, autocommit=True) as conn:
            conn.execute(f"INSERT INTO public.{table} SELECT g, %s || g FROM generate_series(%s::int, %s::int) g",
                         (note, first, last))

    def watch_lag_through_an_outage(url: str) -> None:
        # streaming works: a change made now is durable and scraped with a small lag
        until("the snapshot to reach the target", lambda: runner.stats.snapshot_done.get(source))
        insert(11, 20, "live ")
        until("20 rows written", lambda: (scalar(url, rows_query) or 0) >= 20)
        healthy = until("the lag series", lambda: scalar(url, lag_query))
        assert healthy < 10

        # cut the sink: capture continues into the spool, lag keeps rising with no new change durable
        proxy.cut()
        insert(21, 30, "during outage ")
        until("changes to pile up in the spool",
              lambda: (scalar(url, "max(branchline_spool_bytes)") or 0) > 0
              and metrics.sample("branchline_capture_lag_seconds", {"branch": "t1", "source": source}))
        stalled = until("lag to rise past 8 s", lambda: (v := scalar(url, lag_query)) and v > 8 and v)
        later = until("lag to keep rising", lambda: (v := scalar(url, lag_query)) and v > stalled + 2 and v)
        assert later > stalled > healthy
        assert scalar(url, rows_query) == 20  # nothing more became durable while the sink was cut
        until("the oldest spooled change to age", lambda: (scalar(url, "max(branchline_spool_oldest_age_seconds)") or 0) > 1)

        # restore: the spool drains, and a fresh change brings lag back down
        proxy.restore()
        until("the spooled rows to be written", lambda: (scalar(url, rows_query) or 0) >= 30)
        insert(31, 31, "after outage ")
        recovered = until("lag to fall", lambda: (v := scalar(url, lag_query)) is not None and v < 5 and (v,))
        assert recovered[0] < later
        until("the spool to be empty", lambda: scalar(url, "max(branchline_spool_bytes)") == 0)

        # the DBA's screen agrees: the source answers, its slot exists, the table's lag is small
        # (the embedded reader polls the slot over SQL, so `active` is only true during a poll)
        from branchline.status_cli import collect_status

        report = collect_status(pipeline, server.url)
        (seen,) = report["sources"]
        assert seen["up"] and seen["slot"]["slot"] == f"branchline_t1_{source}"
        assert seen["slot"]["retained_bytes"] >= 0
        (row,) = [t for t in report["tables"] if t["table"] == f"public.{table}"]
        assert row["replication_lag_s"] < 5 and row["rows_written"] == 31
        assert report["spools"][0]["bytes"] == 0
        assert report["healthy"], report["problems"]

    try:
        thread.start()
        try:
            with prometheus(tmp_path, [f"127.0.0.1:{server.port}"]) as url:
                watch_lag_through_an_outage(url)
        finally:
            runner.stop.set()
            thread.join(30)
            server.close()
            metrics.reset()
        assert not errors, errors
        assert runner.stats.error is None
        with psycopg.connect(crm_dsn) as conn:
            expected = conn.execute(f"SELECT id, note FROM public.{table} ORDER BY id").fetchall()
        with psycopg.connect(cloud_dsn) as conn:
            got = conn.execute(f'SELECT id, note FROM "{source}"."{table}" ORDER BY id').fetchall()
        assert got == expected
        assert len(got) == 31
    finally:
        _drop_source_objects(crm_dsn, f"branchline_t1_{source}", table)
        with psycopg.connect(cloud_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{source}" CASCADE')


def _drop_source_objects(crm_dsn: str, slot: str, table: str) -> None:
    """Drop the test's slot, publication and table: an abandoned slot would hold the CRM's WAL forever."""
    with psycopg.connect(crm_dsn, autocommit=True) as conn:
        for _ in range(20):  # the runner's connection may still hold the slot for a moment
            active = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
            if active is None or not active[0]:
                break
            time.sleep(0.25)
        if active is not None:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        conn.execute(f'DROP PUBLICATION IF EXISTS "{slot}"')
        conn.execute(f"DROP TABLE IF EXISTS public.{table}")


def test_heartbeats_keep_idle_table_lag_true_and_show_a_stall(
    crm: Any, cloud: Any, tmp_path: Path, cuttable_proxy: Any, wait_for: Any, prometheus: Any
) -> None:
    """No user table changes at all: heartbeat rows alone keep the idle table's lag low while healthy,
    let it rise while the sink is cut, and bring it back down once the sink returns."""
    import asyncio
    from types import SimpleNamespace

    from branchline.config import load_pipeline
    from branchline.heartbeat import run_heartbeats, write_heartbeat
    from branchline.metrics_config import HeartbeatConfig
    from branchline.runtime.runner import Runner
    from pydantic import SecretStr

    suffix = secrets.token_hex(3)
    source, table = f"hb{suffix}", f"idle_{suffix}"
    crm_dsn = f"host={crm.host} port={crm.port} user=postgres dbname=crm"
    cloud_dsn = f"host={cloud.host} port={cloud.port} user=postgres dbname=cloud"
    beat_source = SimpleNamespace(kind="postgres", name=source, branch="t1", host=crm.host, port=crm.port,
                                  user="postgres", password=SecretStr(""), database="crm")
    write_heartbeat(beat_source)  # creates branchline.debezium_heartbeat once
    with psycopg.connect(crm_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE public.{table} (id int PRIMARY KEY, note text)")
        conn.execute(f"INSERT INTO public.{table} SELECT g, 'idle ' || g FROM generate_series(1, 5) g")
        conn.execute(f'CREATE PUBLICATION "branchline_t1_{source}" FOR TABLE public.{table}, '
                     "branchline.debezium_heartbeat")

    proxy = cuttable_proxy(cloud)
    pipeline_file = tmp_path / "pipeline.yaml"
    pipeline_file.write_text(yaml.safe_dump({
        "name": source, "branch": "t1",
        "sources": [{"name": source, "kind": "postgres", "host": crm.host, "port": crm.port, "user": "postgres",
                     "database": "crm", "schemas": ["public", "branchline"],
                     "include": [f"public.{table}", "branchline.debezium_heartbeat"]}],
        "sinks": {"cloud": {"kind": "postgres", "host": "127.0.0.1", "port": proxy.port, "user": "postgres",
                            "database": "cloud", "max_attempts": 1, "connect_timeout_s": 2}},
        "runtime": {"spool": {"path": str(tmp_path / "spool.sqlite")}, "batch_interval_ms": 50},
    }))
    pipeline = load_pipeline(pipeline_file)
    metrics.reset()
    runner = Runner(pipeline)
    errors: list[BaseException] = []
    stop_beats = threading.Event()

    def run() -> None:
        try:
            asyncio.run(runner.run())
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    def beat() -> None:
        async def main() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(run_heartbeats([beat_source], HeartbeatConfig(interval_s=0.5), stop))
            await asyncio.to_thread(stop_beats.wait)
            stop.set()
            await task

        asyncio.run(main())

    threads = [threading.Thread(target=run, daemon=True), threading.Thread(target=beat, daemon=True)]

    def until(what: str, check: Callable[[], Any], timeout_s: float = 90.0) -> Any:
        return wait_for(what, check, timeout_s,
                        failed=lambda: runner.stats.error or (errors[0] if errors else None))

    def lag() -> float | None:
        return metrics.sample("branchline_replication_lag_seconds",
                              {"branch": "t1", "source": source, "table": f"public.{table}", "sink": "cloud"})

    try:
        for thread in threads:
            thread.start()
        try:
            until("the idle table's lag to be known", lambda: (lag() or 99) < 3)
            started = time.monotonic()
            # idle for longer than the bound: without heartbeats its lag would now exceed it
            until("6 s of idle time with lag held low", lambda: time.monotonic() - started > 6 and (lag() or 99) < 3)
            proxy.cut()
            until("lag to rise with no user change", lambda: (lag() or 0) > 6)
            proxy.restore()
            until("lag to fall again on heartbeats alone", lambda: (lag() or 99) < 3)
            beats = metrics.sample("branchline_heartbeats_written_total", {"branch": "t1", "source": source})
            assert beats is not None and beats > 10
            skew = metrics.sample("branchline_source_clock_skew_seconds", {"branch": "t1", "source": source})
            assert skew is not None and abs(skew) < 1  # same host: the skew estimate must be near zero
        finally:
            stop_beats.set()
            runner.stop.set()
            for thread in threads:
                thread.join(30)
            metrics.reset()
        assert not errors, errors
        with psycopg.connect(cloud_dsn) as conn:  # the idle table itself arrived, row by row
            got = conn.execute(f'SELECT id, note FROM "{source}"."{table}" ORDER BY id').fetchall()
        assert got == [(i, f"idle {i}") for i in range(1, 6)]
    finally:
        _drop_source_objects(crm_dsn, f"branchline_t1_{source}", table)
        with psycopg.connect(cloud_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{source}" CASCADE')


def test_prometheus_scrapes_the_branchline_run_command(
    crm: Any, erp: Any, cloud: Any, tmp_path: Path, cuttable_proxy: Any, wait_for: Any, free_port: Any,
    prometheus: Any,
) -> None:
    """The real command in its own process: `branchline run` serves /metrics on the port of its pipeline
    file with its monitoring beside it (heartbeats, slot WAL, binlog files behind), Prometheus scrapes
    it, and `branchline status` reads lag per table from it. The MariaDB table never changes after its
    snapshot: its lag is known and stays low on heartbeats alone, rises while the sink is cut, and
    falls once it returns."""
    import json
    import os
    import signal
    import sys

    import pymysql

    suffix = secrets.token_hex(3)
    source, table = f"cm{suffix}", f"cmd_{suffix}"
    erp_source, erp_db = f"em{suffix}", f"cmd_{suffix}"
    crm_dsn = f"host={crm.host} port={crm.port} user=postgres dbname=crm"
    cloud_dsn = f"host={cloud.host} port={cloud.port} user=postgres dbname=cloud"
    metrics_port = free_port()
    with psycopg.connect(crm_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE public.{table} (id int PRIMARY KEY, note text)")
        conn.execute(f"INSERT INTO public.{table} VALUES (0, 'before the snapshot')")
        conn.execute(f'CREATE PUBLICATION "branchline_t1_{source}" FOR TABLE public.{table}')
    maria = pymysql.connect(host=erp.host, port=erp.port, user="root", password="", autocommit=True)
    with maria.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{erp_db}`")
        cur.execute(f"CREATE TABLE `{erp_db}`.idle (id INT PRIMARY KEY, note TEXT)")
        cur.execute(f"INSERT INTO `{erp_db}`.idle VALUES (1, 'never changes')")
    proxy = cuttable_proxy(cloud)
    pipeline_file = tmp_path / "pipeline.yaml"
    pipeline_file.write_text(yaml.safe_dump({
        "name": source, "branch": "t1",
        "sources": [{"name": source, "kind": "postgres", "host": crm.host, "port": crm.port, "user": "postgres",
                     "database": "crm", "include": [f"public.{table}"]},
                    {"name": erp_source, "kind": "mariadb", "host": erp.host, "port": erp.port, "user": "root",
                     "databases": [erp_db]}],
        "sinks": {"cloud": {"kind": "postgres", "host": "127.0.0.1", "port": proxy.port, "user": "postgres",
                            "database": "cloud", "max_attempts": 1, "connect_timeout_s": 2}},
        "runtime": {"spool": {"path": str(tmp_path / "spool.sqlite")}},
        "metrics": {"port": metrics_port, "poll_interval_s": 1, "heartbeat": {"interval_s": 1}},
    }))
    branchline = str(Path(sys.executable).with_name("branchline"))
    env = {**os.environ, "BRANCHLINE_STATE": str(tmp_path / "state")}
    labels = f'source="{source}",table="public.{table}",sink="cloud"'
    idle_labels = f'source="{erp_source}",table="{erp_db}.idle",sink="cloud"'
    try:
        with (tmp_path / "run.log").open("w") as log:
            process = subprocess.Popen([branchline, "run", str(pipeline_file), "--no-progress"], env=env,
                                       stdout=log, stderr=subprocess.STDOUT)
        try:
            def alive() -> BaseException | None:
                code = process.poll()
                return None if code is None else RuntimeError(
                    f"branchline run exited {code}: {(tmp_path / 'run.log').read_text()[-2000:]}")

            with prometheus(tmp_path, [f"127.0.0.1:{metrics_port}"]) as url:
                started = time.monotonic()
                # rows inserted after the snapshot are streamed changes, which carry commit times
                wait_for("the snapshot to be read", lambda: scalar(
                    url, f'branchline_snapshot_rows_total{{source="{source}",table="public.{table}"}}') == 1,
                    failed=alive)
                with psycopg.connect(crm_dsn, autocommit=True) as conn:
                    conn.execute(f"INSERT INTO public.{table} SELECT g, 'row ' || g FROM generate_series(1, 50) g")
                wait_for("51 rows written, as Prometheus sees them",
                         lambda: (scalar(url, f"sum(branchline_rows_written_total{{{labels}}})") or 0) >= 51,
                         failed=alive)
                lag = wait_for("the lag series", lambda: scalar(url, f"branchline_replication_lag_seconds{{{labels}}}"),
                               failed=alive)
                assert 0 <= lag < 30
                info = httpx.get(f"{url}/api/v1/query", params={"query": "branchline_build_info"}, timeout=5).json()
                assert info["data"]["result"][0]["metric"]["runtime"] == "run"

                # the monitoring runs inside the command: pollers and heartbeats, scraped by Prometheus
                retained = wait_for("the slot's retained WAL", lambda: scalar(
                    url, f'branchline_slot_wal_retained_bytes{{source="{source}",slot="branchline_t1_{source}"}}'),
                    failed=alive)
                assert retained >= 0
                wait_for("binlog files behind to be known", lambda: scalar(
                    url, f'branchline_binlog_files_behind{{source="{erp_source}"}}') == 0, failed=alive)
                for name in (source, erp_source):
                    wait_for(f"{name} to be up", lambda n=name: scalar(  # type: ignore[misc]
                        url, f'branchline_source_up{{source="{n}"}}') == 1, failed=alive)
                    wait_for(f"heartbeats into {name}", lambda n=name: (scalar(  # type: ignore[misc]
                        url, f'branchline_heartbeats_written_total{{source="{n}"}}') or 0) >= 3, failed=alive)
                    skew = scalar(url, f'branchline_source_clock_skew_seconds{{source="{name}"}}')
                    assert skew is not None and abs(skew) < 1  # one host: no skew to speak of
                # the MariaDB table is idle since its snapshot, longer than the bound: heartbeats keep it true
                wait_for("15 s of an idle table with its lag held low", lambda: time.monotonic() - started > 15
                         and (v := scalar(url, f"branchline_replication_lag_seconds{{{idle_labels}}}")) is not None
                         and v < 5, failed=alive)
                # a stall with no user change at all: the idle table's lag rises, and falls when the sink returns
                idle_lag = f"branchline_replication_lag_seconds{{{idle_labels}}}"
                proxy.cut()
                wait_for("the idle table's lag to rise while the sink is cut",
                         lambda: (scalar(url, idle_lag) or 0) > 8, failed=alive)
                proxy.restore()
                wait_for("the idle table's lag to fall after", lambda: (v := scalar(url, idle_lag)) is not None
                         and v < 5, failed=alive)
                # heartbeat rows are not user rows
                assert scalar(url, 'sum(branchline_rows_written_total{table="branchline.debezium_heartbeat"})') is None
                assert scalar(url, f'sum(branchline_events_total{{source="{erp_source}",table="{erp_db}.idle"}})') == 1

                status = subprocess.run([branchline, "status", str(pipeline_file), "--json"], env=env,
                                        capture_output=True, text=True, timeout=60, check=False)
                report = json.loads(status.stdout)
                assert report["runtime"]["reachable"], report
                (row,) = [t for t in report["tables"] if t["table"] == f"public.{table}"]
                assert row["rows_written"] == 51 and row["replication_lag_s"] < 30
                (idle,) = [t for t in report["tables"] if t["table"] == f"{erp_db}.idle"]
                assert idle["replication_lag_s"] < 5
                assert status.returncode == 0, report["problems"]
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        with psycopg.connect(crm_dsn) as conn:
            expected = conn.execute(f"SELECT id, note FROM public.{table} ORDER BY id").fetchall()
        with psycopg.connect(cloud_dsn) as conn:
            got = conn.execute(f'SELECT id, note FROM "{source}"."{table}" ORDER BY id').fetchall()
            idle_rows = conn.execute(f'SELECT id, note FROM "{erp_source}".idle ORDER BY id').fetchall()
        assert got == expected and len(got) == 51
        assert idle_rows == [(1, "never changes")]
    finally:
        _drop_source_objects(crm_dsn, f"branchline_t1_{source}", table)
        with maria.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{erp_db}`")
        maria.close()
        with psycopg.connect(cloud_dsn, autocommit=True) as conn:
            for schema in (source, erp_source):
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
