"""Benchmark of the embedded runtime (prints figures; not a test).

For each source kind (MariaDB -> cloud PostgreSQL, PostgreSQL -> cloud PostgreSQL), in a private
database/schema of the local stack:

1. record the log position, pre-load a backlog of N sample-shaped rows;
2. raw decode rate: the capture library alone reads the same backlog (python-mysql-replication's
   BinLogStreamReader, or psycopg2's replication stream + the pgoutput parser, as the capture reads it; the
   rate through ``pg_logical_slot_peek_binary_changes`` is printed next to it). It runs twice, before and
   after step 3, and step 3 is compared with the mean of the two: on a shared machine the CPU time a row
   costs varies by a third between runs minutes apart, and one raw run alone made the ratio swing with it;
3. end to end: `branchline run` (a separate process) streams the backlog into the cloud PostgreSQL;
   rows/s from the first to the last row's ``_bl_synced_at`` and over the wall clock;
4. lag at a steady churn (default 1,000 rows/s): each row carries its insert time (``t_us``); lag =
   ``_bl_synced_at`` (the sink transaction's time) - insert time, p50/p99;
5. peak RSS of the `branchline run` process (VmHWM), both phases;
6. the ceiling this machine allows: a plain binary COPY of the same rows into the cloud PostgreSQL
   (rows/s), and decode + COPY alone on every core (cores / their CPU per row: the capture library,
   the source server's decoding backend, this process's COPY encoding and the cloud server's backend).
   For PostgreSQL also the least a pipeline with a durable spool does, in one process (`_spooled_pipeline`).
   Next to it, the CPU per row of `branchline run`'s runner and capture processes and of the server
   backends serving it (walsender, sink connections): where the machine's time goes, in all and while rows
   flowed (first..last synced, the window the rate is measured over).

Run: ``branchline bench embedded --rows 500000`` (or ``python -m branchline.runtime.bench``).
"""

from __future__ import annotations

import os
import random
import select
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from itertools import pairwise
from pathlib import Path
from typing import Any

import click
import psycopg
import pymysql
from branchline.connectors.embedded.reader import Checkpoint
from branchline.events import TableSchema, lsn_position
from branchline.runtime.spool import Spool

STACK = Path(__file__).resolve().parents[2] / "infra" / "stack.toml"


def _port(name: str) -> int:
    default = tomllib.loads(STACK.read_text())["ports"][name] if STACK.exists() else 0
    return int(os.environ.get(f"BRANCHLINE_{name.upper()}_PORT", default))


@dataclass
class RawDecode:
    """One run of the capture library alone over the backlog."""

    rows_s: float
    cpu_us: float
    server_cpu_us: float
    other_cores: float


@dataclass
class Figures:
    kind: str
    rows: int
    load_s: float = 0.0
    raw_runs: list[RawDecode] = field(default_factory=list)
    """The raw decode before and after the end-to-end phase."""
    e2e_cpu_us: float = 0.0
    """CPU per row of `branchline run` and its capture process over the backlog, start-up included."""
    e2e_rows_s: float = 0.0
    e2e_wall_rows_s: float = 0.0
    churn_rows: int = 0
    churn_rate: float = 0.0
    lag_p50_ms: float = 0.0
    lag_p99_ms: float = 0.0
    lag_max_ms: float = 0.0
    rss_backlog_mb: float = 0.0
    rss_churn_mb: float = 0.0
    peek_rows_s: float = 0.0
    """PostgreSQL: the raw decode through ``pg_logical_slot_peek_binary_changes`` instead of the replication
    stream the capture reads (one result set, no per-message protocol): shown next to it, not compared."""
    copy_rows_s: float = 0.0
    """A plain binary COPY of the same rows into the cloud PostgreSQL (same batches, one transaction each)."""
    copy_cpu_us: float = 0.0
    """CPU per row of that COPY: this process (encoding) plus the cloud server's backend."""
    spooled_rows_s: float = 0.0
    """PostgreSQL: `_spooled_pipeline`, the least a pipeline with a durable spool does, in one process."""
    spooled_cpu_us: float = 0.0
    """Its CPU per row: the process, the walsender and the cloud backend."""
    e2e_server_cpu_us: dict[str, float] = field(default_factory=dict)
    """CPU per row of the servers' backends serving `branchline run` (walsender, sink connections)."""
    runner_cpu_us: float = 0.0
    """Of `e2e_cpu_us`: the runner process (spool read, transforms, dedupe, sink); the rest is capture."""
    capture_cpu_us: float = 0.0
    other_readers: list[str] = field(default_factory=list)
    """Other replication clients of the source (Debezium connectors, leftover runs), seen at the start and the
    end: each decodes the same log on the same cores, which the other-work figures do not count."""
    window_cpu_us: dict[str, float] = field(default_factory=dict)
    """CPU per row of the run's processes and the watched backends from the first to the last row's sync: the
    window the end-to-end rate is measured over (no start-up, no idle tail)."""
    e2e_other_cores: float = 0.0
    """Cores busy with other work while `branchline run` streamed the backlog (its processes, the watched
    server backends and this process not counted): on a shared machine, what the two rates competed with."""

    def _raw_mean(self, name: str) -> float:
        return sum(getattr(r, name) for r in self.raw_runs) / len(self.raw_runs) if self.raw_runs else 0.0

    @property
    def raw_rows_s(self) -> float:
        """The reference the end-to-end rate is compared with: the mean of the raw runs."""
        return self._raw_mean("rows_s")

    @property
    def raw_cpu_us(self) -> float:
        """CPU per row of the raw decode (this process): steadier than rows/s on a shared machine."""
        return self._raw_mean("cpu_us")

    @property
    def raw_server_cpu_us(self) -> float:
        """CPU per row of the source server while the raw decode ran: the backend (PostgreSQL) or the whole
        local server (MariaDB)."""
        return self._raw_mean("server_cpu_us")

    @property
    def raw_other_cores(self) -> float:
        """Cores busy with other work (other processes, the source server) while the raw decode ran."""
        return self._raw_mean("other_cores")


def _sample_row(i: int, rng: random.Random) -> tuple[Any, ...]:
    return (i, rng.randint(1, 5000), Decimal(rng.randint(0, 10**7)) / 100, f"order {i} {rng.randint(0, 10**6)}",
            datetime(2024, 1, 1, rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59), rng.randint(0, 999999)),
            rng.choice(["draft", "open", "paid", "shipped"]), 0)


# -- process helpers ------------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _machine_busy_s() -> float:
    """CPU seconds every core spent busy since boot (/proc/stat: user, nice, system, irq, softirq, steal)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return sum(int(fields[i]) for i in (0, 1, 2, 5, 6, 7)) / _TICK


def _local_pid(cursor: Any) -> int | None:
    """The pid of the MariaDB/MySQL server ``cursor`` talks to, when it runs on this machine (its pid file)."""
    cursor.execute("SELECT @@pid_file")
    row = cursor.fetchone()
    try:
        return int(Path(row[0]).read_text().split()[0]) if row and row[0] else None
    except (OSError, ValueError, IndexError):
        return None


def _binlog_readers(cursor: Any) -> list[str]:
    """The MariaDB/MySQL connections dumping the binlog (replicas, Debezium, other runs) besides ours."""
    cursor.execute("SELECT ID, USER, HOST FROM information_schema.PROCESSLIST WHERE COMMAND LIKE 'Binlog Dump%'")
    return [f"binlog dump #{row[0]} ({row[1]}@{row[2]})" for row in cursor.fetchall()]


def _slot_readers(conn: Any, own_slot: str) -> list[str]:
    """The active replication slots of the PostgreSQL source besides ours: each walsender decodes all WAL."""
    return [f"slot {row[0]} ({row[1]})" for row in conn.execute(
        "SELECT slot_name, plugin FROM pg_replication_slots WHERE active AND slot_name <> %s ORDER BY 1",
        (own_slot,))]


def _add_readers(figures: Figures, readers: list[str]) -> None:
    figures.other_readers.extend(r for r in readers if r not in figures.other_readers)


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (a local server's backend too); None once it exited."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK


class CpuTimeline:
    """Each watched process's CPU seconds as read over time (wall clock), so that the CPU of a window (the
    rows' first..last sync) is told apart from start-up and the idle tail: what bounds a rate is the CPU spent
    while it is measured."""

    def __init__(self) -> None:
        self.readings: dict[int, list[tuple[float, float]]] = {}

    def record(self, pid: int, cpu: float) -> None:
        self.readings.setdefault(pid, []).append((time.time(), cpu))

    def first_to_last(self) -> dict[int, float]:
        return {pid: r[-1][1] - r[0][1] for pid, r in self.readings.items()}

    def last(self) -> dict[int, float]:
        return {pid: r[-1][1] for pid, r in self.readings.items()}

    def between(self, start: float, end: float) -> dict[int, float]:
        """CPU seconds each process used from ``start`` to ``end`` (epoch seconds), read between readings."""
        return {pid: _cpu_at(r, end) - _cpu_at(r, start) for pid, r in self.readings.items()}


def _cpu_at(readings: list[tuple[float, float]], when: float) -> float:
    """A process's CPU seconds at ``when``, straight between the readings around it (the first reading before
    it was first seen, the last after it exited)."""
    if when <= readings[0][0]:
        return readings[0][1]
    for (t0, c0), (t1, c1) in pairwise(readings):
        if when <= t1:
            return c0 + (c1 - c0) * (when - t0) / (t1 - t0) if t1 > t0 else c1
    return readings[-1][1]


class BackendCpu:
    """Polls the CPU of a local server's backends (found by a query) while `branchline run` works.

    Why: on this 2-core machine the source's walsender and the cloud server's sink connections share the
    cores with the run's two processes; their CPU per row says how much of the machine is left for ours.
    Each backend's last reading counts (it may exit before the end); from its first reading on."""

    def __init__(self, port: int, dbname: str, where: str) -> None:
        self.port, self.dbname, self.where = port, dbname, where
        self.cpu = CpuTimeline()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=self.dbname,
                                 autocommit=True) as conn:
                while True:
                    pids = [r[0] for r in conn.execute(f"SELECT pid FROM pg_stat_activity WHERE {self.where}")]
                    for pid in dict.fromkeys(pids + list(self.cpu.readings)):
                        cpu = _cpu_s(pid)
                        if cpu is not None:
                            self.cpu.record(pid, cpu)
                    if self._stop.wait(0.25):
                        return
        except psycopg.Error:
            return

    def stop(self) -> float:
        """CPU seconds the matched backends used while watched."""
        self._stop.set()
        self._thread.join(5)
        return sum(self.cpu.first_to_last().values())


class RssWatch:
    """Polls a process's VmHWM (peak resident set) until it exits, and the CPU of it and its children (the
    capture processes), each process's last reading, so the CPU per row splits between runner and capture."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kb = 0
        self.cpu = CpuTimeline()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        path = Path(f"/proc/{self.pid}/status")
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        while True:
            try:
                for line in path.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak_kb = max(self.peak_kb, int(line.split()[1]))
                for pid in [self.pid, *(int(c) for c in children.read_text().split())]:
                    cpu = _cpu_s(pid)
                    if cpu is not None:
                        self.cpu.record(pid, cpu)
            except OSError:
                return
            time.sleep(0.2)

    def split_cpu_s(self, window: tuple[float, float] | None = None) -> tuple[float, float]:
        """(CPU seconds of the process, of its children): in all, at their last readings (up to 0.2 s short),
        or within ``window`` (epoch seconds)."""
        cpu = self.cpu.last() if window is None else self.cpu.between(*window)
        return cpu.get(self.pid, 0.0), sum(s for pid, s in cpu.items() if pid != self.pid)

    def join(self) -> float:
        self._thread.join(5)
        return self.peak_kb / 1024


def _run(pipeline: Path, spool: Path, idle_s: float) -> tuple[subprocess.Popen[bytes], Path]:
    path = pipeline.with_suffix(f".{time.monotonic_ns()}.log")
    log = open(path, "w")  # noqa: SIM115 (child owns it)
    process = subprocess.Popen([sys.executable, "-m", "branchline.cli", "run", str(pipeline), "--spool", str(spool),
                                "--no-progress", "--no-metrics", "--exit-when-idle", str(idle_s)],
                               stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return process, path


def _wait_streaming(process: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    """Until the run's reader streams: start-up (imports, the capture process) is not lag."""
    deadline = time.monotonic() + timeout
    while ": streaming from " not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise click.ClickException(f"`branchline run` must start streaming; its log:\n{log.read_text()[-2000:]}")
        time.sleep(0.1)


_RUNTIME_EXTRA: dict[str, Any] = {}
"""Extra `runtime:` settings of the benchmarked pipeline (--batch-interval-ms, --capture-threads)."""


def _pipeline(path: Path, name: str, source_yaml: str, cloud_port: int, batch_size: int) -> Path:
    extra = "".join(f"  {key}: {value}\n" for key, value in _RUNTIME_EXTRA.items())
    path.write_text(f"""name: {name}
branch: hq
sources:
{source_yaml}
sinks:
  cloud:
    kind: postgres
    port: {cloud_port}
    application_name: bench-{name}
    user: postgres
    database: cloud
    schema: "{{source}}"
runtime:
  batch_size: {batch_size}
  snapshot: never
{extra}metrics:
  enabled: false
""")
    return path


def _target_stats(cloud_port: int, schema: str, first_id: int,
                  last_id: int) -> tuple[int, tuple[float, float], list[float]]:
    """(rows, first and last _bl_synced_at in epoch seconds, lags in ms for rows with t_us set)."""
    with psycopg.connect(host="127.0.0.1", port=cloud_port, user="postgres", dbname="cloud") as conn:
        row = conn.execute(
            f'SELECT count(*), EXTRACT(EPOCH FROM min(_bl_synced_at)), EXTRACT(EPOCH FROM max(_bl_synced_at))'
            f' FROM "{schema}".orders WHERE id BETWEEN %s AND %s', (first_id, last_id)).fetchone()
        assert row is not None
        count, first, last = row
        lags = [float(r[0]) for r in conn.execute(
            f'SELECT (EXTRACT(EPOCH FROM _bl_synced_at) * 1e6 - t_us) / 1000.0 FROM "{schema}".orders'
            " WHERE id BETWEEN %s AND %s AND t_us > 0", (first_id, last_id))]
    return int(count), (float(first or 0), float(last or 0)), lags


def _wait_rows(cloud_port: int, schema: str, first_id: int, last_id: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    want = last_id - first_id + 1
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(host="127.0.0.1", port=cloud_port, user="postgres", dbname="cloud") as conn:
                row = conn.execute(f'SELECT count(*) FROM "{schema}".orders WHERE id BETWEEN %s AND %s',
                                   (first_id, last_id)).fetchone()
                got = row[0] if row else 0
            if got >= want:
                return time.monotonic()
        except psycopg.Error:
            pass
        time.sleep(0.25)
    raise click.ClickException(f"target did not receive {want} rows within {timeout:.0f} s")


def _percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]


def _churn(insert: Any, first_id: int, rate: float, seconds: float) -> int:
    """Insert ``rate`` rows/s in 10 ms ticks for ``seconds``; each row carries its insert time."""
    rng = random.Random(7)
    tick = 0.01
    per_tick = max(1, round(rate * tick))
    next_id = first_id
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        rows = []
        for _ in range(per_tick):
            row = list(_sample_row(next_id, rng))
            row[-1] = time.time_ns() // 1000
            rows.append(tuple(row))
            next_id += 1
        insert(rows)
        target = start + (next_id - first_id) / rate
        delay = target - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    return next_id - first_id


def plain_copy(cloud_port: int, rows: int, batch_size: int) -> tuple[float, float]:
    """The ceiling of any writer into the cloud PostgreSQL: the same rows (same generator and seed as the
    backlog) COPYed in binary into a plain table with the same primary key, one transaction per batch, with
    the sink's C row encoder. No staging, upsert, bookkeeping, spool or dedupe.

    Returns (rows/s, CPU per row in µs of this process plus the server's backend). Generating the rows is
    outside the clock."""
    from branchline.sinks.postgres._copy import FLUSH_AT, SIGNATURE, TRAILER
    from psycopg._copy_base import format_row_binary

    table = "bench_copy_" + uuid.uuid4().hex[:8]
    rng = random.Random(1)
    elapsed = cpu = 0.0
    with psycopg.connect(host="127.0.0.1", port=cloud_port, user="postgres", dbname="cloud", autocommit=True) as conn:
        conn.execute(f"""CREATE TABLE public.{table} (id bigint PRIMARY KEY, customer_id int NOT NULL,
            amount numeric(12,2) NOT NULL, note varchar(60), ordered_at timestamp NOT NULL,
            status varchar(10) NOT NULL, t_us bigint NOT NULL)""")
        backend = conn.info.backend_pid
        server_before = _cpu_s(backend) or 0.0
        try:
            for offset in range(0, rows, batch_size):
                batch = [_sample_row(i, rng) for i in range(offset, min(rows, offset + batch_size))]
                began, cpu_began = time.perf_counter(), time.process_time()
                with conn.transaction(), conn.cursor() as cursor, \
                        cursor.copy(f"COPY public.{table} FROM STDIN (FORMAT BINARY)") as copy:
                    copy.set_types(["int8", "int4", "numeric", "text", "timestamp", "text", "int8"])
                    transformer = copy.formatter.transformer
                    buffer = bytearray(SIGNATURE)
                    for row in batch:
                        format_row_binary(row, transformer, buffer)
                        if len(buffer) >= FLUSH_AT:
                            copy.write(buffer)
                            buffer = bytearray()
                    buffer += TRAILER
                    copy.write(buffer)
                elapsed += time.perf_counter() - began
                cpu += time.process_time() - cpu_began
            cpu += (_cpu_s(backend) or server_before) - server_before
        finally:
            conn.execute(f"DROP TABLE IF EXISTS public.{table}")
    return rows / elapsed, 1e6 * cpu / rows


# -- MariaDB --------------------------------------------------------------------------------------


def _binlog_decode(port: int, gtid: str, db: str, rows: int, server_pid: int | None) -> RawDecode:
    """python-mysql-replication alone reads the backlog from ``gtid``, until ``rows`` rows."""
    from branchline.connectors.embedded.mariadb import _pymysql_connect
    from pymysqlreplication import BinLogStreamReader
    from pymysqlreplication.row_event import WriteRowsEvent

    # blocking, as the reader streams: non-blocking dumps of MariaDB 10.11 were cut (error 2013) and
    # restarted from the start position again and again, which understated the raw rate. Heartbeats when
    # idle, as the reader asks for: without them the server's dump thread outlives the closed stream until
    # the next binlog event, and the bench named it among the source's other readers.
    stream = BinLogStreamReader(connection_settings={"host": "127.0.0.1", "port": port, "user": "root",
                                                     "password": ""},
                                server_id=4_100_000 + random.randint(0, 99_999), blocking=True,
                                is_mariadb=True, auto_position=gtid, only_schemas=[db],
                                only_events=[WriteRowsEvent], enable_logging=False, slave_heartbeat=0.1,
                                pymysql_wrapper=_pymysql_connect)
    decoded = 0
    began, cpu, busy = time.monotonic(), time.process_time(), _machine_busy_s()
    server_cpu = _cpu_s(server_pid) if server_pid else None
    try:
        for event in stream:
            decoded += len(event.rows)
            if decoded >= rows:
                break
        elapsed, own = time.monotonic() - began, time.process_time() - cpu
    finally:
        stream.close()
    server = (_cpu_s(server_pid) or server_cpu or 0.0) - (server_cpu or 0.0) if server_pid else 0.0
    return RawDecode(decoded / elapsed, 1e6 * own / decoded, 1e6 * server / decoded,
                     max(0.0, _machine_busy_s() - busy - own - server) / elapsed)


def bench_mariadb(rows: int, rate: float, seconds: float, work: Path, batch_size: int) -> Figures:
    from branchline.connectors.embedded.mariadb import MariaDbReader

    port, cloud = _port("erp"), _port("cloud")
    db = "bench_" + uuid.uuid4().hex[:8]
    source = "b" + db[-8:]
    figures = Figures("MariaDB -> cloud PostgreSQL", rows)
    conn = pymysql.connect(host="127.0.0.1", port=port, user="root", password="", autocommit=True)
    cur = conn.cursor()
    cur.execute(f"CREATE DATABASE {db}")
    try:
        cur.execute(f"""CREATE TABLE {db}.orders (id BIGINT PRIMARY KEY, customer_id INT NOT NULL,
            amount DECIMAL(12,2) NOT NULL, note VARCHAR(60), ordered_at DATETIME(6) NOT NULL,
            status VARCHAR(10) NOT NULL, t_us BIGINT NOT NULL)""")
        reader = MariaDbReader(source=source, branch="hq", host="127.0.0.1", port=port, user="root", password="",
                               databases=[db])
        start = reader.start_position()
        reader.close()
        insert_sql = f"INSERT INTO {db}.orders VALUES (%s, %s, %s, %s, %s, %s, %s)"
        rng = random.Random(1)
        began = time.monotonic()
        for offset in range(0, rows, 5000):
            cur.execute("BEGIN")
            cur.executemany(insert_sql, [_sample_row(i, rng) for i in range(offset, min(rows, offset + 5000))])
            cur.execute("COMMIT")
        figures.load_s = time.monotonic() - began
        _add_readers(figures, _binlog_readers(cur))

        server_pid = _local_pid(cur)
        raw_decode = (port, start.data["gtid"], db, rows, server_pid)
        figures.raw_runs.append(_binlog_decode(*raw_decode))
        figures.copy_rows_s, figures.copy_cpu_us = plain_copy(cloud, rows, batch_size)

        # end to end: branchline run from the recorded position
        spool = work / f"{source}.sqlite"
        seeded = Spool(spool)
        seeded.plan_snapshot(source, start, [], start.position)
        seeded.close()
        pipeline = _pipeline(work / f"{source}.yaml", source, f"""  - name: {source}
    kind: mariadb
    port: {port}
    user: root
    databases: [{db}]""", cloud, batch_size)
        _end_to_end(figures, pipeline, spool, cloud, source, rows, seconds, rate,
                    lambda batch: cur.executemany(insert_sql, batch), {}, server_pid)
        _add_readers(figures, _binlog_readers(cur))
        figures.raw_runs.append(_binlog_decode(*raw_decode))
    finally:
        cur.execute(f"DROP DATABASE IF EXISTS {db}")
        conn.close()
        _drop_target(cloud, source)
    return figures


# -- PostgreSQL -----------------------------------------------------------------------------------


@contextmanager
def _replication(port: int, slot: str, publication: str) -> Iterator[tuple[Any, int]]:
    """psycopg2's replication stream of ``slot`` as `PostgresReader.stream` starts it (never acknowledged):
    the cursor to read messages from and the walsender's pid."""
    import psycopg2
    import psycopg2.extras

    conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="crm",
                            connection_factory=psycopg2.extras.LogicalReplicationConnection)
    try:
        cursor = conn.cursor()
        cursor.start_replication(slot_name=slot, decode=False,
                                 options={"proto_version": "1", "publication_names": publication})
        yield cursor, conn.get_backend_pid()
    finally:
        conn.close()


def _wait_for_messages(cursor: Any, deadline: float) -> bool:
    """No message was ready: wait up to a second for the stream's socket; False once past ``deadline``."""
    if time.monotonic() > deadline:
        return False
    select.select([cursor.connection.fileno()], [], [], 1.0)
    return True


def _stream_decode(port: int, slot: str, publication: str, rows: int) -> RawDecode:
    """The capture library alone on the backlog: psycopg2's replication stream of ``slot`` (as
    `PostgresReader.stream` reads it, never acknowledged) through the pgoutput parser, until ``rows`` row
    changes; CPU per row of this process and of the walsender."""
    from branchline.connectors.embedded.pgoutput import PgOutputParser, RowChange

    with _replication(port, slot, publication) as (cursor, walsender):
        parse, read = PgOutputParser().parse, cursor.read_message
        decoded = 0
        server_cpu = _cpu_s(walsender) or 0.0
        began, cpu, busy = time.monotonic(), time.process_time(), _machine_busy_s()
        deadline = began + 600
        while decoded < rows:
            message = read()
            if message is None:
                if not _wait_for_messages(cursor, deadline):
                    break
            elif isinstance(parse(message.payload), RowChange):
                decoded += 1
        elapsed, own = time.monotonic() - began, time.process_time() - cpu
        server = (_cpu_s(walsender) or server_cpu) - server_cpu
    decoded = max(1, decoded)
    return RawDecode(decoded / elapsed, 1e6 * own / decoded, 1e6 * server / decoded,
                     max(0.0, _machine_busy_s() - busy - own - server) / elapsed)


def _spooled_pipeline(port: int, slot: str, publication: str, rows: int, cloud: int, work: Path,
                      schema: TableSchema, batch_size: int) -> tuple[float, float]:
    """The least a pipeline with a durable spool does, in one process and in order, over the same backlog:
    the capture's reading and tuple splitting (`PgOutputParser.parse_text`), each batch durably into a
    `Spool` and read back from its bytes, collapsed per key into COPY text (`split_round`), and COPYed into a
    keyed table of the cloud PostgreSQL in one transaction. No hand-off between processes, no asyncio, no
    guards, checkpoints or metrics. Returns rows/s and CPU per row: this process, the walsender and the cloud
    backend."""
    import gc

    from branchline.connectors.embedded.pgoutput import Begin, PgOutputParser, RowChange, TextRow
    from branchline.gc_tuning import tune_for_throughput
    from branchline.runtime.text_rows import split_round

    target = f"{publication}_ceiling"
    columns = ", ".join([*(f'"{c.name}"' for c in schema.columns), "_bl_position", "_bl_op", "_bl_source_ts"])
    schemas = {schema.id: schema}
    lsn_unit = lsn_position(1, 0)  # a position is lsn_position(lsn, 1), as the reader computes it
    thresholds = gc.get_threshold()
    spool = Spool(work / f"{target}.sqlite", memory_bytes=0)  # every batch read back from its bytes
    sink = psycopg.connect(host="127.0.0.1", port=cloud, user="postgres", dbname="cloud")
    try:
        sink.execute(f'CREATE SCHEMA "{target}"')
        sink.execute(f"""CREATE TABLE "{target}".orders (id bigint PRIMARY KEY, customer_id int NOT NULL,
            amount numeric(12,2) NOT NULL, note varchar(60), ordered_at timestamp NOT NULL, status varchar(10)
            NOT NULL, t_us bigint NOT NULL, _bl_position numeric(38,0) NOT NULL, _bl_op text NOT NULL,
            _bl_source_ts timestamptz, _bl_synced_at timestamptz NOT NULL DEFAULT now())""")
        sink.commit()
        batch: list[TextRow] = []
        after = 0

        def write() -> None:
            nonlocal batch, after
            spool.append(target, batch, schemas, None)  # type: ignore[arg-type]
            spooled = list(spool.read(10**9, after))
            for segment in split_round(spooled, lambda _schema: True).segments:
                with sink.cursor().copy(f'COPY "{target}".orders ({columns}) FROM STDIN') as copy:
                    copy.write(segment.body)
            sink.commit()
            after = spooled[-1].seq
            spool.delete_through(after)
            batch = []

        with _replication(port, slot, publication) as (cursor, walsender):
            parse, read = PgOutputParser().parse_text, cursor.read_message
            decoded = 0
            ts = txid = None
            servers = [walsender, sink.info.backend_pid]
            servers_began = [_cpu_s(pid) or 0.0 for pid in servers]
            tune_for_throughput()  # as `branchline run`'s processes do
            began, cpu = time.monotonic(), time.process_time()
            deadline = began + 600
            while decoded < rows:
                message = read()
                if message is None:
                    if not _wait_for_messages(cursor, deadline):
                        break
                    continue
                change = parse(message.payload)
                if isinstance(change, RowChange):
                    batch.append(TextRow(change, schema.id, message.data_start * lsn_unit | 1, ts, txid))
                    decoded += 1
                    if len(batch) >= batch_size:
                        write()
                elif isinstance(change, Begin):
                    ts, txid = change.commit_ts, str(change.xid)
            if batch:
                write()
            elapsed, own = time.monotonic() - began, time.process_time() - cpu
            server_s = sum((_cpu_s(pid) or b) - b for pid, b in zip(servers, servers_began, strict=True))
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
        spool.close()
        sink.rollback()
        sink.execute(f'DROP SCHEMA IF EXISTS "{target}" CASCADE')
        sink.commit()
        sink.close()
    decoded = max(1, decoded)
    return decoded / elapsed, 1e6 * (own + server_s) / decoded


def bench_postgres(rows: int, rate: float, seconds: float, work: Path, batch_size: int) -> Figures:
    from branchline.connectors.embedded.pgoutput import SESSION_SETTINGS, PgOutputParser, RowChange
    from branchline.connectors.embedded.postgres import PostgresReader

    port, cloud = _port("crm"), _port("cloud")
    schema = "bench_" + uuid.uuid4().hex[:8]
    source = "p" + schema[-8:]
    raw_slots = (f"{schema}_raw", f"{schema}_raw_after", f"{schema}_spooled")
    figures = Figures("PostgreSQL -> cloud PostgreSQL", rows)
    conn = psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="crm", autocommit=True)
    conn.execute(f"CREATE SCHEMA {schema}")
    reader = PostgresReader(source=source, branch="hq", host="127.0.0.1", port=port, user="postgres", password="",
                            database="crm", schemas=[schema], slot=schema, publication=schema)
    try:
        conn.execute(f"""CREATE TABLE {schema}.orders (id bigint PRIMARY KEY, customer_id int NOT NULL,
            amount numeric(12,2) NOT NULL, note varchar(60), ordered_at timestamp NOT NULL,
            status varchar(10) NOT NULL, t_us bigint NOT NULL)""")
        start = reader.start_position()
        # each raw decode streams its own slot: the run's slot keeps the whole backlog for the end-to-end phase
        for raw_slot in raw_slots:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (raw_slot,))
        rng = random.Random(1)
        began = time.monotonic()
        for offset in range(0, rows, 5000):
            with conn.transaction(), conn.cursor().copy(f"COPY {schema}.orders FROM STDIN") as copy:
                for i in range(offset, min(rows, offset + 5000)):
                    copy.write_row(_sample_row(i, rng))
        figures.load_s = time.monotonic() - began
        _add_readers(figures, _slot_readers(conn, schema))

        # raw decode: what the capture reads (the replication stream, psycopg2) and the pgoutput parser
        figures.raw_runs.append(_stream_decode(port, raw_slots[0], schema, rows))
        # and through the SQL function, for reference: the same backlog in one result set
        parser = PgOutputParser()
        conn.execute(SESSION_SETTINGS)
        decoded = 0
        began = time.monotonic()
        with conn.cursor(binary=True) as cursor:
            cursor.execute("SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, 'proto_version',"
                           " '1', 'publication_names', %s)", (schema, schema))
            for (data,) in cursor:
                if isinstance(parser.parse(data), RowChange):
                    decoded += 1
        figures.peek_rows_s = decoded / (time.monotonic() - began)
        figures.copy_rows_s, figures.copy_cpu_us = plain_copy(cloud, rows, batch_size)
        figures.spooled_rows_s, figures.spooled_cpu_us = _spooled_pipeline(
            port, raw_slots[2], schema, rows, cloud, work, reader.tables()[0], batch_size)

        spool = work / f"{source}.sqlite"
        seeded = Spool(spool)
        seeded.plan_snapshot(source, Checkpoint(start.data, start.position), [], 0)
        seeded.close()
        pipeline = _pipeline(work / f"{source}.yaml", source, f"""  - name: {source}
    kind: postgres
    port: {port}
    user: postgres
    database: crm
    schemas: [{schema}]
    slot: {schema}
    publication: {schema}""", cloud, batch_size)

        def insert(batch: list[tuple[Any, ...]]) -> None:
            with conn.cursor() as cursor:
                cursor.executemany(f"INSERT INTO {schema}.orders VALUES (%s, %s, %s, %s, %s, %s, %s)", batch)

        _end_to_end(figures, pipeline, spool, cloud, source, rows, seconds, rate, insert,
                    {"source walsender": (port, "crm", f"application_name = 'branchline-{source}'")})
        _add_readers(figures, _slot_readers(conn, schema))
        figures.raw_runs.append(_stream_decode(port, raw_slots[1], schema, rows))
    finally:
        reader.close()
        conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                     " WHERE slot_name = ANY(%s)", ([schema, *raw_slots],))
        conn.execute(f"DROP PUBLICATION IF EXISTS {schema}")
        conn.execute(f"DROP SCHEMA {schema} CASCADE")
        conn.close()
        _drop_target(cloud, source)
    return figures


# -- shared ---------------------------------------------------------------------------------------


def _end_to_end(figures: Figures, pipeline: Path, spool: Path, cloud: int, schema: str, rows: int,
                seconds: float, rate: float, insert: Any, servers: dict[str, tuple[int, str, str]],
                server_pid: int | None = None) -> None:
    """``servers``: name -> (port, database, pg_stat_activity condition) of backends whose CPU is counted;
    ``server_pid``: a local source server counted whole (MariaDB: one process, a thread per connection)."""
    import resource

    watched = {"cloud sink connections": (cloud, "cloud", f"application_name = 'bench-{schema}'"), **servers}
    watches = {name: BackendCpu(*where) for name, where in watched.items()}
    began, own, busy = time.monotonic(), time.process_time(), _machine_busy_s()
    server_began = _cpu_s(server_pid) if server_pid else None
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    process, _ = _run(pipeline, spool, idle_s=2)
    rss = RssWatch(process.pid)
    done = _wait_rows(cloud, schema, 0, rows - 1, timeout=max(600, rows / 500))
    figures.e2e_wall_rows_s = rows / (done - began)
    ours = sum(rss.cpu.last().values()) + sum(sum(w.cpu.first_to_last().values()) for w in watches.values())
    server = 0.0
    if server_pid and server_began is not None:
        server = (_cpu_s(server_pid) or server_began) - server_began
    figures.e2e_other_cores = max(0.0, _machine_busy_s() - busy - ours - server
                                  - (time.process_time() - own)) / (done - began)
    process.wait(120)
    figures.e2e_server_cpu_us = {name: 1e6 * watch.stop() / rows for name, watch in watches.items()}
    if server_pid:
        figures.e2e_server_cpu_us["source server (all of it)"] = 1e6 * server / rows
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the run reaped its capture process: both count
    figures.e2e_cpu_us = 1e6 * (after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime) / rows
    figures.rss_backlog_mb = rss.join()
    runner_s, capture_s = rss.split_cpu_s()
    figures.runner_cpu_us, figures.capture_cpu_us = 1e6 * runner_s / rows, 1e6 * capture_s / rows
    count, window, _ = _target_stats(cloud, schema, 0, rows - 1)
    span = window[1] - window[0]
    figures.e2e_rows_s = count / span if span else 0.0
    if span:
        runner_s, capture_s = rss.split_cpu_s(window)
        figures.window_cpu_us = {"runner": 1e6 * runner_s / count, "capture": 1e6 * capture_s / count}
        figures.window_cpu_us.update({name: 1e6 * sum(w.cpu.between(*window).values()) / count
                                      for name, w in watches.items()})
    if seconds <= 0:
        return
    process, log = _run(pipeline, spool, idle_s=3)
    rss = RssWatch(process.pid)
    _wait_streaming(process, log)
    # warm: one row through reader, spool and sink (target catalog, staging table) before the clock
    # starts; its t_us is 0, so it is not in the lag figures
    warm_id = rows + 10_000_000
    insert([(warm_id, *_sample_row(warm_id, random.Random(3))[1:-1], 0)])
    _wait_rows(cloud, schema, warm_id, warm_id, timeout=120)
    time.sleep(0.5)
    churned = _churn(insert, rows, rate, seconds)
    figures.churn_rows = churned
    figures.churn_rate = churned / seconds
    _wait_rows(cloud, schema, rows, rows + churned - 1, timeout=120)
    process.wait(120)
    figures.rss_churn_mb = rss.join()
    _, _, lags = _target_stats(cloud, schema, rows, rows + churned - 1)
    figures.lag_p50_ms = _percentile(lags, 0.50)
    figures.lag_p99_ms = _percentile(lags, 0.99)
    figures.lag_max_ms = max(lags) if lags else 0.0


def _drop_target(cloud: int, schema: str) -> None:
    with psycopg.connect(host="127.0.0.1", port=cloud, user="postgres", dbname="cloud", autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _print(figures: Figures) -> None:
    ratio = figures.e2e_rows_s / figures.raw_rows_s if figures.raw_rows_s else 0.0
    click.echo(f"\n{figures.kind}: backlog of {figures.rows:,} rows (loaded in {figures.load_s:.1f} s)")
    click.echo(f"  raw decode (capture library alone)  {figures.raw_rows_s:>10,.0f} rows/s  (mean of the runs before"
               " and after end to end: " + ", ".join(f"{r.rows_s:,.0f}" for r in figures.raw_runs) + ")")
    if figures.peek_rows_s:
        click.echo(f"  raw decode via the SQL function      {figures.peek_rows_s:>10,.0f} rows/s"
                   " (pg_logical_slot_peek_binary_changes, one result set; the capture reads the stream)")
    each = ", ".join(f"{100 * figures.e2e_rows_s / r.rows_s:.0f}%" for r in figures.raw_runs if r.rows_s)
    click.echo(f"  end to end (first..last row synced) {figures.e2e_rows_s:>10,.0f} rows/s"
               f"  = {100 * ratio:.0f}% of raw decode (target >= 80%; of each run: {each})")
    click.echo(f"  end to end (wall, incl. start-up)   {figures.e2e_wall_rows_s:>10,.0f} rows/s")
    click.echo(f"  CPU per row: raw decode {figures.raw_cpu_us:.1f} us"
               + (f" (+ source server {figures.raw_server_cpu_us:.1f} us)" if figures.raw_server_cpu_us else "")
               + f"; `branchline run` (both processes, incl. start-up) {figures.e2e_cpu_us:.1f} us"
               f" (runner {figures.runner_cpu_us:.1f}, capture {figures.capture_cpu_us:.1f})"
               + "".join(f"; {name} {cpu:.1f} us" for name, cpu in figures.e2e_server_cpu_us.items()))
    cores = os.cpu_count() or 1
    copy_ratio = figures.copy_rows_s / figures.raw_rows_s if figures.raw_rows_s else 0.0
    click.echo(f"  ceiling: plain COPY of the same rows   {figures.copy_rows_s:>10,.0f} rows/s  = {100 * copy_ratio:.0f}%"
               f" of raw decode ({figures.copy_cpu_us:.1f} us CPU per row, client + server)")
    # decoding and COPYing each row once with every core busy: no pipeline on this machine does better
    floor = figures.raw_cpu_us + figures.raw_server_cpu_us + figures.copy_cpu_us
    if floor:
        ceiling = cores * 1e6 / floor
        ceiling_ratio = ceiling / figures.raw_rows_s if figures.raw_rows_s else 0.0
        uncounted = "" if figures.raw_server_cpu_us else ", the source server's share not counted"
        click.echo(f"  ceiling: decode + COPY on {cores} cores      {ceiling:>10,.0f} rows/s  = {100 * ceiling_ratio:.0f}%"
                   f" of raw decode ({floor:.1f} us CPU per row{uncounted})")
    if figures.spooled_cpu_us and figures.raw_rows_s:
        ceiling = cores * 1e6 / figures.spooled_cpu_us
        click.echo(f"  ceiling: decode + spool + collapse + COPY, one process, on {cores} cores {ceiling:>8,.0f} rows/s"
                   f"  = {100 * ceiling / figures.raw_rows_s:.0f}% of raw decode ({figures.spooled_cpu_us:.1f} us CPU"
                   f" per row incl. walsender and cloud backend; ran at {figures.spooled_rows_s:,.0f} rows/s on one)")
    if figures.e2e_cpu_us and figures.raw_rows_s and figures.raw_cpu_us:
        # what this run's own CPU allows on an otherwise idle machine. A process handles every row, so its
        # CPU per row against the raw decode's bounds its rate against the raw decode's (a core each); all
        # the processes together, server backends included, share the cores.
        work = figures.e2e_cpu_us + sum(figures.e2e_server_cpu_us.values())
        parts = [f"{name} {cpu:.1f} us/row = {cpu / figures.raw_cpu_us:.1f}x the raw decode's:"
                 f" <= {100 * figures.raw_cpu_us / cpu:.0f}%"
                 for name, cpu in (("capture", figures.capture_cpu_us), ("runner", figures.runner_cpu_us)) if cpu]
        shared = cores * 1e6 / work / figures.raw_rows_s
        click.echo(f"  bound by this run's CPU: {'; '.join(parts)}; all {work:.1f} us/row incl. server backends"
                   f" on {cores} cores: <= {100 * shared:.0f}% of raw decode")
    if figures.window_cpu_us and figures.e2e_rows_s:
        flowing = sum(figures.window_cpu_us.values())
        click.echo("  CPU per row while rows flowed (first..last synced): "
                   + ", ".join(f"{name} {cpu:.1f} us" for name, cpu in figures.window_cpu_us.items())
                   + f"; all {flowing:.1f} us/row = {flowing * figures.e2e_rows_s / 1e6:.2f} cores busy at"
                   f" {figures.e2e_rows_s:,.0f} rows/s (of {cores}; the whole source server not counted)")
    click.echo(f"  other work on this machine (other processes; servers not counted above): {figures.raw_other_cores:.2f} cores"
               f" during the raw decode, {figures.e2e_other_cores:.2f} during end to end (of {cores})")
    click.echo("  other replication readers of the source (they decode the same log on these cores): "
               + (", ".join(figures.other_readers) if figures.other_readers else "none"))
    if figures.churn_rows:
        click.echo(f"  steady churn {figures.churn_rate:,.0f} rows/s for {figures.churn_rows:,} rows: lag p50"
                   f" {figures.lag_p50_ms:.0f} ms, p99 {figures.lag_p99_ms:.0f} ms, max {figures.lag_max_ms:.0f} ms"
                   " (target p99 <= 200 ms)")
    click.echo(f"  peak RSS of `branchline run`: backlog {figures.rss_backlog_mb:.0f} MB, churn"
               f" {figures.rss_churn_mb:.0f} MB (target <= 300 MB)")


@click.command("embedded")
@click.option("--rows", type=int, default=500_000, show_default=True, help="Backlog rows per source kind.")
@click.option("--churn-rate", type=float, default=1000.0, show_default=True, help="Rows/s of the steady churn.")
@click.option("--churn-seconds", type=float, default=20.0, show_default=True, help="0 skips the lag phase.")
@click.option("--batch-size", type=int, default=5000, show_default=True)
@click.option("--batch-interval-ms", type=int, default=None, help="runtime.batch_interval_ms (default: the default).")
@click.option("--only", type=click.Choice(["mariadb", "postgres"]), default=None)
@click.option("--capture-processes/--capture-threads", default=None,
              help="runtime.capture_processes (default: the default, processes).")
def embedded(rows: int, churn_rate: float, churn_seconds: float, batch_size: int, batch_interval_ms: int | None,
             only: str | None, capture_processes: bool | None) -> None:
    """End-to-end rows/s vs raw decode rate, lag p50/p99 at steady churn, peak RSS of `branchline run`."""
    import tempfile

    if batch_interval_ms is not None:
        _RUNTIME_EXTRA["batch_interval_ms"] = batch_interval_ms
    if capture_processes is not None:
        _RUNTIME_EXTRA["capture_processes"] = str(capture_processes).lower()

    with tempfile.TemporaryDirectory(prefix="branchline-bench-") as tmp:
        work = Path(os.environ.get("BRANCHLINE_BENCH_DIR") or tmp)
        work.mkdir(parents=True, exist_ok=True)
        click.echo(f"branchline run benchmark: {rows:,} rows, churn {churn_rate:,.0f} rows/s x {churn_seconds:.0f} s,"
                   f" {os.cpu_count()} CPUs")
        if only in (None, "mariadb"):
            _print(bench_mariadb(rows, churn_rate, churn_seconds, work, batch_size))
        if only in (None, "postgres"):
            _print(bench_postgres(rows, churn_rate, churn_seconds, work, batch_size))


if __name__ == "__main__":
    embedded()
