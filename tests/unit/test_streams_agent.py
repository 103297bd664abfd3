"""The worker's batch logic without a broker: what reaches the sinks, what is dropped, what stops."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from branchline.errors import BadRecordError, ConfigError
from branchline.events import ChangeEvent, Op, TableSchema
from branchline.sinks.contract import SinkCapabilities
from branchline.streams import _envelopes as env
from branchline.streams.app import BatchProcessor, FaustPositions, Record, SourceRoute
from branchline.streams.config import TableTransforms, WorkerSettings

F = env.field
ORDERS = env.Table(prefix="b01.erp", database="erp", table="orders", key=["id"],
                   fields=[F("id", "int64", optional=False), F("code", "string"), env.decimal_field("amount", 12, 2)])
ROUTES = [SourceRoute("erp", "b01", "b01.erp")]


class MemorySink:
    """A sink double that keeps what it was given (the real sinks have their conformance suite)."""

    def __init__(self, durable: bool = True) -> None:
        self.capabilities = SinkCapabilities(durable_on_write=durable)
        self.batches: list[tuple[TableSchema, list[ChangeEvent]]] = []
        self.flushes = 0
        self.fail: Exception | None = None

    async def write_batch(self, table: TableSchema, events: Sequence[ChangeEvent]) -> None:
        if self.fail is not None:
            raise self.fail
        self.batches.append((table, list(events)))

    async def flush(self) -> None:
        self.flushes += 1

    async def close(self) -> None:
        pass


def records(changes: list[tuple[str, int, str | None]], start: int = 0, partition: int = 0) -> list[Record]:
    out = []
    for i, (op, key, code) in enumerate(changes):
        row = {"id": key, "code": code, "amount": env.decimal_bytes(1234)}
        value = ORDERS.value(op, before=row if op == "d" else None, after=None if op == "d" else row,
                             position=("erp-bin.000001", 1000 + 10 * (start + i), 0))
        out.append(Record(ORDERS.topic, partition, start + i, ORDERS.key_record(row), value))
    return out


def processor(sink: MemorySink, **settings: Any) -> BatchProcessor:
    dead: list[tuple[Record, BadRecordError]] = []

    async def dead_letter(record: Record, error: BadRecordError) -> None:
        dead.append((record, error))

    p = BatchProcessor(ROUTES, settings.pop("tables", {}), {"cloud": sink}, {}, WorkerSettings(**settings),
                       dead_letter)
    p.dead = dead  # type: ignore[attr-defined]
    return p


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_batch_reaches_the_sink_collapsed_per_key_in_position_order():
    sink = MemorySink()
    report = run(processor(sink).process(records([("c", 1, "a"), ("c", 2, "b"), ("u", 1, "a2"), ("d", 2, "b")])))
    ((schema, events),) = sink.batches
    assert schema.id.qualified == "erp.orders" and schema.id.branch == "b01"
    assert [(e.op, e.key["id"]) for e in events] == [(Op.UPDATE, 1), (Op.DELETE, 2)]
    assert (report.records, report.changes, report.written) == (4, 4, 2)


def test_a_redelivered_batch_is_dropped_and_counted():
    sink = MemorySink()
    p = processor(sink)
    batch = records([("c", 1, "a"), ("u", 1, "b")])
    run(p.process(batch))
    report = run(p.process(batch))
    assert report.dropped == 2 and report.written == 0 and len(sink.batches) == 1


def test_non_row_records_are_skipped_not_written():
    sink = MemorySink()
    topic, key, value = env.heartbeat("b01.erp")
    tombstone = Record(ORDERS.topic, 0, 9, ORDERS.key_record({"id": 1}), None)
    report = run(processor(sink).process([Record(topic, 0, 0, key, value), tombstone]))
    assert report.skipped == 2 and sink.batches == []


def test_a_bad_record_stops_with_topic_partition_offset_and_nothing_is_written():
    sink = MemorySink()
    good = records([("c", 1, "a")])
    bad = Record(ORDERS.topic, 3, 77, ORDERS.key_record({"id": 5}), b'{"schema": 1')
    with pytest.raises(BadRecordError, match="partition 3 offset 77"):
        run(processor(sink).process([*good, bad]))
    assert sink.batches == []


def test_dlq_routes_the_bad_record_and_writes_the_rest():
    sink = MemorySink()
    p = processor(sink, on_bad_record="dlq")
    bad = Record(ORDERS.topic, 0, 77, ORDERS.key_record({"id": 5}), b"not json")
    report = run(p.process([*records([("c", 1, "a")]), bad]))
    assert report.dead_letters == 1 and len(p.dead) == 1  # type: ignore[attr-defined]
    assert p.dead[0][0] is bad and "offset 77" in str(p.dead[0][1])  # type: ignore[attr-defined]
    assert [e.key["id"] for e in sink.batches[0][1]] == [1]


def test_a_sink_failure_propagates_so_nothing_is_acknowledged_or_recorded():
    sink = MemorySink()
    sink.fail = RuntimeError("target down")
    p = processor(sink)
    batch = records([("c", 1, "a")])
    with pytest.raises(RuntimeError):
        run(p.process(batch))
    sink.fail = None
    report = run(p.process(batch))  # the redelivery after the failure is not mistaken for a duplicate
    assert report.written == 1 and report.dropped == 0


def test_a_sink_that_is_not_durable_on_write_is_flushed_before_the_batch_counts_as_done():
    sink = MemorySink(durable=False)
    run(processor(sink).process(records([("c", 1, "a")])))
    assert sink.flushes == 1


def test_transforms_apply_and_a_wrong_column_is_a_config_error_naming_table_and_column():
    sink = MemorySink()
    tables = {"erp.orders": TableTransforms.model_validate({"exclude": ["amount"], "rename": "orders_v2"})}
    run(processor(sink, tables=tables).process(records([("c", 1, "a")])))
    schema, events = sink.batches[0]
    assert schema.id.table == "orders_v2" and "amount" not in events[0].after
    wrong = {"erp.orders": TableTransforms.model_validate({"exclude": ["amount_eur"]})}
    with pytest.raises(ConfigError, match="amount_eur") as info:
        run(processor(MemorySink(), tables=wrong).process(records([("c", 1, "a")])))
    assert "erp.orders" in str(info.value)


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes, int | None]] = []

    async def send(self, topic, key, value, partition, timestamp, headers):
        self.sent.append((topic, key, value, partition))
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


class FakeFaustTable:
    """The two things `FaustPositions` uses of a Faust table: its local data and its changelog topic."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.app = type("App", (), {"producer": FakeProducer()})()
        self.changelog_topic = type("Topic", (), {"get_topic_name": lambda self: "app-applied-changelog"})()

    @property
    def sent(self) -> list[tuple[int | None, str, str]]:
        import orjson

        return [(partition, orjson.loads(key), orjson.loads(value))
                for _, key, value, partition in self.app.producer.sent]


def test_guard_keys_go_to_the_changelog_partition_of_their_record():
    table = FakeFaustTable()
    store = FaustPositions(table)
    p = BatchProcessor(ROUTES, {}, {"cloud": MemorySink()}, store, WorkerSettings())
    batch = records([("c", 1, "a")], partition=2) + records([("c", 7, "b")], start=1, partition=3)
    run(p.process(batch))
    partitions = {key: partition for partition, key, _ in table.sent}
    assert sorted(partitions.values()) == [2, 3]
    assert all(isinstance(value, str) for _, _, value in table.sent)  # positions exceed JSON's 64-bit ints
    report = run(p.process(batch))
    assert report.dropped == 2


PIPELINE = """
name: unit
branch: b01
sources:
  - {name: erp, kind: mariadb, user: x, databases: [erp]}
kafka: {bootstrap_servers: "127.0.0.1:1"}
worker: {batch_size: 2, batch_within_s: 0.1}
"""


def test_the_faust_agent_takes_batches_and_hands_them_to_the_sinks(tmp_path):
    """The real agent in Faust's in-memory test context (no broker): batches of `batch_size`."""
    from branchline.config import load_pipeline
    from branchline.streams.app import TopicLayout, build_app

    path = tmp_path / "pipeline.yaml"
    path.write_text(PIPELINE)
    sink = MemorySink()
    apps = []
    failures: list[BaseException] = []

    async def scenario() -> None:
        # built inside the running loop, so that Faust binds to it and opens no loop of its own
        app = build_app(load_pipeline(path), TopicLayout([ORDERS.topic], 1), sinks_factory=lambda: {"cloud": sink},
                        on_failure=failures.append)
        app._producer = FakeProducer()  # no broker: the changelog writes land here
        apps.append(app)
        agent = next(iter(app.agents.values()))
        async with agent.test_context() as context:
            for record in records([("c", 1, "a"), ("c", 2, "b"), ("u", 1, "c")]):
                await context.put(key=record.key, value=record.value)
            for _ in range(50):
                if sum(len(events) for _, events in sink.batches) == 3:
                    break
                await asyncio.sleep(0.05)

    try:
        run(scenario())
    finally:
        for app in apps:  # the consumer thread's loop: created by Faust, never started in a test context
            thread = getattr(app._consumer, "_thread", None) if app._consumer is not None else None
            if thread is not None and not thread.thread_loop.is_closed():
                thread.thread_loop.close()
    assert failures == []
    assert [[(e.op, e.key["id"]) for e in events] for _, events in sink.batches] == [
        [(Op.CREATE, 1), (Op.CREATE, 2)], [(Op.UPDATE, 1)]]
    assert len(apps[0]._producer.sent) == 3  # one guard entry per written change, on the changelog


class Message:
    def __init__(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        self.topic, self.key, self.value = topic, key, value


def test_key_check_accepts_primary_key_keys_and_refuses_others():
    from branchline.streams.app import _key_problem
    from branchline.streams.decode import EnvelopeDecoder

    decoder = EnvelopeDecoder("erp", "b01")
    (good,) = records([("c", 1, "a")])
    assert _key_problem(decoder, Message(good.topic, good.key, good.value), partitions=4) is None
    assert "null key" in _key_problem(decoder, Message(good.topic, None, good.value), partitions=4)
    assert _key_problem(decoder, Message(good.topic, None, good.value), partitions=1) is None
    by_code = env.Table(prefix="b01.erp", database="erp", table="orders", key=["code"], fields=ORDERS.fields)
    row = {"id": 1, "code": "a", "amount": env.decimal_bytes(1)}
    problem = _key_problem(decoder, Message(good.topic, by_code.key_record(row), good.value), partitions=4)
    assert problem is None or "primary key" in problem  # a key of row columns: accepted as the key
    foreign = orjson.dumps({"schema": {"type": "struct", "fields": [{"type": "string", "field": "tenant"}]},
                            "payload": {"tenant": "x"}})
    assert "primary-key columns" in _key_problem(decoder, Message(good.topic, foreign, good.value), partitions=4)


def test_offset_tracker_finds_offsets_faust_never_delivered():
    """A rebalance race in faust-streaming drops records below its fetcher's read offset; the
    tracker sees the jump (from the committed offset at the start of a generation, then between
    records) and ignores re-deliveries."""
    from branchline.streams.app import Hole, OffsetTracker

    tracker = OffsetTracker()
    committed = {("t", 0): 10, ("t", 1): None}

    def batch(*offsets: tuple[int, int]) -> list[Record]:
        return [Record("t", partition, offset, None, None) for partition, offset in offsets]

    def holes(records: list[Record], generation: int = 1) -> list[Hole]:
        return tracker.holes(records, generation, lambda topic, partition: committed[(topic, partition)])

    assert holes(batch((0, 10), (0, 11), (1, 5), (1, 6))) == []
    assert holes(batch((0, 12), (0, 15), (1, 7))) == [Hole("t", 0, 13, 15)]
    assert holes(batch((0, 15), (0, 16), (1, 3))) == []  # re-delivered: not a hole, nothing moves back
    assert holes(batch((1, 9))) == [Hole("t", 1, 8, 9)]
    committed[("t", 0)] = 17
    assert holes(batch((0, 20)), generation=2) == [Hole("t", 0, 17, 20)]  # a new generation starts afresh
    assert holes(batch((1, 2), (1, 3)), generation=3) == []  # no committed offset: the first record counts


class BufferingSink(MemorySink):
    """Like the Delta sink: durable only after `flush`, which the caller owes every `commit_interval_s`."""

    def __init__(self, interval: float | None) -> None:
        super().__init__(durable=False)
        self.capabilities = SinkCapabilities(durable_on_write=False, commit_interval_s=interval)
        self.durable: list[ChangeEvent] = []

    async def flush(self) -> None:
        await super().flush()
        self.durable.extend(e for _, events in self.batches for e in events if e not in self.durable)


def test_a_buffering_sink_is_flushed_on_its_interval_and_only_then_are_positions_guarded():
    sink = BufferingSink(interval=60.0)
    now = [100.0]
    store: dict[str, int] = {}
    p = BatchProcessor(ROUTES, {}, {"cloud": sink}, store, WorkerSettings(), clock=lambda: now[0])
    first = run(p.process(records([("c", 1, "a")])))
    second = run(p.process(records([("u", 1, "b")], start=1)))
    assert (first.durable, second.durable, sink.flushes, p.unflushed) == (False, False, 0, 2)
    assert store == {}  # nothing durable yet: the guard must not know these positions
    redelivered = run(p.process(records([("c", 1, "a")])))  # not yet guarded: written again, harmless
    assert redelivered.dropped == 0
    now[0] += 60.0
    assert p.flush_due()
    third = run(p.process(records([("c", 2, "x")], start=2)))
    assert third.durable and sink.flushes == 1 and p.unflushed == 0
    from branchline.events import binlog_position

    assert sorted(store.values()) == [binlog_position("erp-bin.000001", 1000 + 10 * n, 0) for n in (1, 2)]
    assert run(p.process(records([("u", 1, "b")], start=1))).dropped == 1  # now guarded


def test_a_buffering_flush_waits_for_the_caller_when_nothing_new_arrives():
    sink = BufferingSink(interval=5.0)
    now = [0.0]
    p = BatchProcessor(ROUTES, {}, {"cloud": sink}, {}, WorkerSettings(), clock=lambda: now[0])
    run(p.process(records([("c", 1, "a")])))
    assert not p.flush_due() and sink.flushes == 0
    now[0] = 5.0
    assert p.flush_due()
    run(p.flush())  # what the worker's timer (or a rebalance, or shutdown) does
    assert sink.flushes == 1 and p.unflushed == 0 and not p.flush_due()


def test_a_buffering_sink_without_an_interval_is_flushed_after_every_batch():
    sink = BufferingSink(interval=None)
    p = BatchProcessor(ROUTES, {}, {"cloud": sink}, {}, WorkerSettings())
    assert run(p.process(records([("c", 1, "a")]))).durable and sink.flushes == 1


def test_a_durable_sink_next_to_a_buffering_one_waits_for_the_flush_too():
    durable, buffering = MemorySink(), BufferingSink(interval=30.0)
    store: dict[str, int] = {}
    p = BatchProcessor(ROUTES, {}, {"pg": durable, "lake": buffering}, store, WorkerSettings(), clock=lambda: 0.0)
    report = run(p.process(records([("c", 1, "a")])))
    assert not report.durable and len(durable.batches) == 1 and store == {}


def test_worker_consumes_table_topics_but_never_the_signal_or_transaction_topics():
    """The signal table's rows are commands for Debezium (incremental snapshots): consumed like a
    table, they would be written into the target as a table of their own."""
    from pathlib import Path

    from branchline.config import load_pipeline
    from branchline.streams.app import routes_of, table_topics

    config = load_pipeline(Path(__file__).parents[2] / "examples" / "pipeline.yaml")
    routes = routes_of(config)
    erp = next(r for r in routes if r.name == "erp")
    names = [f"{erp.topic_prefix}.erp.orders", f"{erp.topic_prefix}.branchline.heartbeat",
             f"{erp.topic_prefix}.branchline.debezium_signal", f"{erp.topic_prefix}.transaction",
             "other.erp.orders", f"__branchline-schema-history.{erp.topic_prefix}"]
    assert erp.signal_topic == f"{erp.topic_prefix}.branchline.debezium_signal"
    assert table_topics(names, routes) == sorted([f"{erp.topic_prefix}.branchline.heartbeat",
                                                  f"{erp.topic_prefix}.erp.orders"])
