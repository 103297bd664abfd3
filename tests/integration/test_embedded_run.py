"""`branchline run` end to end on the stack, and its fault tests: each ends with `branchline verify`
reporting identical source and target.

Every test has its own MariaDB database, PostgreSQL schema/slot/publication and target schemas.
Faults are real: kill -9 of the process, a TCP proxy that cuts the cloud PostgreSQL off, a restart
of a private MariaDB server, ALTER TABLE during churn.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import psycopg
import pymysql
import pytest
from psycopg.types.json import Jsonb

pytestmark = pytest.mark.integration

BRANCHLINE = [sys.executable, "-m", "branchline.cli"]


# -- helpers ----------------------------------------------------------------------------------------


def _name(prefix: str = "e") -> str:
    return prefix + uuid.uuid4().hex[:9]


MARIADB_DDL = """CREATE TABLE {db}.items (
  id INT UNSIGNED PRIMARY KEY, qty INT NOT NULL, price DECIMAL(12,2), label VARCHAR(40), ratio FLOAT,
  made DATETIME(6), seen TIMESTAMP(3) NULL, tags SET('a','b','c'), doc JSON, raw VARBINARY(16))"""
PG_DDL = """CREATE TABLE {s}.items (
  id int PRIMARY KEY, qty int NOT NULL, price numeric(12,2), label text, ratio real, made timestamp,
  seen timestamptz, tags text[], doc jsonb, raw bytea)"""


def mariadb_churn(conn: pymysql.connections.Connection, db: str, ops: int, rng: random.Random,
                  next_id: list[int]) -> None:
    """Random inserts, updates and deletes in small multi-statement transactions."""
    cur = conn.cursor()
    done = 0
    while done < ops:
        cur.execute("BEGIN")
        for _ in range(rng.randint(1, 5)):
            roll = rng.random()
            if roll < 0.5 or next_id[0] < 5:
                i = next_id[0]
                next_id[0] += 1
                cur.execute(
                    f"INSERT INTO {db}.items (id, qty, price, label, ratio, made, seen, tags, doc, raw)"
                    " VALUES (%s, %s, %s, %s, %s, NOW(6), NOW(3), %s, %s, %s)",
                    (i, rng.randint(0, 100), Decimal(rng.randint(0, 10**6)) / 100, f"item {i}",
                     rng.random() * 100, rng.choice(["a", "a,c", "", "b,c"]),
                     f'{{"n": {i}, "x": [1, {rng.randint(0, 9)}]}}', os.urandom(rng.randint(0, 16))))
            elif roll < 0.85:
                cur.execute(f"UPDATE {db}.items SET qty = qty + 1, label = %s, price = price + 1 WHERE id = %s",
                            (f"upd {rng.randint(0, 999)}", rng.randrange(next_id[0])))
            else:
                cur.execute(f"DELETE FROM {db}.items WHERE id = %s", (rng.randrange(next_id[0]),))
            done += 1
        cur.execute("COMMIT")


def pg_churn(conn: psycopg.Connection, schema: str, ops: int, rng: random.Random, next_id: list[int]) -> None:
    done = 0
    while done < ops:
        with conn.transaction():
            for _ in range(rng.randint(1, 5)):
                roll = rng.random()
                if roll < 0.5 or next_id[0] < 5:
                    i = next_id[0]
                    next_id[0] += 1
                    conn.execute(
                        f"INSERT INTO {schema}.items (id, qty, price, label, ratio, made, seen, tags, doc, raw)"
                        " VALUES (%s, %s, %s, %s, %s, now(), now(), %s, %s, %s)",
                        (i, rng.randint(0, 100), Decimal(rng.randint(0, 10**6)) / 100, f"item {i}",
                         rng.random() * 100, rng.choice([["a"], ["a", "c"], [], None]),
                         Jsonb({"n": i, "x": [1, rng.randint(0, 9)]}),
                         os.urandom(rng.randint(0, 16))))
                elif roll < 0.85:
                    conn.execute(f"UPDATE {schema}.items SET qty = qty + 1, label = %s WHERE id = %s",
                                 (f"upd {rng.randint(0, 999)}", rng.randrange(next_id[0])))
                else:
                    conn.execute(f"DELETE FROM {schema}.items WHERE id = %s", (rng.randrange(next_id[0]),))
                done += 1


def _drop_slot(pg, slot: str, wait_s: float = 15.0) -> None:
    """Drop a test's slot, ending a session still holding it (a run the test left behind): a slot left over
    keeps every later WAL segment of the shared server, gigabytes after a few benchmark runs."""
    deadline = time.monotonic() + wait_s
    while True:
        row = pg.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
        if row is None:
            return
        if row[0] is None:
            pg.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            return
        if time.monotonic() > deadline:
            pg.execute("SELECT pg_terminate_backend(%s)", (row[0],))
        time.sleep(0.2)


@dataclass
class Env:
    """One test's sources, target schemas, pipeline file and spool."""

    tmp: Path
    erp: object
    crm: object
    cloud: object
    db: str = field(default_factory=lambda: _name("emb_"))
    pg_schema: str = field(default_factory=lambda: _name("emb_"))
    erp_name: str = field(default_factory=lambda: _name("e"))
    crm_name: str = field(default_factory=lambda: _name("c"))
    cloud_port: int | None = None
    extra_sources: str = ""
    sink_extra: str = ""
    runtime: str = "runtime:\n  batch_interval_ms: 20\n  snapshot_chunk_rows: 500\n"
    with_crm: bool = True

    @property
    def pipeline(self) -> Path:
        return self.tmp / "pipeline.yaml"

    @property
    def spool(self) -> Path:
        return self.tmp / "spool.sqlite"

    def write(self) -> Path:
        crm = f"""
  - name: {self.crm_name}
    kind: postgres
    host: {self.crm.host}
    port: {self.crm.port}
    user: postgres
    database: crm
    schemas: [{self.pg_schema}]
    slot: {self.pg_schema}
    publication: {self.pg_schema}
""" if self.with_crm else ""
        self.pipeline.write_text(f"""name: {self.erp_name}
branch: hq
sources:
  - name: {self.erp_name}
    kind: mariadb
    host: {self.erp.host}
    port: {self.erp.port}
    user: root
    databases: [{self.db}]
{crm}{self.extra_sources}
sinks:
  cloud:
    kind: postgres
    host: {self.cloud.host}
    port: {self.cloud_port or self.cloud.port}
    user: postgres
    database: cloud
    schema: "{{source}}"
    max_attempts: 2
    retry_backoff_s: 0.2
    connect_timeout_s: 3
{self.sink_extra}
{self.runtime}
metrics:
  enabled: false
""")
        return self.pipeline

    def run(self, *args: str) -> subprocess.Popen:
        with open(self.tmp / f"run-{time.monotonic_ns()}.log", "w") as log:  # the child keeps its own copy
            return subprocess.Popen([*BRANCHLINE, "run", str(self.pipeline), "--spool", str(self.spool),
                                     "--no-progress", *args], stdout=log, stderr=subprocess.STDOUT,
                                    cwd=self.tmp, env={**os.environ, "BRANCHLINE_STATE": str(self.tmp / "state")})

    def verify(self, *args: str, pipeline: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*BRANCHLINE, "verify", str(pipeline or self.pipeline), "--no-progress", "--chunk",
                               "300", *args], check=False, capture_output=True, text=True, timeout=300)

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(p.read_text()[-tail:] for p in sorted(self.tmp.glob("run-*.log")))


@pytest.fixture
def env(tmp_path, erp, crm, cloud) -> Iterator[Env]:
    environment = Env(tmp_path, erp, crm, cloud)
    maria = pymysql.connect(host=erp.host, port=erp.port, user="root", password="", autocommit=True)
    maria.cursor().execute(f"CREATE DATABASE {environment.db}")
    maria.cursor().execute(MARIADB_DDL.format(db=environment.db))
    pg = psycopg.connect(host=crm.host, port=crm.port, user="postgres", dbname="crm", autocommit=True)
    pg.execute(f"CREATE SCHEMA {environment.pg_schema}")
    pg.execute(PG_DDL.format(s=environment.pg_schema))
    environment.maria, environment.pg = maria, pg  # type: ignore[attr-defined]
    yield environment
    maria.cursor().execute(f"DROP DATABASE IF EXISTS {environment.db}")
    maria.close()
    _drop_slot(pg, environment.pg_schema)
    pg.execute(f"DROP PUBLICATION IF EXISTS {environment.pg_schema}")
    pg.execute(f"DROP SCHEMA {environment.pg_schema} CASCADE")
    pg.close()
    with psycopg.connect(host=cloud.host, port=cloud.port, user="postgres", dbname="cloud", autocommit=True) as c:
        for schema in (environment.erp_name, environment.crm_name, "fanin_" + environment.erp_name):
            c.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def wait_exit(process: subprocess.Popen, env: Env, timeout: float = 240) -> None:
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError("branchline run did not finish:\n" + env.logs()) from None
    assert code == 0, env.logs()


def assert_identical(env: Env, pipeline: Path | None = None) -> str:
    result = env.verify(pipeline=pipeline)
    assert result.returncode == 0, result.stdout + result.stderr + "\n" + env.logs()
    assert "identical" in result.stdout
    return result.stdout


# -- tests ------------------------------------------------------------------------------------------


def test_snapshot_then_streaming_churn_is_identical_and_verify_reports_tampering(env):
    rng = random.Random(1)
    ids_m, ids_p = [0], [0]
    mariadb_churn(env.maria, env.db, 1200, rng, ids_m)  # existing rows: the snapshot copies them
    pg_churn(env.pg, env.pg_schema, 1200, rng, ids_p)
    env.write()
    process = env.run("--exit-when-idle", "3")
    for _ in range(6):  # churn while the snapshot and then the stream run
        mariadb_churn(env.maria, env.db, 100, rng, ids_m)
        pg_churn(env.pg, env.pg_schema, 100, rng, ids_p)
        time.sleep(0.2)
    wait_exit(process, env)
    out = assert_identical(env)
    assert f"{env.erp_name}:{env.db}.items" in out and f"{env.crm_name}:{env.pg_schema}.items" in out

    with psycopg.connect(host=env.cloud.host, port=env.cloud.port, user="postgres", dbname="cloud",
                         autocommit=True) as cloud:
        target = f'"{env.erp_name}".items'
        some = cloud.execute(f"SELECT id FROM {target} ORDER BY id LIMIT 3").fetchall()
        cloud.execute(f"UPDATE {target} SET label = 'tampered' WHERE id = %s", (some[0][0],))
        cloud.execute(f"DELETE FROM {target} WHERE id = %s", (some[1][0],))
        cloud.execute(f"INSERT INTO {target} (id, qty, _bl_position, _bl_op, _bl_synced_at)"
                      " VALUES (999999, 1, 1, 'c', now())")
    result = env.verify("--table", f"{env.db}.items")
    assert result.returncode == 1, result.stdout
    assert f"different id={some[0][0]}: label: source=" in result.stdout
    assert f"missing   id={some[1][0]}" in result.stdout
    assert "extra     id=999999" in result.stdout
    assert f"{env.pg_schema}.items" not in result.stdout  # --table limits the comparison


def test_kill_9_during_churn_then_restart_is_identical(env):
    rng = random.Random(2)
    ids_m, ids_p = [0], [0]
    mariadb_churn(env.maria, env.db, 2000, rng, ids_m)
    pg_churn(env.pg, env.pg_schema, 2000, rng, ids_p)
    env.write()
    process = env.run()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        mariadb_churn(env.maria, env.db, 50, rng, ids_m)
        pg_churn(env.pg, env.pg_schema, 50, rng, ids_p)
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    mariadb_churn(env.maria, env.db, 300, rng, ids_m)  # changes while nothing runs
    pg_churn(env.pg, env.pg_schema, 300, rng, ids_p)
    restarted = env.run("--exit-when-idle", "3")
    mariadb_churn(env.maria, env.db, 300, rng, ids_m)
    pg_churn(env.pg, env.pg_schema, 300, rng, ids_p)
    wait_exit(restarted, env)
    assert_identical(env)


def test_exit_when_idle_is_not_kept_busy_by_other_writers_heartbeats(env):
    """Debezium connectors on the same servers write the shared heartbeat table every few seconds:
    those rows (and their commits) are no user changes, so the run still goes idle and exits."""
    from branchline.heartbeat import debezium_heartbeat_query, heartbeat_ddl

    rng = random.Random(7)
    ids_m, ids_p = [0], [0]
    mariadb_churn(env.maria, env.db, 300, rng, ids_m)
    pg_churn(env.pg, env.pg_schema, 300, rng, ids_p)
    for statement in heartbeat_ddl("mariadb", "branchline", "debezium_heartbeat"):
        env.maria.cursor().execute(statement)
    for statement in heartbeat_ddl("postgres", "branchline", "debezium_heartbeat"):
        env.pg.execute(statement)
    env.write()
    stop = threading.Event()

    def foreign_heartbeats() -> None:  # what five connectors with 10 s heartbeats write, in its own connections
        with pymysql.connect(host=env.erp.host, port=env.erp.port, user="root", password="", autocommit=True) as maria, \
                psycopg.connect(host=env.crm.host, port=env.crm.port, user="postgres", dbname="crm",
                                autocommit=True) as pg:
            while not stop.wait(0.5):
                maria.cursor().execute(debezium_heartbeat_query("mariadb", "branchline", "debezium_heartbeat"))
                pg.execute(debezium_heartbeat_query("postgres", "branchline", "debezium_heartbeat"))

    writer = threading.Thread(target=foreign_heartbeats, daemon=True)
    writer.start()
    try:
        first = env.run()  # a run without an idle exit captures the heartbeat table (for lag); so does its restart
        mariadb_churn(env.maria, env.db, 100, rng, ids_m)
        time.sleep(4)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        restarted = env.run("--exit-when-idle", "3")
        mariadb_churn(env.maria, env.db, 200, rng, ids_m)
        pg_churn(env.pg, env.pg_schema, 200, rng, ids_p)
        wait_exit(restarted, env, timeout=90)
    finally:
        stop.set()
        writer.join(10)
    assert_identical(env)


def test_cloud_postgres_unreachable_for_30s_during_churn_spools_then_drains(env, cuttable_proxy):
    outage_s = float(os.environ.get("BRANCHLINE_TEST_OUTAGE_S", "30"))
    proxy = cuttable_proxy(env.cloud)
    env.cloud_port = proxy.port
    rng = random.Random(3)
    ids_m, ids_p = [0], [0]
    mariadb_churn(env.maria, env.db, 500, rng, ids_m)
    pg_churn(env.pg, env.pg_schema, 500, rng, ids_p)
    env.write()
    process = env.run("--exit-when-idle", "4")
    time.sleep(3)
    proxy.cut()
    cut_at = time.monotonic()
    while time.monotonic() - cut_at < outage_s:
        mariadb_churn(env.maria, env.db, 40, rng, ids_m)
        pg_churn(env.pg, env.pg_schema, 40, rng, ids_p)
        time.sleep(0.2)
    spooled = _spooled_batches(env.spool)
    proxy.restore()
    mariadb_churn(env.maria, env.db, 200, rng, ids_m)
    pg_churn(env.pg, env.pg_schema, 200, rng, ids_p)
    wait_exit(process, env)
    assert spooled > 0, "capture must continue into the spool while the target is down"
    assert "target unreachable; capture continues into the spool" in env.logs(tail=10**7)
    assert "target reachable again" in env.logs(tail=10**7)
    env.cloud_port = None
    env.write()
    assert_identical(env)


def _spooled_batches(path: Path) -> int:
    import sqlite3

    with sqlite3.connect(path, timeout=10) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM batches").fetchone()[0])


def test_alter_table_add_column_during_churn(env):
    rng = random.Random(4)
    ids_m, ids_p = [0], [0]
    mariadb_churn(env.maria, env.db, 300, rng, ids_m)
    pg_churn(env.pg, env.pg_schema, 300, rng, ids_p)
    env.write()
    process = env.run("--exit-when-idle", "3")
    mariadb_churn(env.maria, env.db, 300, rng, ids_m)
    pg_churn(env.pg, env.pg_schema, 300, rng, ids_p)
    env.maria.cursor().execute(f"ALTER TABLE {env.db}.items ADD COLUMN note VARCHAR(30)")
    env.pg.execute(f"ALTER TABLE {env.pg_schema}.items ADD COLUMN note text")
    mariadb_churn(env.maria, env.db, 200, rng, ids_m)
    pg_churn(env.pg, env.pg_schema, 200, rng, ids_p)
    env.maria.cursor().execute(f"UPDATE {env.db}.items SET note = CONCAT('n', id) WHERE id % 3 = 0")
    env.pg.execute(f"UPDATE {env.pg_schema}.items SET note = 'n' || id WHERE id % 3 = 0")
    mariadb_churn(env.maria, env.db, 200, rng, ids_m)
    pg_churn(env.pg, env.pg_schema, 200, rng, ids_p)
    wait_exit(process, env)
    out = assert_identical(env)
    assert "identical" in out
    with psycopg.connect(host=env.cloud.host, port=env.cloud.port, user="postgres", dbname="cloud") as cloud:
        noted = cloud.execute(f'SELECT count(*) FROM "{env.erp_name}".items WHERE note IS NOT NULL').fetchone()[0]
    assert noted > 0


# -- a private MariaDB server: restarted for real, and a second branch instance ------------------------


@dataclass
class PrivateMariaDb:
    host: str
    port: int
    datadir: Path
    process: subprocess.Popen | None = None

    def start(self) -> None:
        base = self.datadir.parent
        self.process = subprocess.Popen(
            ["mariadbd", "--no-defaults", f"--datadir={self.datadir}", f"--port={self.port}",
             "--bind-address=127.0.0.1", f"--socket={base / 'm.sock'}", f"--pid-file={base / 'm.pid'}",
             f"--log-error={base / 'm.err'}", f"--log-bin={self.datadir / 'binlog'}", "--binlog-format=ROW",
             "--binlog-row-image=FULL", "--binlog-row-metadata=FULL", "--server-id=7", "--user=root",
             "--character-set-server=utf8mb4", "--collation-server=utf8mb4_general_ci", "--gtid-domain-id=7"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                pymysql.connect(host=self.host, port=self.port, user="root", password="").close()
                return
            except pymysql.err.OperationalError:
                time.sleep(0.2)
        raise AssertionError((base / "m.err").read_text()[-2000:])

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)
            self.process = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def private_mariadb(tmp_path) -> Iterator[PrivateMariaDb]:
    if shutil.which("mariadbd") is None or shutil.which("mariadb-install-db") is None:
        message = "`mariadbd` must be installed (apt: mariadb-server) for the restart test"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    datadir = tmp_path / "mdb" / "data"
    datadir.parent.mkdir()
    subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={datadir}", "--user=root",
                    "--auth-root-authentication-method=normal", "--skip-test-db"], check=True,
                   capture_output=True)
    server = PrivateMariaDb("127.0.0.1", _free_port(), datadir)
    server.start()
    yield server
    server.stop()


def test_source_database_restart_during_churn(env, private_mariadb):
    source = private_mariadb
    conn = pymysql.connect(host=source.host, port=source.port, user="root", password="", autocommit=True)
    conn.cursor().execute(f"CREATE DATABASE {env.db}")
    conn.cursor().execute(MARIADB_DDL.format(db=env.db))
    env.erp = source  # the pipeline's MariaDB source is the private server
    env.with_crm = False
    rng = random.Random(5)
    ids = [0]
    mariadb_churn(conn, env.db, 500, rng, ids)
    env.write()
    process = env.run("--exit-when-idle", "4")
    time.sleep(2)
    mariadb_churn(conn, env.db, 200, rng, ids)
    conn.close()
    source.stop()
    time.sleep(2)
    source.start()
    conn = pymysql.connect(host=source.host, port=source.port, user="root", password="", autocommit=True)
    mariadb_churn(conn, env.db, 400, rng, ids)
    wait_exit(process, env)
    assert "source unreachable" in env.logs(tail=10**7)
    assert_identical(env)
    conn.close()


def test_two_branch_instances_with_overlapping_ids_fan_in_with_branch_keys(env, private_mariadb):
    second = private_mariadb
    conn2 = pymysql.connect(host=second.host, port=second.port, user="root", password="", autocommit=True)
    conn2.cursor().execute(f"CREATE DATABASE {env.db}")  # same database, same schema, other instance
    conn2.cursor().execute(MARIADB_DDL.format(db=env.db))
    rng = random.Random(6)
    ids1, ids2 = [0], [0]  # both count from 0: overlapping ids
    mariadb_churn(env.maria, env.db, 400, rng, ids1)
    mariadb_churn(conn2, env.db, 400, rng, ids2)
    env.with_crm = False
    env.extra_sources = f"""  - name: {env.erp_name}b
    kind: mariadb
    branch: north
    host: {second.host}
    port: {second.port}
    user: root
    databases: [{env.db}]
"""
    env.sink_extra = "    branch_key: true\n"
    env.write()
    text = env.pipeline.read_text().replace('schema: "{source}"', f'schema: "fanin_{env.erp_name}"')
    env.pipeline.write_text(text)
    process = env.run("--exit-when-idle", "3")
    mariadb_churn(env.maria, env.db, 300, rng, ids1)
    mariadb_churn(conn2, env.db, 300, rng, ids2)
    wait_exit(process, env)
    out = assert_identical(env)
    assert out.count("identical") >= 2
    with psycopg.connect(host=env.cloud.host, port=env.cloud.port, user="postgres", dbname="cloud") as cloud:
        branches = dict(cloud.execute(
            f'SELECT _bl_branch, count(*) FROM "fanin_{env.erp_name}".items GROUP BY 1').fetchall())
        overlap = cloud.execute(
            f'SELECT count(*) FROM (SELECT id FROM "fanin_{env.erp_name}".items GROUP BY id HAVING count(*) = 2) x'
        ).fetchone()[0]
    assert set(branches) == {"hq", "north"}
    assert overlap > 0
    conn2.close()


def test_buffering_delta_sink_is_committed_on_idle_exit_and_matches_the_source(env):
    """A sink that is durable only after `flush` (Delta, commit interval far away) beside PostgreSQL: the
    run writes every round but commits the lake only before its idle exit, and only then empties the
    spool; the lake then holds exactly the source's rows."""
    from deltalake import DeltaTable

    lake = env.tmp / "lake"
    env.with_crm = False
    env.sink_extra = f"  lake:\n    kind: delta\n    uri: {lake}\n    commit_interval_s: 3600\n"
    rng = random.Random(5)
    ids = [0]
    mariadb_churn(env.maria, env.db, 400, rng, ids)
    env.write()
    process = env.run("--exit-when-idle", "2")
    for _ in range(8):  # bursts apart in time: several drain rounds, each a commit if flushed per round
        mariadb_churn(env.maria, env.db, 40, rng, ids)
        time.sleep(0.4)
    wait_exit(process, env)
    assert_identical(env)
    with sqlite3.connect(env.spool) as spool:
        assert spool.execute("SELECT count(*) FROM batches").fetchone() == (0,)
    table = DeltaTable(str(lake / env.erp_name / "items"))
    commits = [c for c in table.history() if c.get("operation") != "CREATE TABLE"]
    assert 1 <= len(commits) <= 2, commits  # not one per round: the commit interval is an hour
    target = {row["id"]: (row["qty"], row["price"], row["label"])
              for row in table.to_pyarrow_table().to_pylist() if not row.get("_bl_deleted")}
    cur = env.maria.cursor()
    cur.execute(f"SELECT id, qty, price, label FROM {env.db}.items")
    assert target == {i: (q, p, label) for i, q, p, label in cur.fetchall()}
