"""Pure parts of the preflight: grant parsing, table selection, exit codes, setup SQL."""

from __future__ import annotations

from pathlib import Path

from branchline.cli import cli
from branchline.config import BinlogSourceConfig, PostgresSourceConfig
from branchline.connectors.preflight import Check, _has, captured, exit_code, parse_grants
from branchline.connectors.setup_sql import PASSWORD_PLACEHOLDER, setup_script, setup_statements
from click.testing import CliRunner

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_grants_are_parsed_per_scope_without_column_lists_or_password_hashes() -> None:
    scopes = parse_grants([
        ("GRANT SELECT, RELOAD, SHOW DATABASES, REPLICATION SLAVE, BINLOG MONITOR ON *.* TO `bl`@`%` "
         "IDENTIFIED BY PASSWORD '*5AF57E73BF94584DA4D25F6067E9F747708D0975'"),
        "GRANT INSERT (id, type), UPDATE ON `branchline`.`debezium_signal` TO `bl`@`%`",
        "GRANT ALL PRIVILEGES ON `erp`.* TO `bl`@`%`",
        "GRANT USAGE ON *.* TO `other`@`%`",
    ])
    assert scopes["*.*"] >= {"SELECT", "RELOAD", "SHOW DATABASES", "REPLICATION SLAVE", "BINLOG MONITOR"}
    assert scopes["branchline.debezium_signal"] == {"INSERT", "UPDATE"}
    assert all("5AF57E" not in p for ps in scopes.values() for p in ps)
    assert _has(scopes, "REPLICATION CLIENT")  # MariaDB's BINLOG MONITOR is the same privilege
    assert _has(scopes, "LOCK TABLES", "erp.*")  # through ALL PRIVILEGES
    assert not _has(scopes, "LOCK TABLES", "crm.*")


def test_captured_tables_follow_include_and_exclude_globs() -> None:
    tables = [("erp", "orders"), ("erp", "order_lines"), ("erp", "audit"), ("other", "x")]
    base = {"name": "erp", "kind": "mariadb", "branch": "hq", "user": "u", "databases": ("erp",)}
    assert captured(BinlogSourceConfig(**base), tables) == tables[:3]
    assert captured(BinlogSourceConfig(**base, include=("erp.order*",)), tables) == tables[:2]
    assert captured(BinlogSourceConfig(**base, exclude=("erp.audit",)), tables) == tables[:2]


def test_exit_code_is_the_worst_status() -> None:
    def check(status: str) -> Check:
        return Check("s", "c", status, "saw")  # type: ignore[arg-type]

    assert exit_code([]) == 0
    assert exit_code([check("PASS"), check("PASS")]) == 0
    assert exit_code([check("PASS"), check("WARN")]) == 1
    assert exit_code([check("WARN"), check("FAIL"), check("PASS")]) == 2


def test_setup_sql_is_least_privilege_and_never_prints_the_configured_password() -> None:
    mariadb = BinlogSourceConfig(name="erp", kind="mariadb", branch="hq", user="bl", password="real-secret",
                                 databases=("erp", "wms"))
    statements = setup_statements(mariadb)
    joined = "\n".join(statements)
    assert "real-secret" not in joined and PASSWORD_PLACEHOLDER in joined
    assert "GRANT RELOAD, SHOW DATABASES, REPLICATION SLAVE, BINLOG MONITOR ON *.* TO 'bl'@'%'" in statements
    assert "GRANT SELECT, LOCK TABLES ON `erp`.* TO 'bl'@'%'" in statements
    assert "GRANT SELECT, LOCK TABLES ON `wms`.* TO 'bl'@'%'" in statements
    assert "SUPER" not in joined and "ALL PRIVILEGES" not in joined
    mysql = BinlogSourceConfig(name="erp", kind="mysql", branch="hq", user="bl", databases=("erp",))
    assert "REPLICATION CLIENT ON *.*" in "\n".join(setup_statements(mysql))

    pg = PostgresSourceConfig(name="crm", kind="postgres", branch="hq", user="bl", password="pg-secret",
                              database="crm", include=("public.accounts",))
    statements = setup_statements(pg)
    joined = "\n".join(statements)
    assert "pg-secret" not in joined
    assert 'CREATE ROLE "bl" WITH LOGIN REPLICATION' in joined and "SUPERUSER" not in joined
    assert ('CREATE PUBLICATION "branchline_hq_crm" FOR TABLE "public"."accounts", '
            '"branchline"."debezium_signal", "branchline"."debezium_heartbeat"') in statements
    assert not any("PUBLICATION" in s for s in setup_statements(pg, publication=False))
    script = setup_script(pg)
    assert script.startswith("-- Branchline setup for source `crm`") and script.count(";\n") >= len(statements)


def test_print_setup_sql_for_a_file_names_each_source() -> None:
    result = CliRunner().invoke(cli, ["preflight", str(EXAMPLES / "pipeline.yaml"), "--print-setup-sql"])
    assert result.exit_code == 0, result.output
    assert "source `erp` (mariadb at 127.0.0.1:13306)" in result.output
    assert "source `crm` (postgres at 127.0.0.1:15432)" in result.output
    assert "branchline" + "'@'%' IDENTIFIED BY '<choose-a-password>'" in result.output


def test_preflight_without_file_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["preflight"])
    assert result.exit_code == 2 and "FILE is required" in result.output
