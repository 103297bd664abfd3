"""Pure parts of operating connectors: Connect status parsing, snapshot signals."""

from __future__ import annotations

import json

import pytest
from branchline.config import BinlogSourceConfig
from branchline.connectors.connect import ConnectorState
from branchline.connectors.operate import StatusReport
from branchline.connectors.snapshot import _check_tables, signal_row
from branchline.errors import ConfigError

FAILED = {
    "name": "branchline.hq.crm",
    "connector": {"state": "RUNNING", "worker_id": "127.0.0.1:18083"},
    "tasks": [{"id": 0, "state": "FAILED", "worker_id": "127.0.0.1:18083",
               "trace": "org.apache.kafka.connect.errors.ConnectException: boom\n\tat x.y(Z.java:1)"}],
    "type": "source",
}


def test_a_failed_task_makes_the_report_severe_and_shows_its_trace() -> None:
    state = ConnectorState.from_json(FAILED)
    assert not state.healthy and state.tasks[0].trace
    report = StatusReport("crm", state.name, state)
    assert report.severity == 2
    text = report.render()
    assert "task 0: FAILED" in text and "ConnectException: boom" in text
    assert report.to_json()["tasks"][0]["state"] == "FAILED"


def test_missing_and_paused_connectors_are_not_healthy() -> None:
    assert StatusReport("crm", "n", None).severity == 1
    paused = dict(FAILED, connector={"state": "PAUSED", "worker_id": "w"},
                  tasks=[{"id": 0, "state": "PAUSED", "worker_id": "w"}])
    assert StatusReport("crm", "n", ConnectorState.from_json(paused)).severity == 1
    running = dict(FAILED, tasks=[{"id": 0, "state": "RUNNING", "worker_id": "w"}])
    assert StatusReport("crm", "n", ConnectorState.from_json(running)).severity == 0


def test_snapshot_progress_is_rendered_from_the_latest_notification() -> None:
    state = ConnectorState.from_json(dict(FAILED, tasks=[{"id": 0, "state": "RUNNING", "worker_id": "w"}]))
    report = StatusReport("erp", "n", state, snapshot={
        "type": "IN_PROGRESS", "aggregate_type": "Incremental Snapshot",
        "additional_data": {"current_collection_in_progress": "erp.orders", "last_processed_key": "[1024]",
                            "maximum_key": "[5000]", "data_collections": "erp.orders"}})
    assert "incremental snapshot: IN_PROGRESS, table erp.orders, at key [1024] of [5000]" in report.render()


def test_signal_row_is_debeziums_incremental_snapshot_signal() -> None:
    signal_id, kind, data = signal_row(["erp.orders", "erp.customers"])
    assert kind == "execute-snapshot" and len(signal_id) == 36
    assert json.loads(data) == {"data-collections": ["erp.orders", "erp.customers"], "type": "incremental"}


def test_snapshot_tables_must_belong_to_the_source() -> None:
    source = BinlogSourceConfig(name="erp", kind="mariadb", branch="hq", user="u", databases=("erp",))
    _check_tables(source, ["erp.orders"])
    with pytest.raises(ConfigError) as info:
        _check_tables(source, ["orders", "crm.accounts"])
    assert len(info.value.problems) == 2
