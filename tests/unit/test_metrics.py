"""The write-path helpers move the metrics they should, read back from the registry `/metrics` serves."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
from branchline import metrics
from branchline.errors import RetryableSinkError
from branchline.events import ChangeEvent, Op, TableId
from branchline.metrics_config import MetricsConfig
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

T0 = 1_800_000_000.0
ORDERS = TableId(source="erp", branch="b1", database="erp", table="orders")
CUSTOMERS = TableId(source="erp", branch="b1", database="erp", table="customers")
HEARTBEAT = TableId(source="erp", branch="b1", database="branchline", table="debezium_heartbeat")


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    metrics.reset()
    fake = Clock()
    monkeypatch.setattr(metrics, "_clock", fake)
    yield fake
    metrics.reset()


def event(table: TableId, position: int, committed: float | None, op: Op = Op.CREATE, snapshot: bool = False,
          after: dict | None = None) -> ChangeEvent:
    return ChangeEvent.model_construct(
        op=op, table=table, key={"id": position}, before=None, after=after or {"id": position}, position=position,
        source_ts=None if committed is None else datetime.fromtimestamp(committed, UTC), txid=None, snapshot=snapshot)


def lag(table: TableId = ORDERS, sink: str = "cloud") -> float | None:
    return metrics.sample("branchline_replication_lag_seconds",
                          {"branch": table.branch, "source": table.source, "table": table.qualified, "sink": sink})


def test_replication_lag_is_now_minus_newest_durable_commit(clock: Clock) -> None:
    metrics.observe_batch_written(ORDERS, "cloud", [event(ORDERS, 1, T0 - 7), event(ORDERS, 2, T0 - 3)], 0.01)
    assert lag() == pytest.approx(3.0)


def test_replication_lag_rises_while_nothing_becomes_durable(clock: Clock) -> None:
    metrics.observe_batch_written(ORDERS, "cloud", [event(ORDERS, 1, T0 - 1)], 0.01)
    first = lag()
    clock.now += 120  # the sink is stopped: no batch for two minutes
    assert first == pytest.approx(1.0)
    assert lag() == pytest.approx(121.0)


def test_replication_lag_falls_when_newer_changes_become_durable(clock: Clock) -> None:
    metrics.observe_batch_written(ORDERS, "cloud", [event(ORDERS, 1, T0 - 100)], 0.01)
    clock.now += 5
    metrics.observe_batch_written(ORDERS, "cloud", [event(ORDERS, 2, T0 + 4)], 0.01)
    assert lag() == pytest.approx(1.0)


def test_a_replayed_older_batch_does_not_move_lag_back(clock: Clock) -> None:
    metrics.observe_batch_written(ORDERS, "cloud", [event(ORDERS, 2, T0 - 1)], 0.01)
    metrics.observe_batch_written(ORDERS, "cloud", [event(ORDERS, 1, T0 - 50)], 0.01)
    assert lag() == pytest.approx(1.0)


def test_snapshot_reads_move_neither_lag_nor_latency(clock: Clock) -> None:
    metrics.observe_batch_written(ORDERS, "cloud", [event(ORDERS, 1, T0 - 1, op=Op.READ, snapshot=True)], 0.01)
    assert lag() is None
    assert metrics.sample("branchline_end_to_end_latency_seconds_count",
                          {"branch": "b1", "source": "erp", "sink": "cloud"}) is None
    assert metrics.sample("branchline_events_total",
                          {"branch": "b1", "source": "erp", "table": "erp.orders", "op": "r"}) == 1


def test_heartbeat_keeps_lag_true_on_an_idle_table(clock: Clock) -> None:
    metrics.observe_batch_written(CUSTOMERS, "cloud", [event(CUSTOMERS, 1, T0 - 3600)], 0.01)
    metrics.track_table(ORDERS, "cloud")
    assert lag(CUSTOMERS) == pytest.approx(3600)
    assert lag(ORDERS) is None  # no change and no heartbeat yet: nothing true to say

    beat = datetime.fromtimestamp(T0 - 2, UTC)
    metrics.observe_batch_written(HEARTBEAT, "cloud", [event(HEARTBEAT, 9, T0 - 3, after={"id": 1, "ts": beat})], 0)
    assert lag(CUSTOMERS) == pytest.approx(2.0)  # the row's own microsecond `ts`, not the binlog's second
    assert lag(ORDERS) == pytest.approx(2.0)
    clock.now += 30  # heartbeats stop arriving: the pipeline stalled
    assert lag(ORDERS) == pytest.approx(32.0)


def test_heartbeat_rows_count_as_neither_events_nor_rows(clock: Clock) -> None:
    metrics.observe_batch_written(HEARTBEAT, "cloud", [event(HEARTBEAT, 1, T0)], 0.01)
    text = _exposition()
    assert "branchline_rows_written_total{" not in text
    assert "branchline_events_total{" not in text


def test_capture_lag_follows_the_newest_change_read(clock: Clock) -> None:
    metrics.observe_changes_read("b1", "erp", [event(ORDERS, 5, T0 - 10), event(ORDERS, 6, T0 - 4)])
    clock.now += 6
    assert metrics.sample("branchline_capture_lag_seconds", {"branch": "b1", "source": "erp"}) == pytest.approx(10)
    assert metrics.newest_position_read("b1", "erp") == 6


def test_events_are_counted_by_operation_and_rows_as_written(clock: Clock) -> None:
    batch = [event(ORDERS, 1, T0, Op.CREATE), event(ORDERS, 2, T0, Op.UPDATE), event(ORDERS, 3, T0, Op.UPDATE),
             event(ORDERS, 4, T0, Op.DELETE)]
    metrics.observe_batch_written(ORDERS, "cloud", batch, 0.2, rows_written=3)
    labels = {"branch": "b1", "source": "erp", "table": "erp.orders"}
    assert [metrics.sample("branchline_events_total", {**labels, "op": op}) for op in "cud"] == [1, 2, 1]
    assert metrics.sample("branchline_rows_written_total", {**labels, "sink": "cloud"}) == 3
    assert metrics.sample("branchline_sink_batch_duration_seconds_sum",
                          {"branch": "b1", "source": "erp", "sink": "cloud"}) == pytest.approx(0.2)


def test_duplicates_counter_rises_on_a_replayed_batch(clock: Clock) -> None:
    labels = {"branch": "b1", "source": "erp", "table": "erp.orders"}
    metrics.observe_duplicates_dropped(ORDERS, 0)
    assert metrics.sample("branchline_duplicates_dropped_total", labels) is None
    metrics.observe_duplicates_dropped(ORDERS, 40)
    metrics.observe_duplicates_dropped(ORDERS, 2)
    assert metrics.sample("branchline_duplicates_dropped_total", labels) == 42


def test_latency_histogram_puts_each_change_in_its_bucket(clock: Clock) -> None:
    batch = [event(ORDERS, 1, T0 - 0.03), event(ORDERS, 2, T0 - 0.3), event(ORDERS, 3, T0 - 7), event(ORDERS, 4, None)]
    metrics.observe_batch_written(ORDERS, "cloud", batch, 0.01)
    labels = {"branch": "b1", "source": "erp", "sink": "cloud"}

    def bucket(le: str) -> float | None:
        return metrics.sample("branchline_end_to_end_latency_seconds_bucket", {**labels, "le": le})

    assert (bucket("0.05"), bucket("0.5"), bucket("5.0"), bucket("10.0"), bucket("+Inf")) == (1, 2, 2, 3, 3)
    assert metrics.sample("branchline_end_to_end_latency_seconds_count", labels) == 3
    assert metrics.sample("branchline_end_to_end_latency_seconds_sum", labels) == pytest.approx(7.33)


def test_spool_age_is_zero_when_empty_and_grows_with_the_oldest_change(clock: Clock) -> None:
    metrics.set_spool("main", 0, 1000, None)
    assert metrics.sample("branchline_spool_oldest_age_seconds", {"spool": "main"}) == 0
    metrics.set_spool("main", 800, 1000, T0 - 5)
    clock.now += 10
    assert metrics.sample("branchline_spool_oldest_age_seconds", {"spool": "main"}) == pytest.approx(15)
    assert metrics.sample("branchline_spool_bytes", {"spool": "main"}) == 800
    assert metrics.sample("branchline_spool_limit_bytes", {"spool": "main"}) == 1000


def test_connector_states_mark_only_the_current_state(clock: Clock) -> None:
    statuses = {"branchline.b1.erp": {"status": {
        "connector": {"state": "RUNNING", "worker_id": "w"},
        "tasks": [{"id": 0, "state": "FAILED", "worker_id": "w", "trace": "boom\n at x"}]}}}
    metrics.set_connector_states(statuses)
    connector = {"connector": "branchline.b1.erp"}
    assert metrics.sample("branchline_connector_state", {**connector, "state": "RUNNING"}) == 1
    assert metrics.sample("branchline_connector_state", {**connector, "state": "FAILED"}) == 0
    assert metrics.sample("branchline_connector_task_state", {**connector, "task": "0", "state": "FAILED"}) == 1
    assert metrics.sample("branchline_connector_task_state", {**connector, "task": "0", "state": "RUNNING"}) == 0
    assert metrics.snapshot()["connectors"]["branchline.b1.erp"]["tasks"][0]["trace"] == ["boom"]


def test_errors_are_counted_by_kind_and_the_last_one_is_kept(clock: Clock) -> None:
    metrics.observe_error("sink", "cloud", RetryableSinkError("`cloud` must answer; got timeout"))
    metrics.observe_error("sink", "cloud", ValueError("surprise"))
    labels = {"component": "sink", "name": "cloud"}
    assert metrics.sample("branchline_errors_total", {**labels, "kind": "RetryableSinkError"}) == 1
    assert metrics.sample("branchline_errors_total", {**labels, "kind": "unexpected"}) == 1
    (last,) = metrics.snapshot()["errors"]
    assert (last["kind"], last["message"]) == ("unexpected", "surprise")


def test_source_side_gauges(clock: Clock) -> None:
    metrics.set_slot_wal("b1", "crm", "slot1", 5000, None, active=False)
    metrics.set_binlog_position("b1", "erp", 3, 86400)
    metrics.set_kafka_consumer_lag("g", "b1.erp.erp.orders", 0, 17)
    assert metrics.sample("branchline_slot_wal_retained_bytes", {"branch": "b1", "source": "crm", "slot": "slot1"}) == 5000
    assert metrics.sample("branchline_slot_safe_wal_size_bytes", {"branch": "b1", "source": "crm", "slot": "slot1"}) is None
    assert metrics.sample("branchline_slot_active", {"branch": "b1", "source": "crm", "slot": "slot1"}) == 0
    assert metrics.sample("branchline_binlog_files_behind", {"branch": "b1", "source": "erp"}) == 3
    assert metrics.sample("branchline_binlog_retention_seconds", {"branch": "b1", "source": "erp"}) == 86400
    assert metrics.sample("branchline_kafka_consumer_lag",
                          {"group": "g", "topic": "b1.erp.erp.orders", "partition": "0"}) == 17


def test_heartbeat_written_records_clock_skew_from_the_round_trip_midpoint(clock: Clock) -> None:
    metrics.observe_heartbeat_written("b1", "erp", T0 + 2.5, local_before=T0, local_after=T0 + 1)
    assert metrics.sample("branchline_source_clock_skew_seconds", {"branch": "b1", "source": "erp"}) == 2.0
    assert metrics.sample("branchline_heartbeats_written_total", {"branch": "b1", "source": "erp"}) == 1


def test_metrics_server_serves_metrics_and_status_on_loopback(clock: Clock) -> None:
    metrics.observe_batch_written(ORDERS, "cloud", [event(ORDERS, 1, T0 - 2)], 0.01)
    server = metrics.serve_metrics(MetricsConfig(port=0), runtime="run")
    assert server is not None
    try:
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
        (sample,) = families["branchline_replication_lag_seconds"].samples
        status = httpx.get(server.url + "/status.json").json()
    finally:
        server.close()
    assert server.host == "127.0.0.1"
    assert sample.value == pytest.approx(2.0)
    assert status["tables"][0]["table"] == "erp.orders"
    assert status["tables"][0]["replication_lag_s"] == pytest.approx(2.0)


def test_disabled_metrics_serve_nothing() -> None:
    assert metrics.serve_metrics(MetricsConfig(enabled=False)) is None


def test_metrics_config_rejects_unknown_keys_and_defaults_to_loopback() -> None:
    assert (MetricsConfig().host, MetricsConfig().port) == ("127.0.0.1", 9464)
    with pytest.raises(ValidationError):
        MetricsConfig.model_validate({"prot": 1})


def test_pipeline_file_takes_the_metrics_section(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from branchline.config import load_pipeline

    path = tmp_path / "pipeline.yml"
    path.write_text("sources:\n  - {name: erp, branch: b1, kind: mariadb, user: root, databases: [erp]}\n"
                    "metrics:\n  port: 19464\n  heartbeat: {interval_s: 2}\n")
    config = load_pipeline(path)
    assert isinstance(config.metrics, MetricsConfig)
    assert (config.metrics.port, config.metrics.heartbeat.interval_s) == (19464, 2)


def test_heartbeats_stop_when_asked_and_report_an_unreachable_source(clock: Clock) -> None:
    from types import SimpleNamespace

    from branchline.heartbeat import run_heartbeats
    from branchline.metrics_config import HeartbeatConfig
    from pydantic import SecretStr

    # port 1 on loopback refuses at once: the beat fails, is reported, and the loop keeps going
    dead = SimpleNamespace(kind="postgres", name="crm", branch="b1", host="127.0.0.1", port=1, user="u",
                           password=SecretStr(""), database="d")

    async def one_round() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(run_heartbeats([dead], HeartbeatConfig(interval_s=60), stop))
        while metrics.sample("branchline_source_up", {"branch": "b1", "source": "crm"}) is None:
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(one_round())
    assert metrics.sample("branchline_source_up", {"branch": "b1", "source": "crm"}) == 0
    assert metrics.sample("branchline_errors_total", {"component": "source", "name": "crm", "kind": "unexpected"}) == 1


def _exposition() -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.REGISTRY).decode()


def test_run_monitoring_stops_on_the_runners_threading_event(clock: Clock) -> None:
    import threading
    from types import SimpleNamespace

    from branchline.monitoring import run_monitoring
    from pydantic import SecretStr

    dead = SimpleNamespace(kind="mariadb", name="erp", branch="b1", host="127.0.0.1", port=1, user="u",
                           password=SecretStr(""), connector_name="branchline.b1.erp")
    pipeline = SimpleNamespace(sources=[dead], metrics=MetricsConfig(), connect=None, kafka=None)
    stop = threading.Event()

    async def scenario() -> None:
        task = asyncio.create_task(run_monitoring(pipeline, stop, runtime="run"))
        while metrics.sample("branchline_errors_total",
                             {"component": "source", "name": "erp", "kind": "unexpected"}) != 2:
            await asyncio.sleep(0.01)  # one failed heartbeat and one failed poll
        stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
    assert metrics.sample("branchline_source_up", {"branch": "b1", "source": "erp"}) == 0
