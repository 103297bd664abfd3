"""A real crash: a writer process is killed (SIGKILL) in the middle of a batch, then the batch is
replayed by a new process. The target must hold exactly the acknowledged batches after the kill, and
match the source history row by row after the replay."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from branchline.events import Op
from branchline.sinks import bench
from branchline.sinks.build import build_sink
from branchline.sinks.config import PostgresSinkConfig

pytestmark = pytest.mark.integration

TABLE = bench.TABLE.model_copy(
    update={"id": bench.TABLE_ID.model_copy(update={"source": "crash", "table": "order_lines"})}
)

CHILD = """
import asyncio, sys
from branchline.events import Op
from branchline.sinks import bench
from branchline.sinks.build import build_sink
from branchline.sinks.config import PostgresSinkConfig

host, port, schema, app = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
table = bench.TABLE.model_copy(update={"id": bench.TABLE_ID.model_copy(update={"source": "crash", "table": "order_lines"})})

async def main():
    sink = build_sink(PostgresSinkConfig(host=host, port=port, database="cloud", schema=schema, application_name=app))
    await sink.write_batch(table, bench._events(table.id, 1, 1000, 1, Op.CREATE, 0))
    print("batch 1 acknowledged", flush=True)
    # batch 2: updates of batch 1 and many new rows; the parent kills us while it streams
    await sink.write_batch(table, bench._events(table.id, 1, 100_000, 10_000, Op.UPDATE, 1))
    print("batch 2 committed", flush=True)

asyncio.run(main())
"""


@pytest.fixture
def target(cloud: Any) -> Iterator[dict[str, Any]]:
    schema = f"crash_{uuid.uuid4().hex[:10]}"
    dsn = f"host={cloud.host} port={cloud.port} user=postgres dbname=cloud"
    yield {"schema": schema, "dsn": dsn, "host": cloud.host, "port": cloud.port}
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _table(target: dict[str, Any]) -> list[tuple[Any, ...]]:
    with psycopg.connect(target["dsn"]) as conn:
        return conn.execute(
            f'SELECT id, qty, note, _bl_position FROM "{target["schema"]}".order_lines ORDER BY id'
        ).fetchall()


def test_writer_killed_mid_batch_then_replayed(target: dict[str, Any]) -> None:
    app = f"bl-crash-{uuid.uuid4().hex[:6]}"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, target["host"], str(target["port"]), target["schema"], app],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "batch 1 acknowledged"
        deadline = time.monotonic() + 60
        with psycopg.connect(target["dsn"], autocommit=True) as admin:
            while True:
                row = admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND query LIKE 'COPY%%'"
                    " AND state = 'active'",
                    [app],
                ).fetchone()
                if row and row[0]:
                    break
                assert child.poll() is None, child.stderr.read() if child.stderr else "child exited"
                assert time.monotonic() < deadline, "the writer never started streaming batch 2"
                time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)  # mid-COPY: batch 2 cannot have committed
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()

    batch1 = bench._events(TABLE.id, 1, 1000, 1, Op.CREATE, 0)
    batch2 = bench._events(TABLE.id, 1, 100_000, 10_000, Op.UPDATE, 1)
    assert _table(target) == [(e.key["id"], e.after["qty"], e.after["note"], e.position) for e in batch1]  # type: ignore[index]

    async def replay() -> None:
        sink = build_sink(
            PostgresSinkConfig(
                host=target["host"], port=target["port"], database="cloud", schema=target["schema"]
            )
        )
        try:
            await sink.write_batch(TABLE, batch2[:50_000])  # everything after the last acknowledgement,
            await sink.write_batch(TABLE, batch1)  # an older batch redelivered out of order,
            await sink.write_batch(TABLE, batch2[50_000:])  # and the rest
        finally:
            await sink.close()

    asyncio.run(replay())
    expected = [(e.key["id"], e.after["qty"], e.after["note"], e.position) for e in batch2]  # type: ignore[index]
    assert _table(target) == expected
