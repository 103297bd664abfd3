"""The runner's drain and a buffering sink (durable only after `flush`, like Delta): batches are written
as they come, but the spool forgets them only after a flush, which happens on the sink's commit
interval, on idle exit and on shutdown. A durable-on-write sink is never flushed and acknowledged each
round. Pure unit tests: a real spool file, a recording in-memory sink, no sources."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
from branchline import metrics
from branchline.config import load_pipeline
from branchline.errors import RetryableSinkError
from branchline.events import ChangeEvent, Column, ColumnType, Op, TableId, TableSchema
from branchline.runtime.runner import Runner
from branchline.sinks.contract import SinkCapabilities

TABLE = TableId(source="erp", branch="hq", database="erp", table="orders")
SCHEMA = TableSchema(id=TABLE, columns=(Column(name="id", type=ColumnType.INT64),
                                        Column(name="v", type=ColumnType.STRING)), primary_key=("id",))


def events(first: int, count: int) -> list[ChangeEvent]:
    return [ChangeEvent(op=Op.CREATE, table=TABLE, key={"id": i}, after={"id": i, "v": f"v{i}"}, position=i,
                        source_ts=datetime(2024, 1, 1, tzinfo=UTC)) for i in range(first, first + count)]


class RecordingSink:
    """Keeps what was written; ``durable`` holds what a flush made durable. Records the spool's size at
    each flush, to prove the drain acknowledges only after it."""

    def __init__(self, runner: Runner, *, durable_on_write: bool, commit_interval_s: float | None,
                 fail_flushes: int = 0) -> None:
        self.capabilities = SinkCapabilities(durable_on_write=durable_on_write, commit_interval_s=commit_interval_s)
        self.runner = runner
        self.buffer: list[int] = []
        self.durable: list[int] = []
        self.writes = 0
        self.flushes: list[int] = []
        """Spooled batches still held when each successful flush began."""
        self.fail_flushes = fail_flushes
        self.fail_writes: set[int] = set()
        """Numbers of the write_batch calls (1-based) that fail with a retryable error."""

    async def write_batch(self, table: TableSchema, batch: Sequence[ChangeEvent]) -> None:
        self.writes += 1
        if self.writes in self.fail_writes:
            raise RetryableSinkError("`target` must be reachable; got a refused connection")
        self.buffer.extend(e.key["id"] for e in batch)

    async def flush(self) -> None:
        if self.fail_flushes:
            self.fail_flushes -= 1
            self.buffer.clear()  # the worst case: the failed commit lost the buffer
            raise RetryableSinkError("`target` must be reachable; got a refused connection")
        self.flushes.append(self.runner.spool.batches)
        self.durable.extend(self.buffer)
        self.buffer.clear()

    async def close(self) -> None:
        pass


class Capture:
    """Stands in for a capture thread that is still running."""

    def __init__(self) -> None:
        self.alive = True

    def is_alive(self) -> bool:
        return self.alive

    def join(self, timeout: float | None = None) -> None:
        pass


def make_runner(tmp_path: Path, exit_when_idle_s: float | None = None, batch_size: int = 5000) -> Runner:
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"""
name: unit
branch: hq
sources:
  - name: erp
    kind: mariadb
    host: 127.0.0.1
    port: 1
    user: u
    password: p
    databases: [erp]
sinks:
  lake:
    kind: delta
    uri: {tmp_path / 'lake'}
runtime:
  capture_processes: false
  batch_size: {batch_size}
""")
    return Runner(load_pipeline(path), spool_path=tmp_path / "spool.sqlite", exit_when_idle_s=exit_when_idle_s)


async def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def spool_three_batches(runner: Runner) -> None:
    for first in (1, 11, 21):
        runner.spool.append("erp", events(first, 10), {TABLE: SCHEMA})


def test_buffering_sink_is_acknowledged_only_after_the_flush_on_shutdown(tmp_path):
    runner = make_runner(tmp_path)
    sink = RecordingSink(runner, durable_on_write=False, commit_interval_s=3600)
    spool_three_batches(runner)

    async def scenario() -> None:
        runner._loop, runner._wake = asyncio.get_running_loop(), asyncio.Event()
        drain = asyncio.create_task(runner._drain({"lake": sink}, {}, [Capture()]))  # type: ignore[list-item]
        await wait_for(lambda: len(sink.buffer) == 30)
        await asyncio.sleep(0.3)  # several idle rounds: no flush before the interval, nothing acknowledged
        assert sink.flushes == [] and runner.spool.batches == 3 and runner.stats.written == 0
        runner.spool.append("erp", events(31, 5), {TABLE: SCHEMA})
        await wait_for(lambda: len(sink.buffer) == 35)
        runner.stop.set()
        await asyncio.wait_for(drain, 10)

    asyncio.run(scenario())
    assert sink.flushes == [4]  # one flush, while the spool still held every batch
    assert sorted(sink.durable) == list(range(1, 36))
    assert runner.spool.batches == 0 and runner.stats.written == 35
    runner.spool.close()


def test_buffering_sink_is_flushed_when_its_commit_interval_has_passed(tmp_path):
    runner = make_runner(tmp_path)
    sink = RecordingSink(runner, durable_on_write=False, commit_interval_s=0.2)
    capture = Capture()
    spool_three_batches(runner)

    async def scenario() -> None:
        runner._loop, runner._wake = asyncio.get_running_loop(), asyncio.Event()
        drain = asyncio.create_task(runner._drain({"lake": sink}, {}, [capture]))  # type: ignore[list-item]
        await wait_for(lambda: len(sink.flushes) == 1)  # the capture is still running: only the interval flushes
        await wait_for(lambda: runner.spool.batches == 0)
        runner.spool.append("erp", events(31, 5), {TABLE: SCHEMA})
        await wait_for(lambda: len(sink.flushes) == 2)
        capture.alive = False
        await asyncio.wait_for(drain, 10)

    asyncio.run(scenario())
    assert sink.flushes == [3, 1]
    assert sorted(sink.durable) == list(range(1, 36)) and runner.stats.written == 35
    runner.spool.close()


def test_buffering_sink_is_flushed_before_an_idle_exit(tmp_path):
    runner = make_runner(tmp_path, exit_when_idle_s=0)
    sink = RecordingSink(runner, durable_on_write=False, commit_interval_s=3600)
    spool_three_batches(runner)

    async def scenario() -> None:
        runner._loop, runner._wake = asyncio.get_running_loop(), asyncio.Event()
        await asyncio.wait_for(runner._drain({"lake": sink}, {}, []), 10)

    asyncio.run(scenario())
    assert sink.flushes == [3]
    assert sorted(sink.durable) == list(range(1, 31)) and runner.spool.batches == 0
    runner.spool.close()


def test_a_failed_flush_writes_the_unflushed_batches_again_and_acknowledges_nothing_before(tmp_path):
    metrics.reset()
    runner = make_runner(tmp_path, exit_when_idle_s=0)
    sink = RecordingSink(runner, durable_on_write=False, commit_interval_s=3600, fail_flushes=1)
    spool_three_batches(runner)

    async def scenario() -> None:
        runner._loop, runner._wake = asyncio.get_running_loop(), asyncio.Event()
        await asyncio.wait_for(runner._drain({"lake": sink}, {}, []), 20)

    asyncio.run(scenario())
    assert sink.flushes == [3]  # the failed one left all three in the spool
    assert sorted(sink.durable) == list(range(1, 31))  # written again after the buffer was lost
    assert sink.writes == 2 and runner.spool.batches == 0 and runner.stats.sink_down_since is None
    labels = {"component": "sink", "name": "lake"}
    # a sink's own errors are counted by its retry loop (sinks/_retry.py), never a second time by the runner
    assert metrics.sample("branchline_errors_total", {**labels, "kind": "RetryableSinkError"}) is None
    assert metrics.sample("branchline_retries_total", labels) == 1
    runner.spool.close()


@pytest.mark.parametrize("interval", [None, 3600])
def test_durable_on_write_sink_is_never_flushed_and_acknowledged_each_round(tmp_path, interval):
    runner = make_runner(tmp_path)
    sink = RecordingSink(runner, durable_on_write=True, commit_interval_s=interval)
    capture = Capture()
    spool_three_batches(runner)

    async def scenario() -> None:
        runner._loop, runner._wake = asyncio.get_running_loop(), asyncio.Event()
        drain = asyncio.create_task(runner._drain({"pg": sink}, {}, [capture]))  # type: ignore[list-item]
        await wait_for(lambda: runner.spool.batches == 0)
        assert runner.stats.written == 30
        capture.alive = False
        await asyncio.wait_for(drain, 10)

    asyncio.run(scenario())
    assert sink.flushes == [] and sorted(sink.buffer) == list(range(1, 31))
    runner.spool.close()


def test_a_backlog_is_read_ahead_in_order_and_a_failed_round_is_read_again(tmp_path):
    runner = make_runner(tmp_path, exit_when_idle_s=0, batch_size=10)  # every round is full: read-ahead on
    sink = RecordingSink(runner, durable_on_write=True, commit_interval_s=None)
    sink.fail_writes = {2}
    for first in range(1, 60, 10):
        runner.spool.append("erp", events(first, 10), {TABLE: SCHEMA})

    async def scenario() -> None:
        runner._loop, runner._wake = asyncio.get_running_loop(), asyncio.Event()
        await asyncio.wait_for(runner._drain({"pg": sink}, {}, []), 20)

    asyncio.run(scenario())
    assert sink.buffer == list(range(1, 61))  # in spool order, the failed round once
    assert runner.spool.batches == 0 and runner.stats.written == 60 and runner._prefetch is None
    runner.spool.close()
