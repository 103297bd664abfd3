"""MariaDB/MySQL binlog reader built on python-mysql-replication: no JVM, no Kafka.

Positions and values match the Debezium MariaDB/MySQL connectors, so that both runtimes write the
same target rows: ``source.file``/``source.pos``/``source.row`` -> `binlog_position`, where ``pos``
is the start of the rows event (Debezium: ``EventHeaderV4.getPosition() = nextPosition - length``)
and ``row`` the row's index in it. Values are normalised to the types documented in
`branchline.events` (aware UTC for TIMESTAMP, list for SET, `Json` for JSON columns...).
"""

from __future__ import annotations

import logging
import re
import struct
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from itertools import repeat, starmap
from operator import itemgetter
from typing import Any

import orjson
import pymysql
from branchline.connectors.embedded.reader import BinlogRows, Changes, Checkpoint
from branchline.errors import FatalSourceError, RetryableSourceError, SourceError
from branchline.events import (
    OP_CREATE,
    OP_DELETE,
    OP_READ,
    OP_UPDATE,
    ChangeEvent,
    Column,
    ColumnType,
    Json,
    TableId,
    TableSchema,
    binlog_position,
)
from branchline.streams._construct import new_event

log = logging.getLogger(__name__)

Converter = Callable[[Any], Any]

_FLOAT = struct.Struct("<f")


def float32(value: float) -> float:
    """The shortest decimal that round-trips a FLOAT, as Debezium (Java ``Float.toString``) prints it."""
    packed = _FLOAT.pack(value)
    for digits in range(6, 10):
        candidate = float(f"{value:.{digits}g}")
        if _FLOAT.pack(candidate) == packed:
            return candidate
    return value


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC)


def _json(value: Any) -> Json:
    if isinstance(value, (bytes, str)):
        return Json(orjson.loads(value))
    return Json(value)


def _set_converter(members: list[str]) -> Converter:
    order = {name: i for i, name in enumerate(members)}

    def convert(value: Any) -> list[str]:
        if isinstance(value, str):
            value = value.split(",") if value else []
        return sorted(value, key=lambda m: order.get(m, len(order)))

    return convert


def _bits_converter(length: int) -> Converter:
    def convert(value: Any) -> str:
        if isinstance(value, (bytes, bytearray)):
            return format(int.from_bytes(value, "big"), f"0{length}b")
        return str(value).rjust(length, "0")

    return convert


def _bit1(value: Any) -> bool:
    if isinstance(value, (bytes, bytearray)):
        return value != b"\x00"
    return str(value) == "1"


def _members(column_type: str) -> list[str]:
    """``set('a','b')`` / ``enum('a','b')`` -> ['a', 'b'] (quotes doubled inside values)."""
    inner = column_type[column_type.index("(") + 1 : column_type.rindex(")")]
    return [m.replace("''", "'") for m in re.findall(r"'((?:[^']|'')*)'", inner)]


_INT_TYPES = {
    "tinyint": (ColumnType.INT16, ColumnType.INT16),
    "smallint": (ColumnType.INT16, ColumnType.INT32),
    "mediumint": (ColumnType.INT32, ColumnType.INT32),
    "int": (ColumnType.INT32, ColumnType.INT64),
    "integer": (ColumnType.INT32, ColumnType.INT64),
    "bigint": (ColumnType.INT64, ColumnType.UINT64),
}
_STRING_TYPES = {"char", "varchar", "tinytext", "text", "mediumtext", "longtext"}
_BYTES_TYPES = {"binary", "varbinary", "tinyblob", "blob", "mediumblob", "longblob"}


def column_from_catalog(row: dict[str, Any], json_columns: set[str]) -> Column:
    """One information_schema.COLUMNS row -> `Column` (types as the Debezium decoder maps them)."""
    name = row["COLUMN_NAME"]
    data_type = row["DATA_TYPE"].lower()
    column_type = row["COLUMN_TYPE"].lower()
    unsigned = "unsigned" in column_type
    nullable = row["IS_NULLABLE"] == "YES"
    kind: ColumnType
    precision = scale = length = None
    if data_type in _INT_TYPES:
        kind = _INT_TYPES[data_type][1 if unsigned else 0]
    elif data_type in ("decimal", "numeric"):
        kind, precision, scale = ColumnType.DECIMAL, row["NUMERIC_PRECISION"], row["NUMERIC_SCALE"]
    elif data_type == "float":
        kind = ColumnType.FLOAT32
    elif data_type in ("double", "real"):
        kind = ColumnType.FLOAT64
    elif data_type == "json":  # MySQL's native JSON; MariaDB's JSON is LONGTEXT: text, as Debezium sends it
        kind = ColumnType.JSON
    elif data_type in _STRING_TYPES:
        kind, length = ColumnType.STRING, row["CHARACTER_MAXIMUM_LENGTH"]
        if (row.get("CHARACTER_SET_NAME") or "") == "binary":
            kind = ColumnType.BYTES
    elif data_type in _BYTES_TYPES:
        kind, length = ColumnType.BYTES, row["CHARACTER_MAXIMUM_LENGTH"]
    elif data_type == "date":
        kind = ColumnType.DATE
    elif data_type == "datetime":
        kind, precision = ColumnType.TIMESTAMP, row["DATETIME_PRECISION"]
    elif data_type == "timestamp":
        kind, precision = ColumnType.TIMESTAMPTZ, row["DATETIME_PRECISION"]
    elif data_type == "time":
        kind, precision = ColumnType.TIME, row["DATETIME_PRECISION"]
    elif data_type == "year":
        kind = ColumnType.YEAR
    elif data_type == "enum":
        kind = ColumnType.ENUM
    elif data_type == "set":
        kind = ColumnType.SET
    elif data_type == "bit":
        length = int(row["NUMERIC_PRECISION"] or 1)
        kind = ColumnType.BOOLEAN if length == 1 else ColumnType.BITS
    else:
        kind = ColumnType.STRING
    return Column(name=name, type=kind, nullable=nullable, precision=precision, scale=scale,
                  length=length, source_type=column_type)


def snapshot_converter(column: Column) -> Converter | None:
    """How to turn a pymysql value of this column into the canonical value (None: keep it)."""
    source_type = column.source_type or ""
    if column.type is ColumnType.FLOAT32:
        return float32  # read as CAST(.. AS DOUBLE): the text protocol rounds FLOAT to 6 digits
    if column.type is ColumnType.TIMESTAMPTZ:
        return _utc
    if column.type is ColumnType.SET:
        return _set_converter(_members(source_type))
    if column.type is ColumnType.JSON:
        return _json
    if column.type is ColumnType.BITS:
        return _bits_converter(column.length or 1)
    if column.type is ColumnType.BOOLEAN and source_type.startswith("bit"):
        return _bit1
    return None


def _bytes(value: Any) -> bytes:
    # python-mysql-replication hands an empty binary string over as ''
    return value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogateescape")


_SECOND = timedelta(seconds=1)


def negative_time(value: timedelta) -> timedelta:
    """python-mysql-replication (1.0.17) negates a negative TIME2's whole seconds and its fraction apart:
    -00:00:01.25 comes out as -00:00:01.75. Put the fraction back on the right side of the second."""
    if value >= timedelta(0):
        return value
    magnitude = -value
    fraction = timedelta(microseconds=magnitude.microseconds)
    if not fraction:
        return value
    whole = magnitude - fraction
    return -(whole + (_SECOND - fraction))


def stream_converter(column: Column) -> Converter | None:
    """How to turn a python-mysql-replication value into the canonical value (None: keep it)."""
    if column.type is ColumnType.TIME and (column.precision or 0) > 0:
        return negative_time
    if column.type is ColumnType.BYTES:
        return _bytes
    return snapshot_converter(column)


def _convert(row: dict[str, Any], converters: list[tuple[str, Converter]]) -> dict[str, Any]:
    for name, convert in converters:
        value = row.get(name)
        if value is not None:
            row[name] = convert(value)
    return row


def _empty_sets(row: dict[str, Any], none_sources: dict[str, str] | None, set_columns: list[str]) -> None:
    """python-mysql-replication reads an empty SET as None; Debezium sends '' (-> [])."""
    if none_sources:
        for name in set_columns:
            if row.get(name) is None and none_sources.get(name) == "empty set":
                row[name] = []


_REDUCED: tuple[type, ...] = (Decimal, datetime, date, timedelta)
"""Value types the library returns that marshal cannot write: spooled as the arguments their pickling uses
(``__reduce_ex__``), which rebuild them exactly (a decimal's digits and exponent, a datetime's fields and
fold; never through float or a time zone). Tag ``i + 1`` in `spool_image`."""
_REDUCED_TAGS = {cls: i + 1 for i, cls in enumerate(_REDUCED)}
_HAS_NONE = 8
"""Added to a reduced column's tag when some of its values are None (kept as None)."""
AS_IS = 16
"""The tag of a column holding types neither marshal-safe nor reduced here: the batch is pickled instead."""
_NONE = type(None)
_MARSHAL_SAFE = frozenset({int, float, str, bytes, bool, _NONE, set, frozenset, list, dict, tuple})
"""Types marshal writes and reads back as the same type (bytearray, also accepted by marshal, would come
back as bytes; containers' contents that marshal cannot write make it raise, and the batch is pickled)."""


def spool_image(rows: list[dict[str, Any]]) -> tuple[tuple[int, ...], list[Any]]:
    """One image (the library's value dicts) of a rows event's rows -> (tags, columns): each column's values
    in marshal's types, a column at a time (a type check and, for the few reduced columns, one comprehension
    per column, instead of work per value in Python)."""
    columns: list[Any] = list(zip(*map(dict.values, rows)))
    tags = []
    for i, column in enumerate(columns):
        kinds = set(map(type, column))
        if kinds <= _MARSHAL_SAFE:
            tags.append(0)
            continue
        has_none = _NONE in kinds
        kinds.discard(_NONE)
        tag = _REDUCED_TAGS.get(kinds.pop()) if len(kinds) == 1 else None
        if tag is None:
            tags.append(AS_IS)
            continue
        if has_none:
            columns[i] = [None if v is None else v.__reduce_ex__(4)[1] for v in column]
            tag |= _HAS_NONE
        else:
            columns[i] = [v.__reduce_ex__(4)[1] for v in column]
        tags.append(tag)
    return tuple(tags), columns


def _image_rows(names: tuple[str, ...], image: tuple[tuple[int, ...], list[Any]],
                converters: dict[str, Converter]) -> list[dict[str, Any]]:
    """`spool_image`'s inverse, then the reader's conversions (`stream_converter`): the row dicts `stream`
    makes by default. Converters are looked up by name as `_convert` does (a name the image lacks: none)."""
    tags, columns = image
    values = []
    for name, tag, column in zip(names, tags, columns):
        if tag and tag != AS_IS:
            cls = _REDUCED[(tag & 7) - 1]
            column = [None if a is None else cls(*a) for a in column] if tag & _HAS_NONE else list(starmap(cls, column))
        convert = converters.get(name)
        if convert is not None:
            column = [None if v is None else convert(v) for v in column]
        values.append(column)
    return list(map(dict, map(zip, repeat(names), zip(*values))))


_converter_cache: dict[Any, dict[str, Converter]] = {}
"""Schema -> its stream converters by column name: built once per schema, not per batch."""


def binlog_row_events(groups: list[tuple[Any, ...]], schemas: list[TableSchema],
                      others: list[ChangeEvent]) -> list[ChangeEvent]:
    """The events of spooled `BinlogRows`, in order: exactly what `MariaDbReader.stream` makes of the same
    rows events by default (values, types, keys, positions, commit times).

    ``groups``: (kind, schema slot, position, timestamp, txid, count, names, before, after) per `BinlogRows`,
    or ("E", index into ``others``) for an event spooled whole."""
    events: list[ChangeEvent] = []
    append = events.append
    stamps: dict[int, datetime] = {}
    for group in groups:
        kind = group[0]
        if kind == "E":
            append(others[group[1]])
            continue
        _, slot, base, timestamp, txid, _count, names, before_image, after_image = group
        schema = schemas[slot]
        converters = _converter_cache.get(schema)
        if converters is None:
            converters = _converter_cache[schema] = {
                c.name: conv for c in schema.columns if (conv := stream_converter(c)) is not None}
        pk = schema.primary_key or tuple(c.name for c in schema.columns)
        table = schema.id
        ts = stamps.get(timestamp)
        if ts is None:
            ts = stamps[timestamp] = datetime.fromtimestamp(timestamp, UTC)
        if kind == "I":
            single = pk[0] if len(pk) == 1 else None
            for index, after in enumerate(_image_rows(names, after_image, converters)):
                append(new_event({
                    "op": OP_CREATE, "table": table,
                    "key": {single: after[single]} if single is not None else {k: after[k] for k in pk},
                    "before": None, "after": after, "position": base | index, "source_ts": ts, "txid": txid,
                    "snapshot": False}))
        elif kind == "U":
            befores = _image_rows(names, before_image, converters)
            afters = _image_rows(names, after_image, converters)
            for index, (before, after) in enumerate(zip(befores, afters)):
                position = base | index
                key = {k: after[k] for k in pk}
                old_key = {k: before[k] for k in pk}
                if old_key != key:  # a changed primary key: delete + create, as Debezium
                    append(_event(op=OP_DELETE, table=table, key=old_key, before=before, after=None,
                                  position=position, source_ts=ts, txid=txid, snapshot=False))
                    append(_event(op=OP_CREATE, table=table, key=key, before=None, after=after,
                                  position=position, source_ts=ts, txid=txid, snapshot=False))
                    continue
                append(_event(op=OP_UPDATE, table=table, key=key, before=before, after=after, position=position,
                              source_ts=ts, txid=txid, snapshot=False))
        else:
            for index, before in enumerate(_image_rows(names, before_image, converters)):
                append(_event(op=OP_DELETE, table=table, key={k: before[k] for k in pk}, before=before,
                              after=None, position=base | index, source_ts=ts, txid=txid, snapshot=False))
    return events


_VALUES = itemgetter("values")
_BEFORE_VALUES = itemgetter("before_values")
_AFTER_VALUES = itemgetter("after_values")


def map_pymysql_error(exc: BaseException, what: str) -> SourceError:
    """The one place that sorts pymysql errors: connection problems retry, grants and SQL do not."""
    if isinstance(exc, pymysql.err.OperationalError):
        code = exc.args[0] if exc.args else 0
        if code in (1045, 1044, 1142, 1227, 1236):  # access denied, missing grant, purged binlog
            return FatalSourceError(f"`{what}` must be readable; got {exc.args!r}")
        return RetryableSourceError(f"`{what}` must be reachable; got {exc.args!r}")
    if isinstance(exc, (pymysql.err.InterfaceError, ConnectionError, OSError, struct.error)):
        return RetryableSourceError(f"`{what}` must be reachable; got {exc!r}")
    return FatalSourceError(f"`{what}` failed; got {exc!r}")


class MariaDbReader:
    """Snapshot and binlog stream of one MariaDB/MySQL server, for the embedded runtime.

    MariaDB resumes by GTID (python-mysql-replication ignores file/pos with ``is_mariadb=True``);
    MySQL resumes by file/pos. Every `Checkpoint` carries both.
    """

    def __init__(self, *, source: str, branch: str, host: str, port: int, user: str, password: str,
                 databases: list[str], accept: Callable[[str, str], bool] | None = None,
                 server_id: int = 4217, mariadb: bool | None = None, raw_rows: bool = False) -> None:
        self.source = source
        self.raw_rows = raw_rows
        """`stream` hands out each rows event's rows as one `BinlogRows` (the library's values, column by column,
        unconverted) instead of events: for a capture process, whose spool's reader builds the events."""
        self.branch = branch
        self._settings = {"host": host, "port": port, "user": user, "password": password}
        self.databases = list(databases)
        self._accept = accept or (lambda database, table: True)
        self._server_id = server_id
        self._mariadb = mariadb
        self._schemas: dict[tuple[str, str], TableSchema] = {}
        self._converters: dict[tuple[str, str], list[tuple[str, Converter]]] = {}
        self._set_columns: dict[tuple[str, str], list[str]] = {}
        self._ctl: pymysql.connections.Connection | None = None
        self._lock = threading.RLock()

    # -- catalog ---------------------------------------------------------------------------------

    def _connect(self) -> pymysql.connections.Connection:
        try:
            conn = pymysql.connect(**self._settings, charset="utf8mb4", autocommit=True,
                                   cursorclass=pymysql.cursors.DictCursor, connect_timeout=10,
                                   init_command="SET time_zone='+00:00'")
        except Exception as exc:
            raise map_pymysql_error(exc, f"{self.source} at {self._settings['host']}:{self._settings['port']}") from exc
        return conn

    def _query(self, sql: str, args: Any = None) -> list[dict[str, Any]]:
        """One catalog query on the shared control connection (capture and runner threads use it)."""
        with self._lock:
            return self._query_unlocked(sql, args)

    def _query_unlocked(self, sql: str, args: Any = None) -> list[dict[str, Any]]:
        for attempt in (1, 2):
            if self._ctl is None:
                self._ctl = self._connect()
            try:
                with self._ctl.cursor() as cur:
                    cur.execute(sql, args)
                    return list(cur.fetchall())
            except (pymysql.err.OperationalError, pymysql.err.InterfaceError) as exc:
                self._ctl = None
                if attempt == 2:
                    raise map_pymysql_error(exc, self.source) from exc
        raise AssertionError("unreachable")

    @property
    def is_mariadb(self) -> bool:
        if self._mariadb is None:
            version = self._query("SELECT VERSION() AS v")[0]["v"]
            self._mariadb = "mariadb" in version.lower()
        return self._mariadb

    def table_ids(self) -> list[TableId]:
        rows = self._query(
            "SELECT TABLE_SCHEMA, TABLE_NAME FROM information_schema.TABLES WHERE TABLE_TYPE='BASE TABLE'"
            " AND TABLE_SCHEMA IN %s ORDER BY TABLE_SCHEMA, TABLE_NAME", (tuple(self.databases),))
        return [self._table_id(r["TABLE_SCHEMA"], r["TABLE_NAME"]) for r in rows
                if self._accept(r["TABLE_SCHEMA"], r["TABLE_NAME"])]

    def _table_id(self, database: str, table: str) -> TableId:
        return TableId(source=self.source, branch=self.branch, database=database, table=table)

    def tables(self) -> list[TableSchema]:
        return [self.schema(t) for t in self.table_ids()]

    def schema(self, table: TableId) -> TableSchema:
        """Columns and primary key from information_schema.

        MariaDB's JSON is LONGTEXT with a json_valid check: it stays text, exactly as stored, because
        that is what Debezium's MariaDB connector emits (the two runtimes must write the same rows).
        """
        rows = self._query(
            "SELECT COLUMN_NAME, DATA_TYPE, COLUMN_TYPE, IS_NULLABLE, NUMERIC_PRECISION, NUMERIC_SCALE,"
            " DATETIME_PRECISION, CHARACTER_MAXIMUM_LENGTH, CHARACTER_SET_NAME, COLUMN_KEY"
            " FROM information_schema.COLUMNS WHERE TABLE_SCHEMA=%s AND TABLE_NAME=%s ORDER BY ORDINAL_POSITION",
            (table.database, table.table))
        if not rows:
            raise FatalSourceError(f"`{table.qualified}` must exist in {self.source}; got no columns")
        json_columns: set[str] = set()
        if self.is_mariadb:
            checks = self._query(
                "SELECT CHECK_CLAUSE FROM information_schema.CHECK_CONSTRAINTS"
                " WHERE CONSTRAINT_SCHEMA=%s AND TABLE_NAME=%s", (table.database, table.table))
            for check in checks:
                match = re.fullmatch(r"json_valid\(`((?:[^`]|``)+)`\)", check["CHECK_CLAUSE"].strip())
                if match:
                    json_columns.add(match.group(1).replace("``", "`"))
        keys = self._query(
            "SELECT COLUMN_NAME FROM information_schema.KEY_COLUMN_USAGE WHERE TABLE_SCHEMA=%s"
            " AND TABLE_NAME=%s AND CONSTRAINT_NAME='PRIMARY' ORDER BY ORDINAL_POSITION",
            (table.database, table.table))
        columns = tuple(column_from_catalog(r, json_columns) for r in rows)
        schema = TableSchema(id=table, columns=columns, primary_key=tuple(k["COLUMN_NAME"] for k in keys))
        self._schemas[(table.database, table.table)] = schema
        self._converters[(table.database, table.table)] = [
            (c.name, conv) for c in columns if (conv := stream_converter(c)) is not None]
        self._set_columns[(table.database, table.table)] = [c.name for c in columns if c.type is ColumnType.SET]
        return schema

    def estimate_rows(self, table: TableId) -> int:
        """The catalog's row estimate (InnoDB statistics), for snapshot progress."""
        rows = self._query("SELECT TABLE_ROWS FROM information_schema.TABLES WHERE TABLE_SCHEMA=%s AND TABLE_NAME=%s",
                           (table.database, table.table))
        return int(rows[0]["TABLE_ROWS"] or 0) if rows else 0

    def retention_seconds(self) -> float | None:
        rows = self._query("SHOW GLOBAL VARIABLES WHERE Variable_name IN"
                           " ('binlog_expire_logs_seconds', 'expire_logs_days')")
        values = {r["Variable_name"]: float(r["Value"] or 0) for r in rows}
        seconds = values.get("binlog_expire_logs_seconds") or values.get("expire_logs_days", 0) * 86400
        return seconds or None

    # -- positions -------------------------------------------------------------------------------

    def start_position(self) -> Checkpoint:
        """The current end of the binlog (file, pos and, on MariaDB, the GTID position)."""
        status = self._query("SHOW MASTER STATUS")
        if not status:
            raise FatalSourceError(f"`{self.source}` must have the binlog enabled (log_bin); got none")
        file, pos = status[0]["File"], int(status[0]["Position"])
        gtid = None
        if self.is_mariadb:
            gtid = self._query("SELECT BINLOG_GTID_POS(%s, %s) AS g", (file, pos))[0]["g"] or ""
        return Checkpoint({"file": file, "pos": pos, "gtid": gtid}, binlog_position(file, pos, 0))

    durable_spool_required = False
    """`acknowledge` releases nothing, so the spool may commit batches without an fsync each (the runner
    reads this): a batch lost to a power cut takes its checkpoint with it and is read from the binlog again."""

    def acknowledge(self, checkpoint: Checkpoint) -> None:
        """Nothing to release: the binlog is kept by retention, not by this reader."""

    # -- snapshot --------------------------------------------------------------------------------

    def snapshot(self, schema: TableSchema, position: int, chunk_rows: int,
                 after: tuple[Any, ...] | None = None) -> Iterator[tuple[list[ChangeEvent], tuple[Any, ...]]]:
        """Keyset pagination over the primary key (a table without one is read in one pass)."""
        table = schema.id
        names = [c.name for c in schema.columns]
        select = ", ".join(
            f"CAST({_quote(c.name)} AS DOUBLE) AS {_quote(c.name)}" if c.type is ColumnType.FLOAT32 else _quote(c.name)
            for c in schema.columns)
        source = f"{_quote(table.database)}.{_quote(table.table)}"
        pk = list(schema.primary_key)
        converters = [(c.name, conv) for c in schema.columns if (conv := snapshot_converter(c)) is not None]
        key_names = pk or names
        conn = self._connect()
        try:
            while True:
                if pk:
                    order = ", ".join(_quote(k) for k in pk)
                    where = ""
                    args: tuple[Any, ...] = ()
                    if after is not None:
                        where = f" WHERE ({order}) > ({', '.join(['%s'] * len(pk))})"
                        args = tuple(after)
                    sql = f"SELECT {select} FROM {source}{where} ORDER BY {order} LIMIT {int(chunk_rows)}"
                else:
                    sql, args = f"SELECT {select} FROM {source}", ()
                with conn.cursor() as cur:
                    cur.execute(sql, args)
                    rows = cur.fetchall()
                if not rows:
                    return
                last = tuple(rows[-1][k] for k in pk) if pk else ()
                events = []
                for row in rows:
                    _convert(row, converters)
                    events.append(_event(
                        op=OP_READ, table=table, key={k: row[k] for k in key_names}, before=None,
                        after=row, position=position, source_ts=None, txid=None, snapshot=True))
                yield events, last
                if not pk or len(rows) < chunk_rows:
                    return
                after = last
        except pymysql.err.MySQLError as exc:
            raise map_pymysql_error(exc, f"snapshot of {table.qualified}") from exc
        finally:
            conn.close()

    # -- stream ----------------------------------------------------------------------------------

    def _reader(self, start: Checkpoint) -> Any:
        from pymysqlreplication import BinLogStreamReader
        from pymysqlreplication.event import (
            GtidEvent,
            HeartbeatLogEvent,
            MariadbGtidEvent,
            QueryEvent,
            RotateEvent,
            XidEvent,
        )
        from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent

        events = [WriteRowsEvent, UpdateRowsEvent, DeleteRowsEvent, XidEvent, QueryEvent, RotateEvent,
                  MariadbGtidEvent, GtidEvent, HeartbeatLogEvent]
        kwargs: dict[str, Any] = {}
        if self.is_mariadb:
            kwargs["auto_position"] = start.data.get("gtid") or ""
        else:
            kwargs.update(log_file=start.data["file"], log_pos=start.data["pos"], resume_stream=True)
        return BinLogStreamReader(
            connection_settings=dict(self._settings), server_id=self._server_id, blocking=True,
            only_events=events, only_schemas=self.databases, is_mariadb=self.is_mariadb,
            slave_heartbeat=0.1, enable_logging=False,
            pymysql_wrapper=_pymysql_connect, **kwargs)

    def stream(self, start: Checkpoint, stop: threading.Event) -> Iterator[Changes]:
        """Row changes from ``start``; one `Changes` per rows event, plus one per commit."""
        from pymysqlreplication.event import (
            GtidEvent,
            HeartbeatLogEvent,
            MariadbGtidEvent,
            QueryEvent,
            RotateEvent,
            XidEvent,
        )
        from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent

        file = start.data["file"]
        gtid_state = _parse_gtids(start.data.get("gtid") or "")
        current_gtid: str | None = None
        reader = self._reader(start)
        construct = _event
        raw = self.raw_rows
        announced: set[tuple[str, str]] = set()
        """Tables whose schema this stream handed out: `BinlogRows` are converted by the spool's reader with
        the schema spooled next to them, so it must be the one this reader had (not a later catalog read)."""
        try:
            for event in reader:
                if stop.is_set():
                    return
                if isinstance(event, RotateEvent):
                    file = event.next_binlog
                    continue
                end = event.packet.log_pos
                if isinstance(event, (WriteRowsEvent, UpdateRowsEvent, DeleteRowsEvent)):
                    database, name = event.schema, event.table
                    if not self._accept(database, name):
                        continue
                    key_ = (database, name)
                    schemas: list[TableSchema] = []
                    schema = self._schemas.get(key_)
                    if schema is None or len(schema.columns) != len(event.columns):
                        schema = self.schema(self._table_id(database, name))
                        schemas.append(schema)
                    converters = self._converters[key_]
                    set_columns = self._set_columns[key_]
                    pk = schema.primary_key or tuple(c.name for c in schema.columns)
                    start_pos = end - event.packet.event_size
                    table = schema.id
                    out = []
                    rows = event.rows
                    # the row index fills the low bits: one checked `binlog_position` per rows event, not per row
                    base = binlog_position(file, start_pos, 0)
                    binlog_position(file, start_pos, max(0, len(rows) - 1))  # raises if the last index does not fit
                    inserts = isinstance(event, WriteRowsEvent)
                    if set_columns:
                        for row in rows:
                            for image, sources in (("values", "none_sources"), ("before_values", "before_none_sources"),
                                                   ("after_values", "after_none_sources")):
                                if image in row:
                                    _empty_sets(row[image], row.get(sources), set_columns)
                    if raw:
                        if key_ not in announced:
                            announced.add(key_)
                            if schema not in schemas:
                                schemas.append(schema)
                        if not rows:
                            yield Changes([], None, schemas)
                            continue
                        if inserts:
                            kind, before_image, after_image = "I", None, spool_image(list(map(_VALUES, rows)))
                            names = tuple(rows[0]["values"])
                        elif isinstance(event, UpdateRowsEvent):
                            kind = "U"
                            before_image = spool_image(list(map(_BEFORE_VALUES, rows)))
                            after_image = spool_image(list(map(_AFTER_VALUES, rows)))
                            names = tuple(rows[0]["after_values"])
                            if tuple(rows[0]["before_values"]) != names:
                                raise FatalSourceError(f"`{table.qualified}` rows event must have the same columns"
                                                       f" before and after; got {names!r}")
                        else:
                            kind, before_image, after_image = "D", spool_image(list(map(_VALUES, rows))), None
                            names = tuple(rows[0]["values"])
                        missing = [k for k in pk if k not in names]
                        if missing:
                            raise FatalSourceError(f"`{table.qualified}` rows must have the key columns {missing!r};"
                                                   f" got {names!r}")
                        yield Changes([BinlogRows(kind, table, base, event.timestamp, current_gtid, names,  # type: ignore[list-item]
                                                  before_image, after_image, len(rows))], None, schemas, len(rows))
                        continue
                    ts = datetime.fromtimestamp(event.timestamp, UTC)
                    for index, row in enumerate(rows):
                        position = base | index
                        if inserts:
                            after = _convert(row["values"], converters)
                            out.append(construct(op=OP_CREATE, table=table, key={k: after[k] for k in pk},
                                                 before=None, after=after, position=position, source_ts=ts,
                                                 txid=current_gtid, snapshot=False))
                        elif isinstance(event, UpdateRowsEvent):
                            before = _convert(row["before_values"], converters)
                            after = _convert(row["after_values"], converters)
                            key = {k: after[k] for k in pk}
                            old_key = {k: before[k] for k in pk}
                            if old_key != key:  # a changed primary key: delete + create, as Debezium
                                out.append(construct(op=OP_DELETE, table=table, key=old_key, before=before,
                                                     after=None, position=position, source_ts=ts,
                                                     txid=current_gtid, snapshot=False))
                                out.append(construct(op=OP_CREATE, table=table, key=key, before=None,
                                                     after=after, position=position, source_ts=ts,
                                                     txid=current_gtid, snapshot=False))
                                continue
                            out.append(construct(op=OP_UPDATE, table=table, key=key,
                                                 before=before, after=after, position=position, source_ts=ts,
                                                 txid=current_gtid, snapshot=False))
                        else:
                            before = _convert(row["values"], converters)
                            out.append(construct(op=OP_DELETE, table=table, key={k: before[k] for k in pk},
                                                 before=before, after=None, position=position, source_ts=ts,
                                                 txid=current_gtid, snapshot=False))
                    yield Changes(out, None, schemas)
                elif isinstance(event, (MariadbGtidEvent, GtidEvent)):
                    current_gtid = str(event.gtid)
                    if isinstance(event, MariadbGtidEvent):
                        domain = current_gtid.split("-", 1)[0]
                        gtid_state[domain] = current_gtid
                elif isinstance(event, XidEvent):
                    checkpoint = self._checkpoint(file, end, gtid_state)
                    if checkpoint.data["gtid"]:
                        # the library reconnects by itself after a dropped connection (errors 2006/2013)
                        # from `auto_position`: from here, not from where this stream started
                        reader.auto_position = checkpoint.data["gtid"]
                    yield Changes([], checkpoint)
                elif isinstance(event, QueryEvent):
                    query = event.query.strip() if isinstance(event.query, str) else ""
                    upper = query[:16].upper()
                    if upper.startswith(("BEGIN", "SAVEPOINT")):
                        continue
                    changed = []
                    if not upper.startswith("COMMIT"):
                        # DDL: forget cached schemas of that database; reload tables the DDL names
                        changed = self._forget_schemas(event.schema, query)
                    checkpoint = self._checkpoint(file, end, gtid_state)
                    if checkpoint.data["gtid"]:
                        reader.auto_position = checkpoint.data["gtid"]
                    yield Changes([], checkpoint, changed)
                elif isinstance(event, HeartbeatLogEvent):
                    yield Changes([])
        except (pymysql.err.MySQLError, OSError, struct.error) as exc:
            raise map_pymysql_error(exc, f"binlog of {self.source}") from exc
        finally:
            reader.close()

    def _checkpoint(self, file: str, end: int, gtid_state: dict[str, str]) -> Checkpoint:
        gtid = ",".join(gtid_state[d] for d in sorted(gtid_state, key=int)) if gtid_state else None
        return Checkpoint({"file": file, "pos": end, "gtid": gtid}, binlog_position(file, end, 0))

    def _forget_schemas(self, database: Any, query: str) -> list[TableSchema]:
        database = database.decode() if isinstance(database, bytes) else database
        changed = []
        for (db, table) in list(self._schemas):
            if re.search(rf"\b{re.escape(table)}\b", query, re.IGNORECASE) and (db == database or db in query):
                del self._schemas[(db, table)]
                try:
                    changed.append(self.schema(self._table_id(db, table)))
                except FatalSourceError:  # dropped
                    continue
        return changed

    def close(self) -> None:
        with self._lock:
            if self._ctl is not None:
                try:
                    self._ctl.close()
                except (pymysql.err.Error, OSError):  # already broken: nothing left to release
                    pass
                self._ctl = None


def _event(**values: Any) -> ChangeEvent:
    """`ChangeEvent.model_construct` without pydantic's per-field loop (every field given; see `new_event`)."""
    return new_event(values)


def _pymysql_connect(**settings: Any) -> pymysql.connections.Connection:
    """python-mysql-replication passes pymysql's deprecated ``db``/``passwd``; translate them."""
    if "db" in settings:
        settings["database"] = settings.pop("db")
    if "passwd" in settings:
        settings["password"] = settings.pop("passwd")
    return pymysql.connect(**settings)


def _parse_gtids(text: str) -> dict[str, str]:
    return {part.split("-", 1)[0]: part for part in (p.strip() for p in text.split(",")) if part}


def _quote(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


__all__ = ["Decimal", "MariaDbReader", "binlog_row_events", "column_from_catalog", "float32", "map_pymysql_error",
           "spool_image"]
