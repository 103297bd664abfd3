"""The embedded readers against the real MariaDB and PostgreSQL of the stack: exact values, exact
positions (checked against SHOW BINLOG EVENTS / the slot's own LSNs), snapshot = stream values.

Each test works in its own database (MariaDB) or schema + slot + publication (PostgreSQL).
"""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import psycopg
import pymysql
import pytest
from branchline.connectors.embedded.mariadb import MariaDbReader
from branchline.connectors.embedded.postgres import PostgresReader
from branchline.events import UNCHANGED, ColumnType, Json, Op, binlog_position, lsn_position, parse_lsn

pytestmark = pytest.mark.integration


def _name() -> str:
    return "emb_" + uuid.uuid4().hex[:10]


@pytest.fixture
def mariadb_db(erp):
    name = _name()
    conn = pymysql.connect(host=erp.host, port=erp.port, user="root", password="", autocommit=True)
    conn.cursor().execute(f"CREATE DATABASE {name}")
    yield conn, name
    conn.cursor().execute(f"DROP DATABASE IF EXISTS {name}")
    conn.close()


def _collect(reader, start, want_events: int, timeout_s: float = 20.0):
    """Stream until ``want_events`` events arrived; returns (events, checkpoints, schemas)."""
    stop = threading.Event()
    events, checkpoints, schemas = [], [], []
    deadline = datetime.now(UTC) + timedelta(seconds=timeout_s)
    for changes in reader.stream(start, stop):
        events.extend(changes.events)
        schemas.extend(changes.schemas)
        if changes.checkpoint is not None:
            checkpoints.append(changes.checkpoint)
        if len(events) >= want_events and changes.checkpoint is not None:
            break
        if datetime.now(UTC) > deadline:
            break
    stop.set()
    return events, checkpoints, schemas


MARIADB_TABLE = """
CREATE TABLE {db}.t (
  id INT UNSIGNED PRIMARY KEY, big BIGINT UNSIGNED, small SMALLINT, flag TINYINT(1), amount DECIMAL(18,4),
  ratio FLOAT, score DOUBLE, name VARCHAR(20), code CHAR(3), note TEXT, raw BLOB, vb VARBINARY(8),
  made DATETIME(3), stamped TIMESTAMP(6) NULL, day DATE, span TIME(2), yr YEAR, kind ENUM('a','b'),
  tags SET('x','y','z'), doc JSON, bits BIT(5), bit1 BIT(1)
)"""

MARIADB_ROW = ("(1, 18446744073709551615, -5, 1, 12345.6789, 1.1, 2.2, 'héllo', 'ab', 'long text', x'00ff10',"
               " x'0102', '2024-01-02 03:04:05.123', '2024-05-06 07:08:09.123456', '2024-02-29', '-838:59:58.5',"
               " 2024, 'b', 'z,x', '{\"a\": [1, 2.5]}', b'10101', b'1')")

MARIADB_VALUES = {
    "id": 1, "big": 18446744073709551615, "small": -5, "flag": 1, "amount": Decimal("12345.6789"), "ratio": 1.1,
    "score": 2.2, "name": "héllo", "code": "ab", "note": "long text", "raw": b"\x00\xff\x10", "vb": b"\x01\x02",
    "made": datetime(2024, 1, 2, 3, 4, 5, 123000), "stamped": datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC),
    "day": date(2024, 2, 29), "span": -timedelta(hours=838, minutes=59, seconds=58, microseconds=500000),
    "yr": 2024, "kind": "b", "tags": ["x", "z"], "doc": '{"a": [1, 2.5]}', "bits": "10101", "bit1": True,
}


def test_mariadb_stream_and_snapshot_give_exact_values_and_debezium_positions(erp, mariadb_db):
    conn, db = mariadb_db
    cur = conn.cursor()
    cur.execute("SET time_zone = '+00:00'")
    cur.execute(MARIADB_TABLE.format(db=db))
    reader = MariaDbReader(source="erp", branch="b1", host=erp.host, port=erp.port, user="root", password="",
                           databases=[db], server_id=4242001)
    start = reader.start_position()
    cur.execute(f"INSERT INTO {db}.t VALUES {MARIADB_ROW}")
    cur.execute(f"INSERT INTO {db}.t (id) VALUES (2), (3)")
    cur.execute(f"UPDATE {db}.t SET name = 'bye' WHERE id = 1")
    cur.execute(f"UPDATE {db}.t SET id = 4 WHERE id = 2")
    cur.execute(f"DELETE FROM {db}.t WHERE id = 3")
    events, checkpoints, _ = _collect(reader, start, 7)

    assert [(e.op, e.key) for e in events] == [
        (Op.CREATE, {"id": 1}), (Op.CREATE, {"id": 2}), (Op.CREATE, {"id": 3}), (Op.UPDATE, {"id": 1}),
        (Op.DELETE, {"id": 2}), (Op.CREATE, {"id": 4}), (Op.DELETE, {"id": 3}),
    ]
    assert events[0].after == MARIADB_VALUES
    assert events[3].before["name"] == "héllo" and events[3].after["name"] == "bye"
    assert events[4].position == events[5].position  # a key change: delete + create at one position
    assert all(e.source_ts is not None and e.source_ts.tzinfo is UTC for e in events)
    assert all(e.txid and e.txid.count("-") == 2 for e in events)  # MariaDB GTID d-s-n

    # positions: (file, start of the rows event, row index), as Debezium's source.file/pos/row
    cur.execute(f"SHOW BINLOG EVENTS IN '{start.data['file']}' FROM {start.data['pos']}")
    ours: set[str] = set()
    rows_events = []
    for row in cur.fetchall():  # other sessions write to the shared stack's binlog too
        kind, info = row[2], row[5]
        if kind == "Table_map" and f"({db}.t)" in info:
            ours.add(info.split()[1])
        elif kind in ("Write_rows_v1", "Update_rows_v1", "Delete_rows_v1") and info.split()[1] in ours:
            rows_events.append(row)
    assert len(rows_events) == 5
    file = start.data["file"]
    expected = [binlog_position(file, rows_events[0][1], 0), binlog_position(file, rows_events[1][1], 0),
                binlog_position(file, rows_events[1][1], 1), binlog_position(file, rows_events[2][1], 0),
                binlog_position(file, rows_events[3][1], 0), binlog_position(file, rows_events[3][1], 0),
                binlog_position(file, rows_events[4][1], 0)]
    assert [e.position for e in events] == expected
    assert all(c.position > start.position for c in checkpoints)
    assert checkpoints[-1].data["gtid"]

    # a snapshot reads the same values as the stream
    schema = reader.schema(events[0].table)
    assert schema.primary_key == ("id",)
    # MariaDB's JSON is LONGTEXT: text as stored, as Debezium's MariaDB connector sends it
    assert schema.column("doc").type is ColumnType.STRING and schema.column("big").type is ColumnType.UINT64
    snapshot = [e for chunk, _ in reader.snapshot(schema, start.position, 1) for e in chunk]
    assert [e.key for e in snapshot] == [{"id": 1}, {"id": 4}]
    assert snapshot[0].after == {**MARIADB_VALUES, "name": "bye"}
    assert all(e.op is Op.READ and e.snapshot and e.position == start.position for e in snapshot)
    reader.close()


def test_mariadb_resumes_after_the_checkpoint_without_loss_or_repeat(erp, mariadb_db):
    conn, db = mariadb_db
    cur = conn.cursor()
    cur.execute(f"CREATE TABLE {db}.t (id INT PRIMARY KEY, v INT)")
    reader = MariaDbReader(source="erp", branch="b1", host=erp.host, port=erp.port, user="root", password="",
                           databases=[db], server_id=4242002)
    start = reader.start_position()
    for i in range(3):
        cur.execute(f"INSERT INTO {db}.t VALUES ({i}, {i})")
    first, checkpoints, _ = _collect(reader, start, 3)
    assert [e.key["id"] for e in first] == [0, 1, 2]
    for i in range(3, 5):
        cur.execute(f"INSERT INTO {db}.t VALUES ({i}, {i})")
    again, _, _ = _collect(MariaDbReader(source="erp", branch="b1", host=erp.host, port=erp.port, user="root",
                                         password="", databases=[db], server_id=4242003), checkpoints[-1], 2)
    assert [e.key["id"] for e in again] == [3, 4]
    reader.close()


def test_mariadb_added_column_reaches_events_and_schema(erp, mariadb_db):
    conn, db = mariadb_db
    cur = conn.cursor()
    cur.execute(f"CREATE TABLE {db}.t (id INT PRIMARY KEY, v INT)")
    reader = MariaDbReader(source="erp", branch="b1", host=erp.host, port=erp.port, user="root", password="",
                           databases=[db], server_id=4242004)
    start = reader.start_position()
    cur.execute(f"INSERT INTO {db}.t VALUES (1, 1)")
    cur.execute(f"ALTER TABLE {db}.t ADD COLUMN note VARCHAR(10)")
    cur.execute(f"INSERT INTO {db}.t VALUES (2, 2, 'new')")
    events, _, schemas = _collect(reader, start, 2)
    assert events[1].after == {"id": 2, "v": 2, "note": "new"}
    assert [c.name for c in schemas[-1].columns] == ["id", "v", "note"]
    reader.close()


# -- PostgreSQL -------------------------------------------------------------------------------------


@pytest.fixture
def pg_schema(crm):
    name = _name()
    conn = psycopg.connect(host=crm.host, port=crm.port, user="postgres", dbname="crm", autocommit=True)
    conn.execute(f"CREATE SCHEMA {name}")
    reader = PostgresReader(source="crm", branch="b1", host=crm.host, port=crm.port, user="postgres", password="",
                            database="crm", schemas=[name], slot=name, publication=name)
    yield conn, name, reader
    reader.close()
    conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s", (name,))
    conn.execute(f"DROP PUBLICATION IF EXISTS {name}")
    conn.execute(f"DROP SCHEMA {name} CASCADE")
    conn.close()


PG_TABLE = """
CREATE TABLE {s}.t (id int PRIMARY KEY, big bigint, sm smallint, b boolean, n numeric(18,4), nv numeric,
  f4 real, f8 double precision, t text, ch char(3), by bytea, d date, tm time, ts timestamp(3), tz timestamptz,
  iv interval, js json, jb jsonb, u uuid, arr text[], bits bit(5), bit1 bit(1), doc text)"""

PG_ROW = ("(1, 9223372036854775807, -3, true, 12345.6789, 1e-20, 1.1, 2.2, 'héllo', 'ab', '\\x00ff10', '2024-02-29',"
          " '13:14:15.5', '2024-01-02 03:04:05.123', '2024-05-06 07:08:09.123456+02', '1 year 2 mons 3 days 04:05:06.5',"
          " '{\"a\": [1, 2]}', '{\"b\": {\"c\": null}}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{x,\"y z\",NULL}',"
          " B'10101', B'1', repeat('x', 5000))")

PG_VALUES = {
    "id": 1, "big": 9223372036854775807, "sm": -3, "b": True, "n": Decimal("12345.6789"), "nv": Decimal("1E-20"),
    "f4": 1.1, "f8": 2.2, "t": "héllo", "ch": "ab ", "by": b"\x00\xff\x10", "d": date(2024, 2, 29),
    "tm": timedelta(hours=13, minutes=14, seconds=15, microseconds=500000),
    "ts": datetime(2024, 1, 2, 3, 4, 5, 123000), "tz": datetime(2024, 5, 6, 5, 8, 9, 123456, tzinfo=UTC),
    "iv": "P1Y2M3DT4H5M6.5S", "js": Json({"a": [1, 2]}), "jb": Json({"b": {"c": None}}),
    "u": uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"), "arr": ["x", "y z", None], "bits": "10101",
    "bit1": True, "doc": "x" * 5000,
}


def test_postgres_stream_and_snapshot_give_exact_values_and_slot_lsns(pg_schema):
    conn, s, reader = pg_schema
    conn.execute(PG_TABLE.format(s=s))
    conn.execute(f"ALTER TABLE {s}.t ALTER COLUMN doc SET STORAGE EXTERNAL")
    start = reader.start_position()
    conn.execute(f"INSERT INTO {s}.t VALUES {PG_ROW}")
    with conn.transaction():
        conn.execute(f"INSERT INTO {s}.t (id) VALUES (2), (3)")
        conn.execute(f"UPDATE {s}.t SET t = 'bye' WHERE id = 1")
        conn.execute(f"UPDATE {s}.t SET id = 4 WHERE id = 2")
        conn.execute(f"DELETE FROM {s}.t WHERE id = 3")
    conn.execute(f"TRUNCATE {s}.t")
    slot_lsns = [parse_lsn(r[0]) for r in conn.execute(
        "SELECT lsn::text FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, 'proto_version', '1',"
        " 'publication_names', %s) WHERE substr(data, 1, 1) IN ('I', 'U', 'D', 'T')", (s, s)).fetchall()]
    events, checkpoints, _ = _collect(reader, start, 8)
    assert [(e.op, e.key) for e in events] == [
        (Op.CREATE, {"id": 1}), (Op.CREATE, {"id": 2}), (Op.CREATE, {"id": 3}), (Op.UPDATE, {"id": 1}),
        (Op.DELETE, {"id": 2}), (Op.CREATE, {"id": 4}), (Op.DELETE, {"id": 3}), (Op.TRUNCATE, {}),
    ]
    assert events[0].after == PG_VALUES
    assert events[3].after["doc"] is UNCHANGED and events[3].after["t"] == "bye" and events[3].before is None
    # positions are the Debezium path's: lsn_position(source.lsn, 1), source.lsn = each change's LSN
    positions = [lsn_position(lsn, 1) for lsn in slot_lsns]
    assert [e.position for e in events] == [positions[0], positions[1], positions[2], positions[3], positions[4],
                                            positions[4], positions[5], positions[6]]
    assert events[1].txid == events[6].txid != events[0].txid
    assert [c.position for c in checkpoints] == sorted(c.position for c in checkpoints)

    # after acknowledging, the slot moves and a new reader resumes after the checkpoint
    reader.acknowledge(checkpoints[1])
    conn.execute(f"INSERT INTO {s}.t (id, t) VALUES (9, 'after')")
    more, _, _ = _collect(reader, checkpoints[1], 2)
    assert [(e.op, e.key) for e in more] == [(Op.TRUNCATE, {}), (Op.CREATE, {"id": 9})]
    confirmed = conn.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
                             (s,)).fetchone()[0]
    assert parse_lsn(confirmed) >= parse_lsn(checkpoints[1].data["lsn"])

    conn.execute(f"INSERT INTO {s}.t VALUES {PG_ROW}")
    schema = reader.schema(events[0].table)
    snapshot = [e for chunk, _ in reader.snapshot(schema, 0, 1) for e in chunk]
    assert [e.key for e in snapshot] == [{"id": 1}, {"id": 9}]
    assert snapshot[0].after == PG_VALUES
    assert all(e.op is Op.READ and e.snapshot and e.position == 0 for e in snapshot)


def _slot(conn, slot):
    """(confirmed_flush_lsn as int, active_pid) of a slot."""
    row = conn.execute("SELECT confirmed_flush_lsn::text, active_pid FROM pg_replication_slots WHERE slot_name = %s",
                       (slot,)).fetchone()
    return parse_lsn(row[0]), row[1]


def _reader(crm, name, **kwargs):
    kwargs = {"slot": name, "publication": name, **kwargs}
    return PostgresReader(source="crm", branch="b1", host=crm.host, port=crm.port, user="postgres", password="",
                          database="crm", schemas=[name], **kwargs)


def test_postgres_ensure_publication_creates_then_adds_tables(crm, pg_schema):
    conn, s, reader = pg_schema
    conn.execute(f"CREATE TABLE {s}.a (id int PRIMARY KEY)")

    def published():
        return sorted(r[0] for r in conn.execute(
            "SELECT tablename FROM pg_publication_tables WHERE pubname = %s", (s,)).fetchall())

    reader.ensure_publication(reader.table_ids())  # CREATE PUBLICATION ... FOR TABLE returns no rows
    assert published() == ["a"]
    conn.execute(f"CREATE TABLE {s}.b (id int PRIMARY KEY)")
    reader.ensure_publication(reader.table_ids())  # ALTER PUBLICATION ... ADD TABLE
    assert published() == ["a", "b"]
    reader.ensure_publication(reader.table_ids())  # nothing missing: unchanged
    assert published() == ["a", "b"]

    empty = _reader(crm, s, publication=s + "_none")
    try:
        empty.ensure_publication([])  # a publication without tables
        assert conn.execute("SELECT count(*) FROM pg_publication WHERE pubname = %s", (s + "_none",)).fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM pg_publication_tables WHERE pubname = %s",
                            (s + "_none",)).fetchone() == (0,)
    finally:
        conn.execute(f"DROP PUBLICATION IF EXISTS {s}_none")
        empty.close()


def test_postgres_slot_confirms_only_acknowledged_lsns_and_a_restart_replays_the_rest(crm, pg_schema):
    conn, s, reader = pg_schema
    conn.execute(f"CREATE TABLE {s}.t (id int PRIMARY KEY, v text)")
    start = reader.start_position()
    for i in range(3):
        conn.execute(f"INSERT INTO {s}.t VALUES ({i}, 'v{i}')")
    events, checkpoints, _ = _collect(reader, start, 3)  # streamed all three, acknowledged none
    assert [e.key["id"] for e in events] == [0, 1, 2]
    assert _slot(conn, s)[0] == parse_lsn(start.data["lsn"])

    # the runner acknowledges the first commit while streaming: the server is told, and no more
    stop = threading.Event()
    streamer = _reader(crm, s)
    stream = streamer.stream(start, stop)
    acknowledged = None
    reported_while_open = False
    deadline = datetime.now(UTC) + timedelta(seconds=20)
    for changes in stream:
        if changes.checkpoint is not None and acknowledged is None:
            acknowledged = changes.checkpoint
            streamer.acknowledge(acknowledged)
        if acknowledged is not None and not changes.events and _slot(conn, s)[0] >= parse_lsn(
                acknowledged.data["lsn"]):
            reported_while_open = True  # told while the stream is still open (it was idle)
            break
        if datetime.now(UTC) > deadline:
            break
    assert acknowledged == checkpoints[0] and reported_while_open
    stream.close()  # a crash: commits 2 and 3 were streamed but never acknowledged
    streamer.close()
    confirmed, active = _slot(conn, s)
    assert confirmed == parse_lsn(checkpoints[0].data["lsn"]) and active is None

    # a new reader resumes from the acknowledged checkpoint: nothing lost, nothing before it repeated
    again = _reader(crm, s)
    conn.execute(f"INSERT INTO {s}.t VALUES (3, 'v3')")
    more, _, _ = _collect(again, checkpoints[0], 3)
    assert [(e.op, e.key["id"]) for e in more] == [(Op.CREATE, 1), (Op.CREATE, 2), (Op.CREATE, 3)]
    assert [e.position for e in more[:2]] == [e.position for e in events[1:]]
    again.close()


def test_postgres_large_transaction_is_handed_out_in_parts_with_one_checkpoint(crm, pg_schema):
    conn, s, _ = pg_schema
    conn.execute(f"CREATE TABLE {s}.t (id int PRIMARY KEY, v text)")
    reader = _reader(crm, s, peek_changes=1000)
    start = reader.start_position()
    conn.execute(f"INSERT INTO {s}.t SELECT g, 'row ' || g FROM generate_series(1, 2500) g")
    stop = threading.Event()
    parts = []
    for changes in reader.stream(start, stop):
        if changes.events or changes.checkpoint:
            parts.append(changes)
        if changes.checkpoint is not None:
            break
    stop.set()
    reader.close()
    assert [len(p.events) for p in parts] == [1000, 1000, 500]
    assert [p.checkpoint is None for p in parts] == [True, True, False]
    keys = [e.key["id"] for p in parts for e in p.events]
    assert keys == list(range(1, 2501))
    assert parts[2].events[-1].after == {"id": 2500, "v": "row 2500"}
    assert len({e.txid for p in parts for e in p.events}) == 1
    assert [s_.id.table for s_ in parts[0].schemas] == ["t"] and not parts[1].schemas


def test_postgres_slot_held_by_another_session_is_retryable_then_streams(crm, pg_schema):
    import psycopg2
    import psycopg2.extras
    from branchline.errors import RetryableSourceError, is_retryable

    conn, s, reader = pg_schema
    conn.execute(f"CREATE TABLE {s}.t (id int PRIMARY KEY)")
    start = reader.start_position()
    conn.execute(f"INSERT INTO {s}.t VALUES (1)")
    holder = psycopg2.connect(host=crm.host, port=crm.port, user="postgres", dbname="crm",
                              connection_factory=psycopg2.extras.LogicalReplicationConnection)
    try:
        holder.cursor().start_replication(slot_name=s, decode=False,
                                          options={"proto_version": "1", "publication_names": s})
        busy = _reader(crm, s, slot_busy_s=0.5)
        with pytest.raises(RetryableSourceError) as caught:
            next(busy.stream(start, threading.Event()))
        assert is_retryable(caught.value) and "in use" in str(caught.value)
        busy.close()
    finally:
        holder.close()
    # the holder's walsender exits a moment later: the reader waits for it instead of failing
    events, _, _ = _collect(reader, start, 1)
    assert [e.key for e in events] == [{"id": 1}]


def test_postgres_connection_cut_is_retryable_and_resume_loses_nothing(crm, pg_schema, cuttable_proxy):
    from branchline.errors import RetryableSourceError

    conn, s, _ = pg_schema
    conn.execute(f"CREATE TABLE {s}.t (id int PRIMARY KEY)")
    proxy = cuttable_proxy(crm)
    reader = PostgresReader(source="crm", branch="b1", host="127.0.0.1", port=proxy.port, user="postgres",
                            password="", database="crm", schemas=[s], slot=s, publication=s)
    start = reader.start_position()
    conn.execute(f"INSERT INTO {s}.t VALUES (1)")
    stop = threading.Event()
    stream = reader.stream(start, stop)
    seen = []
    first = None
    with pytest.raises(RetryableSourceError, match="must be reachable"):
        for changes in stream:
            seen.extend(changes.events)
            if changes.checkpoint is not None and first is None:
                reader.acknowledge(changes.checkpoint)
                first = changes.checkpoint
                conn.execute(f"INSERT INTO {s}.t VALUES (2)")  # may or may not arrive before the cut
                proxy.cut()
    assert first is not None and seen[0].key == {"id": 1}
    proxy.restore()
    events, _, _ = _collect(reader, first, 1)
    assert [e.key for e in events] == [{"id": 2}]
    reader.close()


def test_postgres_stream_returns_soon_after_stop_while_idle(crm, pg_schema):
    conn, s, reader = pg_schema
    conn.execute(f"CREATE TABLE {s}.t (id int PRIMARY KEY)")
    start = reader.start_position()
    stop = threading.Event()
    yields = []

    def consume():
        yields.extend(reader.stream(start, stop))  # appends as the stream yields

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    while len(yields) < 3 and thread.is_alive():  # idle: empty Changes keep coming
        threading.Event().wait(0.05)
    stop.set()
    thread.join(10)
    assert not thread.is_alive() and len(yields) >= 3 and not any(c.events for c in yields)
    assert _slot(conn, s)[1] is None  # the replication connection is closed and the slot released


def test_mariadb_rows_spooled_as_library_values_are_the_events_the_reader_makes(erp, mariadb_db):
    """`raw_rows` (a capture process) against the real library and server: every sample column type, NULLs,
    an empty SET, updates (a changed key too), deletes and an ALTER between rows events, through the spool's
    encoding, give the default reader's events value by value and type by type."""
    from branchline.runtime.spool import decode, encode

    from tests.unit.test_spool_binlog_rows import _events_typed

    conn, db = mariadb_db
    cur = conn.cursor()
    cur.execute("SET time_zone = '+00:00'")
    cur.execute(MARIADB_TABLE.format(db=db))
    reader = MariaDbReader(source="erp", branch="b1", host=erp.host, port=erp.port, user="root", password="",
                           databases=[db], server_id=4242005)
    start = reader.start_position()
    reader.close()
    cur.execute(f"INSERT INTO {db}.t VALUES {MARIADB_ROW}")
    cur.execute(f"INSERT INTO {db}.t (id, tags, amount, made, span) VALUES (2, '', -0.5, NULL, '-00:00:01.25'),"
                " (3, NULL, NULL, '1000-01-01 00:00:00', NULL)")
    cur.execute(f"UPDATE {db}.t SET name = 'bye', amount = amount * 2 WHERE id = 1")
    cur.execute(f"UPDATE {db}.t SET id = 4 WHERE id = 2")
    cur.execute(f"DELETE FROM {db}.t WHERE id = 3")
    cur.execute(f"ALTER TABLE {db}.t ADD COLUMN extra DECIMAL(5,2)")
    cur.execute(f"INSERT INTO {db}.t (id, extra) VALUES (5, -999.99)")

    def collect(raw_rows: bool, server_id: int, want: int) -> tuple[list[object], list[object]]:
        reader = MariaDbReader(source="erp", branch="b1", host=erp.host, port=erp.port, user="root", password="",
                               databases=[db], server_id=server_id, raw_rows=raw_rows)
        stop = threading.Event()
        events, batches = [], []
        schemas: dict[object, object] = {}
        deadline = datetime.now(UTC) + timedelta(seconds=20)
        for changes in reader.stream(start, stop):
            for schema in changes.schemas:
                schemas[schema.id] = schema
            for event in changes.events:
                events.append(event)
                batches.append(encode([event], {event.table: schemas[event.table]}) if raw_rows else None)
            if len(events) >= want or datetime.now(UTC) > deadline:
                break
        stop.set()
        reader.close()
        return events, batches

    expected, _ = collect(False, 4242006, 8)
    groups, batches = collect(True, 4242007, 6)  # one per rows event
    assert len(expected) == 8 and len(groups) == 6  # a changed key is delete + create
    events = [e for data in batches for e in decode(data)[0]]
    assert _events_typed(events) == _events_typed(expected)  # type: ignore[arg-type]
    assert events[0].after == MARIADB_VALUES
    assert events[1].after["tags"] == [] and events[1].after["amount"] == Decimal("-0.5000")
    assert events[1].after["span"] == -timedelta(seconds=1, microseconds=250000)
    assert events[-1].after["extra"] == Decimal("-999.99")
