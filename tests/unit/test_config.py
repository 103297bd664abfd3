"""The pipeline file: validation, error reporting, `${ENV}` interpolation, derived names."""

from __future__ import annotations

from pathlib import Path

import pytest
from branchline.cli import cli
from branchline.config import BinlogSourceConfig, PostgresSourceConfig, load_pipeline
from branchline.errors import ConfigError
from click.testing import CliRunner

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

MINIMAL = """
branch: hq
sources:
  - name: erp
    kind: mariadb
    user: branchline
    password: ${ERP_PASSWORD}
    databases: [erp]
  - name: crm
    kind: postgres
    user: postgres
    database: crm
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    return path


def problems(path: Path, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_pipeline(path, env={} if env is None else env)
    return info.value.problems


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_is_valid(example: Path) -> None:
    config = load_pipeline(example, env={})
    assert config.sources


def test_minimal_file_derives_branch_slot_publication_and_server_id(tmp_path: Path) -> None:
    config = load_pipeline(write(tmp_path, MINIMAL), env={"ERP_PASSWORD": "s3cret"})
    erp, crm = config.sources
    assert isinstance(erp, BinlogSourceConfig) and isinstance(crm, PostgresSourceConfig)
    assert (erp.branch, crm.branch) == ("hq", "hq")
    assert erp.port == 3306 and crm.port == 5432
    assert erp.password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(config)
    assert crm.slot == crm.publication == "branchline_hq_crm"
    assert erp.topic_prefix == "hq.erp" and erp.table_topic("erp", "customers") == "hq.erp.erp.customers"
    assert crm.table_topic("public", "contacts") == "hq.crm.public.contacts"
    assert erp.connector_name == "branchline.hq.erp"
    # the derived server id is stable and differs between branches
    again = load_pipeline(write(tmp_path, MINIMAL), env={"ERP_PASSWORD": "x"}).sources[0]
    other = load_pipeline(write(tmp_path, MINIMAL.replace("branch: hq", "branch: north")), env={"ERP_PASSWORD": "x"})
    assert isinstance(again, BinlogSourceConfig) and isinstance(other.sources[0], BinlogSourceConfig)
    assert again.server_id == erp.server_id != other.sources[0].server_id


def test_every_problem_is_reported_at_once_with_its_path(tmp_path: Path) -> None:
    text = """
name: Bad Name
branch: hq
sources:
  - name: erp
    kind: mariadb
    hots: 127.0.0.1
    port: abc
    user: u
    databases: []
  - name: crm
    kind: oracle
sinks:
  cloud: {kind: postgres, port: 99999, pasword: x}
connect: {url: ftp://x}
"""
    found = problems(write(tmp_path, text))
    joined = "\n".join(found)
    assert "name: must be lower-case" in joined
    assert "sources[erp].hots: is not a known key" in joined
    assert "sources[erp].port: must be a valid integer" in joined and "got 'abc'" in joined
    assert "sources[erp].databases: must list at least 1 item" in joined
    assert "sources[crm].kind: must be one of 'mariadb', 'mysql', 'postgres'; got 'oracle'" in joined
    assert "sinks.cloud.port: must be less than or equal to 65535; got 99999" in joined
    assert "sinks.cloud.pasword: is not a known key" in joined
    assert "connect.url:" in joined
    assert len(found) == 8, found


def test_error_message_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "sources: []\n")
    with pytest.raises(ConfigError) as info:
        load_pipeline(path, env={})
    assert str(info.value).startswith(f"{path}: ")


def test_missing_env_variable_is_named_and_other_errors_still_reported(tmp_path: Path) -> None:
    text = MINIMAL.replace("database: crm", "database: crm\n    port: nope")
    found = problems(write(tmp_path, text))
    assert "sources[erp].password: environment variable `ERP_PASSWORD` must be set; got nothing" in found
    assert any(p.startswith("sources[crm].port: must be a valid integer") for p in found)


def test_env_default_and_escape(tmp_path: Path) -> None:
    text = MINIMAL.replace("${ERP_PASSWORD}", "${ERP_PASSWORD:-fallback}").replace(
        "user: postgres", "user: $${literal}")
    config = load_pipeline(write(tmp_path, text), env={})
    assert config.sources[0].password.get_secret_value() == "fallback"
    assert config.sources[1].user == "${literal}"


def test_secret_and_env_values_are_never_echoed(tmp_path: Path) -> None:
    text = MINIMAL.replace("database: crm", "database: crm\n    port: ${CRM_PORT}\n    password: [hunter2]")
    found = problems(write(tmp_path, text), env={"ERP_PASSWORD": "x", "CRM_PORT": "topsecret"})
    joined = "\n".join(found)
    assert "sources[crm].port" in joined and "sources[crm].password" in joined
    assert "topsecret" not in joined and "hunter2" not in joined


def test_duplicate_key_is_an_error_with_its_line(tmp_path: Path) -> None:
    found = problems(write(tmp_path, "branch: hq\nbranch: north\nsources: []\n"))
    assert "line 2" in found[0] and "'branch' appears twice" in found[0]


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    found = problems(write(tmp_path, "sources:\n  - name: [erp\n"))
    assert found[0].startswith("line ") and "must be valid YAML" in found[0]


def test_include_and_exclude_together_are_rejected(tmp_path: Path) -> None:
    text = MINIMAL.replace("databases: [erp]", "databases: [erp]\n    include: [erp.a]\n    exclude: [erp.b]")
    found = problems(write(tmp_path, text), env={"ERP_PASSWORD": "x"})
    assert any("`include` and `exclude` must not both be set" in p for p in found)


def test_table_outside_the_captured_databases_is_rejected(tmp_path: Path) -> None:
    text = MINIMAL.replace("databases: [erp]", "databases: [erp]\n    include: [sales.orders]")
    found = problems(write(tmp_path, text), env={"ERP_PASSWORD": "x"})
    assert any("table `sales.orders` must be in one of ['erp']" in p for p in found)


def test_clashing_server_ids_and_slots_are_rejected(tmp_path: Path) -> None:
    text = """
branch: hq
sources:
  - {name: a, kind: mariadb, user: u, databases: [x], server_id: 7}
  - {name: b, kind: mysql, user: u, databases: [y], server_id: 7}
  - {name: c, kind: postgres, user: u, database: d, slot: same}
  - {name: d, kind: postgres, user: u, database: d, slot: same}
"""
    joined = "\n".join(problems(write(tmp_path, text)))
    assert "`sources.b.server_id` must differ from `a`'s; got 7" in joined
    assert "`sources.d.slot` must differ from `c`'s; got 'same'" in joined


def test_source_without_branch_is_an_error(tmp_path: Path) -> None:
    found = problems(write(tmp_path, MINIMAL.replace("branch: hq\n", "")), env={"ERP_PASSWORD": "x"})
    assert "sources[erp].branch: is required" in found and "sources[crm].branch: is required" in found


def test_config_check_command(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["config", "check", str(EXAMPLES / "pipeline.yaml")])
    assert result.exit_code == 0, result.output
    assert "source erp: mariadb 127.0.0.1:13306" in result.output
    bad = write(tmp_path, "sources: []\n")
    result = runner.invoke(cli, ["config", "check", str(bad)])
    assert isinstance(result.exception, ConfigError)


def test_other_stages_sections_are_validated_in_the_same_pass(tmp_path: Path) -> None:
    text = MINIMAL + """
tables:
  erp.customers:
    mask: {email: {method: sha256, salt: topsecret-salt}}
    exclude: [notes]
    include: [id]
worker: {batch_size: 0}
runtime: {spool: {max_bytes: -1}}
metrics: {port: 70000, prot: 1}
"""
    found = problems(write(tmp_path, text), env={"ERP_PASSWORD": "x"})
    joined = "\n".join(found)
    assert "tables.erp.customers: `include` and `exclude` must not both be set" in joined
    assert "worker.batch_size: must be greater than or equal to 1; got 0" in joined
    assert "runtime.spool.max_bytes: must be greater than 0; got -1" in joined
    assert "metrics.port: must be less than or equal to 65535; got 70000" in joined
    assert "metrics.prot: is not a known key" in joined
    assert "topsecret-salt" not in joined


def test_example_sections_load_into_their_stage_models() -> None:
    from branchline.streams.config import TableTransforms

    config = load_pipeline(EXAMPLES / "erp.yaml", env={"MASK_SALT": "s"})
    assert isinstance(config.tables["erp.customers"], TableTransforms)
    assert config.runtime.batch_size == 5000 and config.metrics.port == 9464
