"""`branchline connectors plan`: the exact Debezium configs, built without any network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from branchline.cli import cli
from branchline.config import load_pipeline
from branchline.connectors.debezium import connector_config, is_control_topic, masked, plan, settings_for
from branchline.errors import ConfigError
from click.testing import CliRunner

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

FILE = """
branch: hq
sources:
  - name: erp
    kind: mariadb
    user: branchline
    password: ${ERP_PASSWORD}
    databases: [erp]
    include: [erp.customers, erp.order_*]
  - name: legacy
    kind: mysql
    user: branchline
    databases: [shop]
    exclude: [shop.audit_log]
    server_id: 4242
  - name: crm
    kind: postgres
    user: debezium
    password: pw
    database: crm
    schemas: [public, sales]
    debezium: {poll.interval.ms: "250", snapshot.mode: no_data}
kafka: {bootstrap_servers: "127.0.0.1:19092", partitions: 3}
connect: {url: "http://127.0.0.1:18083"}
"""


@pytest.fixture()
def pipeline(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "p.yaml"
    path.write_text(FILE)
    return load_pipeline(path, env={"ERP_PASSWORD": "s3cret"})


def test_mariadb_gets_the_mariadb_connector_with_exact_types(pipeline) -> None:  # type: ignore[no-untyped-def]
    config = connector_config(pipeline.source("erp"), pipeline)
    assert config["connector.class"] == "io.debezium.connector.mariadb.MariaDbConnector"
    assert config["topic.prefix"] == "hq.erp"
    assert config["database.password"] == "s3cret"
    expected = {
        "decimal.handling.mode": "precise",
        "time.precision.mode": "adaptive_time_microseconds",
        "bigint.unsigned.handling.mode": "precise",
        "key.converter.schemas.enable": "true",
        "value.converter.schemas.enable": "true",
        "tombstones.on.delete": "true",
        "provide.transaction.metadata": "true",
        "include.schema.changes": "true",
        "skipped.operations": "none",
        "signal.data.collection": "branchline.debezium_signal",
        "schema.history.internal.kafka.topic": "__branchline-schema-history.hq.erp",
        "schema.history.internal.kafka.bootstrap.servers": "127.0.0.1:19092",
        "database.include.list": "erp,branchline",
        "table.include.list": r"erp\.customers,erp\.order_[^.]*,branchline\.debezium_signal,"
                              r"branchline\.debezium_heartbeat",
        "topic.creation.default.partitions": "3",
    }
    assert {k: config[k] for k in expected} == expected
    assert config["database.server.id"] == str(pipeline.source("erp").server_id)


def test_mysql_uses_the_mysql_connector_and_exclude_list(pipeline) -> None:  # type: ignore[no-untyped-def]
    config = connector_config(pipeline.source("legacy"), pipeline)
    assert config["connector.class"] == "io.debezium.connector.mysql.MySqlConnector"
    assert config["table.exclude.list"] == r"shop\.audit_log"
    assert "table.include.list" not in config
    assert config["database.server.id"] == "4242"


def test_postgres_uses_pgoutput_filtered_publication_and_a_heartbeat_query(pipeline) -> None:  # type: ignore[no-untyped-def]
    config = connector_config(pipeline.source("crm"), pipeline)
    assert config["connector.class"] == "io.debezium.connector.postgresql.PostgresConnector"
    assert config["plugin.name"] == "pgoutput"
    assert config["publication.autocreate.mode"] == "filtered"
    assert config["slot.name"] == config["publication.name"] == "branchline_hq_crm"
    assert config["schema.include.list"] == "public,sales,branchline"
    assert config["heartbeat.action.query"].startswith("INSERT INTO \"branchline\".\"debezium_heartbeat\"")
    assert "ON CONFLICT (id) DO UPDATE" in config["heartbeat.action.query"]
    assert "bigint.unsigned.handling.mode" not in config and "schema.history.internal.kafka.topic" not in config
    # overrides from the file win, and are marked as such
    assert config["poll.interval.ms"] == "250" and config["snapshot.mode"] == "no_data"
    why = {s.key: s.why for s in settings_for(pipeline.source("crm"), pipeline)}
    assert "Override" in why["snapshot.mode"]


def test_every_setting_has_a_reason(pipeline) -> None:  # type: ignore[no-untyped-def]
    for source in pipeline.sources:
        for setting in settings_for(source, pipeline):
            assert setting.why, setting.key


def test_plan_masks_secrets(pipeline) -> None:  # type: ignore[no-untyped-def]
    shown = json.dumps({name: masked(cfg) for name, cfg in plan(pipeline).items()})
    assert "s3cret" not in shown and '"pw"' not in shown and "********" in shown


def test_binlog_source_without_kafka_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("branch: hq\nsources: [{name: erp, kind: mariadb, user: u, databases: [erp]}]\n")
    pipeline = load_pipeline(path, env={})
    with pytest.raises(ConfigError, match="`kafka` must be set"):
        connector_config(pipeline.sources[0], pipeline)


def test_control_topics_are_recognised() -> None:
    assert is_control_topic("hq.crm.branchline.debezium_heartbeat")
    assert is_control_topic("__debezium-heartbeat.hq.crm")
    assert is_control_topic("__branchline-notifications.hq.erp")
    assert not is_control_topic("hq.erp.erp.customers")


def test_plan_command_prints_masked_json() -> None:
    result = CliRunner().invoke(cli, ["connectors", "plan", str(EXAMPLES / "pipeline.yaml")])
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert [c["name"] for c in body] == ["branchline.hq.erp", "branchline.hq.crm"]
    assert all(c["config"]["database.password"] == "********" for c in body)
    why = CliRunner().invoke(cli, ["connectors", "plan", str(EXAMPLES / "pipeline.yaml"), "--why", "-s", "erp"])
    assert "bigint.unsigned.handling.mode = precise" in why.output and "2^63-1" in why.output
