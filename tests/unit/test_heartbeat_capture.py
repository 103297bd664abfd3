"""How the runtimes see heartbeats: `branchline run` captures the heartbeat table through a copy of the
pipeline, sinks skip writing it while the write path still measures it, and the worker tracks every
table topic from start-up. Pure functions and a stand-in sink; no network."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from branchline import metrics
from branchline.config import load_pipeline
from branchline.events import ChangeEvent, Column, ColumnType, Op, TableId, TableSchema
from branchline.heartbeat import with_heartbeat_capture
from branchline.monitoring import tables_of_topics, track_tables
from branchline.runtime.runner import table_filter


@pytest.fixture(autouse=True)
def fresh_metrics() -> Iterator[None]:
    metrics.reset()
    yield
    metrics.reset()


def _pipeline(tmp_path: Path, sources: str) -> Any:
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"branch: b1\nsources:\n{sources}sinks:\n  cloud: {{kind: postgres, user: u, database: d}}\n")
    return load_pipeline(path, env={})


def _accepts(source: Any, qualified: str) -> bool:
    namespace, table = qualified.split(".")
    return namespace in source.namespaces and table_filter(source.include, source.exclude)(namespace, table)


def test_include_lists_get_the_heartbeat_table_and_its_namespace(tmp_path: Path) -> None:
    pipeline = _pipeline(tmp_path, "  - {name: crm, kind: postgres, user: u, database: crm, include: [public.a]}\n"
                                   "  - {name: erp, kind: mariadb, user: u, databases: [erp], include: [erp.x]}\n")
    captured = with_heartbeat_capture(pipeline)
    crm, erp = captured.sources
    assert crm.schemas == ("public", "branchline") and crm.include == ("public.a", "branchline.debezium_heartbeat")
    assert erp.databases == ("erp", "branchline") and erp.include == ("erp.x", "branchline.debezium_heartbeat")
    for source in (crm, erp):
        assert _accepts(source, "branchline.debezium_heartbeat")
        assert not _accepts(source, "branchline.debezium_signal")
    # the file's own view is unchanged: verify and the connectors still see only the user's tables
    assert pipeline.sources[0].include == ("public.a",) and pipeline.sources[1].databases == ("erp",)
    assert (crm.slot, crm.publication) == (pipeline.sources[0].slot, pipeline.sources[0].publication)


def test_without_include_the_namespace_is_added_and_the_signal_table_left_out(tmp_path: Path) -> None:
    pipeline = _pipeline(tmp_path, "  - {name: erp, kind: mariadb, user: u, databases: [erp]}\n"
                                   "  - {name: crm, kind: postgres, user: u, database: crm, exclude: [public.z]}\n")
    erp, crm = with_heartbeat_capture(pipeline).sources
    assert erp.databases == ("erp", "branchline") and erp.exclude == ("branchline.debezium_signal",)
    assert crm.exclude == ("public.z", "branchline.debezium_signal")
    for source in (erp, crm):
        assert _accepts(source, "branchline.debezium_heartbeat")
        assert not _accepts(source, "branchline.debezium_signal")
    assert _accepts(erp, "erp.anything") and not _accepts(crm, "public.z")


def test_only_the_named_sources_capture_heartbeats(tmp_path: Path) -> None:
    pipeline = _pipeline(tmp_path, "  - {name: erp, kind: mariadb, user: u, databases: [erp]}\n"
                                   "  - {name: crm, kind: postgres, user: u, database: crm}\n")
    erp, crm = with_heartbeat_capture(pipeline, ["crm"]).sources
    assert erp == pipeline.sources[0]
    assert crm.schemas == ("public", "branchline")


def _schema(namespace: str, table: str) -> TableSchema:
    table_id = TableId(source="crm", branch="b1", database="crm", schema_=namespace, table=table)
    return TableSchema(id=table_id, columns=(Column(name="id", type=ColumnType.INT32, nullable=False),),
                       primary_key=("id",))


class _Recorder:
    """A stand-in sink: remembers what it was asked to write."""

    capabilities = "caps"

    def __init__(self) -> None:
        self.written: list[str] = []
        self.flushed = 0

    async def write_batch(self, table: TableSchema, events: Any) -> None:
        self.written.append(table.id.qualified)

    async def flush(self) -> None:
        self.flushed += 1


def test_the_heartbeat_table_is_measured_but_never_written() -> None:
    inner = _Recorder()
    sink = metrics.skip_heartbeat_writes(inner)
    assert isinstance(sink, metrics.HeartbeatSkippingSink) and metrics.skip_heartbeat_writes(sink) is sink
    assert sink.capabilities == "caps"
    beat, user = _schema("branchline", "debezium_heartbeat"), _schema("public", "accounts")
    stamp = datetime(2026, 1, 1, tzinfo=UTC)
    beats = [ChangeEvent.model_construct(op=Op.UPDATE, table=beat.id, key={"id": 1}, before=None,
                                         after={"id": 1, "ts": stamp}, position=5, source_ts=stamp, txid=None,
                                         snapshot=False)]

    async def write() -> None:
        await sink.write_batch(user, [])
        await sink.write_batch(beat, beats)
        await sink.flush()

    asyncio.run(write())
    assert inner.written == ["public.accounts"] and inner.flushed == 1
    # the runtime's write path still observes the (skipped) heartbeat batch after it "returned"
    metrics.track_table(user.id, "cloud")
    metrics.observe_batch_written(beat.id, "cloud", beats, 0.0, now=stamp.timestamp() + 3)
    lag = metrics.sample("branchline_replication_lag_seconds",
                         {"branch": "b1", "source": "crm", "table": "public.accounts", "sink": "cloud"})
    assert lag is not None and lag == pytest.approx(metrics._clock() - stamp.timestamp(), abs=5)
    assert metrics.sample("branchline_rows_written_total", {"branch": "b1", "source": "crm",
                                                             "table": "branchline.debezium_heartbeat",
                                                             "sink": "cloud"}) is None


def test_worker_tracks_every_table_topic_but_heartbeats(tmp_path: Path) -> None:
    pipeline = _pipeline(tmp_path, "  - {name: crm, kind: postgres, user: u, database: crm}\n"
                                   "  - {name: crm2, kind: postgres, user: u, database: crm, slot: s2, publication: p2}\n")
    topics = ["b1.crm.public.accounts", "b1.crm2.public.leads", "b1.crm.branchline.debezium_heartbeat",
              "someone.else.public.x"]
    tables = tables_of_topics(topics, pipeline.sources)
    assert {topic: (t.source, t.qualified) for topic, t in tables.items()} == {
        "b1.crm.public.accounts": ("crm", "public.accounts"), "b1.crm2.public.leads": ("crm2", "public.leads"),
        "b1.crm.branchline.debezium_heartbeat": ("crm", "branchline.debezium_heartbeat")}
    assert track_tables(tables.values(), ["cloud", "lake"]) == 4  # heartbeat tables get no series of their own
    snapshot = metrics.snapshot()
    assert {(t["source"], t["table"], t["sink"]) for t in snapshot["tables"]} == {
        ("crm", "public.accounts", "cloud"), ("crm", "public.accounts", "lake"),
        ("crm2", "public.leads", "cloud"), ("crm2", "public.leads", "lake")}
    metrics.observe_heartbeat_durable("b1", "crm", "cloud", metrics._clock() - 2)
    lag = metrics.sample("branchline_replication_lag_seconds",
                         {"branch": "b1", "source": "crm", "table": "public.accounts", "sink": "cloud"})
    assert lag == pytest.approx(2, abs=1)


def test_the_worker_reads_source_clocks_and_writes_no_heartbeat() -> None:
    import threading
    from types import SimpleNamespace

    from branchline.metrics_config import MetricsConfig
    from branchline.monitoring import run_monitoring
    from pydantic import SecretStr

    dead = SimpleNamespace(kind="postgres", name="crm", branch="b1", host="127.0.0.1", port=1, user="u",
                           password=SecretStr(""), database="d", slot="s", connector_name="branchline.b1.crm")
    pipeline = SimpleNamespace(sources=[dead], metrics=MetricsConfig(), connect=None, kafka=None)
    stop = threading.Event()

    async def scenario() -> None:
        task = asyncio.create_task(run_monitoring(pipeline, stop, runtime="worker"))
        while metrics.sample("branchline_errors_total",
                             {"component": "source", "name": "crm", "kind": "unexpected"}) != 2:
            await asyncio.sleep(0.01)  # one failed clock probe and one failed poll
        stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
    assert metrics.sample("branchline_source_up", {"branch": "b1", "source": "crm"}) == 0
    assert metrics.sample("branchline_heartbeats_written_total", {"branch": "b1", "source": "crm"}) is None


def test_a_table_whose_topic_is_behind_ignores_the_heartbeat() -> None:
    """Distributed path: a heartbeat travels its own topic; a table with a backlog shows its own lag."""
    busy = TableId(source="crm", branch="b1", database="crm", schema_="public", table="busy")
    idle = TableId(source="crm", branch="b1", database="crm", schema_="public", table="idle")
    metrics.register_table_topic("b1.crm.public.busy", busy)
    metrics.register_table_topic("b1.crm.public.idle", idle)
    now = metrics._clock()
    stamp = datetime.fromtimestamp(now - 100, UTC)
    old = [ChangeEvent.model_construct(op=Op.CREATE, table=busy, key={"id": 1}, before=None, after={"id": 1},
                                       position=1, source_ts=stamp, txid=None, snapshot=False)]
    metrics.observe_batch_written(busy, "cloud", old, 0.01)
    metrics.track_table(idle, "cloud")
    metrics.observe_heartbeat_durable("b1", "crm", "cloud", now - 1)

    def lag(table: str) -> float | None:
        return metrics.sample("branchline_replication_lag_seconds",
                              {"branch": "b1", "source": "crm", "table": table, "sink": "cloud"})

    assert lag("public.busy") == pytest.approx(1, abs=1) and lag("public.idle") == pytest.approx(1, abs=1)
    metrics.set_kafka_consumer_lag("branchline-p", "b1.crm.public.busy", 0, 5000)
    metrics.set_kafka_consumer_lag("branchline-p", "b1.crm.public.idle", 0, 0)
    assert lag("public.busy") == pytest.approx(100, abs=2)  # its own watermark: it is really behind
    assert lag("public.idle") == pytest.approx(1, abs=1)
    (busy_row,) = [t for t in metrics.snapshot()["tables"] if t["table"] == "public.busy"]
    assert busy_row["replication_lag_s"] == pytest.approx(100, abs=2)
    metrics.set_kafka_consumer_lag("branchline-p", "b1.crm.public.busy", 0, 0)
    assert lag("public.busy") == pytest.approx(1, abs=1)


def test_a_run_that_exits_on_its_own_writes_and_captures_no_heartbeats(tmp_path: Path) -> None:
    from branchline.runtime.cli import _heartbeats_on

    pipeline = _pipeline(tmp_path, "  - {name: erp, kind: mariadb, user: u, databases: [erp]}\n")
    for idle_s, after_snapshot in ((3.0, False), (None, True)):
        run = _heartbeats_on(pipeline, idle_s, after_snapshot)
        assert run.metrics.heartbeat.enabled is False
        assert run.sources == pipeline.sources  # nothing extra captured either
    assert pipeline.metrics.heartbeat.enabled is True  # the file's own model is left alone


def test_a_skipped_heartbeat_still_reaches_a_store_that_can_be_probed() -> None:
    """An unreachable store must stop heartbeats (their write fails), or idle tables' lag would stay low."""
    from branchline.errors import RetryableSinkError

    class _Probed(_Recorder):
        def __init__(self, reachable: bool) -> None:
            super().__init__()
            self.reachable, self.probes = reachable, 0

        async def probe(self) -> None:
            self.probes += 1
            if not self.reachable:
                raise RetryableSinkError("`cloud` must answer; got connection refused")

    beat = _schema("branchline", "debezium_heartbeat")
    up, down = _Probed(True), _Probed(False)
    asyncio.run(metrics.skip_heartbeat_writes(up).write_batch(beat, []))
    assert up.probes == 1 and up.written == []
    with pytest.raises(RetryableSinkError):
        asyncio.run(metrics.skip_heartbeat_writes(down).write_batch(beat, []))
    assert down.written == []
