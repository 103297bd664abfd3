"""Metric names, types and labels are a public contract: dashboards and alert rules depend on them.

Changing this list means changing infra/grafana and infra/prometheus too, and telling users.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import yaml
from branchline import metrics
from branchline.errors import FatalSinkError
from branchline.events import ChangeEvent, Op, TableId
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

INFRA = Path(__file__).resolve().parents[2] / "infra"

EXPECTED = {
    "branchline_replication_lag_seconds": ("gauge", {"branch", "source", "table", "sink"}),
    "branchline_capture_lag_seconds": ("gauge", {"branch", "source"}),
    "branchline_end_to_end_latency_seconds": ("histogram", {"branch", "source", "sink"}),
    "branchline_events_total": ("counter", {"branch", "source", "table", "op"}),
    "branchline_duplicates_dropped_total": ("counter", {"branch", "source", "table"}),
    "branchline_rows_written_total": ("counter", {"branch", "source", "table", "sink"}),
    "branchline_sink_batch_duration_seconds": ("histogram", {"branch", "source", "sink"}),
    "branchline_snapshot_rows_total": ("counter", {"branch", "source", "table"}),
    "branchline_retries_total": ("counter", {"component", "name"}),
    "branchline_errors_total": ("counter", {"component", "name", "kind"}),
    "branchline_dead_letter_total": ("counter", {"branch", "source", "table"}),
    "branchline_spool_bytes": ("gauge", {"spool"}),
    "branchline_spool_limit_bytes": ("gauge", {"spool"}),
    "branchline_spool_oldest_age_seconds": ("gauge", {"spool"}),
    "branchline_kafka_consumer_lag": ("gauge", {"group", "topic", "partition"}),
    "branchline_connector_state": ("gauge", {"connector", "state"}),
    "branchline_connector_task_state": ("gauge", {"connector", "task", "state"}),
    "branchline_slot_wal_retained_bytes": ("gauge", {"branch", "source", "slot"}),
    "branchline_slot_safe_wal_size_bytes": ("gauge", {"branch", "source", "slot"}),
    "branchline_slot_active": ("gauge", {"branch", "source", "slot"}),
    "branchline_binlog_files_behind": ("gauge", {"branch", "source"}),
    "branchline_binlog_retention_seconds": ("gauge", {"branch", "source"}),
    "branchline_source_up": ("gauge", {"branch", "source"}),
    "branchline_heartbeats_written_total": ("counter", {"branch", "source"}),
    "branchline_source_clock_skew_seconds": ("gauge", {"branch", "source"}),
    "branchline_build_info": ("gauge", {"version", "runtime"}),
}


def _exercise_every_metric() -> None:
    table = TableId(source="erp", branch="b1", database="erp", table="orders")
    now = datetime.now(UTC)
    batch = [ChangeEvent.model_construct(op=Op.CREATE, table=table, key={"id": 1}, before=None, after={"id": 1},
                                         position=1, source_ts=now, txid=None, snapshot=False)]
    metrics.observe_changes_read("b1", "erp", batch)
    metrics.observe_batch_written(table, "cloud", batch, 0.01)
    metrics.observe_duplicates_dropped(table, 1)
    metrics.observe_snapshot_rows(table, 1)
    metrics.observe_dead_letter(table)
    metrics.observe_retry("sink", "cloud")
    metrics.observe_error("sink", "cloud", FatalSinkError("x"))
    metrics.set_spool("main", 1, 2, None)
    metrics.set_kafka_consumer_lag("g", "t", 0, 1)
    metrics.set_connector_states({"c": {"status": {"connector": {"state": "RUNNING"}, "tasks": [{"id": 0}]}}})
    metrics.set_slot_wal("b1", "crm", "s", 1, 2, True)
    metrics.set_binlog_position("b1", "erp", 0, 60)
    metrics.set_source_up("b1", "erp", True)
    metrics.observe_heartbeat_written("b1", "erp", now, 0.0, 0.0)
    metrics.set_build_info("run")


def _families() -> dict[str, tuple[str, set[str]]]:
    text = generate_latest(metrics.REGISTRY).decode()
    found = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("branchline_"):
            continue
        name = family.name + ("_total" if family.type == "counter" else "")
        name = name + ("_info" if family.type == "info" else "")
        labels = {k for s in family.samples for k in s.labels} - {"le"}
        found[name] = ("gauge" if family.type == "info" else family.type, labels)
    return found


def test_metric_names_types_and_labels_are_stable() -> None:
    metrics.reset()
    _exercise_every_metric()
    try:
        assert _families() == EXPECTED
    finally:
        metrics.reset()


def test_metric_names_constant_lists_every_metric() -> None:
    assert set(metrics.METRIC_NAMES) == set(EXPECTED)
    assert len(metrics.METRIC_NAMES) == len(set(metrics.METRIC_NAMES))


def _referenced(text: str) -> set[str]:
    names = set(re.findall(r"\bbranchline_[a-z_]+", text))
    suffixes = ("_bucket", "_count", "_sum")
    return {next((n[: -len(s)] for s in suffixes if n.endswith(s) and n[: -len(s)] in EXPECTED), n) for n in names}


def test_alert_rules_use_only_declared_metrics() -> None:
    rules = (INFRA / "prometheus" / "alerts.yml").read_text()
    used = _referenced(" ".join(r["expr"] for g in yaml.safe_load(rules)["groups"] for r in g["rules"]))
    assert used, "the alert rules must reference Branchline metrics"
    assert used <= set(EXPECTED), used - set(EXPECTED)


def test_dashboard_uses_only_declared_metrics() -> None:
    dashboard = json.loads((INFRA / "grafana" / "branchline.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    used = _referenced(exprs)
    assert used <= set(EXPECTED), used - set(EXPECTED)
    for required in ("branchline_replication_lag_seconds", "branchline_rows_written_total",
                     "branchline_errors_total", "branchline_spool_bytes", "branchline_slot_wal_retained_bytes",
                     "branchline_connector_task_state"):
        assert required in used


def test_dashboard_panels_have_unique_ids_and_do_not_overlap() -> None:
    dashboard = json.loads((INFRA / "grafana" / "branchline.json").read_text())
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        for x in range(box["x"], box["x"] + box["w"]):
            for y in range(box["y"], box["y"] + box["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells.get((x, y))}"
                cells[(x, y)] = panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
