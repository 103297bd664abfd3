"""The alert rules in infra/prometheus are valid, and each fires on series that should fire it.

Uses promtool from Debian's `prometheus` package. When ``CI`` is set a missing promtool is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

RULES_DIR = Path(__file__).resolve().parents[2] / "infra" / "prometheus"


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "`promtool` must be installed (apt-get install prometheus); got nothing on PATH"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def run(promtool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def test_alert_rules_are_valid(promtool: str) -> None:
    result = run(promtool, "check", "rules", "alerts.yml", cwd=RULES_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_is_valid(promtool: str) -> None:
    result = run(promtool, "check", "config", "prometheus.yml", cwd=RULES_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_each_alert_fires_on_its_test_series(promtool: str) -> None:
    result = run(promtool, "test", "rules", "alerts_test.yml", cwd=RULES_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_rule_test() -> None:
    rules = yaml.safe_load((RULES_DIR / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tests = yaml.safe_load((RULES_DIR / "alerts_test.yml").read_text())
    tested = {a["alertname"] for t in tests["tests"] for a in t["alert_rule_test"] if a["exp_alerts"]}
    required = {"BranchlineReplicationLagHigh", "BranchlineConnectorTaskFailed", "BranchlineSlotWalRetainedHigh",
                "BranchlineSpoolAlmostFull", "BranchlineWalRetentionApproaching",
                "BranchlineBinlogRetentionApproaching", "BranchlineDeadLetterGrowth"}
    assert required <= alerts
    assert tested == alerts


def test_rule_tests_fail_when_an_alert_would_never_fire(promtool: str, tmp_path: Path) -> None:
    """The rule tests can fail: with the lag threshold raised out of reach, they must."""
    rules = (RULES_DIR / "alerts.yml").read_text()
    broken = rules.replace("(branchline_replication_lag_seconds) > 300", "(branchline_replication_lag_seconds) > 1e9")
    assert broken != rules
    (tmp_path / "alerts.yml").write_text(broken)
    shutil.copy(RULES_DIR / "alerts_test.yml", tmp_path / "alerts_test.yml")
    result = run(promtool, "test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "BranchlineReplicationLagHigh" in result.stdout + result.stderr


def dashboard_queries() -> list[str]:
    """Every PromQL query of the Grafana dashboard, with Grafana's variables filled in."""
    import json

    dashboard = json.loads((RULES_DIR.parent / "grafana" / "branchline.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    return [q.replace("$__rate_interval", "1m").replace("$branch", ".*").replace("$source", ".*") for q in queries]


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    queries = dashboard_queries()
    assert len(queries) > 20
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": q} for i, q in enumerate(queries)]}]}
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump(rules))
    result = run(promtool, "check", "rules", "dashboard_rules.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
