"""Benchmark of the Python stages of a worker: decode, transform, dedupe (prints figures; not a test).

Why: the issue's budget is 30 µs per event on one core for these stages together, so that the
broker and the sink, not Python, set the pace. Records are realistic ERP order rows (decimals,
dates, DATETIME(6), TIMESTAMP, enum, set, JSON, text) in the exact JsonConverter layout, built in
memory before the clock starts. Run it with ``branchline bench streams`` or
``python -m branchline.streams.bench``.
"""

from __future__ import annotations

import gc
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click
from branchline.streams import _envelopes as env
from branchline.streams.config import TableTransforms
from branchline.streams.decode import EnvelopeDecoder, RowChange
from branchline.streams.dedupe import AppliedPositions
from branchline.streams.transforms import CompiledTransform, compile_transforms

F = env.field

ORDER_FIELDS = [
    F("id", "int64", optional=False),
    F("order_no", "string", optional=False, parameters={"__debezium.source.column.type": "VARCHAR",
                                                        "__debezium.source.column.length": "20"}),
    F("customer_id", "int64", optional=False),
    F("branch_code", "string"),
    F("status", "string", logical="io.debezium.data.Enum", parameters={"allowed": "draft,open,paid,shipped,void"}),
    F("currency", "string"),
    env.decimal_field("net_amount", 18, 4),
    env.decimal_field("tax_amount", 18, 4),
    env.decimal_field("gross_amount", 18, 4),
    env.decimal_field("discount_pct", 5, 2),
    F("order_date", "int32", logical="io.debezium.time.Date"),
    F("due_date", "int32", logical="io.debezium.time.Date"),
    F("created_at", "int64", logical="io.debezium.time.MicroTimestamp"),
    F("updated_at", "string", logical="io.debezium.time.ZonedTimestamp"),
    F("flags", "string", logical="io.debezium.data.EnumSet", parameters={"allowed": "rush,gift,export,b2b"}),
    F("customer_email", "string"),
    F("shipping_address", "string"),
    F("notes", "string"),
    F("attributes", "string", logical="io.debezium.data.Json"),
    F("warehouse_id", "int32"),
    F("is_paid", "boolean"),
]
ORDERS = env.Table(prefix="erp", database="erp", table="orders", fields=ORDER_FIELDS, key=["id"])
TRANSFORMS = TableTransforms.model_validate({
    "exclude": ["notes"],
    "mask": {"customer_email": {"method": "sha256", "salt": "bench-salt"}},
    "constants": {"branch_id": "{branch}"},
})


def order_row(rng: random.Random, key: int) -> dict[str, Any]:
    net = rng.randrange(100, 10_000_000)
    tax = net * 19 // 100
    return {
        "id": key, "order_no": f"SO-{key:08d}", "customer_id": rng.randrange(1, 50_000), "branch_code": "B07",
        "status": rng.choice(["draft", "open", "paid", "shipped"]), "currency": "EUR",
        "net_amount": env.decimal_bytes(net), "tax_amount": env.decimal_bytes(tax),
        "gross_amount": env.decimal_bytes(net + tax), "discount_pct": env.decimal_bytes(rng.randrange(0, 2500)),
        "order_date": 19_700 + rng.randrange(0, 400), "due_date": 19_730 + rng.randrange(0, 400),
        "created_at": 1_700_000_000_000_000 + rng.randrange(0, 10**12),
        "updated_at": "2024-03-01T12:34:56.123456Z", "flags": rng.choice(["", "rush", "gift,export", "b2b"]),
        "customer_email": f"customer{key}@example.org",
        "shipping_address": f"Hauptstrasse {key % 300}, 10115 Berlin, Germany",
        "notes": "Please deliver between 9 and 17 o'clock; call ahead." if key % 3 else None,
        "attributes": '{"channel":"web","priority":2,"tags":["a","b"]}', "warehouse_id": rng.randrange(1, 40),
        "is_paid": bool(key % 2),
    }


def records(count: int, keys: int, seed: int = 7) -> list[tuple[str, bytes, bytes]]:
    """(topic, key, value) of `count` inserts and updates over `keys` orders, in binlog order."""
    rng = random.Random(seed)
    out = []
    seen: set[int] = set()
    for i in range(count):
        key = rng.randrange(1, keys + 1)
        row = order_row(rng, key)
        op = "u" if key in seen else "c"
        seen.add(key)
        value = ORDERS.value(op, before=row if op == "u" else None, after=row,
                             position=("mariadb-bin.000042", 4 + i * 900, 0), txid=f"0-1-{i}")
        out.append((ORDERS.topic, ORDERS.key_record(row) or b"", value))
    return out


@dataclass
class StageFigures:
    events: int
    decode_s: float
    transform_s: float
    dedupe_s: float
    free_s: float = 0.0
    """Freeing the batch's objects (events, row dicts, values) once it is done."""

    @property
    def total_s(self) -> float:
        return self.decode_s + self.transform_s + self.dedupe_s + self.free_s

    def per_event_us(self, seconds: float) -> float:
        return seconds / self.events * 1e6


STAGES = ("decode", "transform", "dedupe")


def run_stages(batch: list[tuple[str, bytes, bytes]], decoder: EnvelopeDecoder,
               transforms: dict[Any, CompiledTransform], guard: AppliedPositions,
               clock: Callable[[], float], upto: str = "dedupe") -> tuple[float, float, float, float]:
    """One batch through decode, transform and dedupe (guard admit + collapse, then record), and the
    time to free it. `upto` stops after an earlier stage (to count each stage's instructions)."""
    t0 = clock()
    decoded = [decoder.decode(topic, key, value) for topic, key, value in batch]
    t1 = clock()
    if upto == "decode":
        del decoded
        return t1 - t0, 0.0, 0.0, clock() - t1
    changes = []
    for result in decoded:
        if isinstance(result, RowChange):
            compiled = transforms.get(id(result.schema))  # by identity, as the worker does: hashing a
            if compiled is None:                          # TableSchema costs more than the transform
                compiled = transforms[id(result.schema)] = compile_transforms(result.schema, TRANSFORMS)
            event = compiled.apply_owned(result.event)
            if event is not None:
                changes.append((event, compiled.schema))
    t2 = clock()
    if upto == "transform":
        del decoded, changes
        return t1 - t0, t2 - t1, 0.0, clock() - t2
    segments = guard.dedupe(changes)  # as the worker does: admit + collapse in one pass
    guard.record(segments)
    t3 = clock()
    del decoded, changes, segments  # freeing a batch's events, rows and values costs too
    t4 = clock()
    return t1 - t0, t2 - t1, t3 - t2, t4 - t3


def bench_streams(events: int = 100_000, batch_size: int = 5_000, keys: int = 20_000) -> StageFigures:
    """Time the stages over `events` records in batches of `batch_size` (CPU time of this process)."""
    data = records(events, keys)
    decoder = EnvelopeDecoder("erp", "b07")
    transforms: dict[Any, CompiledTransform] = {}
    guard = AppliedPositions({})
    run_stages(data[:batch_size], EnvelopeDecoder("erp", "b07"), {}, AppliedPositions({}), time.process_time)
    figures = StageFigures(events, 0.0, 0.0, 0.0)
    gc.collect()
    for start in range(0, events, batch_size):
        d, t, u, f = run_stages(data[start:start + batch_size], decoder, transforms, guard, time.process_time)
        figures.decode_s += d
        figures.transform_s += t
        figures.dedupe_s += u
        figures.free_s += f
    return figures


def calibration_us() -> float:
    """CPU µs of a fixed pure-Python loop (a 20-key dict built 1,000 times): compares machines and loads.
    About 1,000 µs on an idle current x86 core."""
    keys = [f"c{i}" for i in range(20)]
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        for _ in range(1_000):
            {k: 1 for k in keys}
        best = min(best, time.process_time() - start)
    return best * 1e6


def print_figures(figures: StageFigures, echo: Callable[[str], None] = print) -> None:
    import os

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    echo(f"streams stages, {figures.events} ERP order events, one core (process CPU time):")
    echo(f"  machine: {os.cpu_count()} cores, load average {load:.2f}, calibration loop "
         f"{calibration_us():,.0f} µs")
    for name, seconds in (("decode", figures.decode_s), ("transform", figures.transform_s),
                          ("dedupe", figures.dedupe_s), ("free", figures.free_s), ("total", figures.total_s)):
        echo(f"  {name:<10} {figures.per_event_us(seconds):7.2f} µs/event  "
             f"{figures.events / seconds if seconds else float('inf'):>12,.0f} events/s")
    verdict = "within" if figures.per_event_us(figures.total_s) <= 30 else "OVER"
    echo(f"  budget 30 µs/event: {verdict}")


@click.command("streams")
@click.option("--events", default=100_000, show_default=True, help="Records to push through the stages.")
@click.option("--batch", "batch_size", default=5_000, show_default=True, help="Records per batch.")
@click.option("--keys", default=20_000, show_default=True, help="Distinct primary keys (fewer: more dedupe).")
@click.option("--repeat", default=3, show_default=True, help="Runs; the fastest is shown (others' load is noise).")
def streams(events: int, batch_size: int, keys: int, repeat: int) -> None:
    """Decode + transform + dedupe rate of realistic ERP envelopes on one core."""
    from branchline.gc_tuning import tune_for_throughput

    tune_for_throughput()  # as the worker does
    runs = [bench_streams(events, batch_size, keys) for _ in range(max(1, repeat))]
    print_figures(min(runs, key=lambda f: f.total_s), click.echo)
    totals = sorted(f.per_event_us(f.total_s) for f in runs)
    click.echo(f"  total over the {len(runs)} runs: fastest {totals[0]:.2f}, median {totals[len(totals) // 2]:.2f}, "
               f"slowest {totals[-1]:.2f} µs/event")




@click.command("instructions")
@click.option("--events", default=10_000, show_default=True, help="Records counted (after a first batch).")
@click.option("--by-stage", is_flag=True, help="Also count the stages up to decode and up to transform.")
def instructions(events: int, by_stage: bool) -> None:
    """Instructions per event of decode + transform + dedupe, counted by valgrind.

    Why: on a shared machine the µs figures swing by up to 2x; an instruction count does not, so
    it is what to compare before and after a change. Two runs over the same records, one stopping
    after the first batch, one going on through `events` more: their difference is the stages' own."""
    import os
    import re
    import shutil
    import subprocess
    import sys

    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise click.ClickException("`valgrind` must be installed to count instructions (apt install valgrind)")

    def count(through: int, upto: str) -> int:
        done = subprocess.run(
            [valgrind, "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null", sys.executable,
             "-m", "branchline.streams.bench", "run-stages", "--records", str(events), "--through", str(through),
             "--upto", upto],
            capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"}, check=True)
        found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
        if found is None:
            raise click.ClickException(f"valgrind printed no instruction count: {done.stderr[-500:]}")
        return int(found.group(1).replace(",", ""))

    def per_event(upto: str) -> float:
        return (count(events, upto) - count(0, upto)) / events

    total = per_event("dedupe")
    click.echo(f"streams stages: {total:,.0f} instructions per event ({events:,} ERP order events, "
               f"valgrind cachegrind)")
    if by_stage:  # each stage's share: the difference between stopping after it and before it
        decode, transform = per_event("decode"), per_event("transform")
        for name, value in (("decode", decode), ("transform", transform - decode), ("dedupe", total - transform)):
            click.echo(f"  {name:<10} {value:9,.0f}  (freeing its objects included)")


@click.command("run-stages", hidden=True)
@click.option("--records", "count", required=True, type=int)
@click.option("--through", required=True, type=int)
@click.option("--upto", type=click.Choice(STAGES), default="dedupe")
def run_stages_only(count: int, through: int, upto: str) -> None:
    """Build `count` + one batch of records, push the first batch and then `through` more (for `instructions`)."""
    from branchline.gc_tuning import tune_for_throughput

    batch_size = 5_000
    data = records(count + batch_size, 20_000)
    tune_for_throughput()
    decoder, guard = EnvelopeDecoder("erp", "b07"), AppliedPositions({})
    transforms: dict[Any, CompiledTransform] = {}
    for start in range(0, batch_size + min(through, count), batch_size):
        run_stages(data[start:start + batch_size], decoder, transforms, guard, time.process_time, upto)


# -- end to end: a pre-filled topic through one worker into the PostgreSQL sink ---------------------


def bench_worker(events: int = 100_000, *, keys: int = 50_000, partitions: int = 4, batch_size: int = 5_000,
                 bootstrap: str = "127.0.0.1:19092", cloud_host: str = "127.0.0.1", cloud_port: int = 15433,
                 echo: Callable[[str], None] = print) -> float:
    """Fill a fresh topic with `events` ERP order changes, start one `branchline worker` on it and time
    until the cloud PostgreSQL holds every key. Prints and returns events/s (first row -> last row)."""
    import asyncio
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    import uuid
    from pathlib import Path

    import psycopg

    branch = "bench" + uuid.uuid4().hex[:6]
    prefix = f"{branch}.erp"
    table = env.Table(prefix=prefix, database="erp", table="orders", fields=ORDER_FIELDS, key=["id"])
    data = [(table.topic, key, value) for _, key, value in records(events, keys)]
    expected = len({key for _, key, _ in data})

    async def fill() -> None:
        from aiokafka import AIOKafkaProducer
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(table.topic, num_partitions=partitions, replication_factor=1)])
        finally:
            await admin.close()
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20,
                                    max_batch_size=1 << 20, max_request_size=8 << 20)
        await producer.start()
        try:
            for topic, key, value in data:
                await producer.send(topic, key=key, value=value)
            await producer.flush()
        finally:
            await producer.stop()

    started = time.monotonic()
    asyncio.run(fill())
    echo(f"filled {table.topic}: {events:,} records ({partitions} partitions) in {time.monotonic() - started:.1f} s")
    workdir = Path(tempfile.mkdtemp(prefix="branchline-bench-"))
    pipeline = workdir / "pipeline.yaml"
    pipeline.write_text(f"""
name: {branch}
branch: {branch}
sources:
  - {{name: erp, kind: mariadb, user: bench, databases: [erp]}}
kafka: {{bootstrap_servers: "{bootstrap}", partitions: {partitions}}}
sinks:
  cloud: {{kind: postgres, host: "{cloud_host}", port: {cloud_port}, user: postgres, database: cloud,
          schema: "{branch}_erp"}}
worker: {{batch_size: {batch_size}, batch_within_s: 1.0}}
""")
    log = workdir / "worker.log"
    with log.open("wb") as handle:
        worker = subprocess.Popen([sys.executable, "-m", "branchline.cli", "worker", str(pipeline)],
                                  stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    first = last = None
    count = 0
    conninfo = f"host={cloud_host} port={cloud_port} user=postgres dbname=cloud"
    try:
        deadline = time.monotonic() + 600
        with psycopg.connect(conninfo, autocommit=True) as conn:
            while time.monotonic() < deadline and worker.poll() is None:
                row = conn.execute("SELECT to_regclass(%s)", (f'"{branch}_erp"."orders"',)).fetchone()
                if row and row[0]:
                    counted = conn.execute(f'SELECT count(*) FROM "{branch}_erp"."orders"').fetchone()
                    count = counted[0] if counted else 0
                    if count and first is None:
                        first = time.monotonic()
                    if count >= expected:
                        last = time.monotonic()
                        break
                time.sleep(0.2)
            if first is not None and last is not None:
                rate = events / (last - first)
                echo(f"worker end to end: {events:,} events -> {expected:,} rows in PostgreSQL in "
                     f"{last - first:.1f} s (first row to last): {rate:,.0f} events/s")
                os.killpg(worker.pid, signal.SIGTERM)  # the ceilings below read the same topic on the same cores
                try:
                    worker.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(worker.pid, signal.SIGKILL)
                    worker.wait()
                faust_rate = faust_delivery(table.topic, events, partitions, bootstrap, batch_size)
                kafka_rate = asyncio.run(aiokafka_delivery(table.topic, events, bootstrap, batch_size))
                echo(f"ceiling: Faust alone, the same topic into a noack_take agent that only acknowledges: "
                     f"{faust_rate:,.0f} events/s")
                echo(f"ceiling: aiokafka alone (getmany, the same topic, nothing else): {kafka_rate:,.0f} events/s")
                return rate
            echo(f"worker did not finish: {count:,}/{expected:,} rows; log: {log}")
            return 0.0
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{branch}_erp" CASCADE')


async def aiokafka_delivery(topic: str, events: int, bootstrap: str, batch_size: int) -> float:
    """Records/s the Kafka client alone reads `topic` at (a fresh group, from the start): the floor under Faust."""
    import uuid

    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"bench-read-{uuid.uuid4().hex[:6]}",
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        read, first = 0, None
        deadline = time.monotonic() + 300
        while read < events and time.monotonic() < deadline:
            for records_ in (await consumer.getmany(timeout_ms=1000, max_records=batch_size)).values():
                first = first or time.monotonic()
                read += len(records_)
        return read / (time.monotonic() - first) if first and read >= events else 0.0
    finally:
        await consumer.stop()


def faust_delivery(topic: str, events: int, partitions: int, bootstrap: str, batch_size: int) -> float:
    """Events/s Faust alone delivers `topic` at, with the worker's settings, into an agent that takes batches
    as the worker does (``noack_take``) and only acknowledges them: the most any worker could do."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "branchline.streams.bench", "faust-delivery-probe", topic, str(events),
               str(partitions), bootstrap, str(batch_size)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    except subprocess.TimeoutExpired:
        return 0.0
    found = re.search(r"DELIVERED ([0-9.]+)", result.stdout + result.stderr)  # Faust logs what agents print
    return float(found.group(1)) if found else 0.0


@click.command("faust-delivery-probe", hidden=True)
@click.argument("topic")
@click.argument("events", type=int)
@click.argument("partitions", type=int)
@click.argument("bootstrap")
@click.argument("batch_size", type=int)
def faust_delivery_probe(topic: str, events: int, partitions: int, bootstrap: str, batch_size: int) -> None:
    """Run a Faust worker whose agent only acknowledges; print ``DELIVERED <events/s>`` and exit."""
    import os
    import tempfile
    import uuid
    from pathlib import Path

    import faust
    from branchline.streams.app import new_faust_app
    from branchline.streams.config import WorkerSettings

    settings = WorkerSettings(batch_size=batch_size)
    app = new_faust_app(f"bench-faust-{uuid.uuid4().hex[:6]}", bootstrap, partitions, 1, settings,
                        Path(tempfile.mkdtemp(prefix="branchline-bench-faust-")))
    source = app.topic(topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    seen = {"events": 0, "first": 0.0}

    @app.agent(source)
    async def deliver(stream: Any) -> None:
        async for batch in stream.noack_take(settings.batch_size, settings.batch_within_s):
            seen["first"] = seen["first"] or time.monotonic()
            seen["events"] += len(batch)
            for event in batch:
                await stream.ack(event)
            if seen["events"] >= events:
                print(f"DELIVERED {seen['events'] / (time.monotonic() - seen['first']):.1f}", flush=True)
                os._exit(0)  # a worker's shutdown takes seconds and measures nothing

    faust.Worker(app, loglevel="warning", quiet=True).execute_from_commandline()


@click.command("worker")
@click.option("--events", default=100_000, show_default=True)
@click.option("--keys", default=50_000, show_default=True)
@click.option("--partitions", default=4, show_default=True)
@click.option("--batch", "batch_size", default=5_000, show_default=True)
@click.option("--bootstrap", default="127.0.0.1:19092", show_default=True)
@click.option("--cloud-port", default=15433, show_default=True)
def worker(events: int, keys: int, partitions: int, batch_size: int, bootstrap: str, cloud_port: int) -> None:
    """End-to-end rate of one worker from a pre-filled topic into the cloud PostgreSQL (local stack)."""
    bench_worker(events, keys=keys, partitions=partitions, batch_size=batch_size, bootstrap=bootstrap,
                 cloud_port=cloud_port, echo=click.echo)


@click.group()
def bench() -> None:
    """Streams benchmarks (print figures)."""


bench.add_command(streams)
bench.add_command(instructions)
bench.add_command(run_stages_only)
bench.add_command(worker)
bench.add_command(faust_delivery_probe)

if __name__ == "__main__":
    bench()
