"""Preflight against real servers: the local stack, and private servers misconfigured on purpose
(MariaDB with binlog_format=STATEMENT and friends, MariaDB without a binlog, PostgreSQL with
wal_level=replica, users without grants). Each private server lives in a tmp dir and is stopped after."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pymysql
import pytest
from branchline.cli import cli
from branchline.config import load_pipeline
from branchline.connectors.preflight import Check, exit_code, run
from branchline.connectors.setup_sql import setup_statements
from click.testing import CliRunner

pytestmark = pytest.mark.integration

MARIADBD = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
INSTALL_DB = shutil.which("mariadb-install-db") or "/usr/bin/mariadb-install-db"
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need(path: str | Path) -> None:
    if not Path(path).exists():
        message = f"`{path}` must be installed for private test servers; got nothing"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def wait_port(port: int, timeout_s: float = 30.0, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    tail = log.read_text()[-2000:] if log and log.exists() else ""
    raise RuntimeError(f"private server on {port} did not start:\n{tail}")


class PrivateMariaDb:
    """A throwaway MariaDB in a tmp dir; `args` are extra server options (the misconfiguration)."""

    def __init__(self, args: list[str]) -> None:
        need(MARIADBD)
        self.dir = Path(tempfile.mkdtemp(prefix="bl-preflight-mariadb-"))
        self.port = free_port()
        data = self.dir / "data"
        subprocess.run([INSTALL_DB, "--no-defaults", f"--datadir={data}", "--user=root",
                        "--auth-root-authentication-method=normal", "--skip-test-db"],
                       check=True, capture_output=True)
        self.log = self.dir / "error.log"
        self.process = subprocess.Popen(
            [MARIADBD, "--no-defaults", f"--datadir={data}", f"--port={self.port}", "--bind-address=127.0.0.1",
             f"--socket={self.dir / 'sock'}", f"--pid-file={self.dir / 'pid'}", f"--log-error={self.log}",
             "--user=root", "--character-set-server=utf8mb4", "--collation-server=utf8mb4_general_ci", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, log=self.log)

    def sql(self, *statements: str, database: str | None = None) -> None:
        conn = pymysql.connect(host="127.0.0.1", port=self.port, user="root", password="", database=database,
                               autocommit=True)
        with conn.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)
        conn.close()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivatePostgres:
    """A throwaway PostgreSQL 15 cluster in a tmp dir, run as the `postgres` OS user."""

    def __init__(self, settings: dict[str, str]) -> None:
        need(PG_BIN / "initdb")
        self.dir = Path(tempfile.mkdtemp(prefix="bl-preflight-pg-"))
        self.port = free_port()
        self.data = self.dir / "data"
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")
        self.as_postgres = as_postgres
        subprocess.run([*as_postgres, str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres",
                        "--auth=trust", "-E", "UTF8"], check=True, capture_output=True)
        options = {"listen_addresses": "'127.0.0.1'", "port": str(self.port),
                   "unix_socket_directories": f"'{self.dir}'", **settings}
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{k} = {v}\n" for k, v in options.items())
        self.log = self.dir / "server.log"
        subprocess.run([*as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
                        "start"], check=True, capture_output=True)
        wait_port(self.port, log=self.log)

    def sql(self, *statements: str, dbname: str = "postgres") -> None:
        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=dbname,
                             autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)

    def stop(self) -> None:
        subprocess.run([*self.as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                        "-w", "stop"], capture_output=True, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.check: c for c in checks}


def pipeline_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text("branch: pf\n" + body)
    return path


# ----------------------------------------------------------------------------------- MariaDB FAIL cases


@pytest.fixture(scope="module")
def statement_mariadb() -> Iterator[PrivateMariaDb]:
    """Binlog on but STATEMENT format, MINIMAL row image and metadata, one day of retention,
    time zone +02:00; a user with no grants; a MyISAM table and a table without a key."""
    server = PrivateMariaDb(["--log-bin=binlog", "--server-id=7", "--binlog-format=STATEMENT",
                             "--binlog-row-image=MINIMAL", "--binlog-row-metadata=MINIMAL",
                             "--binlog-expire-logs-seconds=86400", "--default-time-zone=+02:00"])
    server.sql(
        "CREATE DATABASE shop",
        "CREATE TABLE shop.orders (id INT PRIMARY KEY, total DECIMAL(10,2)) ENGINE=InnoDB",
        "CREATE TABLE shop.legacy (code VARCHAR(10) NOT NULL, price INT, UNIQUE KEY uq (code)) ENGINE=MyISAM",
        "CREATE USER 'nogrants'@'127.0.0.1' IDENTIFIED BY 'pw'",
        "GRANT SELECT ON shop.* TO 'nogrants'@'127.0.0.1'",
    )
    yield server
    server.stop()


def test_misconfigured_mariadb_fails_with_the_fix_for_each_setting(statement_mariadb: PrivateMariaDb,
                                                                   tmp_path: Path) -> None:
    path = pipeline_file(tmp_path, f"""
sources:
  - {{name: shop, kind: mariadb, port: {statement_mariadb.port}, user: nogrants, password: pw, databases: [shop]}}
""")
    checks = run(load_pipeline(path, env={}))
    found = by_name(checks)
    assert found["binlog_format"].status == "FAIL" and "binlog_format=STATEMENT" in found["binlog_format"].saw
    assert found["binlog_format"].fix and "SET GLOBAL binlog_format = 'ROW'" in found["binlog_format"].fix
    assert found["binlog_row_image"].status == "FAIL" and "MINIMAL" in found["binlog_row_image"].saw
    assert found["binlog_row_metadata"].status == "WARN"
    assert found["binlog_retention"].status == "FAIL" and "24 h < the required 72 h" in found["binlog_retention"].saw
    assert "binlog_expire_logs_seconds = 259200" in (found["binlog_retention"].fix or "")
    assert found["grants"].status == "FAIL"
    for privilege in ("RELOAD", "SHOW DATABASES", "REPLICATION SLAVE", "REPLICATION CLIENT", "LOCK TABLES on shop"):
        assert privilege in found["grants"].saw
    assert "GRANT RELOAD, SHOW DATABASES, REPLICATION SLAVE, BINLOG MONITOR ON *.* TO 'nogrants'@'127.0.0.1'" in (
        found["grants"].fix or "")
    assert found["signal_table"].status == "FAIL" and "CREATE TABLE IF NOT EXISTS `branchline`.`debezium_signal`" in (
        found["signal_table"].fix or "")
    assert found["engines"].status == "WARN" and "shop.legacy (MyISAM)" in found["engines"].saw
    assert found["primary_keys"].status == "WARN" and found["primary_keys"].saw.endswith(": shop.legacy")
    assert "ADD PRIMARY KEY (code)" in (found["primary_keys"].fix or "")
    assert found["time_zone"].status == "WARN" and "+02:00" in found["time_zone"].saw
    assert found["log_bin"].status == "PASS" and found["server_id"].status == "PASS"
    assert exit_code(checks) == 2

    result = CliRunner().invoke(cli, ["preflight", str(path), "--json"])
    assert result.exit_code == 2, result.output
    body = json.loads(result.output)
    assert body["exit_code"] == 2
    assert {c["check"]: c["status"] for c in body["checks"]}["binlog_format"] == "FAIL"
    assert "pw" not in [c["saw"] for c in body["checks"]]


def test_setup_sql_then_server_fixes_turn_failures_into_passes(statement_mariadb: PrivateMariaDb,
                                                               tmp_path: Path) -> None:
    """The printed fixes work: run the setup SQL and the SET GLOBALs, and the checks pass."""
    path = pipeline_file(tmp_path, f"""
sources:
  - {{name: shop, kind: mariadb, port: {statement_mariadb.port}, user: fixed, password: pw2, databases: [shop],
      include: [shop.orders]}}
""")
    source = load_pipeline(path, env={}).sources[0]
    statement_mariadb.sql(*setup_statements(source, password="pw2", user_host="127.0.0.1"))  # type: ignore[arg-type]
    checks = by_name(run(load_pipeline(path, env={})))
    assert checks["grants"].status == "PASS", checks["grants"]
    assert checks["signal_table"].status == "PASS" and checks["heartbeat_table"].status == "PASS"
    assert checks["engines"].status == "PASS", checks["engines"]
    assert checks["primary_keys"].status == "PASS", checks["primary_keys"]  # only shop.orders is captured
    statement_mariadb.sql("SET GLOBAL binlog_format = 'ROW'", "SET GLOBAL binlog_row_image = 'FULL'",
                          "SET GLOBAL binlog_expire_logs_seconds = 259200")
    checks = by_name(run(load_pipeline(path, env={})))
    assert checks["binlog_format"].status == "PASS" and checks["binlog_row_image"].status == "PASS"
    assert checks["binlog_retention"].status == "PASS"


def test_mariadb_without_binlog_fails_log_bin(tmp_path: Path) -> None:
    server = PrivateMariaDb(["--server-id=0"])
    try:
        path = pipeline_file(tmp_path, f"""
sources:
  - {{name: erp, kind: mariadb, port: {server.port}, user: root, databases: [mysql]}}
""")
        found = by_name(run(load_pipeline(path, env={})))
        assert found["log_bin"].status == "FAIL" and found["log_bin"].saw == "log_bin=OFF"
        assert found["log_bin"].fix and "log_bin=mysql-bin" in found["log_bin"].fix
    finally:
        server.stop()


def test_kind_mysql_on_mariadb_fails(statement_mariadb: PrivateMariaDb, tmp_path: Path) -> None:
    path = pipeline_file(tmp_path, f"""
sources:
  - {{name: shop, kind: mysql, port: {statement_mariadb.port}, user: root, databases: [shop]}}
""")
    found = by_name(run(load_pipeline(path, env={})))
    assert found["server"].status == "FAIL" and "kind: mariadb" in (found["server"].fix or "")


def test_unreachable_source_is_one_fail(tmp_path: Path) -> None:
    path = pipeline_file(tmp_path, f"""
sources:
  - {{name: erp, kind: mariadb, port: {free_port()}, user: u, password: secretpw, databases: [erp]}}
""")
    checks = run(load_pipeline(path, env={}))
    assert [c.check for c in checks] == ["connect"] and checks[0].status == "FAIL"
    assert "secretpw" not in checks[0].saw


# -------------------------------------------------------------------------------- PostgreSQL FAIL cases


@pytest.fixture(scope="module")
def replica_postgres() -> Iterator[PrivatePostgres]:
    """wal_level=replica, no replication slots; a user without REPLICATION; a keyless table."""
    server = PrivatePostgres({"wal_level": "replica", "max_replication_slots": "0", "max_wal_senders": "0"})
    server.sql("CREATE DATABASE app")
    server.sql(
        "CREATE TABLE public.orders (id int PRIMARY KEY, total numeric(10,2))",
        "CREATE TABLE public.audit (at timestamptz, what text)",
        "CREATE ROLE plain LOGIN PASSWORD 'pw'",
        "GRANT SELECT ON public.orders TO plain",
        dbname="app",
    )
    yield server
    server.stop()


def test_misconfigured_postgres_fails_with_the_fix_for_each_setting(replica_postgres: PrivatePostgres,
                                                                    tmp_path: Path) -> None:
    path = pipeline_file(tmp_path, f"""
sources:
  - {{name: app, kind: postgres, port: {replica_postgres.port}, user: plain, password: pw, database: app}}
""")
    checks = run(load_pipeline(path, env={}))
    found = by_name(checks)
    assert found["wal_level"].status == "FAIL" and found["wal_level"].saw == "wal_level=replica"
    assert found["wal_level"].fix == "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL."
    assert found["replication_slots"].status == "FAIL" and "max_replication_slots=0" in found["replication_slots"].saw
    assert found["wal_senders"].status == "FAIL"
    assert found["replication_connection"].status == "FAIL"
    assert found["replication_role"].status == "FAIL" and found["replication_role"].fix == 'ALTER ROLE "plain" WITH REPLICATION;'
    assert found["select_grants"].status == "FAIL" and "public.audit" in found["select_grants"].saw
    assert found["primary_keys"].status == "FAIL" and "public.audit" in found["primary_keys"].saw
    assert 'ALTER TABLE "public"."audit" REPLICA IDENTITY FULL;' in (found["primary_keys"].fix or "")
    assert found["publication"].status == "FAIL" and 'CREATE PUBLICATION "branchline_pf_app"' in (
        found["publication"].fix or "")
    assert found["signal_table"].status == "FAIL" and found["heartbeat_table"].status == "FAIL"
    assert found["max_slot_wal_keep_size"].status == "WARN"
    assert exit_code(checks) == 2
    result = CliRunner().invoke(cli, ["preflight", str(path)])
    assert result.exit_code == 2
    assert "FAIL  wal_level" in result.output and "fix: ALTER SYSTEM SET wal_level = logical" in result.output


def test_postgres_setup_sql_creates_what_preflight_asks_for(replica_postgres: PrivatePostgres, tmp_path: Path) -> None:
    path = pipeline_file(tmp_path, f"""
sources:
  - {{name: app, kind: postgres, port: {replica_postgres.port}, user: repl, password: pw3, database: app,
      include: [public.orders]}}
""")
    source = load_pipeline(path, env={}).sources[0]
    replica_postgres.sql(*setup_statements(source, password="pw3"), dbname="app")
    found = by_name(run(load_pipeline(path, env={})))
    assert found["replication_role"].status == "PASS"
    assert found["select_grants"].status == "PASS" and found["primary_keys"].status == "PASS"
    assert found["signal_table"].status == "PASS" and found["heartbeat_table"].status == "PASS"
    assert found["publication"].status == "PASS", found["publication"]
    assert "exactly the 3 captured and control tables" in found["publication"].saw


# ------------------------------------------------------------------------------------------- the stack


def test_stack_sources_pass_the_settings_checks(erp: object, crm: object, tmp_path: Path) -> None:
    examples = Path(__file__).resolve().parents[2] / "examples" / "pipeline.yaml"
    found = run(load_pipeline(examples, env={}))
    status = {(c.source, c.check): c.status for c in found}
    for check in ("log_bin", "binlog_format", "binlog_row_image", "binlog_row_metadata", "server_id", "grants"):
        assert status[("erp", check)] == "PASS", [c for c in found if c.check == check]
    for check in ("wal_level", "replication_slots", "wal_senders", "replication_connection"):
        assert status[("crm", check)] == "PASS"


def test_print_setup_sql_without_a_file_prints_every_kind() -> None:
    result = CliRunner().invoke(cli, ["preflight", "--print-setup-sql"])
    assert result.exit_code == 0, result.output
    assert "GRANT RELOAD, SHOW DATABASES, REPLICATION SLAVE, BINLOG MONITOR ON *.*" in result.output
    assert "GRANT RELOAD, SHOW DATABASES, REPLICATION SLAVE, REPLICATION CLIENT ON *.*" in result.output
    assert "WITH LOGIN REPLICATION PASSWORD '<choose-a-password>'" in result.output


def test_run_setup_sql_creates_the_user_with_the_files_password(statement_mariadb: PrivateMariaDb,
                                                                tmp_path: Path) -> None:
    path = pipeline_file(tmp_path, f"""
sources:
  - {{name: shop, kind: mariadb, port: {statement_mariadb.port}, user: viacli, password: "it's-secret",
      databases: [shop], include: [shop.orders]}}
""")
    result = CliRunner().invoke(cli, ["preflight", str(path), "--run-setup-sql", "--admin", "root",
                                      "--user-host", "127.0.0.1", "--json"])
    assert result.exit_code in (1, 2), result.output
    assert "it's-secret" not in result.output
    body = json.loads(result.output[result.output.index("{"):])
    status = {c["check"]: c["status"] for c in body["checks"]}
    assert status["grants"] == "PASS" and status["signal_table"] == "PASS" and status["heartbeat_table"] == "PASS"
    again = CliRunner().invoke(cli, ["preflight", str(path), "--run-setup-sql", "--admin", "root",
                                     "--user-host", "127.0.0.1"])
    assert "ran 8 setup statements as root" in again.output  # idempotent: runs again without error


def test_apply_refuses_a_source_that_fails_preflight(statement_mariadb: PrivateMariaDb, tmp_path: Path) -> None:
    """Nothing reaches Kafka Connect when preflight fails (the URL below answers nothing)."""
    path = pipeline_file(tmp_path, f"""
sources:
  - {{name: shop, kind: mariadb, port: {statement_mariadb.port}, user: nogrants, password: pw, databases: [shop]}}
kafka: {{bootstrap_servers: "127.0.0.1:1"}}
connect: {{url: "http://127.0.0.1:1"}}
""")
    result = CliRunner().invoke(cli, ["connectors", "apply", str(path)])
    assert result.exit_code == 2
    assert "FAIL  shop: grants:" in result.output and "nothing applied" in result.output
