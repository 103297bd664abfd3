"""Recreate the sample schemas and bulk-load the generated rows; read tables back as canonical values.

MariaDB gets multi-row INSERTs of about 1 MB each (literals formatted per column type), PostgreSQL
gets COPY; with both targets the CRM loads in a forked process beside the ERP. Canonical values (see
generate.py) are converted into what each driver must send, and `read_table` turns what the driver
returns back into canonical values, so that a test can compare ``list(rows(...))`` with
``read_table(...)`` row by row.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, timedelta
from importlib import resources
from typing import Any

import orjson
import psycopg
import pymysql
from branchline.errors import InfraError
from branchline.events import ColumnType, Json
from psycopg import sql
from psycopg.copy import QueuedLibpqWriter

from .connect import Endpoint, crm_connect, endpoint, ensure_crm_database, ensure_erp_database, erp_connect
from .generate import DEFAULT_SEED, Row, rows
from .tables import CRM_TABLES, ERP_TABLES, PRIMARY_KEYS, columns

STATEMENT_BYTES = 1_000_000
"""Length of one multi-row INSERT; far below MariaDB's default max_allowed_packet (16 MiB)."""

T = ColumnType


@dataclass(frozen=True)
class TableLoad:
    """What loading one table took."""

    database: str
    table: str
    rows: int
    seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")


def schema_sql(database: str) -> list[str]:
    """The statements of erp.sql or crm.sql (DROP ... IF EXISTS, then CREATE), comments removed."""
    text = resources.files(__package__).joinpath(f"{database}.sql").read_text(encoding="utf-8")
    statements: list[str] = []
    current: list[str] = []
    quoted = False
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("--")):
            continue
        current.append(line)
        quoted ^= line.count("$$") % 2 == 1  # a ; inside a $$ body does not end the statement
        if not quoted and line.rstrip().endswith(";"):
            statements.append("\n".join(current).strip().rstrip(";"))
            current = []
    if current:
        statements.append("\n".join(current).strip().rstrip(";"))
    return statements


# ---- canonical value <-> driver value -----------------------------------------------------------

def mysql_time(value: timedelta) -> str:
    """A TIME literal for MariaDB, sign and magnitude formatted apart: a negative timedelta keeps its
    sign in ``days`` only, and splitting it naively gives '-13:59:59' for -12:00:01 (pymysql < 2.2.8 did)."""
    sign = "-" if value < timedelta(0) else ""
    magnitude = -value if sign else value
    seconds = magnitude.days * 86_400 + magnitude.seconds
    return f"{sign}{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}.{magnitude.microseconds:06d}"


def _json_text(value: Json) -> str:
    return orjson.dumps(value.value).decode()


def _to_mariadb(kind: ColumnType) -> Callable[[Any], Any] | None:
    if kind is T.JSON:
        return _json_text
    if kind is T.SET:
        return ",".join
    if kind is T.BOOLEAN:
        return int
    if kind is T.TIMESTAMPTZ:
        return lambda v: v.astimezone(UTC).replace(tzinfo=None)
    if kind is T.TIME:
        return mysql_time
    return None


def _quote(text: str) -> str:
    """A single-quoted MariaDB literal. Inside single quotes only the backslash, the quote and NUL
    need escaping (newlines, double quotes and emoji pass as they are); most texts need none."""
    if "\\" in text or "'" in text or "\0" in text:
        text = text.replace("\\", "\\\\").replace("'", "\\'").replace("\0", "\\0")
    return "'" + text + "'"


def _mariadb_literal(kind: ColumnType) -> Callable[[Any], str]:
    """Canonical value -> SQL literal text. Type-specialised because pymysql's generic escaping
    (a type dispatch per value) costs more than the server's insert; bytes go as hex."""
    if kind in (T.INT16, T.INT32, T.INT64, T.UINT64, T.YEAR, T.BITS, T.DECIMAL):
        return str
    if kind is T.BOOLEAN:
        return lambda v: "1" if v else "0"
    if kind is T.BYTES:
        return lambda v: "X'" + v.hex() + "'"
    if kind is T.JSON:
        return lambda v: _quote(_json_text(v))
    if kind is T.SET:
        return lambda v: "'" + ",".join(v) + "'"
    if kind is T.TIME:
        return lambda v: "'" + mysql_time(v) + "'"
    if kind is T.TIMESTAMPTZ:
        return lambda v: "'" + v.astimezone(UTC).replace(tzinfo=None).isoformat(" ") + "'"
    if kind is T.TIMESTAMP:
        return lambda v: "'" + v.isoformat(" ") + "'"
    if kind is T.DATE:
        return lambda v: "'" + v.isoformat() + "'"
    return _quote


def _to_postgres(kind: ColumnType) -> Callable[[Any], Any] | None:
    return _json_text if kind is T.JSON else None


def _from_mariadb(kind: ColumnType) -> Callable[[Any], Any] | None:
    if kind is T.JSON:
        return lambda v: Json(json.loads(v))
    if kind is T.SET:
        return lambda v: v.split(",") if v else []
    if kind is T.BOOLEAN:
        return bool
    if kind is T.TIMESTAMPTZ:
        return lambda v: v.replace(tzinfo=UTC)
    if kind is T.BITS:
        return lambda v: int.from_bytes(v, "big")
    return None


def _from_postgres(kind: ColumnType) -> Callable[[Any], Any] | None:
    if kind is T.JSON:
        return Json
    if kind is T.TIMESTAMPTZ:
        return lambda v: v.astimezone(UTC)
    return None


def _converter(table: str, pick: Callable[[ColumnType], Callable[[Any], Any] | None]) -> Callable[[Row], tuple[Any, ...]]:
    """Canonical row -> tuple of driver parameters, converting only the columns that need it."""
    names = [c.name for c in columns(table)]
    funcs = [pick(c.type) for c in columns(table)]

    def convert(row: Row) -> tuple[Any, ...]:
        return tuple(
            value if func is None or value is None else func(value)
            for value, func in zip([row[name] for name in names], funcs, strict=True)
        )

    return convert


def _reader(table: str, pick: Callable[[ColumnType], Callable[[Any], Any] | None]) -> Callable[[tuple[Any, ...]], Row]:
    names = [c.name for c in columns(table)]
    funcs = [pick(c.type) for c in columns(table)]

    def convert(record: tuple[Any, ...]) -> Row:
        return {
            name: value if func is None or value is None else func(value)
            for name, value, func in zip(names, record, funcs, strict=True)
        }

    return convert


def to_mariadb(table: str, row: Row) -> tuple[Any, ...]:
    """Driver parameters (in column order) that write ``row`` into the ERP table."""
    return _converter(table, _to_mariadb)(row)


def to_postgres(table: str, row: Row) -> tuple[Any, ...]:
    """Driver parameters (in column order) that write ``row`` into the CRM table."""
    return _converter(table, _to_postgres)(row)


# ---- read back ----------------------------------------------------------------------------------

def read_table(conn: pymysql.Connection | psycopg.Connection[Any], table: str) -> list[Row]:
    """Every row of a sample table as canonical values, in primary-key order (unordered without one)."""
    names = [c.name for c in columns(table)]
    key = PRIMARY_KEYS[table]
    if isinstance(conn, psycopg.Connection):
        query = sql.SQL("SELECT {} FROM {}").format(sql.SQL(", ").join(map(sql.Identifier, names)), sql.Identifier(table))
        if key:
            query += sql.SQL(" ORDER BY {}").format(sql.SQL(", ").join(map(sql.Identifier, key)))
        convert = _reader(table, _from_postgres)
        with conn.cursor() as cur:
            cur.execute(query)
            return [convert(record) for record in cur]
    text = f"SELECT {', '.join(f'`{n}`' for n in names)} FROM `{table}`"
    if key:
        text += " ORDER BY " + ", ".join(f"`{k}`" for k in key)
    convert = _reader(table, _from_mariadb)
    with conn.cursor() as cur:
        cur.execute(text)
        return [convert(record) for record in cur.fetchall()]


# ---- load ---------------------------------------------------------------------------------------

def insert_statements(table: str, items: Iterable[Row], max_bytes: int = STATEMENT_BYTES) -> Iterator[tuple[str, int]]:
    """Multi-row INSERT statements for an ERP table, each about ``max_bytes`` long, with their row counts."""
    names = [c.name for c in columns(table)]
    head = f"INSERT INTO `{table}` ({', '.join(f'`{n}`' for n in names)}) VALUES "
    funcs = [_mariadb_literal(c.type) for c in columns(table)]
    pairs = list(zip(names, funcs, strict=True))
    values: list[str] = []
    size = 0
    for row in items:
        text = "(" + ",".join(["NULL" if (v := row[name]) is None else func(v) for name, func in pairs]) + ")"
        values.append(text)
        size += len(text) + 1
        if size >= max_bytes:
            yield head + ",".join(values), len(values)
            values, size = [], 0
    if values:
        yield head + ",".join(values), len(values)


def load_erp(ep: Endpoint, n: int, seed: int, report: Callable[[TableLoad], None]) -> list[TableLoad]:
    """Recreate the ERP tables and load them; one transaction per table."""
    ensure_erp_database(ep)
    results = []
    with erp_connect(ep) as conn:
        with conn.cursor() as cur:
            cur.execute("SET SESSION lock_wait_timeout = 20")  # a session holding a table must not hang the load
            # Literals use backslash escapes, and a value that does not fit must fail, not be clipped.
            cur.execute("SELECT @@SESSION.sql_mode")
            modes = {m for m in cur.fetchone()[0].split(",") if m and m != "NO_BACKSLASH_ESCAPES"} | {"STRICT_ALL_TABLES"}
            cur.execute("SET SESSION sql_mode = %s", (",".join(sorted(modes)),))
            for statement in schema_sql("erp"):
                cur.execute(statement)
        conn.commit()
        for table in ERP_TABLES:
            started = time.perf_counter()
            loaded = 0
            # The server inserts one statement while this thread builds the next (the driver waits
            # on the socket without the GIL): about a third faster than taking turns.
            with conn.cursor() as cur, ThreadPoolExecutor(1, thread_name_prefix="sample-load") as sender:
                pending: Future[Any] | None = None
                for statement, count in insert_statements(table, rows(table, n, seed)):
                    if pending is not None:
                        pending.result()
                    pending = sender.submit(cur.execute, statement)
                    loaded += count
                if pending is not None:
                    pending.result()
            conn.commit()
            result = TableLoad("erp", table, loaded, time.perf_counter() - started)
            report(result)
            results.append(result)
    return results


def load_crm(ep: Endpoint, n: int, seed: int, report: Callable[[TableLoad], None]) -> list[TableLoad]:
    """Recreate the CRM tables and COPY them in; identity sequences continue after the loaded ids."""
    ensure_crm_database(ep)
    results = []
    with crm_connect(ep) as conn:
        conn.execute("SET lock_timeout = '20s'")  # a session holding a table must not hang the load
        # DROP TABLE takes a table out of its publications; a pipeline replicating these tables
        # would silently stop seeing them. Put each recreated table back where it was.
        memberships = conn.execute(
            "SELECT p.pubname, c.relname FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid "
            "JOIN pg_class c ON c.oid = r.prrelid WHERE c.relnamespace = current_schema()::regnamespace "
            "AND c.relname = ANY(%s)", (list(CRM_TABLES),)).fetchall()
        for statement in schema_sql("crm"):
            conn.execute(statement)
        for publication, table in memberships:
            conn.execute(sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(sql.Identifier(publication), sql.Identifier(table)))
        conn.commit()
        for table in CRM_TABLES:
            started = time.perf_counter()
            names = [c.name for c in columns(table)]
            copy_sql = sql.SQL("COPY {} ({}) FROM STDIN").format(
                sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, names)))
            convert = _converter(table, _to_postgres)
            loaded = 0
            with conn.cursor() as cur:
                with cur.copy(copy_sql, writer=QueuedLibpqWriter(cur)) as copy:
                    for row in rows(table, n, seed):
                        copy.write_row(convert(row))
                        loaded += 1
                if PRIMARY_KEYS[table] == ("id",) and columns(table)[0].type is T.INT64:
                    cur.execute(
                        sql.SQL("SELECT setval(pg_get_serial_sequence(%s, 'id'), GREATEST(max(id), 1), max(id) IS NOT NULL) "
                                "FROM {}").format(sql.Identifier(table)), (table,))
            conn.commit()
            result = TableLoad("crm", table, loaded, time.perf_counter() - started)
            report(result)
            results.append(result)
        conn.execute("ANALYZE")
        conn.commit()
    return results


def load(target: str = "all", n: int = 1000, seed: int = DEFAULT_SEED, *, erp: Endpoint | None = None,
         crm: Endpoint | None = None, report: Callable[[TableLoad], None] | None = None) -> list[TableLoad]:
    """Recreate and fill the sample databases (``target``: erp, crm or all). Idempotent: reloading
    with the same ``n`` and ``seed`` leaves exactly the same rows."""
    if target not in ("erp", "crm", "all"):
        raise ValueError(f"`target` must be erp, crm or all; got {target!r}")
    if n < 0:
        raise ValueError(f"`rows` must be >= 0; got {n!r}")
    report = report or (lambda _: None)
    erp, crm = erp or endpoint("erp"), crm or endpoint("crm")
    if target == "erp":
        return load_erp(erp, n, seed, report)
    if target == "crm":
        return load_crm(crm, n, seed, report)
    # Both: generating and formatting rows is Python-bound, so the CRM loads in a forked process
    # (no threads or connections exist yet to be copied) while this one loads the ERP.
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)

    def load_crm_in_child() -> None:
        try:
            sender.send((True, load_crm(crm, n, seed, report)))
        except BaseException as exc:  # noqa: BLE001  (handed to the parent, which raises it)
            try:
                sender.send((False, exc))
            except Exception:  # noqa: BLE001  (not picklable: keep the message)
                sender.send((False, InfraError(f"loading `crm` failed: {type(exc).__name__}: {exc}")))

    sys.stdout.flush()
    sys.stderr.flush()
    child = context.Process(target=load_crm_in_child, name="sample-load-crm")
    child.start()
    sender.close()
    try:
        erp_results = load_erp(erp, n, seed, report)
        try:
            ok, value = receiver.recv()
        except EOFError as exc:
            raise InfraError(f"loading `crm` must finish; got its process exit code {child.exitcode!r}") from exc
    finally:
        child.join()
    if not ok:
        raise value
    return erp_results + list(value)
