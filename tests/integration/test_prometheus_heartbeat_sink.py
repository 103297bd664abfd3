"""The embedded runtime's heartbeat path as `branchline run` sets it up, with its sinks wrapped in
`branchline.metrics.skip_heartbeat_writes` (where the runner builds its sinks): heartbeat
rows are captured from the source, measured when they reach the sink, and never written into the target.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from branchline import metrics

pytestmark = pytest.mark.integration


def test_heartbeats_are_measured_at_the_sink_and_never_written_into_the_target(
    crm: Any, cloud: Any, tmp_path: Path
) -> None:
    from branchline.config import load_pipeline
    from branchline.heartbeat import prepare_heartbeat_capture, with_heartbeat_capture
    from branchline.monitoring import run_monitoring
    from branchline.runtime.runner import Runner

    suffix = secrets.token_hex(3)
    source, table = f"hs{suffix}", f"hsink_{suffix}"
    crm_dsn = f"host={crm.host} port={crm.port} user=postgres dbname=crm"
    cloud_dsn = f"host={cloud.host} port={cloud.port} user=postgres dbname=cloud"
    with psycopg.connect(crm_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE public.{table} (id int PRIMARY KEY, note text)")
        conn.execute(f"INSERT INTO public.{table} VALUES (1, 'idle')")
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "name": source, "branch": "t1",
        "sources": [{"name": source, "kind": "postgres", "host": crm.host, "port": crm.port, "user": "postgres",
                     "database": "crm", "include": [f"public.{table}"]}],
        "sinks": {"cloud": {"kind": "postgres", "host": cloud.host, "port": cloud.port, "user": "postgres",
                            "database": "cloud"}},
        "runtime": {"spool": {"path": str(tmp_path / "spool.sqlite")}, "batch_interval_ms": 50},
        "metrics": {"heartbeat": {"interval_s": 0.5}, "poll_interval_s": 1},
    }))
    original = load_pipeline(path)
    prepare_heartbeat_capture(original.sources[0])
    pipeline = with_heartbeat_capture(original)
    metrics.reset()
    runner = Runner(pipeline)
    errors: list[BaseException] = []

    def run() -> None:
        async def main() -> None:
            monitor = asyncio.create_task(run_monitoring(pipeline, runner.stop, runtime="run"))
            try:
                await runner.run()
            finally:
                runner.stop.set()
                await monitor

        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    labels = {"branch": "t1", "source": source, "sink": "cloud"}

    def lag(name: str) -> float | None:
        return metrics.sample("branchline_replication_lag_seconds", {**labels, "table": name})

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not errors:
            if runner.stats.snapshot_done.get(source) and (lag("heartbeat") or 99) < 2 \
                    and (lag(f"public.{table}") or 99) < 2:
                break
            time.sleep(0.25)
        assert not errors, errors
        assert (lag("heartbeat") or 99) < 2 and (lag(f"public.{table}") or 99) < 2, metrics.snapshot()["tables"]
        beats = metrics.sample("branchline_heartbeats_written_total", {"branch": "t1", "source": source})
        assert beats is not None and beats >= 2
    finally:
        runner.stop.set()
        thread.join(30)
        metrics.reset()
    try:
        assert not errors, errors
        with psycopg.connect(cloud_dsn) as conn:
            tables = {r[0] for r in conn.execute("SELECT table_name FROM information_schema.tables"
                                                 " WHERE table_schema = %s", (source,)).fetchall()}
            rows = conn.execute(f'SELECT id, note FROM "{source}"."{table}"').fetchall()
        assert table in tables and not any("debezium_heartbeat" in t for t in tables), tables
        assert rows == [(1, "idle")]
    finally:
        slot = original.sources[0].slot  # type: ignore[union-attr]
        with psycopg.connect(crm_dsn, autocommit=True) as conn:
            for _ in range(20):
                row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
                if row is None or not row[0]:
                    break
                time.sleep(0.25)
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
                         (slot,))
            conn.execute(f'DROP PUBLICATION IF EXISTS "{slot}"')
            conn.execute(f"DROP TABLE IF EXISTS public.{table}")
        with psycopg.connect(cloud_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{source}" CASCADE')
