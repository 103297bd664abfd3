"""PostgreSQL reader: a pgoutput logical replication slot read over the streaming replication
protocol (``START_REPLICATION SLOT ... LOGICAL``, psycopg2's replication connection), catalog and
snapshot over psycopg 3.

Why streaming and not ``pg_logical_slot_peek_binary_changes``: each peek re-decodes the WAL from the
slot's restart point (which moves only at the server's running-transactions records), so reading a
large backlog in chunks costs nearly quadratic time, and a bulk transaction comes back whole from
one call; a walsender decodes each record once and sends the changes as it goes. Nothing is lost on a crash:
the server is told a flush position (standby status update) only for what the runner acknowledged,
i.e. after the spool write is durable, and a restart streams again from the spooled checkpoint.

psycopg 3 has no replication-protocol API; psycopg2 has (`LogicalReplicationConnection`), and it
answers the walsender's keepalive requests by itself while messages are read.

Positions match the Debezium path: ``lsn_position(source.lsn, 1)`` where ``source.lsn`` is the LSN
of each change (the XLogData start of its message, which is also the ``lsn`` column of the peek
functions); snapshot rows get position 0.
"""

from __future__ import annotations

import logging
import re
import select
import threading
import time
from collections.abc import Callable, Iterator
from itertools import repeat
from typing import Any

import psycopg
import psycopg2
import psycopg2.extras
from branchline.connectors.embedded.pgoutput import (
    SESSION_OPTIONS,
    SESSION_SETTINGS,
    Begin,
    Commit,
    PgOutputParser,
    Relation,
    RowChange,
    TextRow,
    Truncate,
    column_type_for,
    decode_text_tuple,
    decoder_for,
)
from branchline.connectors.embedded.reader import Changes, Checkpoint
from branchline.errors import BadRecordError, FatalSourceError, RetryableSourceError, SourceError
from branchline.events import (
    OP_CREATE,
    OP_DELETE,
    OP_READ,
    OP_TRUNCATE,
    OP_UPDATE,
    UNCHANGED,
    ChangeEvent,
    Column,
    ColumnType,
    TableId,
    TableSchema,
    format_lsn,
    lsn_position,
    parse_lsn,
)
from branchline.streams._construct import new_event
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


def map_psycopg2_error(exc: BaseException, what: str) -> SourceError:
    """The one place that sorts psycopg2 (replication connection) errors, by the same SQLSTATE rules.

    A lost connection has no SQLSTATE and is retryable (libpq reports a connection cut in the
    middle of the copy stream as a bare `DatabaseError`: "error with status PGRES_COPY_BOTH and no
    message"); 55006 (the slot is active in another session) is too: the other walsender may be one
    of ours that has not exited yet.
    """
    state = getattr(exc, "pgcode", None) or ""
    message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    if state == "55006":
        return RetryableSourceError(f"`{what}` must not be in use by another session; got {message}")
    lost = not state and (isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError))
                          or type(exc) is psycopg2.DatabaseError)
    if state[:2] in ("08", "40", "53") or state.startswith("57P") or lost:
        return RetryableSourceError(f"`{what}` must be reachable; got {type(exc).__name__}"
                                    f"{' SQLSTATE ' + state if state else ''}: {message}")
    return FatalSourceError(f"`{what}` failed; got SQLSTATE {state or '?'}: {message}")


def slot_name(pipeline: str, source: str) -> str:
    """A replication slot / publication name: lower-case letters, digits and underscores."""
    return re.sub(r"[^a-z0-9_]", "_", f"branchline_{pipeline}_{source}".lower())[:63]


class PostgresReader:
    """Snapshot and pgoutput stream of one PostgreSQL database, for the embedded runtime."""

    def __init__(self, *, source: str, branch: str, host: str, port: int, user: str, password: str,
                 database: str, schemas: list[str], accept: Callable[[str, str], bool] | None = None,
                 slot: str, publication: str | None = None, peek_changes: int = 20_000,
                 slot_busy_s: float = 15.0, feedback_s: float = 1.0, text_rows: bool = False) -> None:
        self.source = source
        self.branch = branch
        self.database = database
        self.schemas = list(schemas) or ["public"]
        self._accept = accept or (lambda schema, table: True)
        self._conninfo = psycopg.conninfo.make_conninfo(
            host=host, port=port, user=user, password=password or None, dbname=database,
            connect_timeout=10, application_name=f"branchline-{source}")
        # TCP keepalives: a walsender behind a dead network path is noticed in about a minute
        self._replication_conninfo = psycopg.conninfo.make_conninfo(
            self._conninfo, options=SESSION_OPTIONS, keepalives=1, keepalives_idle=30, keepalives_interval=10,
            keepalives_count=3)
        self.slot = slot
        self.publication = publication or slot
        self.max_held_changes = peek_changes
        """Changes of one transaction held before they are handed out without a checkpoint (memory bound)."""
        self.slot_busy_s = slot_busy_s
        """How long `stream` waits for a slot that another session still holds (a walsender exiting)."""
        self.feedback_s = feedback_s
        """Longest delay, while changes arrive, before an acknowledged LSN is reported to the server."""
        self.text_rows = text_rows
        """`stream` hands out row changes as `TextRow` (values as PostgreSQL's text, undecoded) instead of
        `ChangeEvent`: for a capture process that only writes them into the spool, whose reader decodes them
        (`text_row_events`) into the events this reader would have made. Truncates stay `ChangeEvent`."""
        self._conn: psycopg.Connection[Any] | None = None
        self._by_relid: dict[int, TableSchema] = {}
        self._ack_lsn = 0
        self._ack_lock = threading.Lock()
        self._streaming = False
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
        """Everything up to ``checkpoint`` is durable downstream: the server may release that WAL.

        While `stream` runs, it reports the LSN as its flush position (within `feedback_s`, at once
        when idle, and when it ends). Outside a stream the slot is moved with
        ``pg_replication_slot_advance`` (skipped if the slot is already there or in use).
        """
        lsn = parse_lsn(checkpoint.data["lsn"])
        with self._ack_lock:
            if lsn <= self._ack_lsn:
                return
            self._ack_lsn = lsn
            streaming = self._streaming
        if not streaming:
            self._advance_slot(lsn)

    def _advance_slot(self, lsn: int) -> None:
        try:
            self._query("SELECT pg_replication_slot_advance(slot_name, %s::pg_lsn) FROM pg_replication_slots"
                        " WHERE slot_name = %s AND NOT active AND confirmed_flush_lsn < %s::pg_lsn",
                        (format_lsn(lsn), self.slot, format_lsn(lsn)))
        except SourceError as exc:  # a stream started meanwhile: it reports the LSN itself
            log.debug("advancing slot %s to %s: %s", self.slot, format_lsn(lsn), exc)

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
                        op=OP_READ, table=table, key={k: row[k] for k in key_names}, before=None,
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

    def _start_replication(self, start_lsn: int, stop: threading.Event) -> tuple[Any, Any]:
        """A replication connection streaming the slot from ``start_lsn``; waits while the slot is busy."""
        what = f"replication slot {self.slot} of {self.source}"
        deadline = time.monotonic() + self.slot_busy_s
        while True:
            conn = None
            try:
                conn = psycopg2.connect(self._replication_conninfo,
                                        connection_factory=psycopg2.extras.LogicalReplicationConnection)
                cursor = conn.cursor()
                cursor.start_replication(slot_name=self.slot, decode=False, start_lsn=start_lsn,
                                         options={"proto_version": "1", "publication_names": self.publication})
                return conn, cursor
            except psycopg2.Error as exc:
                if conn is not None:
                    conn.close()
                if exc.pgcode == "55006" and time.monotonic() < deadline and not stop.is_set():
                    stop.wait(0.2)  # the slot's previous walsender (maybe ours) has not exited yet
                    continue
                raise map_psycopg2_error(exc, what) from exc

    def _wait_released(self, pid: int, timeout_s: float = 5.0) -> None:
        """Wait until the walsender ``pid`` let the slot go: a new stream can then start at once, and
        the flush position it was told is what ``pg_replication_slots`` shows."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                rows = self._query("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s AND active_pid = %s",
                                   (self.slot, pid))
            except SourceError:
                return
            if not rows:
                return
            time.sleep(0.02)

    def stream(self, start: Checkpoint, stop: threading.Event, poll_s: float = 0.1,
               idle_after_s: float = 0.02) -> Iterator[Changes]:
        """Stream committed transactions after ``start``; yield them in commit order, one per commit.

        A transaction larger than `max_held_changes` is handed out in parts (only its last part
        carries the checkpoint). Yields an empty `Changes` when no data came for ``idle_after_s``
        (so the runner writes what it holds) and every ``poll_s`` while idle; returns when ``stop``
        is set (checked at least every ``poll_s``).

        Keepalive requests are answered while messages are read: a consumer that holds the stream
        longer than the server's ``wal_sender_timeout`` (a full spool) gets a retryable error, and the
        runner resumes from its checkpoint. Not guaranteed: that the slot's ``confirmed_flush_lsn``
        equals the last acknowledgement (psycopg2 moves it to the server's WAL end on keepalives once
        everything received is acknowledged, which skips only WAL without captured changes).
        """
        what = f"replication slot {self.slot} of {self.source}"
        start_lsn = parse_lsn(start.data["lsn"])
        rows = self._query("SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::int8 FROM pg_replication_slots"
                           " WHERE slot_name = %s", (self.slot,))
        if not rows:
            raise FatalSourceError(f"`slot` {self.slot!r} must exist on {self.source} (it was dropped?); got none:"
                                   " run with --reset to snapshot again")
        with self._ack_lock:
            # never report less than the slot already has: a lower flush position would move it back
            self._ack_lsn = max(self._ack_lsn, start_lsn, int(rows[0][0] or 0))
            self._streaming = True
        conn: Any = None
        cursor: Any = None
        pid = 0
        broken = False  # the connection failed: no last feedback, no waiting on a server that may be gone
        try:
            conn, cursor = self._start_replication(start_lsn, stop)
            pid = conn.get_backend_pid()
            reported = self._ack_lsn
            cursor.send_feedback(write_lsn=reported, flush_lsn=reported, force=True)
            reported_at = time.monotonic()
            yield from self._messages(conn, cursor, start_lsn, stop, poll_s, idle_after_s, reported, reported_at)
        except psycopg2.Error as exc:
            broken = True
            raise map_psycopg2_error(exc, what) from exc
        finally:
            with self._ack_lock:
                self._streaming = False
            if conn is not None:
                if not broken and not conn.closed:
                    try:  # the last acknowledgement, then wait until the walsender let the slot go
                        ack = self._ack_lsn
                        cursor.send_feedback(write_lsn=ack, flush_lsn=ack, force=True)
                    except psycopg2.Error:  # the connection is gone: the next stream reports it
                        broken = True
                conn.close()
                if not broken:
                    self._wait_released(pid)

    def _messages(self, conn: Any, cursor: Any, start_lsn: int, stop: threading.Event, poll_s: float,
                  idle_after_s: float, reported: int, reported_at: float) -> Iterator[Changes]:
        """The message loop of `stream` (the hot path: one pgoutput message per iteration)."""
        parser = PgOutputParser()
        text_rows = self.text_rows
        parse = parser.parse_text if text_rows else parser.parse
        read = cursor.read_message
        wait = select.select
        socket = [conn.fileno()]
        construct = _construct
        # relid -> (the Relation message it was checked with, its schema or None when not captured,
        # table id, key columns)
        known: dict[int, tuple[Relation, TableSchema | None, TableId | None, tuple[str, ...]]] = {}
        events: list[ChangeEvent | TextRow] = []
        schemas: list[TableSchema] = []
        skip = False
        ts = txid = None
        # end LSN of the last transaction handed out: a restart may find the slot behind the checkpoint
        seen_end = start_lsn
        held = self.max_held_changes
        idle_yields = 0
        while not stop.is_set():
            message = read()
            if message is None:
                ack = self._ack_lsn
                if ack > reported:  # idle: report what the runner acknowledged now
                    cursor.send_feedback(write_lsn=ack, flush_lsn=ack, force=True)
                    reported, reported_at = ack, time.monotonic()
                if wait(socket, [], [], idle_after_s if idle_yields == 0 else poll_s)[0]:
                    continue
                idle_yields += 1
                yield Changes([])
                continue
            idle_yields = 0
            data = message.payload
            change = parse(data)
            if isinstance(change, RowChange):
                if skip:
                    continue
                relation = change.relation
                entry = known.get(relation.relid)
                if entry is None or entry[0] is not relation:
                    entry = known[relation.relid] = self._known(relation, schemas)
                schema = entry[1]
                if schema is None:
                    continue
                position = message.data_start * _LSN_UNIT | 1  # lsn_position(lsn, 1)
                if text_rows:
                    events.append(TextRow(change, entry[2], position, ts, txid))  # type: ignore[arg-type]
                elif change.kind == "I":  # the common case, inlined: `_row_events` does the same
                    after = change.new
                    pk = entry[3]
                    events.append(new_event({
                        "op": OP_CREATE, "table": entry[2],
                        "key": {pk[0]: after[pk[0]]} if len(pk) == 1 else {k: after[k] for k in pk},
                        "before": None, "after": after, "position": position, "source_ts": ts, "txid": txid,
                        "snapshot": False}))
                else:
                    events.extend(_row_events(construct, change, schema, position, ts, txid))
                if len(events) >= held:
                    yield Changes(events, None, schemas)  # type: ignore[arg-type]
                    events, schemas = [], []
            elif isinstance(change, Begin):
                skip = change.final_lsn < seen_end
                ts, txid = change.commit_ts, str(change.xid)
            elif isinstance(change, Commit):
                if skip:
                    continue
                seen_end = change.end_lsn
                yield Changes(events, Checkpoint({"lsn": format_lsn(change.end_lsn)},  # type: ignore[arg-type]
                                                 lsn_position(change.end_lsn)), schemas)
                events, schemas = [], []
                ack = self._ack_lsn
                if ack > reported:
                    now = time.monotonic()
                    if now - reported_at >= self.feedback_s:
                        cursor.send_feedback(write_lsn=ack, flush_lsn=ack, force=True)
                        reported, reported_at = ack, now
            elif isinstance(change, Truncate) and not skip:
                position = lsn_position(message.data_start, 1)
                for relation in change.relations:
                    entry = known.get(relation.relid)
                    if entry is None or entry[0] is not relation:
                        entry = known[relation.relid] = self._known(relation, schemas)
                    if entry[1] is None:
                        continue
                    events.append(construct(op=OP_TRUNCATE, table=entry[1].id, key={}, before=None, after=None,
                                            position=position, source_ts=ts, txid=txid, snapshot=False))

    def _known(self, relation: Relation, schemas: list[TableSchema]
               ) -> tuple[Relation, TableSchema | None, TableId | None, tuple[str, ...]]:
        """What the message loop keeps per relation: (relation, schema, table id, key columns); schema
        None for a table this reader does not capture. A new or changed schema is appended to ``schemas``."""
        if not self._accept(relation.namespace, relation.name):
            return relation, None, None, ()
        schema, changed = self._schema_for(relation)
        if changed:
            schemas.append(schema)
        return relation, schema, schema.id, schema.primary_key or tuple(c.name for c in schema.columns)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def drop_slot(self) -> None:
        """Remove the slot and publication (tests, `branchline run --reset`)."""
        self._query("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
                    (self.slot,))
        self._query(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(self.publication)))


_LSN_UNIT = lsn_position(1, 0)


def text_row_events(rows: list[tuple[Any, ...]], relations: list[tuple[tuple[str, ...], Any, TableSchema]],
                    stamps: list[Any], others: list[ChangeEvent]) -> list[ChangeEvent]:
    """The events of spooled `TextRow` rows, in order: what `stream` makes of the same messages by default.

    ``rows``: (kind, relation slot, position, stamp slot, txid, old, new, old is key) per `TextRow`, or
    ("E", index into ``others``) for an event spooled whole (a truncate). ``relations``: (column names,
    `text_decoders`, schema) per slot; ``stamps``: the commit times. Values are decoded as `_tuple` decodes
    them; the events are built as `PostgresReader._messages` (inserts, inlined) and `_row_events` build them.
    """
    events: list[ChangeEvent] = []
    append = events.append
    keys = [schema.primary_key or tuple(c.name for c in schema.columns) for _, _, schema in relations]
    wheres = [f"{schema.id.schema_}.{schema.id.table}" for _, _, schema in relations]
    decode = decode_text_tuple
    index, count = 0, len(rows)
    while index < count:
        row = rows[index]
        kind = row[0]
        slot = row[1]
        if kind == "I" and row[6].__class__ is tuple and relations[slot][0]:
            # a run of inserts into one relation, every value a str: decoded a column at a time (`map` of each
            # decoder over the column, in C), ~a quarter less than a call per value
            end = index + 1
            while end < count and (following := rows[end])[0] == "I" and following[1] == slot \
                    and following[6].__class__ is tuple:
                end += 1
            run = rows[index:end]
            index = end
            names, decoders, schema = relations[slot]
            try:
                columns = [values if decoder is str else list(map(decoder, values))
                           for decoder, values in zip(decoders, zip(*[r[6] for r in run]))]
            except (ValueError, ArithmeticError):
                for r in run:  # raises, naming the column
                    decode(names, decoders, r[6], wheres[slot])
                raise
            pk = keys[slot]
            table = schema.id
            single = pk[0] if len(pk) == 1 else None
            for (_, _, position, stamp, txid, _, _, _), after in zip(
                    run, map(dict, map(zip, repeat(names), zip(*columns)))):
                append(new_event({
                    "op": OP_CREATE, "table": table,
                    "key": {single: after[single]} if single is not None else {k: after[k] for k in pk},
                    "before": None, "after": after, "position": position, "source_ts": stamps[stamp], "txid": txid,
                    "snapshot": False}))
            continue
        index += 1
        if kind == "E":
            append(others[slot])
            continue
        _, slot, position, stamp, txid, old, new, old_is_key = row
        names, decoders, schema = relations[slot]
        old_row = None if old is None else decode(names, decoders, old, wheres[slot])
        new_row = None if new is None else decode(names, decoders, new, wheres[slot])
        if kind == "I":
            assert new_row is not None
            pk = keys[slot]
            append(new_event({
                "op": OP_CREATE, "table": schema.id, "key": {k: new_row[k] for k in pk}, "before": None,
                "after": new_row, "position": position, "source_ts": stamps[stamp], "txid": txid,
                "snapshot": False}))
            continue
        change = RowChange(kind, None, old_row, new_row, old_is_key)  # type: ignore[arg-type]
        events.extend(_row_events(_construct, change, schema, position, stamps[stamp], txid))
    return events


def _construct(**values: Any) -> ChangeEvent:
    """`ChangeEvent.model_construct` at half the cost (every field given; see `new_event`)."""
    return new_event(values)


def _row_events(construct: Any, message: RowChange, schema: TableSchema, position: int, ts: Any,
                txid: str | None) -> list[ChangeEvent]:
    """One pgoutput row change -> ChangeEvents; a changed primary key becomes delete + create (Debezium)."""
    table = schema.id
    pk = schema.primary_key or tuple(c.name for c in schema.columns)
    if message.kind == "I":
        after = message.new or {}
        return [construct(op=OP_CREATE, table=table, key={k: after[k] for k in pk}, before=None, after=after,
                          position=position, source_ts=ts, txid=txid, snapshot=False)]
    if message.kind == "D":
        before = message.old or {}
        return [construct(op=OP_DELETE, table=table, key={k: before.get(k) for k in pk}, before=before,
                          after=None, position=position, source_ts=ts, txid=txid, snapshot=False)]
    after = message.new or {}
    before = message.old
    key = {k: after[k] for k in pk}
    if before is not None:
        old_key = {k: before.get(k) for k in pk}
        if old_key != key and all(v is not UNCHANGED for v in old_key.values()):
            return [
                construct(op=OP_DELETE, table=table, key=old_key, before=before, after=None, position=position,
                          source_ts=ts, txid=txid, snapshot=False),
                construct(op=OP_CREATE, table=table, key=key, before=None, after=after, position=position,
                          source_ts=ts, txid=txid, snapshot=False),
            ]
    return [construct(op=OP_UPDATE, table=table, key=key, before=before, after=after, position=position,
                      source_ts=ts, txid=txid, snapshot=False)]
