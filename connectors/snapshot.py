"""Incremental snapshots: re-read tables while streaming continues, through Debezium's signal table.

`request_snapshot` inserts an ``execute-snapshot`` row into the source's signal table (with the
source's own user, which the setup SQL allows to insert there). Debezium reads the row from the
binlog/WAL, then copies the tables in primary-key chunks interleaved with the stream, so the
streamed changes always win over the chunk reads. Progress arrives as notifications on
``__branchline-notifications.<branch>.<source>``, which `latest_notification` reads.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from branchline.config import AnySource as Source
from branchline.config import PipelineConfig, PostgresSourceConfig
from branchline.connectors.debezium import notification_topic
from branchline.connectors.topics import read_topics
from branchline.errors import ConfigError, FatalSourceError, RetryableSourceError


def signal_row(tables: Sequence[str]) -> tuple[str, str, str]:
    """(id, type, data) of an incremental-snapshot signal."""
    data = json.dumps({"data-collections": list(tables), "type": "incremental"})
    return str(uuid.uuid4()), "execute-snapshot", data


def _check_tables(source: Source, tables: Sequence[str]) -> None:
    problems = []
    for table in tables:
        parts = table.split(".")
        if len(parts) != 2 or not all(parts):
            problems.append(f"`table` must be written `namespace.table`; got {table!r}")
        elif parts[0] not in source.namespaces:
            problems.append(f"`table` {table!r} must be in one of {list(source.namespaces)!r} (source "
                            f"`{source.name}`); got namespace {parts[0]!r}")
    if problems:
        raise ConfigError(problems)


def _keyless(source: Source, tables: Sequence[str], cursor_execute: Any) -> list[str]:
    """The tables that do not exist or have no primary key (incremental snapshots read in key order)."""
    out = []
    for table in tables:
        namespace, name = table.split(".", 1)
        if isinstance(source, PostgresSourceConfig):
            query = ("SELECT count(*) FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid "
                     "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE k.contype = 'p' AND n.nspname = %s "
                     "AND c.relname = %s")
        else:
            query = ("SELECT count(*) FROM information_schema.statistics WHERE table_schema = %s "
                     "AND table_name = %s AND index_name = 'PRIMARY'")
        if not cursor_execute(query, (namespace, name)):
            out.append(table)
    return out


def request_snapshot(source: Source, tables: Sequence[str]) -> str:
    """Insert the signal; returns its id. Refuses tables without a primary key (or missing ones):
    Debezium would skip them."""
    _check_tables(source, tables)
    signal_id, kind, data = signal_row(tables)
    namespace, table = source.signal_table.split(".", 1)
    password = source.password.get_secret_value()
    if isinstance(source, PostgresSourceConfig):
        import psycopg
        from psycopg import sql

        try:
            with psycopg.connect(host=source.host, port=source.port, user=source.user, password=password or None,
                                 dbname=source.database, connect_timeout=10, autocommit=True) as conn:
                keyless = _keyless(source, tables, lambda q, p: conn.execute(q, p).fetchone()[0])  # type: ignore[index]
                if keyless:
                    raise ConfigError(f"`table` must exist and have a primary key for an incremental snapshot; "
                                      f"got {keyless!r}")
                conn.execute(sql.SQL("INSERT INTO {} (id, type, data) VALUES (%s, %s, %s)").format(
                    sql.Identifier(namespace, table)), (signal_id, kind, data))
        except psycopg.OperationalError as exc:
            raise RetryableSourceError(f"`{source.name}` must accept connections; got {exc}") from exc
        except psycopg.Error as exc:
            raise FatalSourceError(f"`{source.signal_table}` must accept the signal row from `{source.user}` "
                                   f"(see `branchline preflight --print-setup-sql`); got {exc}") from exc
    else:
        import pymysql

        try:
            conn = pymysql.connect(host=source.host, port=source.port, user=source.user, password=password,
                                   connect_timeout=10, autocommit=True)
        except pymysql.err.OperationalError as exc:
            raise RetryableSourceError(f"`{source.name}` must accept connections; got {exc.args}") from exc
        try:
            with conn.cursor() as cursor:

                def count(query: str, params: tuple[str, str]) -> int:
                    cursor.execute(query, params)
                    return int(cursor.fetchone()[0])

                keyless = _keyless(source, tables, count)
                if keyless:
                    raise ConfigError(f"`table` must exist and have a primary key for an incremental snapshot; "
                                      f"got {keyless!r}")
                cursor.execute(f"INSERT INTO `{namespace}`.`{table}` (id, type, data) VALUES (%s, %s, %s)",
                               (signal_id, kind, data))
        except pymysql.err.MySQLError as exc:
            raise FatalSourceError(f"`{source.signal_table}` must accept the signal row from `{source.user}` "
                                   f"(see `branchline preflight --print-setup-sql`); got {exc.args}") from exc
        finally:
            conn.close()
    return signal_id


def notifications(pipeline: PipelineConfig, source: Source) -> list[dict[str, Any]]:
    if pipeline.kafka is None:
        raise ConfigError("`kafka.bootstrap_servers` must be set to read snapshot progress; got no `kafka:` section")
    topic = notification_topic(source)
    out = []
    for record in read_topics(pipeline.kafka.bootstrap_servers, lambda t: t == topic, timeout_s=30):
        if record.value is not None:
            body = json.loads(record.value)
            out.append(body.get("payload", body) if isinstance(body, dict) else body)
    return out


def latest_notification(pipeline: PipelineConfig, source: Source, since_ms: int = 0,
                        kinds: tuple[str, ...] = ("Incremental Snapshot",)) -> dict[str, Any] | None:
    """The newest snapshot notification of `kinds` (at or after `since_ms`), or None. Kinds are
    Debezium's aggregate types: "Incremental Snapshot", "Initial Snapshot"."""
    found = [n for n in notifications(pipeline, source)
             if n.get("aggregate_type") in kinds and int(n.get("timestamp") or 0) >= since_ms]
    return found[-1] if found else None


def wait_for_snapshot(pipeline: PipelineConfig, source: Source, signal_id: str, *, timeout_s: float = 3600.0,
                      started_ms: int | None = None) -> Iterator[str]:
    """Yield a line per new progress notification until the snapshot reports COMPLETED (or ABORTED)."""
    since = started_ms if started_ms is not None else int(time.time() * 1000) - 60_000
    deadline = time.monotonic() + timeout_s
    seen: set[tuple[str, str, str]] = set()
    while time.monotonic() < deadline:
        for note in notifications(pipeline, source):
            if note.get("aggregate_type") != "Incremental Snapshot" or int(note.get("timestamp") or 0) < since:
                continue
            key = (str(note.get("id")), str(note.get("type")), json.dumps(note.get("additional_data"), sort_keys=True))
            if key in seen:
                continue
            seen.add(key)
            data = note.get("additional_data") or {}
            yield f"  {note.get('type')}: " + ", ".join(f"{k}={v}" for k, v in sorted(data.items()))
            if note.get("type") in ("COMPLETED", "ABORTED"):
                return
        time.sleep(2.0)
    raise RetryableSourceError(f"`incremental snapshot` {signal_id} must complete within {timeout_s:.0f}s; "
                               "got no COMPLETED notification")
