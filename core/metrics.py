"""Every Branchline metric, declared once, and the few functions the shared write path calls.

Why one module: names and labels are a public contract (dashboards and alert rules in infra/ depend on
them; `tests/unit/test_metrics_names.py` pins them). Sinks never touch metrics; the runtimes call
`observe_batch_written` once per durable batch, `observe_changes_read` once per batch read, and the
other ``observe_*`` / ``set_*`` helpers at the one place each thing happens.

Registry: a dedicated `REGISTRY` (not prometheus_client's global one), holding Branchline's metrics
plus the standard process/platform/GC collectors. Third-party libraries that register on the global
registry (Faust's own sensors, for one) cannot collide with or leak into Branchline's names, and tests
read exactly what `/metrics` serves.

Lag is computed at scrape time: the runtimes record *watermarks* (the source commit time of the newest
change made durable, or read), and `/metrics` answers ``now - watermark``. So lag keeps rising while the
pipeline is stalled, even when nothing is written. Heartbeat rows (see `branchline.heartbeat`) move the
per-source watermark on idle sources.

Clock skew: ``now`` is this host's clock, the watermark is the *source's* commit clock. Lag is off by
the skew between the two (source ahead -> lag reads low, possibly negative; behind -> high). We assume
NTP-synced hosts (skew well under a second). The heartbeat writer measures the skew on every beat and
exports it as ``branchline_source_clock_skew_seconds``; alert on it rather than trust lag blindly.
MariaDB/MySQL binlog timestamps have one-second resolution, so MariaDB lag reads up to 1 s high.
"""

from __future__ import annotations

import bisect
import json
import logging
import threading
import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from branchline.events import ChangeEvent, Op, TableId
from branchline.metrics_config import HEARTBEAT_TABLE, HeartbeatConfig, MetricsConfig
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

__all__ = [
    "METRIC_NAMES",
    "REGISTRY",
    "HeartbeatConfig",
    "HeartbeatSkippingSink",
    "MetricsConfig",
    "MetricsServer",
    "observe_batch_written",
    "observe_changes_read",
    "observe_dead_letter",
    "observe_duplicates_dropped",
    "observe_error",
    "observe_heartbeat_durable",
    "observe_heartbeat_written",
    "observe_retry",
    "observe_snapshot_rows",
    "observe_source_clock",
    "register_table_topic",
    "reset",
    "serve_metrics",
    "set_binlog_position",
    "set_connector_states",
    "set_kafka_consumer_lag",
    "set_slot_wal",
    "set_source_up",
    "set_spool",
    "skip_heartbeat_writes",
    "snapshot",
    "track_table",
]

log = logging.getLogger(__name__)

_clock = time.time
"""This host's clock, read when lag is scraped (tests replace it to move time without sleeping)."""

disable_created_metrics()  # `*_created` series double the counters and nothing here reads them
REGISTRY = CollectorRegistry(auto_describe=True)
"""The registry `/metrics` serves: Branchline's metrics plus process, platform and GC metrics."""
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

TABLE = ("branch", "source", "table")
TABLE_SINK = ("branch", "source", "table", "sink")
SOURCE = ("branch", "source")
SOURCE_SINK = ("branch", "source", "sink")

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
"""End-to-end latency buckets: sub-second (embedded, healthy) up to a day (an outage drained)."""
BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

CONNECT_STATES = ("UNASSIGNED", "RUNNING", "PAUSED", "FAILED", "RESTARTING", "STOPPED")
"""States Kafka Connect reports for connectors and tasks; each is one series, 1 for the current state."""

# -- plain metrics ---------------------------------------------------------------------------------

EVENTS = Counter(
    "branchline_events_total", "Change events made durable in a sink, by operation (c, u, d, r, t).",
    (*TABLE, "op"), registry=REGISTRY)
DUPLICATES_DROPPED = Counter(
    "branchline_duplicates_dropped_total",
    "Change events dropped as already applied (replayed after a restart, or collapsed in a batch).",
    TABLE, registry=REGISTRY)
ROWS_WRITTEN = Counter(
    "branchline_rows_written_total", "Rows written into a sink (after collapsing a batch per key).",
    TABLE_SINK, registry=REGISTRY)
SINK_BATCH_DURATION = Histogram(
    "branchline_sink_batch_duration_seconds", "Wall time of one durable sink batch write.",
    SOURCE_SINK, buckets=BATCH_BUCKETS, registry=REGISTRY)
SNAPSHOT_ROWS = Counter(
    "branchline_snapshot_rows_total", "Rows read by an initial or incremental snapshot.",
    TABLE, registry=REGISTRY)
RETRIES = Counter(
    "branchline_retries_total", "Retries of a retryable failure, by component (source, sink, kafka, connect).",
    ("component", "name"), registry=REGISTRY)
ERRORS = Counter(
    "branchline_errors_total", "Errors by kind (the Branchline error class, or `unexpected`).",
    ("component", "name", "kind"), registry=REGISTRY)
DEAD_LETTERS = Counter(
    "branchline_dead_letter_total", "Bad records routed to the dead-letter topic or table.",
    TABLE, registry=REGISTRY)
SPOOL_BYTES = Gauge(
    "branchline_spool_bytes", "Bytes of undelivered changes in the local spool.", ("spool",), registry=REGISTRY)
SPOOL_LIMIT_BYTES = Gauge(
    "branchline_spool_limit_bytes", "Spool size at which capture pauses.", ("spool",), registry=REGISTRY)
KAFKA_CONSUMER_LAG = Gauge(
    "branchline_kafka_consumer_lag", "Messages between a partition's high watermark and the worker's position.",
    ("group", "topic", "partition"), registry=REGISTRY)
CONNECTOR_STATE = Gauge(
    "branchline_connector_state", "Kafka Connect connector state: 1 for the current state, 0 for the others.",
    ("connector", "state"), registry=REGISTRY)
CONNECTOR_TASK_STATE = Gauge(
    "branchline_connector_task_state", "Kafka Connect task state: 1 for the current state, 0 for the others.",
    ("connector", "task", "state"), registry=REGISTRY)
SLOT_WAL_RETAINED = Gauge(
    "branchline_slot_wal_retained_bytes", "WAL a PostgreSQL replication slot keeps (current LSN - restart_lsn).",
    (*SOURCE, "slot"), registry=REGISTRY)
SLOT_SAFE_WAL = Gauge(
    "branchline_slot_safe_wal_size_bytes",
    "WAL that may still be written before the slot is lost (max_slot_wal_keep_size); absent when unlimited.",
    (*SOURCE, "slot"), registry=REGISTRY)
SLOT_ACTIVE = Gauge(
    "branchline_slot_active", "1 when a consumer is attached to the replication slot.",
    (*SOURCE, "slot"), registry=REGISTRY)
BINLOG_FILES_BEHIND = Gauge(
    "branchline_binlog_files_behind", "Binlog files between the reader's file and the server's newest file.",
    SOURCE, registry=REGISTRY)
BINLOG_RETENTION = Gauge(
    "branchline_binlog_retention_seconds", "The server's binlog_expire_logs_seconds; absent when binlogs never expire.",
    SOURCE, registry=REGISTRY)
SOURCE_UP = Gauge(
    "branchline_source_up", "1 when the last poll of the source database succeeded.", SOURCE, registry=REGISTRY)
HEARTBEATS_WRITTEN = Counter(
    "branchline_heartbeats_written_total", "Heartbeat rows written into a source.", SOURCE, registry=REGISTRY)
CLOCK_SKEW = Gauge(
    "branchline_source_clock_skew_seconds",
    "Source clock minus this host's clock, measured at the last heartbeat; lag is off by this much.",
    SOURCE, registry=REGISTRY)
BUILD_INFO = Info("branchline_build", "Branchline version and the runtime serving these metrics.", registry=REGISTRY)


# -- scrape-time metrics: lag, spool age, latency --------------------------------------------------


@dataclass
class _State:
    """Watermarks and other values that `/metrics` turns into ages at scrape time. Guarded by `lock`."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    durable: dict[tuple[str, str, str, str], float | None] = field(default_factory=dict)
    """(branch, source, table, sink) -> source commit time (epoch s) of the newest durable change."""
    heartbeat_durable: dict[tuple[str, str, str], float] = field(default_factory=dict)
    """(branch, source, sink) -> source commit time of the newest heartbeat that reached the sink."""
    read: dict[tuple[str, str], float] = field(default_factory=dict)
    """(branch, source) -> source commit time of the newest change (or heartbeat) read."""
    read_position: dict[tuple[str, str], int] = field(default_factory=dict)
    """(branch, source) -> position of the newest change read (binlog file sequence for files behind)."""
    spool_oldest: dict[str, float | None] = field(default_factory=dict)
    """spool -> local time the oldest undelivered change was spooled; None when the spool is empty."""
    last_errors: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    connectors: dict[str, dict[str, Any]] = field(default_factory=dict)
    sources: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    topic_tables: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    """Kafka topic -> (branch, source, table) it carries (the distributed worker registers its topics)."""
    partition_lag: dict[tuple[str, int], int] = field(default_factory=dict)
    """(topic, partition) -> consumer lag at the last poll."""

    def backlogged(self) -> set[tuple[str, str, str]]:
        """(branch, source, table) whose topic had unconsumed messages at the last poll (hold `lock`)."""
        return {self.topic_tables[topic] for (topic, _), lag in self.partition_lag.items()
                if lag > 0 and topic in self.topic_tables}

    def replication_mark(self, key: tuple[str, str, str, str], backlog: set[tuple[str, str, str]]) -> float | None:
        """The source commit time a table's replication lag is measured from (hold `lock`).

        The newer of the table's own watermark and its source's heartbeat watermark; the heartbeat is
        left out while the table's own topic has a backlog (distributed path: a heartbeat travels its
        own topic, so it proves nothing about a table whose topic is still behind).
        """
        branch, source, table, sink = key
        mark = self.durable.get(key)
        beat = None if (branch, source, table) in backlog else self.heartbeat_durable.get((branch, source, sink))
        return max((m for m in (mark, beat) if m is not None), default=None)


_STATE = _State()


def _epoch(ts: datetime | float | None) -> float | None:
    """Seconds since the epoch; a naive datetime is taken as UTC, as events carry UTC times."""
    if ts is None or isinstance(ts, float | int):
        return ts
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.timestamp()


class _LagCollector:
    """Replication lag, capture lag and spool age, computed from watermarks when scraped."""

    def describe(self) -> Iterable[Metric]:
        yield GaugeMetricFamily("branchline_replication_lag_seconds", "", labels=TABLE_SINK)
        yield GaugeMetricFamily("branchline_capture_lag_seconds", "", labels=SOURCE)
        yield GaugeMetricFamily("branchline_spool_oldest_age_seconds", "", labels=("spool",))

    def collect(self) -> Iterable[Metric]:
        now = _clock()
        replication = GaugeMetricFamily(
            "branchline_replication_lag_seconds",
            "Now minus the source commit time of the newest change durable in the sink (a heartbeat counts "
            "for every table of its source).", labels=TABLE_SINK)
        capture = GaugeMetricFamily(
            "branchline_capture_lag_seconds",
            "Now minus the source commit time of the newest change (or heartbeat) read from the source.",
            labels=SOURCE)
        spool_age = GaugeMetricFamily(
            "branchline_spool_oldest_age_seconds", "Age of the oldest undelivered change in the spool; 0 when empty.",
            labels=("spool",))
        with _STATE.lock:
            backlog = _STATE.backlogged()
            for key in _STATE.durable:
                newest = _STATE.replication_mark(key, backlog)
                if newest is not None:
                    replication.add_metric(key, now - newest)
            for (branch, source), mark in _STATE.read.items():
                capture.add_metric((branch, source), now - mark)
            for spool, oldest in _STATE.spool_oldest.items():
                spool_age.add_metric((spool,), 0.0 if oldest is None else max(0.0, now - oldest))
        yield replication
        yield capture
        yield spool_age


class _BatchHistogram:
    """A histogram that takes a whole batch of observations under one lock.

    prometheus_client's `Histogram.observe` locks once per value; the write path observes every event
    of every batch, so this saves the per-event overhead (see STYLE: batch everything on the hot path).
    """

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]):
        self.name, self.documentation = name, documentation
        self.labelnames = tuple(labelnames)
        self.buckets = tuple(float(b) for b in buckets)
        self._lock = threading.Lock()
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}

    def observe_many(self, labelvalues: tuple[str, ...], values: Iterable[tuple[float, int]]) -> None:
        """Observe each ``value`` ``count`` times (changes of one transaction share a commit time)."""
        counts = [0] * (len(self.buckets) + 1)
        total = 0.0
        for value, count in values:
            counts[bisect.bisect_left(self.buckets, value)] += count
            total += value * count
        if not any(counts):
            return
        with self._lock:
            series = self._series.setdefault(labelvalues, ([0] * len(counts), [0.0]))
            for i, n in enumerate(counts):
                series[0][i] += n
            series[1][0] += total

    def clear(self) -> None:
        with self._lock:
            self._series.clear()

    def describe(self) -> Iterable[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            for labelvalues, (counts, total) in self._series.items():
                cumulative, buckets = 0, []
                for bound, n in zip((*self.buckets, float("inf")), counts, strict=True):
                    cumulative += n
                    buckets.append(("+Inf" if bound == float("inf") else _fmt(bound), cumulative))
                family.add_metric(labelvalues, buckets, total[0])
        yield family


def _fmt(bound: float) -> str:
    return str(int(bound)) + ".0" if bound == int(bound) else repr(bound)


REGISTRY.register(_LagCollector())  # type: ignore[arg-type]
END_TO_END_LATENCY = _BatchHistogram(
    "branchline_end_to_end_latency_seconds",
    "Time from the source commit of a change until it is durable in the sink.", SOURCE_SINK, LATENCY_BUCKETS)
REGISTRY.register(END_TO_END_LATENCY)  # type: ignore[arg-type]

METRIC_NAMES: tuple[str, ...] = (
    "branchline_replication_lag_seconds",
    "branchline_capture_lag_seconds",
    "branchline_end_to_end_latency_seconds",
    "branchline_events_total",
    "branchline_duplicates_dropped_total",
    "branchline_rows_written_total",
    "branchline_sink_batch_duration_seconds",
    "branchline_snapshot_rows_total",
    "branchline_retries_total",
    "branchline_errors_total",
    "branchline_dead_letter_total",
    "branchline_spool_bytes",
    "branchline_spool_limit_bytes",
    "branchline_spool_oldest_age_seconds",
    "branchline_kafka_consumer_lag",
    "branchline_connector_state",
    "branchline_connector_task_state",
    "branchline_slot_wal_retained_bytes",
    "branchline_slot_safe_wal_size_bytes",
    "branchline_slot_active",
    "branchline_binlog_files_behind",
    "branchline_binlog_retention_seconds",
    "branchline_source_up",
    "branchline_heartbeats_written_total",
    "branchline_source_clock_skew_seconds",
    "branchline_build_info",
)
"""Every Branchline metric name as it appears in `/metrics` (counters with their ``_total``)."""


# -- the write path --------------------------------------------------------------------------------


_heartbeat_tables: set[tuple[str, str]] = {HEARTBEAT_TABLE}


def register_heartbeat_table(namespace: str, table: str) -> None:
    """Treat ``namespace.table`` as a heartbeat table (the default is ``branchline.debezium_heartbeat``)."""
    _heartbeat_tables.add((namespace, table))


def is_heartbeat(table: TableId) -> bool:
    """True for the heartbeat table's changes: they move lag for the whole source, not for a user table."""
    return (table.schema_ or table.database, table.table) in _heartbeat_tables


def track_table(table: TableId, sink: str) -> None:
    """Show a table's replication lag from start-up (driven by heartbeats) before its first change."""
    with _STATE.lock:
        _STATE.durable.setdefault((table.branch, table.source, table.qualified, sink), None)


def observe_batch_written(
    table: TableId,
    sink: str,
    events: Sequence[ChangeEvent],
    duration_s: float,
    *,
    rows_written: int | None = None,
    now: float | None = None,
) -> None:
    """Record one batch that the sink has made durable: lag watermark, events, rows, latency, duration.

    Call it once per successful `Sink.write_batch`, after it returned, with the events as read (before any
    collapse per key) and ``rows_written`` the rows the sink wrote (default: ``len(events)``). Snapshot
    reads count as events but move neither lag nor latency: their timestamps are read times, not commits.
    Heartbeat-table batches move the lag of every table of their source.
    """
    now = _clock() if now is None else now
    branch, source, name = table.branch, table.source, table.qualified
    commits = _commit_runs(events)
    newest = max([c[0] for c in commits], default=None)
    if is_heartbeat(table):
        # The row's own `ts` has microseconds; MariaDB binlog commit times have whole seconds only.
        beats = [_epoch(e.after["ts"]) for e in events if e.after and isinstance(e.after.get("ts"), datetime)]
        if beats:
            newest = max(b for b in beats if b is not None)
        if newest is not None:
            observe_heartbeat_durable(branch, source, sink, newest)
        return
    for op, n in Tally([e.op for e in events]).items():
        EVENTS.labels(branch, source, name, op.value if isinstance(op, Op) else str(op)).inc(n)
    ROWS_WRITTEN.labels(branch, source, name, sink).inc(len(events) if rows_written is None else rows_written)
    SINK_BATCH_DURATION.labels(branch, source, sink).observe(duration_s)
    if commits:
        END_TO_END_LATENCY.observe_many((branch, source, sink), [(max(0.0, now - ts), n) for ts, n in commits])
    key = (branch, source, name, sink)
    with _STATE.lock:
        previous = _STATE.durable.get(key)
        if newest is not None and (previous is None or newest > previous):
            _STATE.durable[key] = newest
        elif key not in _STATE.durable:
            _STATE.durable[key] = None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NAIVE_EPOCH = datetime(1970, 1, 1)


def _commit_runs(events: Sequence[ChangeEvent]) -> list[tuple[float, int]]:
    """(commit time in epoch seconds, changes) per run of changes sharing one commit time object.

    Readers hand every change of a transaction the same datetime, so this converts once per transaction
    (an aware datetime's ``timestamp()`` costs more than the rest of this function per change).
    Snapshot reads are left out: their times are read times, not commits.
    """
    runs: list[tuple[float, int]] = []
    previous: datetime | None = None
    count = 0
    for event in events:
        stamp = None if event.snapshot else event.source_ts
        if stamp is previous:
            count += 1
            continue
        if previous is not None:
            runs.append(((previous - (_EPOCH if previous.tzinfo else _NAIVE_EPOCH)).total_seconds(), count))
        previous, count = stamp, 1
    if previous is not None:
        runs.append(((previous - (_EPOCH if previous.tzinfo else _NAIVE_EPOCH)).total_seconds(), count))
    return runs


def observe_heartbeat_durable(branch: str, source: str, sink: str, source_ts: datetime | float) -> None:
    """A heartbeat committed at ``source_ts`` reached the sink: every earlier change of the source has too.

    That holds when the runtime applies one source's changes in commit order and calls this only after
    the batches before the heartbeat are durable (`branchline run`). On the distributed path each table
    has its own topic, so a heartbeat proves only that its own topic is drained: there it counts for a
    table only while that table's topic had no consumer lag at the last poll (`register_table_topic`,
    `set_kafka_consumer_lag`); a table whose topic is behind shows its own watermark. Between polls
    (``metrics.poll_interval_s``) a new backlog can hide behind a fresh heartbeat for that long.
    """
    stamp = _epoch(source_ts)
    assert stamp is not None
    key = (branch, source, sink)
    with _STATE.lock:
        if stamp > _STATE.heartbeat_durable.get(key, float("-inf")):
            _STATE.heartbeat_durable[key] = stamp
        heartbeat_key = (branch, source, "heartbeat", sink)
        if stamp > (_STATE.durable.get(heartbeat_key) or float("-inf")):
            _STATE.durable[heartbeat_key] = stamp


def observe_changes_read(branch: str, source: str, events: Iterable[ChangeEvent]) -> None:
    """Record a batch read from a source (before spooling or producing): moves capture lag."""
    newest = None
    position = None
    for event in events:
        if event.source_ts is not None and not event.snapshot:
            stamp = event.source_ts.timestamp()
            if newest is None or stamp > newest:
                newest = stamp
            if position is None or event.position > position:
                position = event.position
    if newest is not None:
        observe_source_timestamp_read(branch, source, newest)
    if position is not None:
        with _STATE.lock:
            if position > _STATE.read_position.get((branch, source), -1):
                _STATE.read_position[(branch, source)] = position


def newest_position_read(branch: str, source: str) -> int | None:
    """Position of the newest streamed change read from ``source`` by this process, if any."""
    with _STATE.lock:
        return _STATE.read_position.get((branch, source))


def observe_source_timestamp_read(branch: str, source: str, source_ts: datetime | float) -> None:
    """Capture reached a change (or heartbeat) committed at ``source_ts``; for readers without events."""
    stamp = _epoch(source_ts)
    assert stamp is not None
    with _STATE.lock:
        if stamp > _STATE.read.get((branch, source), float("-inf")):
            _STATE.read[(branch, source)] = stamp


def observe_heartbeat_written(branch: str, source: str, source_now: datetime | float, local_before: float,
                              local_after: float) -> None:
    """A heartbeat row was committed; ``source_now`` is the source's clock read in the same statement.

    The skew estimate is the source clock minus the midpoint of the local clock around the round trip,
    so it is exact to within half the round-trip time.
    """
    HEARTBEATS_WRITTEN.labels(branch, source).inc()
    observe_source_clock(branch, source, source_now, local_before, local_after)


def observe_source_clock(branch: str, source: str, source_now: datetime | float, local_before: float,
                         local_after: float) -> None:
    """The source's clock read between ``local_before`` and ``local_after`` (this host): sets the skew."""
    stamp = _epoch(source_now)
    assert stamp is not None
    CLOCK_SKEW.labels(branch, source).set(stamp - (local_before + local_after) / 2)


def observe_duplicates_dropped(table: TableId, count: int) -> None:
    """Changes dropped because the target already has them (a replayed batch) or a later change of the key."""
    if count:
        DUPLICATES_DROPPED.labels(table.branch, table.source, table.qualified).inc(count)


def observe_snapshot_rows(table: TableId, count: int) -> None:
    """Rows read by a snapshot chunk."""
    if count:
        SNAPSHOT_ROWS.labels(table.branch, table.source, table.qualified).inc(count)


def observe_dead_letter(table: TableId, count: int = 1) -> None:
    """Bad records routed to the dead-letter destination (an explicit choice in the pipeline file)."""
    DEAD_LETTERS.labels(table.branch, table.source, table.qualified).inc(count)


def observe_retry(component: str, name: str) -> None:
    """The one retry helper calls this before each new attempt. ``component``: source, sink, kafka, connect."""
    RETRIES.labels(component, name).inc()


def error_kind(exc: BaseException) -> str:
    """The metric label for an error: its Branchline class name, or ``unexpected`` for anything else."""
    from branchline.errors import BranchlineError

    return type(exc).__name__ if isinstance(exc, BranchlineError) else "unexpected"


def observe_error(component: str, name: str, exc: BaseException) -> None:
    """Count an error and remember it as the last error of (component, name) for `branchline status`."""
    kind = error_kind(exc)
    ERRORS.labels(component, name, kind).inc()
    with _STATE.lock:
        _STATE.last_errors[(component, name)] = {
            "component": component, "name": name, "kind": kind, "message": str(exc)[:500], "at": time.time()}


def set_spool(spool: str, size_bytes: int, limit_bytes: int, oldest_spooled_at: float | None) -> None:
    """The spool's size, its limit and when its oldest undelivered change was spooled (None: empty)."""
    SPOOL_BYTES.labels(spool).set(size_bytes)
    SPOOL_LIMIT_BYTES.labels(spool).set(limit_bytes)
    with _STATE.lock:
        _STATE.spool_oldest[spool] = oldest_spooled_at


def set_kafka_consumer_lag(group: str, topic: str, partition: int, lag: int) -> None:
    """Messages the worker has still to process on one partition (high watermark - position).

    For a registered table topic (`register_table_topic`) a backlog also stops heartbeats from
    counting for that table until the backlog is gone (see `_State.replication_mark`).
    """
    KAFKA_CONSUMER_LAG.labels(group, topic, str(partition)).set(max(0, lag))
    with _STATE.lock:
        _STATE.partition_lag[(topic, partition)] = max(0, lag)


def register_table_topic(topic: str, table: TableId) -> None:
    """The distributed worker's table topics: which table each carries, for heartbeat-driven lag."""
    with _STATE.lock:
        _STATE.topic_tables[topic] = (table.branch, table.source, table.qualified)


def set_connector_states(statuses: Mapping[str, Any]) -> None:
    """Set connector and task states from Connect's ``GET /connectors?expand=status`` answer."""
    with _STATE.lock:
        _STATE.connectors = {}
    for connector, entry in statuses.items():
        status = entry.get("status", entry)
        state = status.get("connector", {}).get("state", "UNASSIGNED")
        for candidate in CONNECT_STATES:
            CONNECTOR_STATE.labels(connector, candidate).set(1 if candidate == state else 0)
        tasks = []
        for task in status.get("tasks", []):
            task_state = task.get("state", "UNASSIGNED")
            for candidate in CONNECT_STATES:
                CONNECTOR_TASK_STATE.labels(connector, str(task.get("id")), candidate).set(
                    1 if candidate == task_state else 0)
            tasks.append({"id": task.get("id"), "state": task_state, "worker": task.get("worker_id"),
                          "trace": (task.get("trace") or "").splitlines()[0:1]})
        with _STATE.lock:
            _STATE.connectors[connector] = {"state": state, "tasks": tasks}


def set_source_up(branch: str, source: str, up: bool, detail: str | None = None) -> None:
    """Health of a source database as seen by the last poll."""
    SOURCE_UP.labels(branch, source).set(1 if up else 0)
    with _STATE.lock:
        entry = _STATE.sources.setdefault((branch, source), {})
        entry.update(up=up, detail=detail, checked_at=time.time())


def set_slot_wal(branch: str, source: str, slot: str, retained_bytes: int, safe_wal_bytes: int | None,
                 active: bool) -> None:
    """One replication slot's retained WAL, remaining headroom and whether a consumer is attached."""
    SLOT_WAL_RETAINED.labels(branch, source, slot).set(retained_bytes)
    SLOT_ACTIVE.labels(branch, source, slot).set(1 if active else 0)
    if safe_wal_bytes is None:
        try:
            SLOT_SAFE_WAL.remove(branch, source, slot)
        except KeyError:
            pass
    else:
        SLOT_SAFE_WAL.labels(branch, source, slot).set(safe_wal_bytes)
    with _STATE.lock:
        _STATE.sources.setdefault((branch, source), {})["slot"] = {
            "name": slot, "retained_bytes": retained_bytes, "safe_wal_bytes": safe_wal_bytes, "active": active}


def set_binlog_position(branch: str, source: str, files_behind: int, retention_s: int | None,
                        reader_file: str | None = None, head_file: str | None = None) -> None:
    """How far the binlog reader trails the server's newest file, and how long the server keeps binlogs."""
    BINLOG_FILES_BEHIND.labels(branch, source).set(files_behind)
    if retention_s:
        BINLOG_RETENTION.labels(branch, source).set(retention_s)
    with _STATE.lock:
        _STATE.sources.setdefault((branch, source), {})["binlog"] = {
            "files_behind": files_behind, "retention_s": retention_s, "reader_file": reader_file,
            "head_file": head_file}


def set_build_info(runtime: str) -> None:
    """Which runtime serves these metrics (``run`` or ``worker``) and the Branchline version."""
    from branchline import __version__

    BUILD_INFO.info({"version": __version__, "runtime": runtime})


# -- the sinks, as the runtimes hold them ------------------------------------------------------------


class HeartbeatSkippingSink:
    """A built sink as the runtimes hold it: heartbeat tables are measured, never written.

    The runtime still calls `observe_batch_written` after the (skipped) write of a heartbeat table
    (`is_heartbeat`), in order after the batches before it: that is when the heartbeat "reaches the
    sink" and moves the lag of its source. The target keeps only the user's tables. Everything else
    (``capabilities``, ``flush``, ``close``; failures, which the sinks' retry helper counts) goes to the
    wrapped sink unchanged.
    """

    def __init__(self, sink: Any) -> None:
        self.inner = sink

    async def write_batch(self, table: Any, events: Any) -> None:
        """Skip heartbeat tables (by the schema's `TableId`), but still reach the store when the sink can
        probe it (an unreachable store must stop heartbeats, or idle tables' lag would stay low through an
        outage); write everything else. A buffering sink needs no probe: its flush is the measure."""
        if is_heartbeat(getattr(table, "id", table)):
            probe = getattr(self.inner, "probe", None)
            if probe is not None:
                await probe()
            return
        await self.inner.write_batch(table, events)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def skip_heartbeat_writes(sink: Any) -> Any:
    """Wrap a sink where the runtime builds it from the pipeline file (see `HeartbeatSkippingSink`)."""
    return sink if isinstance(sink, HeartbeatSkippingSink) else HeartbeatSkippingSink(sink)


# -- reading back (status screen, tests) -----------------------------------------------------------


def sample(name: str, labels: Mapping[str, str] | None = None) -> float | None:
    """The current value of one sample in `REGISTRY`, or None when it is absent (for tests and status)."""
    return REGISTRY.get_sample_value(name, dict(labels or {}))


def _values(metric: Any, suffix: str = "") -> dict[tuple[str, ...], float]:
    """label values -> value of every sample of one metric (``suffix``: ``_total`` for counters)."""
    found = {}
    for family in metric.collect():
        for item in family.samples:
            if item.name == family.name + suffix:
                found[tuple(item.labels.values())] = item.value
    return found


def snapshot() -> dict[str, Any]:
    """The in-process state as JSON-ready data: what `/status.json` serves to `branchline status`."""
    now = _clock()
    with _STATE.lock:
        backlog = _STATE.backlogged()
        marks = {key: _STATE.replication_mark(key, backlog) for key in _STATE.durable}
        read = dict(_STATE.read)
        spool_oldest = dict(_STATE.spool_oldest)
        errors = [dict(e) for e in _STATE.last_errors.values()]
        connectors = json.loads(json.dumps(_STATE.connectors))
        sources = {f"{b}/{s}": dict(v, branch=b, source=s) for (b, s), v in _STATE.sources.items()}
    rows = _values(ROWS_WRITTEN, "_total")
    tables = []
    for (branch, source, table, sink), newest in sorted(marks.items()):
        tables.append({"branch": branch, "source": source, "table": table, "sink": sink,
                       "replication_lag_s": None if newest is None else now - newest,
                       "rows_written": rows.get((branch, source, table, sink))})
    for (branch, source), mark in read.items():
        sources.setdefault(f"{branch}/{source}", {"branch": branch, "source": source})["capture_lag_s"] = now - mark
    for (branch, source), skew in _values(CLOCK_SKEW).items():
        sources.setdefault(f"{branch}/{source}", {"branch": branch, "source": source})["clock_skew_s"] = skew
    sizes, limits = _values(SPOOL_BYTES), _values(SPOOL_LIMIT_BYTES)
    spools = [{"spool": name, "bytes": sizes.get((name,)), "limit_bytes": limits.get((name,)),
               "oldest_age_s": 0.0 if oldest is None else now - oldest} for name, oldest in spool_oldest.items()]
    kafka: dict[tuple[str, str], float] = {}
    for (group, topic, _partition), lag in _values(KAFKA_CONSUMER_LAG).items():
        kafka[(group, topic)] = kafka.get((group, topic), 0) + lag
    return {"at": now, "tables": tables, "sources": list(sources.values()), "connectors": connectors,
            "spools": spools, "kafka_consumer_lag": [{"group": g, "topic": t, "lag": n} for (g, t), n in kafka.items()],
            "errors": sorted(errors, key=lambda e: e["at"], reverse=True)}


def reset() -> None:
    """Forget every value (tests only): a fresh process as far as `/metrics` can tell."""
    for collector in (EVENTS, DUPLICATES_DROPPED, ROWS_WRITTEN, SINK_BATCH_DURATION, SNAPSHOT_ROWS, RETRIES, ERRORS,
                      DEAD_LETTERS, SPOOL_BYTES, SPOOL_LIMIT_BYTES, KAFKA_CONSUMER_LAG, CONNECTOR_STATE,
                      CONNECTOR_TASK_STATE, SLOT_WAL_RETAINED, SLOT_SAFE_WAL, SLOT_ACTIVE, BINLOG_FILES_BEHIND,
                      BINLOG_RETENTION, SOURCE_UP, HEARTBEATS_WRITTEN, CLOCK_SKEW):
        collector.clear()
    END_TO_END_LATENCY.clear()
    with _STATE.lock:
        for store in (_STATE.durable, _STATE.heartbeat_durable, _STATE.read, _STATE.read_position, _STATE.spool_oldest,
                      _STATE.last_errors, _STATE.connectors, _STATE.sources, _STATE.topic_tables,
                      _STATE.partition_lag):
            store.clear()


# -- serving ---------------------------------------------------------------------------------------


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: " + format, *args)


@dataclass
class MetricsServer:
    """A running `/metrics` + `/status.json` endpoint; `close()` stops it."""

    host: str
    port: int
    _server: _Server
    _thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
    if environ.get("PATH_INFO") == "/status.json":
        body = json.dumps(snapshot(), default=str).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return iter([body])
    return iter(_metrics_app(environ, start_response))


_metrics_app = make_wsgi_app(REGISTRY)


def serve_metrics(config: MetricsConfig | None = None, *, runtime: str = "run") -> MetricsServer | None:
    """Start serving `/metrics` and `/status.json` in a daemon thread; None when metrics are disabled.

    Call once per process, at start-up, before the pipeline runs. Port 0 picks a free port.
    """
    config = config or MetricsConfig()
    if not config.enabled:
        return None
    set_build_info(runtime)
    server = make_server(config.host, config.port, _app, server_class=_Server, handler_class=_QuietHandler)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, name="branchline-metrics", daemon=True)
    thread.start()
    log.info("metrics on http://%s:%s/metrics", config.host, port)
    return MetricsServer(config.host, port, server, thread)
