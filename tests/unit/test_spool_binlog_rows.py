"""MariaDB/MySQL rows spooled as the library's values (`MariaDbReader.raw_rows`, a capture process) come out of
the spool as exactly the events the reader makes by default: same values and types (nested ones too), keys,
positions, commit times and transaction ids, for every column type of the sample table, inserts, updates (a
changed key too), deletes, a table without a primary key, DDL between rows events, and MySQL JSON.

The library's events are built here as python-mysql-replication 1.0.17 hands them out (its classes, with the
attributes the reader reads and row dicts of the values it decodes); the catalog answers from a dict."""

from __future__ import annotations

import marshal
import sqlite3
import threading
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from branchline.config import BinlogSourceConfig
from branchline.connectors.embedded.mariadb import AS_IS, MariaDbReader, spool_image
from branchline.connectors.embedded.reader import BinlogRows, Checkpoint
from branchline.events import ChangeEvent, Json, Op, binlog_position
from branchline.runtime.config import RuntimeConfig
from branchline.runtime.runner import RunStats, SourceCapture
from branchline.runtime.spool import _PICKLE, Spool, decode, encode
from pymysqlreplication.event import HeartbeatLogEvent, MariadbGtidEvent, QueryEvent, RotateEvent, XidEvent
from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent

DB = "erp"
FILE = "erp-bin.000007"


def _column(name: str, data_type: str, column_type: str, *, key: bool = False, precision: int | None = None,
            scale: int | None = None, length: int | None = None, charset: str | None = None) -> dict[str, Any]:
    return {"COLUMN_NAME": name, "DATA_TYPE": data_type, "COLUMN_TYPE": column_type,
            "IS_NULLABLE": "NO" if key else "YES", "NUMERIC_PRECISION": precision, "NUMERIC_SCALE": scale,
            "DATETIME_PRECISION": precision if data_type in ("datetime", "timestamp", "time") else None,
            "CHARACTER_MAXIMUM_LENGTH": length, "CHARACTER_SET_NAME": charset, "COLUMN_KEY": "PRI" if key else ""}


# the sample table of tests/integration/test_embedded_readers.py: every column type the reader maps
T_COLUMNS = [
    _column("id", "int", "int(10) unsigned", key=True), _column("big", "bigint", "bigint(20) unsigned"),
    _column("small", "smallint", "smallint(6)"), _column("flag", "tinyint", "tinyint(1)"),
    _column("amount", "decimal", "decimal(18,4)", precision=18, scale=4), _column("ratio", "float", "float"),
    _column("score", "double", "double"), _column("name", "varchar", "varchar(20)", length=20, charset="utf8mb4"),
    _column("code", "char", "char(3)", length=3, charset="utf8mb4"),
    _column("note", "text", "text", length=65535, charset="utf8mb4"), _column("raw", "blob", "blob", length=65535),
    _column("vb", "varbinary", "varbinary(8)", length=8), _column("made", "datetime", "datetime(3)", precision=3),
    _column("stamped", "timestamp", "timestamp(6)", precision=6), _column("day", "date", "date"),
    _column("span", "time", "time(2)", precision=2), _column("yr", "year", "year(4)"),
    _column("kind", "enum", "enum('a','b')"), _column("tags", "set", "set('x','y','z')"),
    _column("doc", "longtext", "longtext", charset="utf8mb4"), _column("bits", "bit", "bit(5)", precision=5),
    _column("bit1", "bit", "bit(1)", precision=1),
]
EXTRA = _column("extra", "decimal", "decimal(5,2)", precision=5, scale=2)
NOKEY_COLUMNS = [_column("a", "int", "int(11)"), _column("b", "varchar", "varchar(5)", length=5, charset="utf8mb4")]
JS_COLUMNS = [_column("id", "int", "int(11)", key=True), _column("doc", "json", "json")]


class _Catalog:
    """information_schema as `MariaDbReader.schema` queries it; ``tables`` may change between reads (DDL)."""

    def __init__(self) -> None:
        self.tables: dict[str, list[dict[str, Any]]] = {"t": T_COLUMNS, "nokey": NOKEY_COLUMNS, "js": JS_COLUMNS}

    def query(self, sql: str, args: Any = None) -> list[dict[str, Any]]:
        if "CHECK_CONSTRAINTS" in sql:
            return [{"CHECK_CLAUSE": "json_valid(`doc`)"}] if args[1] == "t" else []
        if "KEY_COLUMN_USAGE" in sql:
            return [{"COLUMN_NAME": c["COLUMN_NAME"]} for c in self.tables[args[1]] if c["COLUMN_KEY"] == "PRI"]
        if "information_schema.COLUMNS" in sql:
            return [dict(c) for c in self.tables.get(args[1], [])]
        raise AssertionError(f"unexpected query {sql}")


class _Packet:
    def __init__(self, log_pos: int, event_size: int) -> None:
        self.log_pos, self.event_size = log_pos, event_size


def _event(cls: type, log_pos: int, size: int = 40, timestamp: int = 1_717_000_000, **attributes: Any) -> Any:
    event: Any = object.__new__(cls)
    event.packet = _Packet(log_pos, size)
    event.timestamp = timestamp
    for name, value in attributes.items():
        setattr(event, name, value)
    return event


def _rows_event(cls: type, table: str, rows: list[dict[str, Any]], log_pos: int, size: int,
                timestamp: int) -> Any:
    image = rows[0].get("values") or rows[0]["after_values"]
    event = _event(cls, log_pos, size, timestamp, schema=DB, table=table, columns=[None] * len(image))
    event._RowsEvent__rows = rows  # what `RowsEvent.rows` returns once parsed
    return event


def _values(names: list[str], row: tuple[Any, ...], none: dict[str, str] | None = None) -> tuple[dict, dict]:
    values = dict(zip(names, row, strict=True))
    sources = {k: (none or {}).get(k, "null") for k, v in values.items() if v is None}
    return values, sources


T_NAMES = [c["COLUMN_NAME"] for c in T_COLUMNS]
# as the library decodes them: FLOAT unrounded, TIMESTAMP naive, SET a set, BIT a bit string, a negative
# fractional TIME with its fraction on the wrong side, an empty binary string as ''
ROW_1 = (1, 18446744073709551615, -5, 1, Decimal("12345.6789"), 1.100000023841858, 2.2, "héllo", "ab",
         "long text", b"\x00\xff\x10", b"\x01\x02", datetime(2024, 1, 2, 3, 4, 5, 123000),
         datetime(2024, 5, 6, 7, 8, 9, 123456), date(2024, 2, 29), -timedelta(hours=838, minutes=59, seconds=58,
                                                                                microseconds=500000),
         2024, "b", {"z", "x"}, '{"a": [1, 2.5]}', "10101", "1")
ROW_2 = (2,) + (None,) * (len(T_NAMES) - 1)  # NULLs everywhere, and an empty SET (the library says None too)
ROW_3 = (3, 0, 32767, 0, Decimal("-0.0000"), -0.0, -1e308, "", "xyz", "", "", b"", datetime(1000, 1, 1),
         datetime(2038, 1, 19, 3, 14, 7), date(9999, 12, 31), timedelta(0), 1901, "a", {"y"}, "[]", "00000", "0")
ROW_4 = (4, 1, 2, 3, Decimal("1E+3"), 3.5, 1.5, "x", "y", "z", b"b", b"v", None, datetime(2024, 1, 1),
         None, timedelta(hours=1, microseconds=10000), None, None, {"x", "y", "z"}, None, None, None)


def _library_events() -> list[Any]:
    """A binlog as the library hands it out (fresh objects: the default path converts row dicts in place)."""
    write_1 = [dict(zip(("values", "none_sources"), _values(T_NAMES, ROW_1), strict=True)),
               dict(zip(("values", "none_sources"), _values(T_NAMES, ROW_2, {"tags": "empty set"}), strict=True)),
               dict(zip(("values", "none_sources"), _values(T_NAMES, ROW_3), strict=True))]
    nokey = [dict(zip(("values", "none_sources"), _values(["a", "b"], (7, "s")), strict=True)),
             dict(zip(("values", "none_sources"), _values(["a", "b"], (None, None)), strict=True))]
    renamed = ROW_1[:7] + ("bye",) + ROW_1[8:]
    moved = (9,) + ROW_3[1:]

    def update(before: tuple[Any, ...], after: tuple[Any, ...], names: list[str] = T_NAMES) -> dict[str, Any]:
        b, bs = _values(names, before)
        a, as_ = _values(names, after)
        return {"before_values": b, "before_none_sources": bs, "after_values": a, "after_none_sources": as_}

    delete = [dict(zip(("values", "none_sources"), _values(T_NAMES, ROW_2, {"tags": "empty set"}), strict=True))]
    extra_names = T_NAMES + ["extra"]
    write_extra = [dict(zip(("values", "none_sources"), _values(extra_names, ROW_4 + (Decimal("-999.99"),)),
                            strict=True)),
                   dict(zip(("values", "none_sources"), _values(extra_names, (5,) + ROW_3[1:] + (None,)),
                            strict=True))]
    js = [dict(zip(("values", "none_sources"), _values(["id", "doc"], (1, {"a": [1, 2.5, None], "b": "c"})),
                   strict=True)),
          dict(zip(("values", "none_sources"), _values(["id", "doc"], (2, [True, False, "x"])), strict=True))]
    js_decimal = [dict(zip(("values", "none_sources"),  # MySQL's binary JSON holds decimals as Decimal
                           _values(["id", "doc"], (3, {"n": Decimal("1.50")})), strict=True))]
    ts = 1_717_000_000
    return [
        _event(RotateEvent, 0, next_binlog=FILE),
        _event(MariadbGtidEvent, 300, gtid="0-1-100"),
        _event(QueryEvent, 350, query="BEGIN", schema=DB),
        _rows_event(WriteRowsEvent, "t", write_1, 1000, 600, ts),
        _rows_event(WriteRowsEvent, "nokey", nokey, 1200, 100, ts),
        _event(XidEvent, 1300),
        _event(HeartbeatLogEvent, 1300),
        _event(MariadbGtidEvent, 1400, gtid="0-1-101"),
        _rows_event(UpdateRowsEvent, "t", [update(ROW_1, renamed), update(ROW_3, moved)], 2000, 500, ts + 1),
        _rows_event(DeleteRowsEvent, "t", delete, 2300, 200, ts + 1),
        _rows_event(UpdateRowsEvent, "nokey", [update((7, "s"), (7, "t"), ["a", "b"])], 2400, 60, ts + 1),
        _event(XidEvent, 2500),
        _event(MariadbGtidEvent, 2600, gtid="0-1-102"),
        _event(QueryEvent, 2900, query="ALTER TABLE t ADD COLUMN extra DECIMAL(5,2)", schema=DB),
        _event(MariadbGtidEvent, 3000, gtid="0-1-103"),
        _rows_event(WriteRowsEvent, "t", write_extra, 3500, 400, ts + 2),
        _rows_event(WriteRowsEvent, "js", js, 3600, 80, ts + 2),
        _event(XidEvent, 3700),
        _event(MariadbGtidEvent, 3800, gtid="0-1-104"),
        _event(QueryEvent, 3900, query="TRUNCATE TABLE nokey", schema=DB),
        _event(MariadbGtidEvent, 4000, gtid="0-1-105"),
        _rows_event(WriteRowsEvent, "js", js_decimal, 4100, 60, ts + 3),
        _event(XidEvent, 4200),
    ]


class _Library:
    """`BinLogStreamReader` as the reader uses it: iterate, set `auto_position`, close."""

    def __init__(self, events: list[Any]) -> None:
        self.events = events
        self.auto_position = ""

    def __iter__(self) -> Any:
        return iter(self.events)

    def close(self) -> None:
        pass


def _reader(raw_rows: bool) -> MariaDbReader:
    reader = MariaDbReader(source="erp", branch="b1", host="127.0.0.1", port=1, user="u", password="",
                           databases=[DB], mariadb=True, raw_rows=raw_rows)
    catalog = _Catalog()
    reader._query = catalog.query  # type: ignore[method-assign]
    events = _library_events()

    def library(start: Checkpoint) -> _Library:
        catalog.tables["t"] = T_COLUMNS  # the ALTER's effect shows from the DDL on, as on a live server
        return _Library(events)

    def with_ddl(database: Any, query: str) -> Any:
        if query.startswith("ALTER TABLE t"):
            catalog.tables["t"] = T_COLUMNS + [EXTRA]
        return forget(database, query)

    forget = reader._forget_schemas
    reader._reader = library  # type: ignore[method-assign]
    reader._forget_schemas = with_ddl  # type: ignore[method-assign]
    return reader


START = Checkpoint({"file": FILE, "pos": 4, "gtid": "0-1-99"}, binlog_position(FILE, 4, 0))


def _stream(raw_rows: bool) -> list[Any]:
    reader = _reader(raw_rows)
    return [e for changes in reader.stream(START, threading.Event()) for e in changes.events]


def _typed(value: Any) -> Any:
    """A value with its type at every level (1 == 1.0 == Decimal(1) == True must not pass; a dict must not
    pass for a `Json`, nor a list for a set)."""
    if isinstance(value, dict):
        return (type(value).__name__, [(k, _typed(v)) for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_typed(v) for v in value])
    if isinstance(value, (set, frozenset)):
        return (type(value).__name__, sorted(map(_typed, value), key=repr))
    if isinstance(value, Json):
        return ("Json", _typed(value.value))
    if isinstance(value, datetime):
        return ("datetime", value, repr(value.tzinfo), value.fold)
    if isinstance(value, Decimal):
        return ("Decimal", str(value))  # digits and exponent: Decimal('1.0') == Decimal('1.00') must not pass
    return (type(value).__name__, value)


def _events_typed(events: list[ChangeEvent]) -> list[Any]:
    return [(e.op, e.table, _typed(e.key), _typed(e.before), _typed(e.after), e.position, _typed(e.source_ts),
             e.txid, e.snapshot) for e in events]


def test_the_library_events_here_make_the_events_the_reader_is_known_to_make():
    """The fake binlog exercises what it claims (else the comparisons below prove little)."""
    expected = _stream(raw_rows=False)
    assert all(isinstance(e, ChangeEvent) for e in expected)
    assert [(e.op, e.table.table, e.key) for e in expected] == [
        (Op.CREATE, "t", {"id": 1}), (Op.CREATE, "t", {"id": 2}), (Op.CREATE, "t", {"id": 3}),
        (Op.CREATE, "nokey", {"a": 7, "b": "s"}), (Op.CREATE, "nokey", {"a": None, "b": None}),
        (Op.UPDATE, "t", {"id": 1}), (Op.DELETE, "t", {"id": 3}), (Op.CREATE, "t", {"id": 9}),
        (Op.DELETE, "t", {"id": 2}), (Op.DELETE, "nokey", {"a": 7, "b": "s"}), (Op.CREATE, "nokey", {"a": 7, "b": "t"}),
        (Op.CREATE, "t", {"id": 4}), (Op.CREATE, "t", {"id": 5}), (Op.CREATE, "js", {"id": 1}),
        (Op.CREATE, "js", {"id": 2}), (Op.CREATE, "js", {"id": 3}),
    ]
    first = expected[0].after
    assert first is not None and first["amount"] == Decimal("12345.6789") and first["ratio"] == 1.1
    assert first["stamped"] == datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC) and first["tags"] == ["x", "z"]
    assert first["span"] == -timedelta(hours=838, minutes=59, seconds=58, microseconds=500000)
    assert first["bit1"] is True and first["bits"] == "10101" and first["doc"] == '{"a": [1, 2.5]}'
    assert expected[1].after is not None and expected[1].after["tags"] == [] and expected[1].after["amount"] is None
    assert expected[2].after is not None and expected[2].after["vb"] == b"" and expected[2].after["raw"] == b""
    assert expected[11].after is not None and expected[11].after["extra"] == Decimal("-999.99")
    assert expected[13].after is not None and expected[13].after["doc"] == Json({"a": [1, 2.5, None], "b": "c"})
    assert expected[6].position == expected[7].position  # a changed key: delete + create at one position
    assert expected[0].position == binlog_position(FILE, 400, 0) and expected[2].position == binlog_position(FILE, 400, 2)
    assert expected[5].source_ts == datetime.fromtimestamp(1_717_000_001, UTC) and expected[5].txid == "0-1-101"


def test_spooled_binlog_rows_are_the_events_the_reader_makes():
    """Each rows event's group encoded with the schema the reader handed out for it, then decoded."""
    expected = _stream(raw_rows=False)
    schemas: dict[Any, Any] = {}
    events: list[ChangeEvent] = []
    groups = 0
    for changes in _reader(raw_rows=True).stream(START, threading.Event()):
        for schema in changes.schemas:
            schemas[schema.id] = schema
        for group in changes.events:
            assert group.__class__ is BinlogRows and changes.rows == group.count  # type: ignore[attr-defined]
            groups += 1
            events.extend(decode(encode([group], {group.table: schemas[group.table]}))[0])
    assert groups == 8
    assert _events_typed(events) == _events_typed(expected)


def test_spooled_binlog_rows_through_the_capture_and_the_spool_file_are_the_reader_s_events(tmp_path: Path):
    """The capture loop as a capture process runs it (schemas per batch across the ALTER, row counts) into a
    spool file, read back from disk: the events of the default reader, value by value and type by type."""
    expected = _stream(raw_rows=False)
    spool = Spool(tmp_path / "s.sqlite", memory_bytes=0, shared=True, synchronous="NORMAL")
    try:
        source = BinlogSourceConfig.model_validate({"name": "erp", "kind": "mariadb", "branch": "b1", "port": 1,
                                                    "user": "u", "databases": [DB]})
        capture = SourceCapture(source, _reader(raw_rows=True), spool, RuntimeConfig(), threading.Event(),
                                RunStats(), lambda: None)
        capture.observe_reads = False
        capture._stream(START)
        with sqlite3.connect(tmp_path / "s.sqlite") as conn:
            counts = [r[0] for r in conn.execute("SELECT events FROM batches ORDER BY seq")]
        batches = list(spool.read(10_000))
        assert spool.checkpoint("erp") is not None and spool.checkpoint("erp").data["gtid"] == "0-1-105"
    finally:
        spool.close()
    assert sum(counts) == 14 == capture.stats.captured  # rows; a changed key's delete + create are one
    assert all(b.events and next(iter(b.events)).__class__ is ChangeEvent for b in batches)
    events = [e for b in batches for e in b.events]
    assert _events_typed(events) == _events_typed(expected)
    for batch in batches:  # each batch carries the schema its rows were read with
        for event in batch.events:
            row = event.after or event.before
            assert row is not None and [c.name for c in batch.schemas[event.table].columns] == list(row)


def test_a_group_with_values_marshal_cannot_write_is_pickled_and_read_back_exactly():
    """MySQL's JSON may hold decimals (marshal raises inside a container); a type marshal would change (a
    bytearray comes back as bytes) is never given to it."""
    spooled = _stream(raw_rows=True)
    last = spooled[-1]
    assert last.table.table == "js" and last.after[0] == (0, 0)  # marshal-safe at the top level, not inside
    with pytest.raises(ValueError):
        marshal.dumps(last.after[1])
    schema = _reader(raw_rows=False).schema(last.table)
    data = encode([last], {last.table: schema})
    head = int.from_bytes(data[4:8], "big")
    assert data[8 + head:9 + head] == _PICKLE
    (event,), _ = decode(data)
    assert event.after == {"id": 3, "doc": Json({"n": Decimal("1.50")})}
    assert _typed(event.after["doc"]) == ("Json", ("dict", [("n", ("Decimal", "1.50"))]))
    tags, columns = spool_image([{"id": 1, "b": bytearray(b"\x01")}, {"id": 2, "b": None}])
    assert tags == (0, AS_IS) and columns[1] == (bytearray(b"\x01"), None)


def test_reduced_columns_keep_exact_types_and_none():
    values = [Decimal("-0.00"), Decimal("1E+3"), None, Decimal("123456789012345678901234567890.123456789")]
    stamps = [datetime(1, 1, 1), None, datetime(9999, 12, 31, 23, 59, 59, 999999), datetime(2024, 11, 3, 1, 30, fold=1)]
    tags, columns = spool_image([{"d": d, "t": t, "day": date(2024, 2, 29), "span": -timedelta(microseconds=1)}
                                 for d, t in zip(values, stamps, strict=True)])
    assert tags == (1 | 8, 2 | 8, 3, 4)  # Decimal, datetime with None; date, timedelta without
    columns = marshal.loads(marshal.dumps(columns))
    from branchline.connectors.embedded.mariadb import _image_rows

    rows = _image_rows(("d", "t", "day", "span"), (tags, columns), {})
    assert [_typed(r["d"]) for r in rows] == [_typed(v) for v in values]
    assert [_typed(r["t"]) for r in rows] == [_typed(v) for v in stamps]
    assert all(_typed(r["day"]) == ("date", date(2024, 2, 29)) and r["span"] == -timedelta(microseconds=1)
               for r in rows)


def test_a_batch_of_whole_events_and_binlog_rows_keeps_its_order():
    """A snapshot's events are whole `ChangeEvent`s: spooled next to rows groups, each stays in its place."""
    spooled = _stream(raw_rows=True)
    expected = _stream(raw_rows=False)
    reader = _reader(raw_rows=False)
    nokey = next(e for e in spooled if e.table.table == "nokey")
    whole = next(e for e in expected if e.table.table == "nokey").model_copy(update={"op": Op.READ, "snapshot": True})
    schema = reader.schema(nokey.table)
    events, schemas = decode(encode([whole, nokey, whole], {nokey.table: schema}))
    assert schemas == {nokey.table: schema}
    creates = [e for e in expected if e.table.table == "nokey" and e.op is Op.CREATE][:2]
    assert _events_typed(events) == _events_typed([whole, *creates, whole])
