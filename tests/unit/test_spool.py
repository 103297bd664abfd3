"""The SQLite spool: ordered, durable, checkpoint written with its batch, values kept exactly."""

from __future__ import annotations

import pickle
import threading
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from branchline.connectors.embedded.reader import Checkpoint
from branchline.events import UNCHANGED, ChangeEvent, Column, ColumnType, Json, Op, TableId, TableSchema
from branchline.runtime.spool import Spool, batch_schemas, decode, encode

TABLE = TableId(source="erp", branch="b1", database="erp", table="orders")
SCHEMA = TableSchema(id=TABLE, columns=(Column(name="id", type=ColumnType.INT64),
                                        Column(name="v", type=ColumnType.STRING)), primary_key=("id",))


def event(i: int, op: Op = Op.CREATE, **after) -> ChangeEvent:
    row = {"id": i, "v": f"v{i}", **after}
    return ChangeEvent(op=op, table=TABLE, key={"id": i}, after=row, position=1000 + i,
                       source_ts=datetime(2024, 1, 1, tzinfo=UTC), txid="0-1-5")


def test_every_value_type_survives_the_round_trip():
    values = {"d": Decimal("12345.678900"), "big": 2**64 - 1, "ts": datetime(2024, 1, 2, 3, 4, 5, 6),
              "tz": datetime(2024, 1, 2, tzinfo=UTC), "day": date(2024, 2, 29), "t": timedelta(hours=-838),
              "b": b"\x00\xff", "s": ["x", "z"], "j": Json({"a": [1, None]}), "u": uuid.uuid4(),
              "toast": UNCHANGED, "none": None}
    original = [event(1, **values), ChangeEvent(op=Op.DELETE, table=TABLE, key={"id": 2},
                                                before={"id": 2, "v": None}, position=7)]
    events, schemas = decode(encode(original, {TABLE: SCHEMA}))
    assert [e.model_dump() for e in events] == [e.model_dump() for e in original]
    assert events[0].after["toast"] is UNCHANGED
    assert schemas == {TABLE: SCHEMA}


def test_equal_table_ids_from_different_objects_share_one_schema():
    """Tables are matched by identity first (cheap), then by value: a second, equal TableId object (a
    reader that rebuilt it) must not give the batch a second table, and interleaved tables keep theirs."""
    other = TableId(source="erp", branch="b1", database="erp", table="items")
    other_schema = SCHEMA.model_copy(update={"id": other})
    twin = TABLE.model_copy()
    assert twin == TABLE and twin is not TABLE
    mixed = [event(1), ChangeEvent(op=Op.CREATE, table=other, key={"id": 9}, after={"id": 9, "v": "i"}, position=3),
             event(2).model_copy(update={"table": twin}), event(3)]
    schemas = {TABLE: SCHEMA, other: other_schema}
    assert batch_schemas(mixed, schemas) == schemas
    copied = batch_schemas(mixed[:1], schemas)
    schemas[TABLE] = other_schema  # a later schema change does not reach a batch already taken
    assert copied == {TABLE: SCHEMA}
    data = encode(mixed, {TABLE: SCHEMA, other: other_schema})
    assert len(pickle.loads(data)[0]) == 2  # each schema stored once
    events, decoded = decode(data)
    assert decoded == {TABLE: SCHEMA, other: other_schema}
    assert [(e.table, e.key["id"]) for e in events] == [(TABLE, 1), (other, 9), (TABLE, 2), (TABLE, 3)]


def test_batches_come_back_in_order_and_go_once_delivered(tmp_path):
    spool = Spool(tmp_path / "s.sqlite")
    for i in range(5):
        spool.append("erp", [event(i)], {TABLE: SCHEMA})
    batches = list(spool.read(limit_events=100))
    assert [b.events[0].key["id"] for b in batches] == [0, 1, 2, 3, 4]
    spool.delete_through(batches[2].seq)
    assert [b.events[0].key["id"] for b in spool.read(limit_events=100)] == [3, 4]
    assert spool.batches == 2


def test_read_stops_near_the_event_limit_but_always_returns_one_batch(tmp_path):
    spool = Spool(tmp_path / "s.sqlite")
    spool.append("erp", [event(i) for i in range(10)], {TABLE: SCHEMA})
    spool.append("erp", [event(i) for i in range(10, 20)], {TABLE: SCHEMA})
    assert [len(b.events) for b in spool.read(limit_events=5)] == [10]
    assert [len(b.events) for b in spool.read(limit_events=20)] == [10, 10]


def test_read_loads_the_data_of_the_batches_it_returns_only(tmp_path):
    """Through a backlog, a round of 2 batches must not copy the next 62 batches' data out of SQLite."""
    spool = Spool(tmp_path / "s.sqlite", memory_bytes=0)
    for i in range(10):
        spool.append("erp", [event(10 * i + j) for j in range(10)], {TABLE: SCHEMA})
    statements: list[str] = []
    spool._reader.set_trace_callback(statements.append)
    batches = list(spool.read(limit_events=20, after_seq=2))
    assert [b.seq for b in batches] == [3, 4]
    assert [e.key["id"] for b in batches for e in b.events] == list(range(20, 40))
    reads = [s for s in statements if "data" in s]
    assert len(reads) == 1 and "BETWEEN 3 AND 4" in reads[0]


def test_checkpoint_is_committed_with_its_batch_and_survives_reopen(tmp_path):
    path = tmp_path / "s.sqlite"
    spool = Spool(path)
    spool.append("erp", [event(1)], {TABLE: SCHEMA}, Checkpoint({"gtid": "0-1-9", "file": "b.000001", "pos": 9}, 42))
    spool.close()
    reopened = Spool(path)
    assert reopened.checkpoint("erp") == Checkpoint({"gtid": "0-1-9", "file": "b.000001", "pos": 9}, 42)
    assert reopened.checkpoint("crm") is None
    assert reopened.batches == 1 and reopened.size_bytes > 0


def test_failed_append_leaves_neither_batch_nor_checkpoint(tmp_path):
    spool = Spool(tmp_path / "s.sqlite")
    bad = event(1, v=threading.Lock())  # cannot be pickled
    with pytest.raises(TypeError):
        spool.append("erp", [bad], {TABLE: SCHEMA}, Checkpoint({"lsn": "0/1"}, 1))
    assert spool.batches == 0 and spool.checkpoint("erp") is None


def test_snapshot_plan_and_progress_resume_after_reopen(tmp_path):
    path = tmp_path / "s.sqlite"
    spool = Spool(path)
    spool.plan_snapshot("erp", Checkpoint({"file": "b.000001", "pos": 4}, 5), ["erp.orders", "erp.items"], 5)
    spool.append("erp", [event(1)], {TABLE: SCHEMA}, snapshot_progress=("erp.orders", 1, (1,), False))
    spool.close()
    state = Spool(path).snapshot_state("erp")
    assert state == {"erp.orders": (5, False, 1, (1,)), "erp.items": (5, False, 0, None)}


def test_capture_waits_while_the_spool_is_full_and_resumes_when_drained(tmp_path):
    spool = Spool(tmp_path / "s.sqlite")
    spool.append("erp", [event(i) for i in range(50)], {TABLE: SCHEMA})
    stop = threading.Event()
    released = threading.Event()

    def capture() -> None:
        if spool.wait_below(spool.size_bytes, stop, timeout=0.05):
            released.set()

    thread = threading.Thread(target=capture)
    thread.start()
    assert not released.wait(0.3)
    spool.delete_through(next(spool.read(100)).seq)
    assert released.wait(5)
    thread.join()


def test_stop_releases_a_waiting_capture(tmp_path):
    spool = Spool(tmp_path / "s.sqlite")
    spool.append("erp", [event(1)], {TABLE: SCHEMA})
    stop = threading.Event()
    stop.set()
    assert spool.wait_below(1, stop, timeout=0.05) is False


def test_a_reopened_spool_reads_the_same_batches_from_disk(tmp_path):
    path = tmp_path / "s.sqlite"
    spool = Spool(path)
    original = [event(i) for i in range(3)]
    spool.append("erp", original, {TABLE: SCHEMA})
    in_memory = next(spool.read(100)).events
    spool.close()
    from_disk = next(Spool(path).read(100)).events
    assert [e.model_dump() for e in from_disk] == [e.model_dump() for e in original]
    assert [e.model_dump() for e in in_memory] == [e.model_dump() for e in original]


def test_memory_limit_falls_back_to_disk(tmp_path):
    spool = Spool(tmp_path / "s.sqlite", memory_bytes=1)
    spool.append("erp", [event(1)], {TABLE: SCHEMA})
    assert [e.key for e in next(spool.read(100)).events] == [{"id": 1}]
