"""`branchline status`: the report names what is down, and shows lag, spool and the last error that the
running runtime serves. Sources here point at a closed loopback port; the runtime is a real metrics server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from branchline import metrics
from branchline.cli import cli
from branchline.errors import RetryableSinkError
from branchline.events import ChangeEvent, Op, TableId
from branchline.metrics_config import MetricsConfig
from click.testing import CliRunner

PIPELINE = """
name: shop
branch: b1
sources:
  - {name: erp, kind: mariadb, host: 127.0.0.1, port: 1, user: root, databases: [erp]}
  - {name: crm, kind: postgres, host: 127.0.0.1, port: 1, user: postgres, database: crm}
metrics: {port: 1}
"""


@pytest.fixture
def pipeline_file(tmp_path: Path) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(PIPELINE)
    return path


@pytest.fixture
def runtime() -> Iterator[metrics.MetricsServer]:
    metrics.reset()
    table = TableId(source="erp", branch="b1", database="erp", table="orders")
    committed = datetime.now(UTC) - timedelta(seconds=90)
    batch = [ChangeEvent.model_construct(op=Op.CREATE, table=table, key={"id": 1}, before=None, after={"id": 1},
                                         position=1, source_ts=committed, txid=None, snapshot=False)]
    metrics.observe_batch_written(table, "cloud", batch, 0.01)
    metrics.set_spool("shop", 800, 1000, None)
    metrics.set_kafka_consumer_lag("branchline-shop", "b1.erp.erp.orders", 0, 5)
    metrics.set_kafka_consumer_lag("branchline-shop", "b1.erp.erp.orders", 1, 7)
    metrics.observe_heartbeat_written("b1", "erp", 100.25, 99.0, 101.0)
    metrics.observe_error("sink", "cloud", RetryableSinkError("`cloud` must answer; got connection refused"))
    server = metrics.serve_metrics(MetricsConfig(port=0))
    assert server is not None
    yield server
    server.close()
    metrics.reset()


def test_status_json_names_every_problem_when_nothing_answers(pipeline_file: Path) -> None:
    result = CliRunner().invoke(cli, ["status", str(pipeline_file), "--json"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.output)
    assert report["healthy"] is False
    assert [(s["name"], s["up"]) for s in report["sources"]] == [("erp", False), ("crm", False)]
    assert all(s["error"] for s in report["sources"])
    assert report["runtime"] == {"url": "http://127.0.0.1:1", "reachable": False, "error": report["runtime"]["error"]}
    assert len(report["problems"]) == 3
    assert report["connect"] is None  # no `connect:` section: the embedded runtime


def test_status_shows_lag_spool_and_last_error_from_the_running_runtime(
        pipeline_file: Path, runtime: metrics.MetricsServer) -> None:
    result = CliRunner().invoke(cli, ["status", str(pipeline_file), "--json", "--url", runtime.url])
    report = json.loads(result.output)
    (table,) = report["tables"]
    assert (table["table"], table["sink"], table["rows_written"]) == ("erp.orders", "cloud", 1)
    assert 90 <= table["replication_lag_s"] < 150
    assert report["spools"][0]["bytes"] == 800
    assert report["last_error"]["kind"] == "RetryableSinkError"
    assert report["kafka_consumer_lag"] == [{"group": "branchline-shop", "topic": "b1.erp.erp.orders", "lag": 12}]
    assert [s["clock_skew_s"] for s in report["sources"]] == [0.25, None]
    assert report["runtime"]["reachable"] is True


def test_status_screen_renders_the_same_report(pipeline_file: Path, runtime: metrics.MetricsServer) -> None:
    result = CliRunner().invoke(cli, ["status", str(pipeline_file), "--url", runtime.url])
    assert result.exit_code == 1  # the sources are down
    for text in ("needs attention", "b1/erp", "down", "erp.orders", "Spool shop", "RetryableSinkError",
                 "+0.250 s", "12 messages"):
        assert text in result.output
