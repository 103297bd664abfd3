"""PostgreSQL rows spooled undecoded (`PostgresReader.text_rows`, a capture process) come out of the spool as
exactly the events the reader makes by default: same values and types, keys, positions, commit times."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from decimal import Decimal

import pytest
from branchline.connectors.embedded.pgoutput import (
    PgOutputParser,
    Relation,
    decode_text_tuple,
    text_decoders,
    text_tuple,
)
from branchline.connectors.embedded.postgres import PostgresReader
from branchline.errors import BadRecordError
from branchline.events import UNCHANGED, ChangeEvent, Column, ColumnType, Op, TableId, TableSchema
from branchline.runtime.spool import Spool, decode, encode

from tests.unit.test_embedded_pgoutput import CAPTURED


@dataclass
class _Message:
    payload: bytes
    data_start: int


class _Cursor:
    """The replication cursor's `read_message`: the captured messages, then None (and the stream stops)."""

    def __init__(self, stop: threading.Event) -> None:
        self.messages = [_Message(bytes.fromhex(data), lsn) for lsn, data in CAPTURED]
        self.stop = stop

    def read_message(self) -> _Message | None:
        if self.messages:
            return self.messages.pop(0)
        self.stop.set()
        return None

    def send_feedback(self, **_: object) -> None:
        pass


class _Conn:
    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()  # never readable: the idle wait times out

    def fileno(self) -> int:
        return self.read_fd


def _reader(text_rows: bool) -> PostgresReader:
    reader = PostgresReader(source="crm", branch="b1", host="127.0.0.1", port=1, user="u", password="",
                            database="crm", schemas=["public"], slot="s", text_rows=text_rows)
    parser = PgOutputParser()
    for _, data in CAPTURED:  # the catalog's answer, from the relations themselves
        message = parser.parse(bytes.fromhex(data))
        if isinstance(message, Relation):
            table = TableId(source="crm", branch="b1", database="crm", schema_=message.namespace,
                            table=message.name)
            columns = tuple(Column(name=n, type=ColumnType.STRING) for n in message.names)
            reader._by_relid[message.relid] = TableSchema(id=table, columns=columns, primary_key=("id",))
    return reader


def _stream(text_rows: bool) -> tuple[list[object], dict[TableId, TableSchema]]:
    reader = _reader(text_rows)
    stop = threading.Event()
    conn = _Conn()
    try:
        changes = list(reader._messages(conn, _Cursor(stop), 0, stop, 0.01, 0.01, 0, 0.0))
    finally:
        os.close(conn.read_fd)
        os.close(conn.write_fd)
    schemas = {s.id: s for s in reader._by_relid.values()}
    return [e for c in changes for e in c.events], schemas


def _typed(events: list[ChangeEvent]) -> list[object]:
    """Everything an event holds, with each value's type (1 == Decimal(1) == True must not pass)."""
    def row(values: dict[str, object] | None) -> object:
        return None if values is None else [(k, type(v).__name__, v) for k, v in values.items()]
    return [(e.op, e.table, row(e.key), row(e.before), row(e.after), e.position, e.source_ts, e.txid, e.snapshot)
            for e in events]


def test_text_rows_through_the_spool_are_the_events_the_reader_makes():
    expected, schemas = _stream(text_rows=False)
    spooled, _ = _stream(text_rows=True)
    assert all(isinstance(e, ChangeEvent) for e in expected)
    assert [type(e).__name__ for e in spooled].count("TextRow") == len(expected) - 2  # the U 2->3 is split later
    assert spooled[-1].__class__ is ChangeEvent and spooled[-1].op is Op.TRUNCATE  # whole, in the same batch
    events, decoded_schemas = decode(encode(spooled, schemas))  # type: ignore[arg-type]
    assert decoded_schemas == schemas
    assert _typed(events) == _typed(expected)  # type: ignore[arg-type]
    assert [e.op for e in events].count(Op.DELETE) == 4  # two deletes, one key change (delete + create)
    toast = next(e for e in events if e.op is Op.UPDATE and e.table.table == "t_toast")
    assert toast.after is not None and toast.after["big"] is UNCHANGED
    insert = next(e for e in events if e.op is Op.CREATE)
    assert insert.after is not None and insert.after["n"] == Decimal("12345.6789")


def test_a_spooled_text_batch_is_read_back_from_disk_not_from_the_memory_cache(tmp_path):
    spooled, schemas = _stream(text_rows=True)
    expected, _ = _stream(text_rows=False)
    spool = Spool(tmp_path / "s.sqlite")
    try:
        spool.append("crm", spooled, schemas)  # type: ignore[arg-type]
        (batch,) = spool.read(10_000)
        assert _typed(batch.events) == _typed(expected)  # type: ignore[arg-type]
    finally:
        spool.close()


def test_a_value_that_does_not_decode_names_its_column():
    relation = Relation(1, "public", "t", "d", [("id", 23, -1, True), ("n", 1700, -1, False)])
    data = b"\x00\x02" + b"t\x00\x00\x00\x011" + b"t\x00\x00\x00\x03x.y"
    values, end = text_tuple(data, 0, relation)
    assert values == ("1", "x.y") and end == len(data)
    with pytest.raises(BadRecordError, match=r"`public\.t\.n` must decode; got 'x\.y'"):
        decode_text_tuple(relation.names, text_decoders(tuple(c[:3] for c in relation.columns)), values, "public.t")


def test_a_tuple_with_a_column_count_other_than_its_relation_is_a_bad_record():
    relation = Relation(1, "public", "t", "d", [("id", 23, -1, True)])
    with pytest.raises(BadRecordError, match="must have 1 columns; got 2"):
        text_tuple(b"\x00\x02nn", 0, relation)


def test_null_and_unchanged_values_survive_the_text_form():
    relation = Relation(1, "public", "t", "d", [("id", 23, -1, True), ("a", 25, -1, False), ("b", 25, -1, False)])
    values, _ = text_tuple(b"\x00\x03t\x00\x00\x00\x017nu", 0, relation)
    assert values == ["7", None, ...]  # a list: not every value is a str
    row = decode_text_tuple(relation.names, text_decoders(tuple(c[:3] for c in relation.columns)), values, "public.t")
    assert row == {"id": 7, "a": None, "b": UNCHANGED} and row["b"] is UNCHANGED


def _observed(source: str, events: list[object]) -> tuple[object, object]:
    from branchline import metrics

    metrics.observe_changes_read("b1", source, events)  # type: ignore[arg-type]
    with metrics._STATE.lock:
        stamp = metrics._STATE.read.get(("b1", source))
    return metrics.newest_position_read("b1", source), stamp


def test_read_marks_tell_capture_lag_what_every_event_tells_it(tmp_path):
    """The runner observes a text batch's marks, or `_read_marks` of other batches, instead of each event."""
    from branchline.runtime.runner import _read_marks

    spooled, schemas = _stream(text_rows=True)
    rows = [e for e in spooled if e.__class__ is not ChangeEvent]  # a batch without whole events has marks
    spool = Spool(tmp_path / "s.sqlite")
    try:
        spool.append("crm", rows, schemas)  # type: ignore[arg-type]
        (batch,) = spool.read(10_000)
    finally:
        spool.close()
    assert batch.marks is not None and len(batch.marks) < len(batch.events)
    expected = _observed("all-events", batch.events)
    assert expected[0] is not None and expected[1] is not None
    assert _observed("marks", batch.marks) == expected
    assert _observed("read-marks", _read_marks(batch.events)) == expected
    snapshot = [e.model_copy(update={"snapshot": True}) for e in batch.events[:3]]
    assert _read_marks(snapshot) is snapshot  # snapshot reads: as they came
