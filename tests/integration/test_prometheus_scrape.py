"""A real Prometheus (Debian's `prometheus` package) scrapes Branchline's `/metrics` and answers queries.

The Prometheus runs on its own loopback port with its own data folder; it never touches a system
service. When ``CI`` is set a missing `prometheus` binary is a failure, never a skip.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from branchline import metrics
from branchline.events import ChangeEvent, Op, TableId
from branchline.metrics_config import MetricsConfig

pytestmark = pytest.mark.integration

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "infra" / "prometheus"


def query(url: str, promql: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


@pytest.fixture
def branchline_metrics() -> Iterator[metrics.MetricsServer]:
    metrics.reset()
    server = metrics.serve_metrics(MetricsConfig(port=0), runtime="run")
    assert server is not None
    yield server
    server.close()
    metrics.reset()


def test_prometheus_scrapes_lag_and_answers_a_query(
    tmp_path: Path, branchline_metrics: metrics.MetricsServer, wait_for: Any, prometheus: Any
) -> None:
    table = TableId(source="erp", branch="b1", database="erp", table="orders")
    committed = datetime.now(UTC) - timedelta(seconds=30)
    events = [ChangeEvent.model_construct(op=Op.CREATE, table=table, key={"id": 1}, before=None, after={"id": 1},
                                          position=1, source_ts=committed, txid=None, snapshot=False)]
    metrics.observe_batch_written(table, "cloud", events, 0.05)

    with prometheus(tmp_path, [f"127.0.0.1:{branchline_metrics.port}"]) as url:
        promql = 'branchline_replication_lag_seconds{branch="b1",source="erp",table="erp.orders",sink="cloud"}'
        first = wait_for("the lag series to be scraped", lambda: query(url, promql))
        (series,) = first
        assert series["metric"]["job"] == "branchline"
        lag_then = float(series["value"][1])
        assert 30 <= lag_then < 120
        # nothing new becomes durable: lag measured by Prometheus keeps rising between scrapes
        later = wait_for("lag to rise", lambda: [s for s in query(url, promql) if float(s["value"][1]) > lag_then + 1])
        assert float(later[0]["value"][1]) > lag_then

        rows = query(url, 'sum(branchline_rows_written_total{table="erp.orders"})')
        assert float(rows[0]["value"][1]) == 1
        rules = httpx.get(f"{url}/api/v1/rules", timeout=5).json()["data"]["groups"]
        loaded = {r["name"] for g in rules for r in g["rules"]}
        assert {"BranchlineReplicationLagHigh", "BranchlineConnectorTaskFailed"} <= loaded
        targets = httpx.get(f"{url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        assert [t["health"] for t in targets] == ["up"]
        # every dashboard query runs against the live server (query() asserts status success)
        panel_lag = next(q for q in dashboard_queries() if q.startswith("max by (branch, source, table, sink)"))
        for promql in dashboard_queries():
            query(url, promql)
        assert query(url, panel_lag)[0]["metric"]["table"] == "erp.orders"


def dashboard_queries() -> list[str]:
    """Every PromQL query of the Grafana dashboard, with Grafana's variables filled in."""
    dashboard = json.loads((PROMETHEUS_DIR.parent / "grafana" / "branchline.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    return [q.replace("$__rate_interval", "1m").replace("$branch", ".*").replace("$source", ".*") for q in queries]
