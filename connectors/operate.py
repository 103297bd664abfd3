"""What `branchline connectors apply|status|pause|resume|restart|delete` do, apart from printing."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from branchline.config import PipelineConfig
from branchline.connectors.connect import ConnectClient, ConnectorNotFound, ConnectorState
from branchline.connectors.debezium import connector_config
from branchline.errors import ConfigError, FatalSourceError


@dataclass(frozen=True)
class ApplyResult:
    name: str
    action: str
    """created, updated or unchanged."""
    state: ConnectorState | None = None


def _sources(pipeline: PipelineConfig, only: str | None) -> list[Any]:
    return [pipeline.source(only)] if only else list(pipeline.sources)


def apply(client: ConnectClient, pipeline: PipelineConfig, only: str | None = None, *, wait: bool = True,
          timeout_s: float = 120.0) -> list[ApplyResult]:
    """Create or update each connector; a connector whose stored config already matches is not touched.

    Connect validates each config first, so a bad property fails before anything changes."""
    desired = {source.connector_name: connector_config(source, pipeline) for source in _sources(pipeline, only)}
    problems: list[str] = []
    for name, config in desired.items():
        for problem in client.validate(name, config):
            problems.append(f"{name}: {problem}")
    if problems:
        raise ConfigError(problems, source="Kafka Connect validation")
    results = []
    for name, config in desired.items():
        current = client.config(name)
        if current is not None and {k: v for k, v in current.items() if k != "name"} == config:
            action = "unchanged"
        else:
            action = "created" if client.put_config(name, config) else "updated"
            if current is not None and action == "created":
                action = "updated"
        state = client.wait_for(name, {"RUNNING"}, timeout_s) if wait else None
        results.append(ApplyResult(name, action, state))
    return results


def act(client: ConnectClient, pipeline: PipelineConfig, only: str | None, action: str) -> list[tuple[str, str]]:
    """pause / resume / restart / delete each connector of the file."""
    outcomes = []
    for source in _sources(pipeline, only):
        name = source.connector_name
        if action == "delete":
            outcomes.append((name, "deleted" if client.delete(name) else "not present"))
            continue
        try:
            getattr(client, action)(name)
        except ConnectorNotFound:
            outcomes.append((name, "not present (run `branchline connectors apply`)"))
            continue
        outcomes.append((name, {"pause": "pause requested", "resume": "resume requested",
                                "restart": "restart requested"}[action]))
    return outcomes


def retire(client: ConnectClient, name: str, timeout_s: float = 60.0) -> bool:
    """Stop a connector, forget its offsets, delete it: a later connector of that name starts afresh.
    False when there was no such connector. (Topics and PostgreSQL slots are left alone.)"""
    if client.config(name) is None:
        return False
    client.stop(name)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.reset_offsets(name)
            break
        except (ConfigError, FatalSourceError):
            if time.monotonic() > deadline:  # Connect answers 400 until the stop has completed
                raise
            time.sleep(0.5)
    client.delete(name)
    return True


@dataclass
class StatusReport:
    source: str
    name: str
    state: ConnectorState | None
    snapshot: dict[str, Any] | None = None
    snapshot_error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def severity(self) -> int:
        """0 running, 1 paused/missing/starting, 2 failed."""
        if self.state is None:
            return 1
        if self.state.state == "FAILED" or any(t.state == "FAILED" for t in self.state.tasks):
            return 2
        return 0 if self.state.healthy else 1

    def to_json(self) -> dict[str, Any]:
        state = self.state
        return {
            "source": self.source,
            "connector": self.name,
            "state": state.state if state else "MISSING",
            "worker_id": state.worker_id if state else None,
            "trace": state.trace if state else None,
            "tasks": [{"id": t.id, "state": t.state, "worker_id": t.worker_id, "trace": t.trace}
                      for t in (state.tasks if state else ())],
            "snapshot": self.snapshot,
        }

    def render(self) -> str:
        state = self.state
        if state is None:
            return f"{self.name}: MISSING (run `branchline connectors apply`)"
        lines = [f"{self.name}: {state.state} on {state.worker_id or '?'}"]
        if state.trace:
            lines.append("  connector trace:\n" + _indent(state.trace))
        for task in state.tasks:
            lines.append(f"  task {task.id}: {task.state} on {task.worker_id}")
            if task.trace:
                lines.append(_indent(task.trace))
        if not state.tasks:
            lines.append("  no tasks yet")
        if self.snapshot:
            kind = str(self.snapshot.get("aggregate_type") or "snapshot").lower()
            lines.append(f"  {kind}: " + _render_snapshot(self.snapshot))
        if self.snapshot_error:
            lines.append(f"  snapshot progress: unknown ({self.snapshot_error})")
        return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines())


def _render_snapshot(snapshot: dict[str, Any]) -> str:
    text = snapshot.get("type", "?")
    data = snapshot.get("additional_data") or {}
    if data.get("current_collection_in_progress"):
        text += f", table {data['current_collection_in_progress']}"
    if data.get("last_processed_key"):
        text += f", at key {data['last_processed_key']} of {data.get('maximum_key', '?')}"
    if data.get("data_collections"):
        text += f" (tables: {data['data_collections']})"
    return text


def status(client: ConnectClient, pipeline: PipelineConfig, only: str | None = None, *,
           snapshots: bool = True) -> list[StatusReport]:
    reports = []
    for source in _sources(pipeline, only):
        try:
            state: ConnectorState | None = client.status(source.connector_name)
        except ConnectorNotFound:
            state = None
        report = StatusReport(source.name, source.connector_name, state)
        if snapshots and pipeline.kafka is not None and state is not None:
            from branchline.connectors.snapshot import latest_notification

            try:
                report.snapshot = latest_notification(pipeline, source,
                                                      kinds=("Incremental Snapshot", "Initial Snapshot"))
            except Exception as exc:  # noqa: BLE001 - progress is informative; the state above still stands
                report.snapshot_error = f"{type(exc).__name__}: {exc}"
        reports.append(report)
    return reports


def dumps(reports: list[StatusReport]) -> str:
    return json.dumps([r.to_json() for r in reports], indent=2)
