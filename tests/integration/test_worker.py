"""`branchline worker` on the real broker and the real cloud PostgreSQL: two workers share the
partitions, one is killed with SIGKILL mid-stream, and the target still matches the changes applied
one by one, row by row. Bad records stop the worker, or go to the dead-letter topic when asked."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from branchline.streams import _envelopes as env

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BRANCHLINE = [sys.executable, "-m", "branchline.cli"]
F = env.field
FIELDS = [
    F("id", "int64", optional=False),
    F("code", "string", optional=False),
    env.decimal_field("amount", 18, 4),
    F("updated", "int64", logical="io.debezium.time.MicroTimestamp"),
    F("note", "string"),
]
PARTITIONS = 4


def pipeline_file(tmp: Path, branch: str, kafka: Any, cloud: Any, **worker: Any) -> Path:
    settings = {"batch_size": 200, "batch_within_s": 0.3, **worker}
    text = f"""
name: {branch}
branch: {branch}
sources:
  - name: erp
    kind: mariadb
    user: branchline
    databases: [erp]
kafka:
  bootstrap_servers: {kafka.address}
  partitions: {PARTITIONS}
sinks:
  cloud:
    kind: postgres
    host: {cloud.host}
    port: {cloud.port}
    user: postgres
    database: cloud
    schema: "{{branch}}_{{source}}"
worker: {orjson.dumps(settings).decode()}
"""
    path = tmp / "pipeline.yaml"
    path.write_text(text)
    return path


async def create_topics(bootstrap: str, names: list[str], partitions: int = PARTITIONS) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names])
    finally:
        await admin.close()


async def produce(bootstrap: str, records: list[tuple[str, bytes | None, bytes | None]]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        for topic, key, value in records:
            await producer.send(topic, key=key, value=value)
        await producer.flush()
    finally:
        await producer.stop()


class History:
    """Changes of one table in binlog order, and the table they leave behind."""

    def __init__(self, table: env.Table, seed: int) -> None:
        self.table = table
        self.rng = random.Random(seed)
        self.rows: dict[int, dict[str, Any]] = {}
        self.pos = 4
        self.last: dict[int, tuple[str, int]] = {}
        """Per key: the operation and binlog offset of its last change (for failure reports)."""

    def changes(self, count: int, keys: int) -> list[tuple[str, bytes | None, bytes | None]]:
        out = []
        for _ in range(count):
            key = self.rng.randrange(1, keys + 1)
            self.pos += 300
            position = ("erp-bin.000001", self.pos, 0)
            if key in self.rows and self.rng.random() < 0.15:
                self.last[key] = ("d", self.pos)
                before = self.rows.pop(key)
                out.append((self.table.topic, self.table.key_record(before),
                            self.table.value("d", before=before, after=None, position=position)))
                out.append((self.table.topic, self.table.key_record(before), None))  # tombstone
                continue
            row = {"id": key, "code": f"K{key}-{self.rng.randrange(10**6)}",
                   "amount": env.decimal_bytes(self.rng.randrange(-10**12, 10**12)),
                   "updated": 1_700_000_000_000_000 + self.rng.randrange(10**12),
                   "note": self.rng.choice([None, "ok", "wide ✓ note"])}
            op = "u" if key in self.rows else "c"
            self.last[key] = (op, self.pos)
            out.append((self.table.topic, self.table.key_record(row),
                        self.table.value(op, before=self.rows.get(key), after=row, position=position)))
            self.rows[key] = row
        return out

    def expected(self) -> list[tuple[Any, ...]]:
        from datetime import datetime, timedelta

        rows = []
        for key in sorted(self.rows):
            row = self.rows[key]
            unscaled = int.from_bytes(__import__("base64").b64decode(row["amount"]), "big", signed=True)
            rows.append((key, row["code"], Decimal(unscaled).scaleb(-4),
                         datetime(1970, 1, 1) + timedelta(microseconds=row["updated"]), row["note"]))
        return rows


def target_rows(cloud: Any, schema: str) -> list[tuple[Any, ...]] | None:
    with psycopg.connect(host=cloud.host, port=cloud.port, user="postgres", dbname="cloud", autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass(%s)", (f'"{schema}"."orders"',)).fetchone()
        if exists is None or exists[0] is None:
            return None
        return [tuple(r) for r in conn.execute(
            f'SELECT id, code, amount, updated, note FROM "{schema}"."orders" ORDER BY id').fetchall()]


def mismatch_report(cloud: Any, schema: str, history: History) -> str:
    """Which keys differ, with the position the target holds and the last change the source made."""
    from aiokafka.partitioner import murmur2
    from branchline.events import binlog_position

    expected = {row[0]: row for row in history.expected()}
    with psycopg.connect(host=cloud.host, port=cloud.port, user="postgres", dbname="cloud", autocommit=True) as conn:
        stored = {r[0]: r for r in conn.execute(
            f'SELECT id, code, amount, updated, note, _bl_position FROM "{schema}"."orders"').fetchall()}
    lines = []
    for key in sorted(set(expected) | set(stored)):
        have = stored.get(key)
        if have is not None and expected.get(key) == tuple(have[:5]):
            continue
        op, pos = history.last.get(key, ("?", 0))
        partition = (murmur2(history.table.key_record({"id": key}) or b"") & 0x7FFFFFFF) % PARTITIONS
        lines.append(f"key {key} (partition {partition}): expected {expected.get(key)!r} (last {op} at {binlog_position('erp-bin.000001', pos)}, "
                     f"binlog pos {pos}); target {have!r}")
    return "\n".join(lines[:20])


def start_worker(path: Path, log: Path) -> subprocess.Popen[bytes]:
    env_ = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([*BRANCHLINE, "worker", str(path)], cwd=ROOT, stdout=handle,
                                stderr=subprocess.STDOUT, env=env_, start_new_session=True)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def wait_for(predicate: Any, timeout: float, what: str, logs: list[Path]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists())
    pytest.fail(f"timed out waiting for {what}\n{tails}")


def batches_in(log: Path) -> int:
    return log.read_text(errors="replace").count("] batch: ") if log.exists() else 0


def test_two_workers_and_a_kill_9_neither_lose_nor_duplicate(kafka: Any, cloud: Any, tmp_path: Path) -> None:
    """Both workers consume their half of the partitions while changes keep arriving; one is killed with
    SIGKILL while it works; the other takes its partitions over and the target ends equal to the changes
    applied one by one.

    This test found the worker's one loss: after a rebalance faust-streaming sometimes never delivers
    a few records (its fetcher's read offset runs ahead of a second seek to the committed offsets); the
    keys whose last change was among them stayed stale (about 1 run in 6). The worker now reads such
    holes from the broker (`OffsetTracker`, `read_holes`)."""
    branch = "w" + uuid.uuid4().hex[:8]
    table = env.Table(prefix=f"{branch}.erp", database="erp", table="orders", fields=FIELDS, key=["id"])
    asyncio.run(create_topics(kafka.address, [table.topic]))
    history = History(table, seed=11)
    path = pipeline_file(tmp_path, branch, kafka, cloud, session_timeout_s=8.0)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    a = start_worker(path, logs[0])
    b = start_worker(path, logs[1])
    done = threading.Event()
    producer = threading.Thread(target=lambda: asyncio.run(produce_until(kafka.address, history, done)))
    producer.start()
    try:
        wait_for(lambda: batches_in(logs[0]) and batches_in(logs[1]), 180, "both workers writing batches", logs)
        seen = batches_in(logs[0])
        wait_for(lambda: batches_in(logs[0]) >= seen + 3, 60, "worker a writing under load", logs)
        os.killpg(a.pid, signal.SIGKILL)  # while changes keep arriving: mid-batch
        a.wait(timeout=10)
        time.sleep(3)
        done.set()
        producer.join(timeout=60)
        assert not producer.is_alive()
        expected = history.expected()
        schema = f"{branch}_erp"
        try:
            wait_for(lambda: target_rows(cloud, schema) == expected, 120, "the target to match the source", logs)
        except pytest.fail.Exception as exc:
            raise AssertionError(f"{mismatch_report(cloud, schema, history)}\n{exc}") from None
        assert b.poll() is None, "the surviving worker must still run"
        assert target_rows(cloud, schema) == expected  # row by row: nothing lost, nothing duplicated
    finally:
        done.set()
        stop(a)
        stop(b)
        producer.join(timeout=60)


async def produce_until(bootstrap: str, history: History, done: threading.Event, pause_s: float = 0.2,
                        max_rounds: int = 1500) -> None:
    for _ in range(max_rounds):
        if done.is_set():
            return
        await produce(bootstrap, history.changes(100, keys=400))
        await asyncio.sleep(pause_s)


def test_bad_record_stops_the_worker_naming_table_key_and_position(kafka: Any, cloud: Any, tmp_path: Path) -> None:
    branch = "w" + uuid.uuid4().hex[:8]
    table = env.Table(prefix=f"{branch}.erp", database="erp", table="orders", fields=FIELDS, key=["id"])
    asyncio.run(create_topics(kafka.address, [table.topic], partitions=1))
    history = History(table, seed=3)
    good = history.changes(20, keys=10)
    row = {"id": 99, "code": "bad", "amount": "not base64 !", "updated": 0, "note": None}
    bad = (table.topic, table.key_record(row), table.value("c", before=None, after=row,
                                                           position=("erp-bin.000009", 4242, 0)))
    asyncio.run(produce(kafka.address, [*good, bad]))
    path = pipeline_file(tmp_path, branch, kafka, cloud)
    log = tmp_path / "worker.log"
    worker = start_worker(path, log)
    try:
        code = worker.wait(timeout=180)
    except subprocess.TimeoutExpired:
        stop(worker)
        pytest.fail("the worker must stop on a bad record\n" + log.read_text(errors="replace")[-3000:])
    text = log.read_text(errors="replace")
    assert code == 2, text[-3000:]
    assert "erp.orders" in text and "key {'id': 99}" in text and f"offset {len(good)}" in text
    from branchline.events import binlog_position

    assert str(binlog_position("erp-bin.000009", 4242, 0)) in text


def test_dead_letter_topic_takes_the_bad_record_and_the_rest_is_written(kafka: Any, cloud: Any,
                                                                        tmp_path: Path) -> None:
    branch = "w" + uuid.uuid4().hex[:8]
    table = env.Table(prefix=f"{branch}.erp", database="erp", table="orders", fields=FIELDS, key=["id"])
    dlq = f"{branch}.dlq"
    asyncio.run(create_topics(kafka.address, [table.topic, dlq], partitions=1))
    history = History(table, seed=5)
    first = history.changes(30, keys=15)
    row = {"id": 77, "code": "bad", "amount": "not base64 !", "updated": 0, "note": None}
    bad = (table.topic, table.key_record(row), table.value("c", before=None, after=row,
                                                           position=("erp-bin.000009", 4242, 0)))
    rest = history.changes(30, keys=15)
    asyncio.run(produce(kafka.address, [*first, bad, *rest]))
    path = pipeline_file(tmp_path, branch, kafka, cloud, on_bad_record="dlq", dlq_topic=dlq)
    log = tmp_path / "worker.log"
    worker = start_worker(path, log)
    try:
        expected = history.expected()
        wait_for(lambda: target_rows(cloud, f"{branch}_erp") == expected, 180, "the good records", [log])
        letters = asyncio.run(read_all(kafka.address, dlq))
        assert len(letters) == 1
        body = orjson.loads(letters[0].value)
        assert body["value"] == bad[2].decode() and body["topic"] == table.topic and body["offset"] == len(first)
        assert "erp.orders" in body["error"]
    finally:
        stop(worker)


async def read_all(bootstrap: str, topic: str) -> list[Any]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        consumer.seek(tp, 0)
        out: list[Any] = []
        while len(out) < end:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            out.extend(batch.get(tp, []))
        return out
    finally:
        await consumer.stop()


def test_read_holes_reads_exactly_the_missing_offsets(kafka: Any) -> None:
    """What the worker does when Faust skipped offsets: read them directly, nothing more."""
    from branchline.streams.app import Hole, read_holes

    topic = "w" + uuid.uuid4().hex[:8] + ".holes"
    asyncio.run(create_topics(kafka.address, [topic], partitions=2))
    asyncio.run(produce_to(kafka.address, topic, [(p, f"{p}-{i}".encode()) for p in (0, 1) for i in range(20)]))
    records = asyncio.run(read_holes(kafka.address, [Hole(topic, 0, 3, 7), Hole(topic, 0, 10, 11),
                                                     Hole(topic, 1, 18, 20)]))
    assert sorted((r.partition, r.offset, r.value) for r in records) == [
        (0, 3, b"0-3"), (0, 4, b"0-4"), (0, 5, b"0-5"), (0, 6, b"0-6"), (0, 10, b"0-10"),
        (1, 18, b"1-18"), (1, 19, b"1-19")]


async def produce_to(bootstrap: str, topic: str, values: list[tuple[int, bytes]]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for partition, value in values:
            await producer.send_and_wait(topic, value=value, partition=partition)
    finally:
        await producer.stop()
