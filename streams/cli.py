"""`branchline worker FILE`: run one Faust worker of the distributed runtime.

Start as many as you like with the same file: they share the source topics' partitions through the
consumer group named after the pipeline (``branchline-<name>``).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import click
from branchline.errors import ConfigError

log = logging.getLogger("branchline.streams")


@click.command("worker")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--loglevel", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]), help="Faust's log level.")
@click.option("--no-key-check", is_flag=True, help="Skip the start-up check that topics are keyed by the primary key.")
def worker(file: str, loglevel: str, no_key_check: bool) -> None:
    """Consume the pipeline's Debezium topics and write them into its sinks."""
    from branchline.config import load_pipeline
    from branchline.gc_tuning import tune_for_throughput
    from branchline.streams.app import build_app, run_preflight
    from branchline.streams.config import WorkerSettings

    config = load_pipeline(file)
    settings = config.worker if isinstance(config.worker, WorkerSettings) else WorkerSettings()
    if no_key_check:
        settings = settings.model_copy(update={"check_topic_keys": False})
    if not config.sinks:
        raise ConfigError("`sinks` must name at least one target for a worker; got none", file)
    _ensure_heartbeat_topics(config)
    layout = run_preflight(config, settings)
    log.info(
        "consuming %d topics with %d partitions each: %s", len(layout.topics), layout.partitions,
        ", ".join(layout.topics))
    app = build_app(config, layout, settings=settings)
    tune_for_throughput()
    stop, monitor, server = _start_monitoring(config, layout.topics, app.conf.id)

    import faust

    worker_ = faust.Worker(app, loglevel=loglevel)
    try:
        worker_.execute_from_commandline()
    finally:
        stop.set()
        monitor.join(15)
        if server is not None:
            server.close()


def _ensure_heartbeat_topics(config: Any) -> None:
    """Subscribe to heartbeat topics even before Debezium's first heartbeat (see `ensure_heartbeat_topics`)."""
    import asyncio

    from branchline.monitoring import ensure_heartbeat_topics

    if config.kafka is None:
        return
    try:
        asyncio.run(ensure_heartbeat_topics(config.kafka.bootstrap_servers, config.sources,
                                            config.kafka.replication_factor))
    except Exception as exc:  # noqa: BLE001 - the worker runs without; idle-table lag waits for a restart
        log.warning("heartbeat topics not created: %s", exc)


def _start_monitoring(config: Any, topics: list[str], group: str) -> tuple[threading.Event, threading.Thread, Any]:
    """/metrics on the pipeline file's port, and the monitoring in its own thread (Faust owns the loop).

    The monitoring polls Connect's connector and task states, this worker's consumer group lag (the
    group is the Faust app id), each source's slot WAL / binlog files behind, and reads each source's
    clock for skew; Debezium writes the heartbeat rows (``heartbeat.action.query``). Every table topic
    gets a replication-lag series from start-up, so an idle table's lag shows (driven by heartbeats)
    before its first change; a heartbeat counts for a table only while its topic has no consumer lag.
    A port already taken (a second worker on this host) is logged, not fatal.
    """
    from branchline import metrics
    from branchline.connectors.debezium import is_control_topic
    from branchline.metrics_config import MetricsConfig
    from branchline.monitoring import start_monitoring_thread, tables_of_topics, track_tables

    settings = config.metrics if isinstance(config.metrics, MetricsConfig) else MetricsConfig()
    server = None
    try:
        server = metrics.serve_metrics(settings, runtime="worker")
    except OSError as exc:
        log.warning("metrics endpoint not started (set `metrics.port` per worker on one host): %s", exc)
    tables = tables_of_topics([t for t in topics if not is_control_topic(t)], config.sources)
    for topic, table in tables.items():  # a heartbeat counts for a table only while its topic is drained
        metrics.register_table_topic(topic, table)
    track_tables(tables.values(), config.sinks)
    stop = threading.Event()
    monitor = start_monitoring_thread(config, stop, runtime="worker", consumer_group=group)
    return stop, monitor, server
