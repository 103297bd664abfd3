"""PostgreSQL reader over SQL: a pgoutput logical replication slot polled with
``pg_logical_slot_peek_binary_changes`` and moved with ``pg_replication_slot_advance``.

Why peek-then-advance and not ``get``: ``get`` consumes changes as it returns them, so a crash
before the spool write would lose them. Peek leaves the slot where it is; the runner acknowledges a
commit only after the spool holds it, and only then is the slot advanced. Each peek re-decodes from
the slot's restart point, so the slot is advanced often and changes are read in chunks of ~20k.

Positions match the Debezium path: ``lsn_position(source.lsn, 1)`` where ``source.lsn`` is the LSN
of each change (the ``lsn`` column of the function, which is the walsender's XLogData start for the
same message); snapshot rows get position 0.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
from branchline.connectors.embedded.pgoutput import (
    SESSION_SETTINGS,
    Begin,
    Commit,
    PgOutputParser,
    Relation,
    RowChange,
    Truncate,
    column_type_for,
    decoder_for,
)
from branchline.connectors.embedded.reader import Changes, Checkpoint
from branchline.errors import BadRecordError, FatalSourceError, RetryableSourceError, SourceError
from branchline.events import (
    UNCHANGED,
    ChangeEvent,
    Column,
    ColumnType,
    Op,
    TableId,
    TableSchema,
    format_lsn,
    lsn_position,
    parse_lsn,
)
from psycopg import sql
from psycopg.types.string import TextLoader

log = logging.getLogger(__name__)


def map_psycopg_error(exc: BaseException, what: str) -> SourceError:
    """The one place that sorts psycopg errors by SQLSTATE class: 08/40/53/57P retry, others do not."""
    state = getattr(exc, "sqlstate", None) or ""
    if isinstance(exc, psycopg.OperationalError) and not state:
        return RetryableSourceError(f"`{what}` must be reachable; got {type(exc).__name__}: {str(exc)[:200]}")
    if state[:2] in ("08", "40", "53") or state.startswith("57P"):
        return RetryableSourceError(f"`{what}` must be reachable; got SQLSTATE {state}: {str(exc)[:200]}")
    return FatalSourceError(f"`{what}` failed; got SQLSTATE {state or '?'}: {str(exc)[:200]}")


def slot_name(pipeline: str, source: str) -> str:
    """A replication slot / publication name: lower-case letters, digits and underscores."""
    return re.sub(r"[^a-z0-9_]", "_", f"branchline_{pipeline}_{source}".lower())[:63]


class PostgresReader:
    """Snapshot and pgoutput stream of one PostgreSQL database, for the embedded runtime."""

    def __init__(self, *, source: str, branch: str, host: str, port: int, user: str, password: str,
                 database: str, schemas: list[str], accept: Callable[[str, str], bool] | None = None,
                 slot: str, publication: str | None = None, peek_changes: int = 20_000) -> None:
        self.source = source
        self.branch = branch
        self.database = database
        self.schemas = list(schemas) or ["public"]
        self._accept = accept or (lambda schema, table: True)
        self._conninfo = psycopg.conninfo.make_conninfo(
            host=host, port=port, user=user, password=password or None, dbname=database,
            connect_timeout=10, application_name=f"branchline-{source}")
        self.slot = slot
        self.publication = publication or slot
        self.peek_changes = peek_changes
        self._conn: psycopg.Connection[Any] | None = None
        self._by_relid: dict[int, TableSchema] = {}
        self._ack_lsn = 0
        self._ack_lock = threading.Lock()
        self._lock = threading.RLock()

    # -- catalog ---------------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True)
            conn.execute(SESSION_SETTINGS)
        except psycopg.Error as exc:
            raise map_psycopg_error(exc, f"{self.source} database {self.database}") from exc
        return conn

    def _query(self, query: Any, args: Any = None) -> list[tuple[Any, ...]]:
        """One catalog query on the shared control connection (capture and runner threads use it)."""
        with self._lock:
            return self._query_unlocked(query, args)

    def _query_unlocked(self, query: Any, args: Any = None) -> list[tuple[Any, ...]]:
        for attempt in (1, 2):
            if self._conn is None or self._conn.closed:
                self._conn = self._connect()
            try:
                cursor = self._conn.execute(query, args)
                return cursor.fetchall() if cursor.description is not None else []
            except psycopg.OperationalError as exc:
                self._conn = None
                if attempt == 2:
                    raise map_psycopg_error(exc, self.source) from exc
            except psycopg.Error as exc:
                raise map_psycopg_error(exc, self.source) from exc
        raise AssertionError("unreachable")

    def table_ids(self) -> list[TableId]:
        rows = self._query(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND n.nspname = ANY(%s)"
            " ORDER BY 1, 2", (self.schemas,))
        return [self._table_id(s, t) for s, t in rows if self._accept(s, t)]

    def _table_id(self, schema: str, table: str) -> TableId:
        return TableId(source=self.source, branch=self.branch, database=self.database, schema_=schema,
                       table=table)

    def tables(self) -> list[TableSchema]:
        return [self.schema(t) for t in self.table_ids()]

    def schema(self, table: TableId) -> TableSchema:
        """Columns (pg_attribute) and primary key (pg_index) of one table."""
        relid_rows = self._query("SELECT %s::regclass::oid",
                                 (f'"{table.schema_}"."{table.table}"',))
        relid = relid_rows[0][0]
        rows = self._query(
            "SELECT a.attname, a.atttypid, a.atttypmod, a.attnotnull, format_type(a.atttypid, a.atttypmod),"
            " t.typtype, t.typelem FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid"
            " WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum", (relid,))
        keys = self._query(
            "SELECT a.attname FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord)"
            " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
            " WHERE i.indrelid = %s AND i.indisprimary ORDER BY k.ord", (relid,))
        columns = []
        for name, type_oid, typmod, notnull, declared, typtype, _elem in rows:
            kind = column_type_for(type_oid, typtype, typmod)
            precision = scale = length = None
            if kind is ColumnType.DECIMAL and typmod > 0:
                precision, scale = ((typmod - 4) >> 16) & 0xFFFF, (typmod - 4) & 0xFFFF
            elif kind in (ColumnType.TIMESTAMP, ColumnType.TIMESTAMPTZ, ColumnType.TIME):
                precision = typmod if typmod >= 0 else 6
            elif kind is ColumnType.BITS and typmod > 0:
                length = typmod
            elif kind is ColumnType.STRING and typmod > 4:
                length = typmod - 4
            columns.append(Column(name=name, type=kind, nullable=not notnull, precision=precision,
                                  scale=scale, length=length, source_type=declared))
        schema = TableSchema(id=table, columns=tuple(columns), primary_key=tuple(k[0] for k in keys))
        self._by_relid[relid] = schema
        return schema

    def estimate_rows(self, table: TableId) -> int:
        """pg_class.reltuples (-1 before the first ANALYZE), for snapshot progress."""
        rows = self._query("SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass",
                           (f'"{table.schema_}"."{table.table}"',))
        return max(0, int(rows[0][0])) if rows else 0

    def retention_seconds(self) -> float | None:
        """A slot holds WAL until it is advanced (unless max_slot_wal_keep_size caps it): no time limit."""
        return None

    # -- positions -------------------------------------------------------------------------------

    def ensure_publication(self, tables: list[TableId]) -> None:
        rows = self._query("SELECT 1 FROM pg_publication WHERE pubname = %s", (self.publication,))
        names = sql.SQL(", ").join(sql.Identifier(t.schema_ or "public", t.table) for t in tables)
        if not rows:
            self._query(sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                sql.Identifier(self.publication), names) if tables else
                sql.SQL("CREATE PUBLICATION {}").format(sql.Identifier(self.publication)))
            return
        published = {(s, t) for s, t in self._query(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s", (self.publication,))}
        missing = [t for t in tables if (t.schema_, t.table) not in published]
        if missing:
            self._query(sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
                sql.Identifier(self.publication),
                sql.SQL(", ").join(sql.Identifier(t.schema_ or "public", t.table) for t in missing)))

    def start_position(self) -> Checkpoint:
        """Create the publication and the slot; the slot's consistent point is where streaming starts.

        Snapshot rows get position 0, as on the Debezium path (`branchline.streams.decode.position_of`):
        a transaction open while the slot was created may carry a WAL LSN below the slot's, and it
        must still win over the snapshot row. Streamed changes are ``lsn_position(lsn, 1)``.
        """
        self.ensure_publication(self.table_ids())
        rows = self._query("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
                           (self.slot,))
        if rows:
            lsn = parse_lsn(rows[0][0])
        else:
            created = self._query("SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'pgoutput')",
                                  (self.slot,))
            lsn = parse_lsn(created[0][0])
        return Checkpoint({"lsn": format_lsn(lsn)}, 0)

    def acknowledge(self, checkpoint: Checkpoint) -> None:
        """Remember the LSN; the reading thread advances the slot before its next peek."""
        lsn = parse_lsn(checkpoint.data["lsn"])
        with self._ack_lock:
            self._ack_lsn = max(self._ack_lsn, lsn)

    def _advance(self, conn: psycopg.Connection[Any], done: int) -> int:
        with self._ack_lock:
            target = self._ack_lsn
        if target > done:
            conn.execute("SELECT pg_replication_slot_advance(%s, %s::pg_lsn)", (self.slot, format_lsn(target)))
            return target
        return done

    # -- snapshot --------------------------------------------------------------------------------

    def snapshot(self, schema: TableSchema, position: int, chunk_rows: int,
                 after: tuple[Any, ...] | None = None) -> Iterator[tuple[list[ChangeEvent], tuple[Any, ...]]]:
        """Keyset pagination over the primary key; values read as text and decoded like pgoutput's."""
        table = schema.id
        target = sql.Identifier(table.schema_ or "public", table.table)
        pk = list(schema.primary_key)
        names = [c.name for c in schema.columns]
        type_rows = self._query(
            "SELECT a.attname, a.atttypid, a.atttypmod FROM pg_attribute a WHERE a.attrelid = %s::regclass"
            " AND a.attnum > 0 AND NOT a.attisdropped", (f'"{table.schema_}"."{table.table}"',))
        oids = {name: (oid, typmod) for name, oid, typmod in type_rows}
        decoders = [decoder_for(*oids[n]) for n in names]
        select = sql.SQL(", ").join(sql.Identifier("src", n) for n in names)
        key_names = pk or names
        conn = self._connect()
        # every value as its output function's text, exactly as pgoutput sends it (a ::text cast
        # would differ: it strips char(n) padding and spells booleans out)
        for oid in {oid for oid, _ in oids.values()}:
            conn.adapters.register_loader(oid, TextLoader)
        try:
            while True:
                if pk:
                    order = sql.SQL(", ").join(sql.Identifier("src", k) for k in pk)
                    if after is None:
                        query = sql.SQL("SELECT {} FROM {} AS src ORDER BY {} LIMIT {}").format(
                            select, target, order, sql.Literal(chunk_rows))
                        args: tuple[Any, ...] = ()
                    else:
                        query = sql.SQL("SELECT {} FROM {} AS src WHERE ({}) > ({}) ORDER BY {} LIMIT {}").format(
                            select, target, order, sql.SQL(", ").join(sql.Placeholder() * len(pk)), order,
                            sql.Literal(chunk_rows))
                        args = tuple(after)
                else:
                    query, args = sql.SQL("SELECT {} FROM {}").format(select, target), ()
                rows = conn.execute(query, args).fetchall()
                if not rows:
                    return
                width = len(names)
                events = []
                for raw in rows:
                    try:
                        row = {n: (None if v is None else d(v)) for n, d, v in zip(names, decoders, raw[:width])}
                    except (ValueError, ArithmeticError) as exc:
                        raise BadRecordError(f"`{table.qualified}` row {raw[:3]!r}... must decode;"
                                             f" got {exc}") from exc
                    events.append(ChangeEvent.model_construct(
                        op=Op.READ, table=table, key={k: row[k] for k in key_names}, before=None,
                        after=row, position=position, source_ts=None, txid=None, snapshot=True))
                last = tuple(rows[-1][names.index(k)] for k in pk)
                yield events, last
                if not pk or len(rows) < chunk_rows:
                    return
                after = last
        except psycopg.Error as exc:
            raise map_psycopg_error(exc, f"snapshot of {table.qualified}") from exc
        finally:
            conn.close()

    # -- stream ----------------------------------------------------------------------------------

    def _schema_for(self, relation: Relation) -> tuple[TableSchema, bool]:
        """The table's schema; re-read from the catalog when the relation's columns changed."""
        schema = self._by_relid.get(relation.relid)
        if schema is not None and tuple(c.name for c in schema.columns) == relation.names:
            return schema, False
        return self.schema(self._table_id(relation.namespace, relation.name)), True

    def stream(self, start: Checkpoint, stop: threading.Event, idle_sleep: float = 0.05) -> Iterator[Changes]:
        """Peek committed transactions after ``start``; yield them in commit order, one per commit."""
        parser = PgOutputParser()
        conn = self._connect()
        start_lsn = parse_lsn(start.data["lsn"])
        try:
            rows = conn.execute("SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::int8 FROM pg_replication_slots"
                                " WHERE slot_name = %s", (self.slot,)).fetchall()
        except psycopg.Error as exc:
            conn.close()
            raise map_psycopg_error(exc, f"replication slot {self.slot} of {self.source}") from exc
        if not rows:
            conn.close()
            raise FatalSourceError(f"`slot` {self.slot!r} must exist on {self.source} (it was dropped?); got none:"
                                   " run with --reset to snapshot again")
        done = int(rows[0][0] or 0)
        with self._ack_lock:
            self._ack_lsn = max(self._ack_lsn, start_lsn)
        # end LSN of the last transaction handed out: peek returns it again until the slot is advanced,
        # and a restart may find the slot behind the spooled checkpoint
        seen_end = start_lsn
        query = ("SELECT (lsn - '0/0'::pg_lsn)::int8, data FROM pg_logical_slot_peek_binary_changes(%s, NULL, %s, 'proto_version', '1',"
                 " 'publication_names', %s)")
        construct = ChangeEvent.model_construct
        try:
            while not stop.is_set():
                done = self._advance(conn, done)
                try:
                    cursor = conn.execute(query, (self.slot, self.peek_changes, self.publication), binary=True)
                    rows = cursor.fetchall()
                except psycopg.Error as exc:
                    raise map_psycopg_error(exc, f"replication slot {self.slot} of {self.source}") from exc
                if not rows:
                    yield Changes([])
                    time.sleep(idle_sleep)
                    continue
                events: list[ChangeEvent] = []
                schemas: list[TableSchema] = []
                skip = False
                ts = None
                txid = None
                progressed = False
                for lsn_text, data in rows:
                    message = parser.parse(data)
                    if isinstance(message, RowChange):
                        if skip or not self._accept(message.relation.namespace, message.relation.name):
                            continue
                        schema, changed = self._schema_for(message.relation)
                        if changed:
                            schemas.append(schema)
                        lsn = lsn_text
                        events.extend(_row_events(construct, message, schema, lsn_position(lsn, 1), ts, txid))
                    elif isinstance(message, Begin):
                        skip = message.final_lsn < seen_end
                        ts, txid = message.commit_ts, str(message.xid)
                    elif isinstance(message, Commit):
                        if skip:
                            continue
                        seen_end = message.end_lsn
                        progressed = True
                        yield Changes(events, Checkpoint({"lsn": format_lsn(message.end_lsn)},
                                                         lsn_position(message.end_lsn)), schemas)
                        events, schemas = [], []
                    elif isinstance(message, Truncate) and not skip:
                        lsn = lsn_text
                        for relation in message.relations:
                            if not self._accept(relation.namespace, relation.name):
                                continue
                            schema, _ = self._schema_for(relation)
                            events.append(construct(op=Op.TRUNCATE, table=schema.id, key={}, before=None,
                                                    after=None, position=lsn_position(lsn, 1), source_ts=ts,
                                                    txid=txid, snapshot=False))
                if not progressed:
                    # everything peeked was already handed out; wait for the acknowledgement to advance
                    yield Changes([])
                    time.sleep(idle_sleep)
        finally:
            conn.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def drop_slot(self) -> None:
        """Remove the slot and publication (tests, `branchline run --reset`)."""
        self._query("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
                    (self.slot,))
        self._query(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(self.publication)))


def _row_events(construct: Any, message: RowChange, schema: TableSchema, position: int, ts: Any,
                txid: str | None) -> list[ChangeEvent]:
    """One pgoutput row change -> ChangeEvents; a changed primary key becomes delete + create (Debezium)."""
    table = schema.id
    pk = schema.primary_key or tuple(c.name for c in schema.columns)
    if message.kind == "I":
        after = message.new or {}
        return [construct(op=Op.CREATE, table=table, key={k: after[k] for k in pk}, before=None, after=after,
                          position=position, source_ts=ts, txid=txid, snapshot=False)]
    if message.kind == "D":
        before = message.old or {}
        return [construct(op=Op.DELETE, table=table, key={k: before.get(k) for k in pk}, before=before,
                          after=None, position=position, source_ts=ts, txid=txid, snapshot=False)]
    after = message.new or {}
    before = message.old
    key = {k: after[k] for k in pk}
    if before is not None:
        old_key = {k: before.get(k) for k in pk}
        if old_key != key and all(v is not UNCHANGED for v in old_key.values()):
            return [
                construct(op=Op.DELETE, table=table, key=old_key, before=before, after=None, position=position,
                          source_ts=ts, txid=txid, snapshot=False),
                construct(op=Op.CREATE, table=table, key=key, before=None, after=after, position=position,
                          source_ts=ts, txid=txid, snapshot=False),
            ]
    return [construct(op=Op.UPDATE, table=table, key=key, before=before, after=after, position=position,
                      source_ts=ts, txid=txid, snapshot=False)]
