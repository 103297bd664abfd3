"""The distributed runtime's worker: Faust agents that consume the Debezium topics in batches, decode,
transform, deduplicate and hand each batch to the sinks; offsets move only after the sinks made it
durable.

Split in two so that the batch logic is testable without a broker:

- `BatchProcessor`: records in, durable writes out (decode -> transforms -> guard -> collapse ->
  sinks -> guard record). Pure asyncio, no Faust.
- `build_app`: the Faust app around it. The agent takes batches with ``stream.noack_take(n, within)``,
  which never acknowledges by itself (``stream.take`` acknowledges a batch when the generator
  resumes *or is closed*, so an exception inside the batch would acknowledge unwritten records).
  Each event is acknowledged with ``stream.ack`` after `BatchProcessor.process` returned; Faust then
  commits acknowledged offsets on its commit interval. A failure stops the worker before any
  acknowledgement: the batch is delivered again to whichever worker owns the partitions next, and
  the sinks' position guard plus the applied-positions table make the replay harmless.

A sink that buffers (``capabilities.durable_on_write`` False, e.g. Delta) is flushed only when its
``commit_interval_s`` has passed since the last flush, when a rebalance starts, and on shutdown; the
batches written since the last flush stay unacknowledged, and their positions stay out of the guard,
until that flush returns.

The applied-positions guard is a Faust table keyed like the source topics' partitions: each key is
written to the changelog partition of the record it came from, so the worker that owns a partition
after a rebalance restores exactly the keys it will see.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from branchline.errors import BadRecordError, BranchlineError, ConfigError, FatalSourceError
from branchline.events import OP_TRUNCATE, ChangeEvent, TableId, TableSchema
from branchline.paths import state_dir
from branchline.sinks.contract import Sink
from branchline.streams.config import TableTransforms, WorkerSettings
from branchline.streams.decode import EnvelopeDecoder, RowChange, Tombstone
from branchline.streams.dedupe import AppliedPositions, GuardStats, Segment, key_token
from branchline.streams.transforms import CompiledTransform, compile_transforms

log = logging.getLogger("branchline.streams")


@dataclass(frozen=True, slots=True)
class Record:
    """One Kafka record as the agent hands it over."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True, slots=True)
class SourceRoute:
    """Which pipeline source a topic belongs to: Debezium topics are ``<branch>.<source>.<ns>.<table>``."""

    name: str
    branch: str
    topic_prefix: str
    signal_topic: str | None = None
    """The topic of the source's Debezium signal table: control rows for the connector (incremental
    snapshots), never consumed, so they never reach the target as a table."""


@dataclass
class BatchReport:
    """What one batch did; the worker logs it and tests check it."""

    records: int = 0
    changes: int = 0
    written: int = 0
    dropped: int = 0
    dead_letters: int = 0
    skipped: int = 0
    """Records that are not rows: tombstones, heartbeats, transaction markers, DDL."""
    segments: int = 0
    durable: bool = True
    """Everything written so far is durable: this batch (and any held before it) may be acknowledged.
    False while a buffering sink waits for its commit interval."""
    prepare_s: float = 0.0
    """Decode, transform and dedupe."""
    write_s: float = 0.0
    """Sink writes, flushes and the guard's changelog."""


@dataclass
class PreparedBatch:
    """A batch decoded, transformed and collapsed, waiting for `BatchProcessor.write`."""

    report: BatchReport
    segments: list[Segment]
    partitions: dict[tuple[int, Any], int]


class FaustPositions(MutableMapping[str, int]):
    """`AppliedPositions`' store on a Faust table: reads the table's local data; each write goes to the
    changelog partition of the source record it came from (``partitions``, filled per batch).

    Why not ``table[key] = value``: Faust sends one changelog message per assignment through its
    producer buffer, one awaited publish at a time (about 4,000 per batch here, and the main cost of
    a batch). The writes are queued instead and `flush` hands them to the producer together and waits
    until Kafka has them all, before the batch's offsets are acknowledged."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self.partitions: dict[str, int] = {}
        self.pending: list[tuple[int | None, str, str]] = []

    def __getitem__(self, key: str) -> int:
        value = self.table.data.get(key)
        if value is None:
            raise KeyError(key)
        return int(value)

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        value = self.table.data.get(key)
        return default if value is None else int(value)

    def __setitem__(self, key: str, value: int) -> None:
        # positions exceed 64 bits (binlog file << 64): stored as decimal text, JSON has no such ints
        text = str(value)
        self.table.data[key] = text
        self.pending.append((self.partitions.get(key), key, text))

    def __delitem__(self, key: str) -> None:
        del self.table.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.table.data)

    def __len__(self) -> int:
        return len(self.table.data)

    async def flush(self) -> None:
        """Send the queued changelog writes (JSON key and value, as the table reads them back)."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        producer = self.table.app.producer
        topic = self.table.changelog_topic.get_topic_name()
        futures = []
        for partition, key, text in pending:
            futures.append(await producer.send(topic, orjson.dumps(key), orjson.dumps(text), partition, None, None))
        await asyncio.gather(*futures)


DeadLetter = Callable[[Record, BadRecordError], Awaitable[None]]


def table_of_topic(topic: str, route: SourceRoute | None) -> TableId:
    """A best-effort `TableId` for a record that could not be decoded (for errors and metrics)."""
    rest = topic[len(route.topic_prefix) + 1:] if route and topic.startswith(route.topic_prefix + ".") else topic
    namespace, _, table = rest.rpartition(".")
    return TableId(source=route.name if route else "unknown", branch=route.branch if route else "unknown",
                   database=namespace or "unknown", table=table or topic)


class BatchProcessor:
    """Decode, transform, deduplicate and write one batch of records; see the module doc."""

    def __init__(self, routes: Sequence[SourceRoute], tables: Mapping[str, TableTransforms],
                 sinks: Mapping[str, Sink], store: MutableMapping[str, int], settings: WorkerSettings,
                 dead_letter: DeadLetter | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if settings.on_bad_record == "dlq" and dead_letter is None:
            raise ConfigError("`worker.on_bad_record` dlq must have a dead-letter producer; got None")
        self.routes = sorted(routes, key=lambda r: -len(r.topic_prefix))
        self.tables = dict(tables)
        self.sinks = dict(sinks)
        self.settings = settings
        self.dead_letter = dead_letter
        self.store = store
        self.guard = AppliedPositions(store)
        self._decoders = {r.topic_prefix: EnvelopeDecoder(r.name, r.branch) for r in routes}
        self._topic_routes: dict[str, SourceRoute | None] = {}
        self._compiled: dict[int, tuple[TableSchema, CompiledTransform]] = {}
        self.buffering = {name: sink for name, sink in self.sinks.items()
                          if getattr(sink.capabilities, "durable_on_write", True) is False}
        intervals = [interval for sink in self.buffering.values()
                     if (interval := getattr(sink.capabilities, "commit_interval_s", None)) is not None]
        self.flush_interval_s: float | None = min(intervals) if intervals and len(intervals) == len(
            self.buffering) else None
        """Seconds between flushes of the buffering sinks; None: flush after every batch."""
        self.clock = clock
        self._last_flush = clock()
        self._unflushed: list[tuple[list[Segment], dict[tuple[int, Any], int]]] = []

    @property
    def unflushed(self) -> int:
        """Batches written into a buffering sink and not yet flushed (not acknowledged, not guarded)."""
        return len(self._unflushed)

    def flush_due(self) -> bool:
        """True when the buffering sinks should be flushed now (their commit interval has passed)."""
        if not self._unflushed:
            return False
        if self.flush_interval_s is None:
            return True
        return self.clock() - self._last_flush >= self.flush_interval_s

    async def flush(self) -> None:
        """Make every batch written so far durable, then store its positions in the guard.

        Called by `process` when `flush_due`, and by the worker on a timer, when a rebalance starts
        and at shutdown. The guard learns a position only after the sinks made it durable."""
        if not self._unflushed:
            self._last_flush = self.clock()
            return
        for sink in self.buffering.values():
            await sink.flush()
        batches, self._unflushed = self._unflushed, []
        self._last_flush = self.clock()
        await self._record(batches)

    async def _record(self, batches: list[tuple[list[Segment], dict[tuple[int, Any], int]]]) -> None:
        mapping: dict[str, int] = {}
        for segments, partitions in batches:
            mapping.update(self._partitions_of(segments, partitions))
        if isinstance(self.store, FaustPositions):
            self.store.partitions = mapping
        for segments, _ in batches:
            self.guard.record(segments)
        if isinstance(self.store, FaustPositions):
            await self.store.flush()

    def route(self, topic: str) -> SourceRoute | None:
        if topic not in self._topic_routes:
            found = None
            for route in self.routes:
                if topic.startswith(route.topic_prefix + ".") or topic.endswith("." + route.topic_prefix):
                    found = route
                    break
            self._topic_routes[topic] = found
        return self._topic_routes[topic]

    def transform_for(self, schema: TableSchema) -> CompiledTransform:
        """The compiled transforms of a table schema; a `ConfigError` naming table and column if the
        ``tables:`` entry does not fit the real columns."""
        cached = self._compiled.get(id(schema))
        if cached is not None and cached[0] is schema:
            return cached[1]
        name = schema.id.qualified
        compiled = compile_transforms(schema, self.tables.get(name), name=name)
        self._compiled[id(schema)] = (schema, compiled)
        return compiled

    async def _bad(self, record: Record, error: BadRecordError, report: BatchReport) -> None:
        route = self.route(record.topic)
        located = BadRecordError(f"{error} [topic {record.topic} partition {record.partition} offset {record.offset}]")
        if self.settings.on_bad_record != "dlq" or self.dead_letter is None:
            raise located from error
        await self.dead_letter(record, located)
        report.dead_letters += 1
        from branchline import metrics

        metrics.observe_dead_letter(table_of_topic(record.topic, route))

    async def process(self, records: Sequence[Record]) -> BatchReport:
        """Make one batch durable in every sink. Raises (and acknowledges nothing) on a bad record
        when ``on_bad_record`` is ``stop``, on a config error, or when a sink gives up."""
        return await self.write(await self.prepare(records))

    async def prepare(self, records: Sequence[Record]) -> PreparedBatch:
        """Decode, transform and deduplicate one batch; nothing is written yet.

        The worker prepares the next batch while the previous one is being written: the guard may
        then admit a change that the batch in flight also holds; the sinks' position guard keeps
        such a repeat harmless, and the guard only learns positions once they are durable."""
        from branchline import metrics

        report = BatchReport(records=len(records))
        began = time.perf_counter()
        pairs: list[tuple[ChangeEvent, TableSchema]] = []
        partitions: dict[tuple[int, Any], int] = {}
        read: dict[tuple[str, str], list[ChangeEvent]] = {}
        for record in records:
            route = self.route(record.topic)
            if route is None:
                report.skipped += 1
                continue
            decoder = self._decoders[route.topic_prefix]
            try:
                result = decoder.decode(record.topic, record.key, record.value)
                if not isinstance(result, RowChange):
                    report.skipped += 1
                    continue
                compiled = self.transform_for(result.schema)
                event = compiled.apply_owned(result.event)
            except BadRecordError as exc:
                await self._bad(record, exc, report)
                continue
            if event is None:
                continue
            pairs.append((event, compiled.schema))
            # by the table object's identity: hashing a TableId (pydantic, five fields) per change costs more
            partitions[(id(event.table), None if event.op is OP_TRUNCATE else key_token(event))] = record.partition
            read.setdefault((route.branch, route.name), []).append(event)
        report.changes = len(pairs)
        for (branch, source), events in read.items():
            metrics.observe_changes_read(branch, source, events)
        stats = GuardStats()
        segments = self.guard.dedupe(pairs, stats)
        report.dropped = stats.dropped
        for table, count in stats.dropped_tables.items():
            metrics.observe_duplicates_dropped(table, count)
        report.segments = len(segments)
        report.prepare_s = time.perf_counter() - began
        return PreparedBatch(report, segments, partitions)

    async def write(self, prepared: PreparedBatch) -> BatchReport:
        """Write a prepared batch into every sink (in the order batches were prepared); see `process`."""
        report, segments, partitions = prepared.report, prepared.segments, prepared.partitions
        written = time.perf_counter()
        await self._write(segments)
        if self.buffering:
            self._unflushed.append((segments, partitions))
            if self.flush_due():
                await self.flush()
            report.durable = not self._unflushed
        else:
            await self._record([(segments, partitions)])
        report.write_s = time.perf_counter() - written
        report.written = sum(len(s.events) for s in segments)
        return report

    async def _write(self, segments: list[Segment]) -> None:
        from branchline import metrics

        for segment in segments:
            for name, sink in self.sinks.items():
                began = time.monotonic()
                await sink.write_batch(segment.schema, segment.events)
                metrics.observe_batch_written(segment.table, name, segment.events, time.monotonic() - began)

    def _partitions_of(self, segments: list[Segment], partitions: dict[tuple[int, Any], int]) -> dict[str, int]:
        """Which changelog partition each guard key of a Faust-backed store belongs to."""
        mapping: dict[str, int] = {}
        if not isinstance(self.store, FaustPositions):
            return mapping
        for segment in segments:
            for event in segment.events:
                truncate = event.op is OP_TRUNCATE
                partition = partitions.get((id(event.table), None if truncate else key_token(event)))
                if partition is not None:
                    mapping[self.guard._key(event.table, None if truncate else event.key)] = partition
        return mapping


@dataclass(frozen=True, slots=True)
class Hole:
    """Offsets ``start`` up to (not including) ``end`` of one partition that never reached the agent."""

    topic: str
    partition: int
    start: int
    end: int


class OffsetTracker:
    """Finds offsets that Faust skipped: the next offset each partition must deliver, per consumer
    generation.

    Why: around a rebalance faust-streaming 0.15 seeks every partition back to its committed offset
    twice (stream resume, then table recovery done) while its fetcher may still deliver records of
    the first read; the fetcher's read offset then runs ahead and the re-read records below it are
    dropped ("DROPPED MESSAGE ROFF", a dev-only log), and records queued in between are cleared on
    resume. Those records never reach the agent in this generation, Faust's commit stops just before
    them, and nothing reads them again until the next rebalance: a change that is a key's last one
    stays missing in the target. The tracker sees the jump in offsets instead of trusting Faust.

    A jump can also be legitimate (transaction markers, compaction): reading the range shows that,
    and the worker then tells Faust to treat it as a gap.
    """

    def __init__(self) -> None:
        self.generation: Any = None
        self.expected: dict[tuple[str, int], int] = {}

    def holes(self, records: Sequence[Record], generation: Any,
              committed: Callable[[str, int], int | None]) -> list[Hole]:
        """The holes before and between `records` (in delivery order); moves the expected offsets on.
        ``committed`` gives the partition's committed offset: where a new generation starts."""
        if generation != self.generation:
            self.generation = generation
            self.expected = {}
        found: list[Hole] = []
        expected = self.expected
        for record in records:
            tp = (record.topic, record.partition)
            want = expected.get(tp)
            if want is None:
                want = committed(record.topic, record.partition)
            if want is not None and record.offset > want:
                found.append(Hole(record.topic, record.partition, want, record.offset))
            if want is None or record.offset >= want:
                expected[tp] = record.offset + 1
        return found


async def read_holes(bootstrap: str, holes: Sequence[Hole], timeout_s: float = 30.0) -> list[Record]:
    """The records in `holes`, read directly from the broker (in offset order per partition).

    Raises `InfraError` if they cannot be read within `timeout_s`: stopping is better than going on
    without them."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from branchline.errors import InfraError

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    out: list[Record] = []
    try:
        wanted: dict[Any, list[Hole]] = {}
        for hole in holes:
            wanted.setdefault(TopicPartition(hole.topic, hole.partition), []).append(hole)
        consumer.assign(list(wanted))
        pending: dict[Any, tuple[int, int]] = {}
        for tp, parts in wanted.items():
            start, end = min(h.start for h in parts), max(h.end for h in parts)
            consumer.seek(tp, start)
            pending[tp] = (start, end)
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise InfraError(f"`kafka` offsets {sorted((tp.topic, tp.partition, r) for tp, r in pending.items())!r} "
                                 f"must be readable to fill what the consumer skipped; got nothing in {timeout_s} s")
            batch = await consumer.getmany(*pending, timeout_ms=500)
            for tp, messages in batch.items():
                if tp not in pending:
                    continue
                parts = wanted[tp]
                for message in messages:
                    if any(h.start <= message.offset < h.end for h in parts):
                        out.append(Record(message.topic, message.partition, message.offset, message.key,
                                          message.value))
                    if message.offset + 1 >= pending[tp][1]:
                        pending.pop(tp, None)
                        break
            if pending:  # a range that ends in markers or compacted records: stop at the end offset
                ends = await consumer.end_offsets(list(pending))
                for tp in list(pending):
                    if await consumer.position(tp) >= min(pending[tp][1], ends[tp]):
                        pending.pop(tp, None)
    finally:
        await _stop_quietly(consumer)
    return out


# -- start-up checks -------------------------------------------------------------------------------


@dataclass
class TopicLayout:
    """The source topics a worker consumes and their partition count (one count for all: Faust
    co-partitions them with the applied-positions table)."""

    topics: list[str]
    partitions: int
    counts: dict[str, int] = field(default_factory=dict)


def table_topics(names: Iterable[str], routes: Sequence[SourceRoute]) -> list[str]:
    """The topics a worker consumes among the broker's `names`: each source's table topics (the
    heartbeat table's included: it carries lag), without its transaction and signal topics."""
    signals = {r.signal_topic for r in routes}
    return sorted(
        t for t in names
        if any(t.startswith(r.topic_prefix + ".") for r in routes) and not t.endswith(".transaction")
        and t not in signals
    )


async def discover_topics(bootstrap: str, routes: Sequence[SourceRoute]) -> TopicLayout:
    """The table topics of the configured sources (``<branch>.<source>.<ns>.<table>``) on the broker."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        topics = table_topics(await admin.list_topics(), routes)
        described = await admin.describe_topics(topics) if topics else []
        counts = {d["topic"]: len(d["partitions"]) for d in described}
    finally:
        await admin.close()
    if not topics:
        prefixes = [r.topic_prefix + ".*" for r in routes]
        raise FatalSourceError(f"`kafka` must hold the source topics {prefixes!r} (are the connectors applied?); "
                               f"got none at {bootstrap}")
    distinct = set(counts.values())
    if len(distinct) > 1:
        raise ConfigError(f"`kafka.partitions` of the source topics must be equal (Faust co-partitions them); "
                          f"got {counts!r}")
    return TopicLayout(topics, distinct.pop(), counts)


async def check_topic_keys(bootstrap: str, layout: TopicLayout, routes: Sequence[SourceRoute],
                           sample: int = 50) -> list[str]:
    """Problems that make per-key dedupe wrong: records keyed by something else than the primary key.

    Reads up to `sample` of the newest records of every partition and checks that each row change
    has a key when its topic has more than one partition, and that the key's fields are columns
    of the row with the same values (Debezium keys a record by the primary key unless
    ``message.key.columns`` or a key-changing transform says otherwise)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    processor_routes = sorted(routes, key=lambda r: -len(r.topic_prefix))
    decoders = {r.topic_prefix: EnvelopeDecoder(r.name, r.branch) for r in routes}
    problems: list[str] = []
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in layout.topics for p in range(layout.counts.get(t, 0))]
        if not tps:
            return problems
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        begins = await consumer.beginning_offsets(tps)
        wanted = {}
        for tp in tps:
            start = max(begins[tp], ends[tp] - sample)
            if ends[tp] > start:
                consumer.seek(tp, start)
                wanted[tp] = ends[tp]
        deadline = time.monotonic() + 10
        while wanted and time.monotonic() < deadline:
            batch = await consumer.getmany(*wanted, timeout_ms=500)
            for tp, messages in batch.items():
                for message in messages:
                    route = next((r for r in processor_routes if message.topic.startswith(r.topic_prefix + ".")), None)
                    if route is None:
                        continue
                    problem = _key_problem(decoders[route.topic_prefix], message, layout.partitions)
                    if problem and problem not in problems:
                        problems.append(problem)
                    if message.offset + 1 >= wanted.get(tp, 0):
                        wanted.pop(tp, None)
    finally:
        await _stop_quietly(consumer)
    return problems


async def _stop_quietly(consumer: Any) -> None:
    """aiokafka 0.14 lets the cancellation of its own committed-offsets task escape `stop()` after
    `assign()` without a group; swallow that one, never a cancellation of the caller."""
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


def _key_problem(decoder: EnvelopeDecoder, message: Any, partitions: int) -> str | None:
    try:  # decoded without its key: the key is what is being checked
        result = decoder.decode(message.topic, None, message.value)
    except BadRecordError:
        return None  # the worker reports bad records itself, with their position
    if isinstance(result, Tombstone) or not isinstance(result, RowChange) or result.event.op is OP_TRUNCATE:
        return None
    if message.key is None:
        if partitions > 1:
            return (f"`{message.topic}` records must be keyed by the primary key when the topic has "
                    f"{partitions} partitions (a table without a key needs one partition); got a null key")
        return None
    try:
        key = orjson.loads(message.key)
    except orjson.JSONDecodeError:
        return f"`{message.topic}` keys must be JsonConverter JSON; got {message.key[:80]!r}"
    payload = key.get("payload") if isinstance(key, dict) else None
    fields = list(payload) if isinstance(payload, dict) else []
    row = result.event.row or {}
    if not fields or any(f not in row for f in fields):
        return (f"`{message.topic}` records must be keyed by primary-key columns of the row; "
                f"got key fields {fields!r}")
    return None


# -- the Faust app ---------------------------------------------------------------------------------


FETCH_BYTES_PER_PARTITION = 16 << 20
"""Bytes one fetch may return per partition. Faust's default (1 MiB) holds only ~120 Debezium
envelopes (each carries its schema, ~8 kB), so a 5,000-record batch needed a dozen fetch round
trips through Faust's consumer thread."""


def routes_of(config: Any) -> list[SourceRoute]:
    """The routes of a `PipelineConfig`'s sources."""
    return [SourceRoute(s.name, s.branch, s.topic_prefix, f"{s.topic_prefix}.{s.signal_table}") for s in config.sources]


def new_faust_app(app_id: str, bootstrap_servers: str, partitions: int, replication_factor: int,
                  settings: WorkerSettings, datadir: Path) -> Any:
    """A Faust app with the worker's consumer settings (the worker's, and the benchmark's delivery probe's)."""
    import faust
    from faust.sensors.monitor import Monitor

    class PerBatchMonitor(Monitor):
        """Faust's monitor without its per-message bookkeeping (Branchline's metrics count batches)."""

        def on_message_in(self, tp: Any, offset: int, message: Any) -> None:
            pass

        def on_stream_event_in(self, tp: Any, offset: int, stream: Any, event: Any) -> Any:
            return None

        def on_stream_event_out(self, tp: Any, offset: int, stream: Any, event: Any, state: Any = None) -> None:
            pass

        def on_message_out(self, tp: Any, offset: int, message: Any) -> None:
            pass

    return faust.App(
        app_id,
        broker=f"kafka://{bootstrap_servers}",
        store="memory://",
        datadir=str(datadir),
        topic_partitions=partitions,
        topic_replication_factor=replication_factor,
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        broker_commit_interval=1.0,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=max(0.5, settings.session_timeout_s / 10),
        stream_buffer_maxsize=max(4096, settings.batch_size * 2),
        table_standby_replicas=0,
        broker_max_poll_records=max(500, settings.batch_size),
        consumer_max_fetch_size=FETCH_BYTES_PER_PARTITION,
        monitor=PerBatchMonitor(),
    )


def build_app(config: Any, layout: TopicLayout, *, sinks_factory: Callable[[], Mapping[str, Sink]] | None = None,
              settings: WorkerSettings | None = None,
              on_failure: Callable[[BaseException], None] | None = None) -> Any:
    """The Faust app of one pipeline file: one agent over every source topic, one guard table.

    ``on_failure`` (default `fail_stop`, which exits the process) is called with the error of a
    batch that could not be made durable, before anything of it is acknowledged."""
    failed = on_failure or fail_stop
    settings = settings or (config.worker if isinstance(config.worker, WorkerSettings) else WorkerSettings())
    kafka = config.kafka
    app = new_faust_app(f"branchline-{config.name}", kafka.bootstrap_servers, layout.partitions,
                        kafka.replication_factor, settings, _faust_datadir(config.name))
    source = app.topic(*layout.topics, key_type=bytes, value_type=bytes, key_serializer="raw",
                       value_serializer="raw")
    applied = app.Table("applied-positions", default=None, partitions=layout.partitions, key_type=str,
                        value_type=str)
    dlq = app.topic(settings.dlq_topic, key_type=bytes, value_type=bytes, key_serializer="raw",
                    value_serializer="raw")
    state: dict[str, Any] = {}

    async def dead_letter(record: Record, error: BadRecordError) -> None:
        body = {"error": str(error), "topic": record.topic, "partition": record.partition, "offset": record.offset,
                "key": None if record.key is None else record.key.decode("utf-8", "replace"),
                "value": None if record.value is None else record.value.decode("utf-8", "replace")}
        future = await dlq.send(key=record.key, value=orjson.dumps(body))
        await future  # durable in the dead-letter topic before the record's offset may move

    def processor() -> BatchProcessor:
        if "processor" not in state:
            if sinks_factory is not None:
                sinks = sinks_factory()
            else:
                from branchline.sinks.build import build_sink

                sinks = {name: build_sink(sink_config, name) for name, sink_config in config.sinks.items()}
            from branchline import metrics

            # heartbeat rows are measured when they reach a sink, never written into the target
            sinks = {name: metrics.skip_heartbeat_writes(sink) for name, sink in sinks.items()}
            state["processor"] = BatchProcessor(routes_of(config), config.tables, sinks, FaustPositions(applied),
                                                settings, dead_letter)
        processor: BatchProcessor = state["processor"]
        return processor

    tracker = OffsetTracker()
    lock = asyncio.Lock()
    held: list[tuple[Any, Any]] = []
    """(stream, event) written but not yet durable (a buffering sink), acknowledged after its flush."""

    pending_gaps: list[Hole] = []

    async def acknowledge() -> None:
        """Acknowledge what is durable now; Faust may then commit past the holes read directly
        (its gaps count as acknowledged)."""
        pending, gaps = held[:], pending_gaps[:]
        held.clear()
        pending_gaps.clear()
        for stream_, event in pending:
            await stream_.ack(event)
        for hole in gaps:
            await mark_gap(app.consumer, hole)

    def committed(topic: str, partition: int) -> int | None:
        from faust.types import TP

        offsets = getattr(app.consumer, "_committed_offset", None)
        value = offsets.get(TP(topic, partition)) if offsets is not None else None
        return value if isinstance(value, int) else None

    async def write(prepared: PreparedBatch, events: list[Any], holes: list[Hole], stream: Any, ranges: str) -> None:
        try:
            async with lock:
                report = await processor().write(prepared)
                held.extend((stream, event) for event in events)
                pending_gaps.extend(holes)
                if report.durable:
                    await acknowledge()
        except BaseException as exc:
            failed(exc)
            raise
        log.info("batch: %d records, %d changes, %d written in %d segments, %d duplicates dropped, "
                 "%d dead letters; prepare %.3f s, write %.3f s; offsets %s", report.records, report.changes,
                 report.written, report.segments, report.dropped, report.dead_letters, report.prepare_s,
                 report.write_s, ranges)

    @app.agent(source)
    async def replicate(stream: Any) -> None:
        """Take a batch, prepare it, and start writing it; while it is written, Faust delivers the
        next batch (noack_take delivers nothing while its batch is held), which is prepared in turn.
        One write at a time, in batch order; each batch is acknowledged after its write."""
        in_flight: asyncio.Future[None] | None = None
        try:
            async for events in stream.noack_take(settings.batch_size, settings.batch_within_s):
                records = [Record(e.message.topic, e.message.partition, e.message.offset, e.message.key,
                                  e.message.value) for e in events]
                try:
                    holes = tracker.holes(records, app.consumer_generation_id, committed)
                    if holes:
                        log.warning("offsets %s never reached this worker (faust's rebalance seek race); "
                                    "reading them from the broker", ", ".join(
                                        f"{h.topic}[{h.partition}] {h.start}-{h.end - 1}" for h in holes))
                        records = await read_holes(kafka.bootstrap_servers, holes) + records
                    prepared = await processor().prepare(records)
                except BaseException as exc:
                    failed(exc)
                    raise
                if in_flight is not None:
                    await in_flight
                in_flight = asyncio.ensure_future(write(prepared, events, holes, stream, offset_ranges(records)))
        finally:
            if in_flight is not None and not in_flight.done():
                await asyncio.shield(in_flight)

    @app.timer(interval=0.5)
    async def flush_buffering_sinks() -> None:
        """A buffering sink's commit interval passes without new records too; a rebalance or a
        shutdown waits for every taken record to be acknowledged: flush then, not a minute later."""
        processor_ = state.get("processor")
        if processor_ is None or not processor_.unflushed:
            return
        if not (processor_.flush_due() or app.rebalancing or app.should_stop):
            return
        try:
            async with lock:
                await processor_.flush()
                await acknowledge()
        except BaseException as exc:
            failed(exc)
            raise

    async def close_sinks() -> None:
        processor_ = state.get("processor")
        if processor_ is not None:
            for sink in processor_.sinks.values():
                await sink.close()

    app.branchline_close_sinks = close_sinks  # type: ignore[attr-defined]
    return app


def offset_ranges(records: Sequence[Record]) -> str:
    """``topic[partition] first-last`` per partition of a batch, for the log (what was acknowledged)."""
    ranges: dict[tuple[str, int], list[int]] = {}
    for record in records:
        span = ranges.get((record.topic, record.partition))
        if span is None:
            ranges[(record.topic, record.partition)] = [record.offset, record.offset]
        else:
            span[0] = min(span[0], record.offset)
            span[1] = max(span[1], record.offset)
    return ", ".join(f"{topic.rsplit('.', 1)[-1]}[{partition}] {low}-{high}"
                     for (topic, partition), (low, high) in sorted(ranges.items()))


async def mark_gap(consumer: Any, hole: Hole) -> None:
    """Tell Faust's consumer that a hole's offsets are done, so that its commit can pass them."""
    from faust.types import TP

    add_gap = getattr(consumer, "_add_gap", None)
    if add_gap is None:  # another Faust: its commit stays behind the hole (replayed, harmless)
        return
    await add_gap(TP(hole.topic, hole.partition), hole.start, hole.end - 1)


def _faust_datadir(name: str) -> Path:
    """Faust's local folder (table checkpoints), in the state folder rather than the working directory."""
    path = state_dir() / "faust" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def fail_stop(exc: BaseException) -> None:
    """Stop the worker at once, acknowledging nothing: the batch is redelivered to the next owner of
    its partitions. Exit code 2 for Branchline errors (config, bad record, sink), 70 otherwise."""
    if isinstance(exc, BranchlineError):
        log.error("stopping: %s", exc)
        print(f"error: {exc}", file=sys.stderr, flush=True)
        code = 2
    else:
        log.critical("stopping on an unexpected error", exc_info=exc)
        code = 70
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)


async def preflight(config: Any, settings: WorkerSettings) -> TopicLayout:
    """Start-up checks: the source topics exist with one partition count, and are keyed by the key."""
    if config.kafka is None:
        raise ConfigError("`kafka` must be set for a worker; got nothing")
    routes = routes_of(config)
    layout = await discover_topics(config.kafka.bootstrap_servers, routes)
    if settings.check_topic_keys:
        problems = await check_topic_keys(config.kafka.bootstrap_servers, layout, routes)
        if problems:
            raise ConfigError(problems)
    return layout


def run_preflight(config: Any, settings: WorkerSettings) -> TopicLayout:
    return asyncio.run(preflight(config, settings))
