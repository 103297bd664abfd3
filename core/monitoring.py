"""Source-side and Connect-side state that no event carries: pollers, and the task that runs them.

Each poller is a small blocking (or async) function that reads one thing and sets its metrics:

- `poll_postgres_slot`: WAL a replication slot retains (``pg_wal_lsn_diff(pg_current_wal_lsn(),
  restart_lsn)``), the headroom left before ``max_slot_wal_keep_size`` invalidates it, and whether a
  consumer is attached.
- `poll_binlog`: binlog files between the reader's file and the server's newest (``SHOW BINARY LOGS``),
  and the server's binlog retention.
- `poll_connect`: connector and task states from Kafka Connect's REST API.
- `poll_kafka_consumer_lag`: per-partition lag of the worker's consumer group.

`run_monitoring` is what a runtime starts next to its pipeline: heartbeats into every source plus the
pollers on ``metrics.poll_interval_s``. A failing poll is reported (metrics, log, `branchline status`),
never raised: watching the pipeline must not stop it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import httpx
from branchline import metrics
from branchline.heartbeat import Stop, run_heartbeats, wait_or_stop
from branchline.metrics_config import MetricsConfig

log = logging.getLogger(__name__)

_FILE_SEQUENCE_SHIFT = 64
"""`branchline.events.binlog_position` keeps the binlog file's sequence number above bit 64."""


def _password(source: Any) -> str:
    secret = getattr(source, "password", None)
    return secret.get_secret_value() if secret is not None else ""


def poll_postgres_slot(source: Any) -> dict[str, Any] | None:
    """Retained WAL, safe WAL headroom and activity of ``source.slot``; None when the slot is missing."""
    import psycopg

    with psycopg.connect(host=source.host, port=source.port, user=source.user, password=_password(source),
                         dbname=source.database, autocommit=True, connect_timeout=10,
                         application_name="branchline-monitor") as conn:
        row = conn.execute(
            "SELECT slot_name, active, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint,"
            " safe_wal_size, wal_status FROM pg_replication_slots WHERE slot_name = %s", (source.slot,)).fetchone()
    metrics.set_source_up(source.branch, source.name, True)
    if row is None:
        return None
    slot, active, retained, safe, wal_status = row
    metrics.set_slot_wal(source.branch, source.name, slot, int(retained or 0), None if safe is None else int(safe),
                         bool(active))
    return {"slot": slot, "active": bool(active), "retained_bytes": int(retained or 0),
            "safe_wal_bytes": None if safe is None else int(safe), "wal_status": wal_status}


def binlog_sequence(file: str) -> int:
    """``'mysql-bin.000042'`` -> 42."""
    return int(file.rsplit(".", 1)[-1])


def reader_binlog_sequence(branch: str, source: str) -> int | None:
    """The binlog file sequence of the newest change this process read from ``source``, if any."""
    position = metrics.newest_position_read(branch, source)
    return None if position is None else position >> _FILE_SEQUENCE_SHIFT


def poll_binlog(source: Any, reader_file: str | None = None) -> dict[str, Any]:
    """Files behind the server's head and binlog retention of a MariaDB/MySQL source.

    ``reader_file`` is the file the capture reads now; default: the file of the newest change this
    process has read (embedded runtime). Without either, files behind is not set.
    """
    import pymysql

    conn = pymysql.connect(host=source.host, port=source.port, user=source.user, password=_password(source),
                           autocommit=True, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW BINARY LOGS")
            files = [row[0] for row in cur.fetchall()]
            cur.execute("SHOW GLOBAL VARIABLES WHERE Variable_name IN ('binlog_expire_logs_seconds', 'expire_logs_days')")
            variables = {name: float(value or 0) for name, value in cur.fetchall()}
    finally:
        conn.close()
    metrics.set_source_up(source.branch, source.name, True)
    retention = variables.get("binlog_expire_logs_seconds") or variables.get("expire_logs_days", 0) * 86400
    head = files[-1] if files else None
    reader = binlog_sequence(reader_file) if reader_file else reader_binlog_sequence(source.branch, source.name)
    behind = None
    if head is not None and reader is not None:
        behind = max(0, binlog_sequence(head) - reader)
        metrics.set_binlog_position(source.branch, source.name, behind, int(retention) or None,
                                    reader_file=reader_file, head_file=head)
    return {"head_file": head, "oldest_file": files[0] if files else None, "files": len(files),
            "files_behind": behind, "retention_s": int(retention) or None}


def poll_connect(url: str, connectors: Iterable[str] | None = None,
                 timeout_s: float = 10.0) -> dict[str, Any]:
    """States of ``connectors`` (default: all) from ``GET /connectors?expand=status``; sets the metrics."""
    response = httpx.get(f"{url.rstrip('/')}/connectors", params={"expand": "status"}, timeout=timeout_s)
    response.raise_for_status()
    statuses: dict[str, Any] = response.json()
    if connectors is not None:
        wanted = set(connectors)
        statuses = {name: entry for name, entry in statuses.items() if name in wanted}
        for missing in wanted - set(statuses):
            statuses[missing] = {"status": {"connector": {"state": "UNASSIGNED"}, "tasks": []}}
    metrics.set_connector_states(statuses)
    return statuses


async def poll_kafka_consumer_lag(bootstrap_servers: str, group: str) -> dict[tuple[str, int], int]:
    """(topic, partition) -> messages the consumer group has still to process; sets the metrics."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="branchline-monitor")
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    if not committed:
        return {}
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False,
                                client_id="branchline-monitor")
    await consumer.start()
    try:
        ends = await consumer.end_offsets(list(committed))
    finally:
        await consumer.stop()
    lags = {}
    for tp, meta in committed.items():
        lag = max(0, ends.get(tp, 0) - max(meta.offset, 0))
        metrics.set_kafka_consumer_lag(group, tp.topic, tp.partition, lag)
        lags[(tp.topic, tp.partition)] = lag
    return lags


async def ensure_heartbeat_topics(bootstrap_servers: str, sources: Sequence[Any],
                                  replication_factor: int = 1) -> list[str]:
    """Create each source's heartbeat-table topic when Debezium has not yet; returns the topics created.

    Why: a worker subscribes to the table topics that exist when it starts. Debezium creates
    ``<branch>.<source>.branchline.debezium_heartbeat`` only with its first heartbeat row, so a worker
    started before that (during the snapshot, say) would never see a heartbeat and idle tables' lag
    would freeze until it restarts. The topic gets the partition count of the source's table topics
    (Faust co-partitions them); nothing is created while a source has no table topic, or when its
    table topics disagree (the worker's start-up check reports that).
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from branchline.heartbeat import heartbeat_table

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="branchline-monitor")
    await admin.start()
    try:
        names = set(await admin.list_topics())
        wanted: list[NewTopic] = []
        for source in sources:
            topic = source.table_topic(*heartbeat_table(source))
            if topic in names:
                continue
            tables = sorted(t for t in names if t.startswith(source.topic_prefix + ".") and not t.endswith(".transaction"))
            if not tables:
                continue
            counts = {len(d["partitions"]) for d in await admin.describe_topics(tables)}
            if len(counts) == 1:
                wanted.append(NewTopic(topic, num_partitions=counts.pop(), replication_factor=replication_factor))
        if wanted:
            await admin.create_topics(wanted)
            log.info("created heartbeat topics %s", ", ".join(t.name for t in wanted))
        return [t.name for t in wanted]
    finally:
        await admin.close()


def poll_source(source: Any) -> dict[str, Any] | None:
    """The source-side poll that fits the source kind; errors are recorded and returned as None."""
    try:
        if source.kind == "postgres":
            return poll_postgres_slot(source)
        return poll_binlog(source)
    except Exception as exc:  # noqa: BLE001 - reported, never raised: see module docstring
        log.warning("polling source %s failed: %s", source.name, exc)
        metrics.observe_error("source", source.name, exc)
        metrics.set_source_up(source.branch, source.name, False, detail=str(exc)[:200])
        return None


async def run_pollers(pipeline: Any, stop: Stop, *, interval_s: float, connect: bool = False,
                      consumer_group: str | None = None) -> None:
    """Poll sources (and Connect, and Kafka consumer lag when asked) every ``interval_s`` until ``stop``."""
    sources: Sequence[Any] = pipeline.sources
    connector_names = [s.connector_name for s in sources]
    while not stop.is_set():
        for source in sources:
            await asyncio.to_thread(poll_source, source)
        if connect and pipeline.connect is not None:
            try:
                await asyncio.to_thread(poll_connect, pipeline.connect.url, connector_names,
                                        pipeline.connect.timeout_s)
            except Exception as exc:  # noqa: BLE001
                log.warning("polling Kafka Connect failed: %s", exc)
                metrics.observe_error("connect", pipeline.connect.url, exc)
        if consumer_group and pipeline.kafka is not None:
            try:
                await poll_kafka_consumer_lag(pipeline.kafka.bootstrap_servers, consumer_group)
            except Exception as exc:  # noqa: BLE001
                log.warning("polling Kafka consumer lag failed: %s", exc)
                metrics.observe_error("kafka", consumer_group, exc)
        await wait_or_stop(stop, interval_s)


async def run_monitoring(pipeline: Any, stop: Stop, *, runtime: str,
                         consumer_group: str | None = None) -> None:
    """Everything a runtime runs beside its pipeline: heartbeats and pollers, until ``stop`` is set.

    ``runtime`` is ``run`` (embedded: writes the heartbeat rows) or ``worker`` (distributed: Debezium's
    ``heartbeat.action.query`` writes them, so the worker only reads each source's clock for skew and
    health; it also polls Connect and, given ``consumer_group``, Kafka consumer lag). Start it after
    `serve_metrics`; ``stop`` may be the runner's `threading.Event`. For `branchline run`::

        monitor = asyncio.create_task(run_monitoring(pipeline, runner.stop, runtime="run"))
        try:
            await runner.run()
        finally:
            runner.stop.set()
            await monitor

    Heartbeat rows reach the sink only if the heartbeat table is captured: `branchline run` arranges
    that (`branchline.heartbeat.with_heartbeat_capture`); Debezium's connector configs list it.
    """
    from branchline.heartbeat import heartbeat_table

    config: MetricsConfig = getattr(pipeline, "metrics", None) or MetricsConfig()
    for source in pipeline.sources:
        metrics.register_heartbeat_table(*heartbeat_table(source))
    await asyncio.gather(
        run_heartbeats(pipeline.sources, config.heartbeat, stop, write=runtime != "worker"),
        run_pollers(pipeline, stop, interval_s=config.poll_interval_s, connect=runtime == "worker",
                    consumer_group=consumer_group),
    )


def track_tables(tables: Iterable[Any], sinks: Iterable[str]) -> int:
    """Give every table a replication-lag series from start-up (heartbeats drive it until its first
    change), except heartbeat tables; returns how many (table, sink) pairs are tracked."""
    count = 0
    sink_names = list(sinks)
    for table in tables:
        if metrics.is_heartbeat(table):
            continue
        for sink in sink_names:
            metrics.track_table(table, sink)
            count += 1
    return count


def tables_of_topics(topics: Iterable[str], sources: Sequence[Any]) -> dict[str, Any]:
    """Topic -> `TableId` of Debezium table topics ``<branch>.<source>.<namespace>.<table>`` (the worker's)."""
    from branchline.events import TableId

    found = {}
    by_prefix = sorted(sources, key=lambda s: -len(s.topic_prefix))
    for topic in topics:
        source = next((s for s in by_prefix if topic.startswith(s.topic_prefix + ".")), None)
        if source is None:
            continue
        namespace, _, table = topic[len(source.topic_prefix) + 1:].rpartition(".")
        if namespace and table:
            found[topic] = TableId(source=source.name, branch=source.branch, database=namespace, table=table)
    return found


def start_monitoring_thread(pipeline: Any, stop: Stop, *, runtime: str,
                            consumer_group: str | None = None) -> threading.Thread:
    """`run_monitoring` on its own event loop in a daemon thread, for runtimes whose loop is not ours
    (Faust owns the worker's). Set ``stop`` (a `threading.Event`) and join the thread to end it."""
    from branchline.heartbeat import heartbeat_table

    for source in pipeline.sources:  # before the first batch, not when the thread gets to it
        metrics.register_heartbeat_table(*heartbeat_table(source))

    def main() -> None:
        try:
            asyncio.run(run_monitoring(pipeline, stop, runtime=runtime, consumer_group=consumer_group))
        except Exception:  # watching must never take the pipeline down
            log.exception("monitoring stopped")

    thread = threading.Thread(target=main, name="branchline-monitoring", daemon=True)
    thread.start()
    return thread
