"""Heartbeat rows in each source, so replication lag stays true when no user table changes.

Every ``interval_s`` the runtime writes one row into the source's heartbeat table (by default
``branchline.debezium_heartbeat``, the same table Debezium's ``heartbeat.action.query`` writes on the
distributed path, so both runtimes look alike). The row's change travels the normal capture path; when
it is durable in the sink, `branchline.metrics.observe_heartbeat_durable` moves the lag watermark of the
whole source. If anything stalls — capture, spool, sink — the watermark stops and lag keeps rising.

Clock skew: the row carries the *source's* clock (read in the same round trip), and lag is computed
against *this host's* clock. The writer estimates the difference on every beat (source clock minus the
midpoint of the local round trip, exact to half the round-trip time) and exports it as
``branchline_source_clock_skew_seconds``. Lag is off by that much; we assume NTP keeps it well below a
second, and the alert rules warn when it is not.

The writer also serves as the source health check: a beat that fails marks ``branchline_source_up`` 0
and records the error for `branchline status`.

Grants: the heartbeat user needs INSERT/UPDATE on the heartbeat table (and CREATE once, or create it
with `heartbeat_ddl`); the heartbeat table must be captured (in the publication on PostgreSQL, accepted
by the embedded reader's table filter) for its changes to reach the sink.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from branchline.metrics import (
    observe_error,
    observe_heartbeat_written,
    observe_source_clock,
    set_source_up,
)
from branchline.metrics_config import HeartbeatConfig

log = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_TABLE = "branchline.debezium_heartbeat"
"""``namespace.table``: MariaDB database `branchline` / PostgreSQL schema `branchline` (see config.py)."""


def heartbeat_table(source: Any) -> tuple[str, str]:
    """(namespace, table) of a source's heartbeat table: its ``heartbeat_table`` field or the default."""
    qualified = getattr(source, "heartbeat_table", None) or DEFAULT_HEARTBEAT_TABLE
    namespace, _, table = qualified.partition(".")
    return namespace, table


def heartbeat_ddl(kind: str, namespace: str, table: str) -> list[str]:
    """Statements that create the heartbeat table; one row per writer, ``ts`` in UTC with microseconds."""
    if kind == "postgres":
        return [f'CREATE SCHEMA IF NOT EXISTS "{namespace}"',
                (f'CREATE TABLE IF NOT EXISTS "{namespace}"."{table}"'
                 " (id integer PRIMARY KEY, ts timestamptz NOT NULL)")]
    return [f"CREATE DATABASE IF NOT EXISTS `{namespace}`",
            (f"CREATE TABLE IF NOT EXISTS `{namespace}`.`{table}`"
             " (id INT PRIMARY KEY, ts TIMESTAMP(6) NOT NULL)")]


def debezium_heartbeat_query(kind: str, namespace: str, table: str) -> str:
    """The ``heartbeat.action.query`` for Debezium that writes the same row the embedded writer does."""
    if kind == "postgres":
        return (f'INSERT INTO "{namespace}"."{table}" (id, ts) VALUES (1, now()) '
                "ON CONFLICT (id) DO UPDATE SET ts = EXCLUDED.ts")
    return (f"INSERT INTO `{namespace}`.`{table}` (id, ts) VALUES (1, UTC_TIMESTAMP(6)) "
            "ON DUPLICATE KEY UPDATE ts = VALUES(ts)")


def _password(source: Any) -> str:
    secret = getattr(source, "password", None)
    return secret.get_secret_value() if secret is not None else ""


def write_heartbeat(source: Any, *, create: bool = True, writer_id: int = 1) -> datetime:
    """Write one heartbeat row into ``source`` (a source section of the pipeline file) and return the
    source clock it carries. Blocking: call it through `asyncio.to_thread`. Records skew and health."""
    namespace, table = heartbeat_table(source)
    if source.kind == "postgres":
        stamp, before, after = _write_postgres(source, namespace, table, create, writer_id)
    else:
        stamp, before, after = _write_binlog(source, namespace, table, create, writer_id)
    observe_heartbeat_written(source.branch, source.name, stamp, before, after)
    set_source_up(source.branch, source.name, True)
    return stamp


Beat = tuple[datetime, float, float]
"""The source clock written, and this host's clock just before and after the statement that read it."""


def _write_postgres(source: Any, namespace: str, table: str, create: bool, writer_id: int) -> Beat:
    import psycopg

    with psycopg.connect(host=source.host, port=source.port, user=source.user, password=_password(source),
                         dbname=source.database, autocommit=True, connect_timeout=10,
                         application_name="branchline-heartbeat") as conn:
        # the setup SQL creates the table and grants only INSERT/UPDATE on it: create only when missing
        if create and conn.execute("SELECT to_regclass(%s)", (f'"{namespace}"."{table}"',)).fetchone() == (None,):
            for statement in heartbeat_ddl("postgres", namespace, table):
                conn.execute(statement)
        conn.execute("SELECT 1")  # warm the connection so the timed round trip is one statement
        before = time.time()
        row = conn.execute(
            f'INSERT INTO "{namespace}"."{table}" (id, ts) VALUES (%s, clock_timestamp()) '
            "ON CONFLICT (id) DO UPDATE SET ts = EXCLUDED.ts RETURNING ts", (writer_id,)).fetchone()
        after = time.time()
    assert row is not None
    return row[0], before, after


def _write_binlog(source: Any, namespace: str, table: str, create: bool, writer_id: int) -> Beat:
    import pymysql

    conn = pymysql.connect(host=source.host, port=source.port, user=source.user, password=_password(source),
                           autocommit=True, connect_timeout=10, charset="utf8mb4",
                           init_command="SET time_zone='+00:00'")
    try:
        with conn.cursor() as cur:
            # CREATE ... IF NOT EXISTS needs the CREATE grant even when the table exists: check first
            if create and not cur.execute("SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s"
                                          " AND TABLE_NAME = %s", (namespace, table)):
                for statement in heartbeat_ddl("mariadb", namespace, table):
                    cur.execute(statement)
            before = time.time()
            cur.execute("SELECT UTC_TIMESTAMP(6)")
            (stamp,) = cur.fetchone()
            after = time.time()
            cur.execute(f"INSERT INTO `{namespace}`.`{table}` (id, ts) VALUES (%s, %s) "
                        "ON DUPLICATE KEY UPDATE ts = VALUES(ts)", (writer_id, stamp))
    finally:
        conn.close()
    return stamp.replace(tzinfo=UTC), before, after


Stop = asyncio.Event | threading.Event
"""What ends a loop: an asyncio event, or the threading event a runtime's capture threads share."""


async def wait_or_stop(stop: Stop, seconds: float) -> bool:
    """Sleep ``seconds`` unless ``stop`` is set first; True when it is set."""
    if isinstance(stop, threading.Event):
        return await asyncio.to_thread(stop.wait, seconds)
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        return False
    return True


async def run_heartbeats(sources: Sequence[Any], config: HeartbeatConfig, stop: Stop, *,
                         write: bool = True) -> None:
    """Write a heartbeat into every source each ``config.interval_s`` until ``stop`` is set.

    A failed beat is logged, counted in ``branchline_errors_total{component="source"}``, marks the
    source down, and is tried again at the next interval: a heartbeat never stops the pipeline.
    ``write=False`` (the distributed worker, where Debezium's ``heartbeat.action.query`` writes the
    rows) only reads each source's clock on the interval: skew and health, no row.
    """
    if not config.enabled:
        return
    created: set[str] = set()
    while not stop.is_set():
        for source in sources:
            try:
                if write:
                    await asyncio.to_thread(write_heartbeat, source, create=source.name not in created)
                else:
                    await asyncio.to_thread(probe_source_clock, source)
                created.add(source.name)
            except Exception as exc:  # noqa: BLE001 - any failure is reported, none stops the pipeline
                log.warning("heartbeat into %s failed: %s", source.name, exc)
                observe_error("source", source.name, exc)
                set_source_up(source.branch, source.name, False, detail=str(exc)[:200])
        await wait_or_stop(stop, config.interval_s)


def probe_source_clock(source: Any) -> datetime:
    """Read the source's clock in one round trip (no write): records skew and health, returns the clock.

    The distributed worker uses this: Debezium writes the heartbeat rows there, but skew is still
    this host's business, since lag is computed against this host's clock.
    """
    before = after = 0.0
    if source.kind == "postgres":
        import psycopg

        with psycopg.connect(host=source.host, port=source.port, user=source.user, password=_password(source),
                             dbname=source.database, autocommit=True, connect_timeout=10,
                             application_name="branchline-monitor") as conn:
            conn.execute("SELECT 1")
            before = time.time()
            row = conn.execute("SELECT clock_timestamp()").fetchone()
            after = time.time()
        assert row is not None
        stamp: datetime = row[0]
    else:
        import pymysql

        conn = pymysql.connect(host=source.host, port=source.port, user=source.user, password=_password(source),
                               autocommit=True, connect_timeout=10)
        try:
            with conn.cursor() as cur:
                before = time.time()
                cur.execute("SELECT UTC_TIMESTAMP(6)")
                (stamp,) = cur.fetchone()
                after = time.time()
        finally:
            conn.close()
        stamp = stamp.replace(tzinfo=UTC)
    observe_source_clock(source.branch, source.name, stamp, before, after)
    set_source_up(source.branch, source.name, True)
    return stamp


# -- capturing heartbeats in the embedded runtime -----------------------------------------------------


def with_heartbeat_capture(pipeline: Any, names: Iterable[str] | None = None) -> Any:
    """A copy of ``pipeline`` whose sources also capture their heartbeat table.

    `branchline run` reads only what the pipeline file lists; the heartbeat row must travel the same
    path as user changes to prove the path is live. With ``include`` the heartbeat table is added to
    it; without, its namespace is added to the captured databases/schemas and the signal table (the
    only other table of that namespace) is excluded. A copy: the file itself is not changed, so
    `branchline verify` and the connectors still see only the user's tables. ``names``: only these
    sources (default: all).
    """
    wanted = None if names is None else set(names)
    sources = []
    for source in pipeline.sources:
        if wanted is not None and source.name not in wanted:
            sources.append(source)
            continue
        namespace, table = heartbeat_table(source)
        qualified = f"{namespace}.{table}"
        namespaces = tuple(source.namespaces)
        field_name = "schemas" if source.kind == "postgres" else "databases"
        update: dict[str, Any] = {}
        if namespace not in namespaces:
            update[field_name] = (*namespaces, namespace)
        if source.include:
            if qualified not in source.include:
                update["include"] = (*source.include, qualified)
        elif namespace not in namespaces:
            signal = getattr(source, "signal_table", None)
            if signal and signal.split(".", 1)[0] == namespace and signal not in source.exclude:
                update["exclude"] = (*source.exclude, signal)
        sources.append(source.model_copy(update=update) if update else source)
    return pipeline.model_copy(update={"sources": tuple(sources)})


def prepare_heartbeat_capture(source: Any) -> None:
    """Create the heartbeat table with a first row, and (PostgreSQL) publish it.

    Runs before capture starts, so the embedded reader finds the table: a new publication then
    includes it; an existing one (created by an earlier run before heartbeats were captured) gets it
    added, unless it already has it or publishes all tables. Blocking; raises on failure (the caller
    warns and runs without heartbeat capture for that source).
    """
    write_heartbeat(source, create=True)
    if source.kind != "postgres":
        return
    import psycopg

    namespace, table = heartbeat_table(source)
    with psycopg.connect(host=source.host, port=source.port, user=source.user, password=_password(source),
                         dbname=source.database, autocommit=True, connect_timeout=10,
                         application_name="branchline-heartbeat") as conn:
        publication = conn.execute("SELECT puballtables FROM pg_publication WHERE pubname = %s",
                                   (source.publication,)).fetchone()
        if publication is None or publication[0]:
            return
        published = conn.execute(
            "SELECT 1 FROM pg_publication_tables WHERE pubname = %s AND schemaname = %s AND tablename = %s",
            (source.publication, namespace, table)).fetchone()
        if published is None:
            from psycopg import sql

            conn.execute(sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
                sql.Identifier(source.publication), sql.Identifier(namespace, table)))
            log.info("added %s.%s to publication %s so heartbeats reach the sink", namespace, table,
                     source.publication)
