"""The runner's text path (`branchline.runtime.text_rows`) on the real servers: one PostgreSQL source, two
`branchline run` processes reading the same changes through slots of their own, one with `runtime.text_copy`
on and one with it off. Their target tables must be equal column by column (bookkeeping included), and
`branchline verify` must find each identical to the source.

The changes cover what the text path must get right (NULLs, tabs, newlines, backslashes, a literal ``\\N``,
non-ASCII text, composite keys, repeated changes of one key in a batch, deletes) and what must send a table
down the event path instead (a changed primary key, an unchanged TOAST value).
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

pytestmark = pytest.mark.integration

BRANCHLINE = [sys.executable, "-m", "branchline.cli"]

DDL = """
CREATE TABLE {s}.wide (
  id bigint PRIMARY KEY, qty int, small smallint, price numeric(12,2), amount numeric, label text,
  code varchar(10), pad char(4), flag boolean, day date, made timestamp(3), seen timestamptz, u uuid,
  ratio double precision);
CREATE TABLE {s}.pairs (region text, n int, note text, PRIMARY KEY (region, n));
CREATE TABLE {s}.docs (id int PRIMARY KEY, body text, rev int);
ALTER TABLE {s}.docs ALTER COLUMN body SET STORAGE EXTERNAL;
"""

LABELS = ["plain", "tab\there", "new\nline", "back\\slash", "\\N", "", None, "ünïcødé ✓", "cr\rx", "a\\tb"]


def _wide_row(i: int, rng: random.Random) -> tuple[object, ...]:
    return (i, rng.randint(-10**6, 10**6), rng.randint(-300, 300), Decimal(rng.randint(-10**8, 10**8)) / 100,
            rng.choice([Decimal("1.500"), Decimal("-0.000001"), Decimal(10**30), None]), rng.choice(LABELS),
            rng.choice(["ab", "x" * 10, None]), rng.choice(["ab", "abcd", None]), rng.choice([True, False, None]),
            date(2024, 1, 1) + timedelta(days=rng.randint(0, 900)),
            datetime(2025, 3, 1, 12, 0) + timedelta(microseconds=rng.randint(0, 10**12) * 1000),
            rng.choice([datetime(2025, 1, 1, tzinfo=UTC) + timedelta(seconds=rng.random() * 10**7), None]),
            uuid.UUID(int=rng.getrandbits(128)), rng.choice([rng.random() * 1e6, 1e-300, -2.5, None]))


def _changes(pg: psycopg.Connection, s: str, rng: random.Random, ids: list[int], transactions: int) -> None:
    """Inserts, repeated updates of a few keys, deletes, composite keys, and large unchanged TOAST values."""
    for _ in range(transactions):
        with pg.transaction():
            for _ in range(rng.randint(1, 20)):
                roll = rng.random()
                if roll < 0.45 or ids[0] < 10:
                    ids[0] += 1
                    pg.execute(f"INSERT INTO {s}.wide VALUES ({', '.join(['%s'] * 14)})", _wide_row(ids[0], rng))
                elif roll < 0.75:
                    pg.execute(f"UPDATE {s}.wide SET qty = qty + 1, label = %s, seen = now() WHERE id = %s",
                               (rng.choice(LABELS), rng.randint(max(1, ids[0] - 5), ids[0])))  # hot keys
                elif roll < 0.85:
                    pg.execute(f"DELETE FROM {s}.wide WHERE id = %s", (rng.randint(1, ids[0]),))
                else:
                    pg.execute(f"INSERT INTO {s}.pairs VALUES (%s, %s, %s) ON CONFLICT (region, n)"
                               " DO UPDATE SET note = EXCLUDED.note",
                               (rng.choice(["north", "south", "ost\tsee"]), rng.randint(0, 30), rng.choice(LABELS)))


@pytest.fixture
def source(crm, cloud) -> Iterator[tuple[psycopg.Connection, str]]:
    schema = "tp_" + uuid.uuid4().hex[:8]
    pg = psycopg.connect(host=crm.host, port=crm.port, user="postgres", dbname="crm", autocommit=True)
    pg.execute(f"CREATE SCHEMA {schema}")
    pg.execute(DDL.format(s=schema))
    yield pg, schema
    for suffix in ("_t", "_e"):
        for _ in range(50):  # the runs have exited; their walsenders may still be letting go
            row = pg.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                             (schema + suffix,)).fetchone()
            if row is None or not row[0]:
                break
            time.sleep(0.2)
        pg.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
                   (schema + suffix,))
        pg.execute(f"DROP PUBLICATION IF EXISTS {schema}{suffix}")
    pg.execute(f"DROP SCHEMA {schema} CASCADE")
    pg.close()
    with psycopg.connect(host=cloud.host, port=cloud.port, user="postgres", dbname="cloud", autocommit=True) as c:
        for suffix in ("_t", "_e"):
            c.execute(f'DROP SCHEMA IF EXISTS "{schema}{suffix}" CASCADE')


def _pipeline(tmp: Path, crm, cloud, schema: str, suffix: str, text_copy: bool) -> Path:
    path = tmp / f"pipeline{suffix}.yaml"
    path.write_text(f"""name: {schema}{suffix}
branch: hq
sources:
  - name: {schema}{suffix}
    kind: postgres
    host: {crm.host}
    port: {crm.port}
    user: postgres
    database: crm
    schemas: [{schema}]
    slot: {schema}{suffix}
    publication: {schema}{suffix}
sinks:
  cloud:
    kind: postgres
    host: {cloud.host}
    port: {cloud.port}
    user: postgres
    database: cloud
    schema: "{{source}}"
runtime:
  batch_interval_ms: 50
  snapshot_chunk_rows: 200
  text_copy: {str(text_copy).lower()}
metrics:
  enabled: false
""")
    return path


def _run(tmp: Path, pipeline: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "w") as out:
        return subprocess.Popen([*BRANCHLINE, "run", str(pipeline), "--spool", str(tmp / f"{pipeline.stem}.sqlite"),
                                 "--no-progress", "--exit-when-idle", "4"], stdout=out, stderr=subprocess.STDOUT,
                                cwd=tmp, env={**os.environ, "BRANCHLINE_STATE": str(tmp / "state")})


def _target(cloud, schema: str, table: str, key: str) -> list[tuple[object, ...]]:
    with psycopg.connect(host=cloud.host, port=cloud.port, user="postgres", dbname="cloud") as conn:
        columns = [r[0] for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s"
            " AND column_name <> '_bl_synced_at' ORDER BY ordinal_position", (schema, table)).fetchall()]
        assert columns, f"{schema}.{table} was not created"
        return conn.execute(f'SELECT {", ".join(columns)} FROM "{schema}".{table} ORDER BY {key}').fetchall()


def test_text_copy_and_event_path_write_the_same_rows(tmp_path, source, crm, cloud, wait_for):
    pg, schema = source
    rng = random.Random(11)
    ids = [0]
    _changes(pg, schema, rng, ids, 40)  # rows for the snapshot (the event path: snapshot rows are events)
    body = "".join(rng.choice("abcdefghij") for _ in range(4000)) * 2  # stored out of line, uncompressed
    pg.execute(f"INSERT INTO {schema}.docs SELECT g, %s, 0 FROM generate_series(1, 5) g", (body,))
    runs = {}
    for suffix, text_copy in (("_t", True), ("_e", False)):
        pipeline = _pipeline(tmp_path, crm, cloud, schema, suffix, text_copy)
        runs[suffix] = (pipeline, tmp_path / f"run{suffix}.log", _run(tmp_path, pipeline, tmp_path / f"run{suffix}.log"))
    for _, log, _ in runs.values():
        wait_for("both runs streaming", lambda log=log: "streaming from" in log.read_text(), timeout_s=120)
    for _ in range(8):
        _changes(pg, schema, rng, ids, 25)
        pg.execute(f"UPDATE {schema}.docs SET rev = rev + 1 WHERE id <= 3")  # body unchanged: TOAST 'u'
        time.sleep(0.1)
    pg.execute(f"UPDATE {schema}.wide SET id = id + 1000000 WHERE id = (SELECT max(id) FROM {schema}.wide)")
    _changes(pg, schema, rng, ids, 10)
    logs = {}
    for suffix, (pipeline, log, process) in runs.items():
        try:
            code = process.wait(240)
        except subprocess.TimeoutExpired:
            process.kill()
            raise AssertionError(log.read_text()[-3000:]) from None
        logs[suffix] = log.read_text()
        assert code == 0, logs[suffix][-3000:]
        verified = subprocess.run([*BRANCHLINE, "verify", str(pipeline), "--no-progress"], capture_output=True,
                                  text=True, timeout=300, check=False)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert verified.stdout.count("identical") >= 1 and "different" not in verified.stdout

    def as_text(log: str) -> int:
        found = re.search(r"(\d+) of them as text COPY rows", log)
        assert found, log[-3000:]
        return int(found.group(1))

    assert as_text(logs["_t"]) > 500  # most streamed changes took the text path
    assert as_text(logs["_e"]) == 0
    for table, key in (("wide", "id"), ("pairs", "region, n"), ("docs", "id")):
        text_rows = _target(cloud, schema + "_t", table, key)
        event_rows = _target(cloud, schema + "_e", table, key)
        assert len(text_rows) == len(event_rows) > 0, table
        for a, b in zip(text_rows, event_rows, strict=True):
            assert a[:-3] == b[:-3], (table, a, b)  # every source column
            if "r" in (a[-2], b[-2]):  # read by a snapshot: each run took its own, at its own position
                assert a[-2] == b[-2] == "r", (table, a, b)
            else:
                assert a[-3:] == b[-3:], (table, a, b)  # position, op and commit time
