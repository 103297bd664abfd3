"""Decoding Debezium JSON envelopes: every logical type, every operation, and the non-row records.

Envelopes are built in JsonConverter's exact layout (streams/_envelopes.py); the recorded ones from
the real connectors are covered by test_streams_cases.py.
"""

from __future__ import annotations

import base64
import os
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import orjson
import pytest
from branchline.errors import BadRecordError
from branchline.events import UNCHANGED, ColumnType, Json, Op, binlog_position, lsn_position
from branchline.streams import _envelopes as env
from branchline.streams.decode import (
    EnvelopeDecoder,
    Heartbeat,
    OtherRecord,
    RowChange,
    SchemaChangeRecord,
    Tombstone,
    TransactionMarker,
)
from pydantic import ValidationError

F = env.field

ERP_FIELDS = [
    F("id", "int64", optional=False),
    F("code", "string", optional=False),
    env.decimal_field("amount", 38, 10),
    env.decimal_field("price", 18, 4),
    F("big_unsigned", "bytes", logical="org.apache.kafka.connect.data.Decimal",
      parameters={"scale": "0", "connect.decimal.precision": "20",
                  "__debezium.source.column.type": "BIGINT UNSIGNED", "__debezium.source.column.length": "20"}),
    F("created", "int64", logical="io.debezium.time.Timestamp"),
    F("updated_us", "int64", logical="io.debezium.time.MicroTimestamp"),
    F("stamp", "string", logical="io.debezium.time.ZonedTimestamp"),
    F("day", "int32", logical="io.debezium.time.Date"),
    F("duration", "int64", logical="io.debezium.time.MicroTime"),
    F("t_millis", "int32", logical="io.debezium.time.Time"),
    F("yr", "int32", logical="io.debezium.time.Year"),
    F("doc", "string", logical="io.debezium.data.Json"),
    F("status", "string", logical="io.debezium.data.Enum", parameters={"allowed": "new,paid,void"}),
    F("flags", "string", logical="io.debezium.data.EnumSet", parameters={"allowed": "a,b,c"}),
    F("mask", "bytes", logical="io.debezium.data.Bits", parameters={"length": "10"}),
    F("active", "boolean"),
    F("blob", "bytes"),
    F("ratio", "float64"),
    F("small", "int16"),
]
ERP = env.Table(prefix="erp", database="erp", table="orders", fields=ERP_FIELDS, key=["id"])

PG_FIELDS = [
    F("id", "int32", optional=False),
    F("uid", "string", logical="io.debezium.data.Uuid"),
    F("note", "string"),
    F("raw", "bytes"),
    F("tags", "array", items={"type": "string", "optional": True}),
    F("n", "struct", logical="io.debezium.data.VariableScaleDecimal",
      fields=[F("scale", "int32", optional=False), F("value", "bytes", optional=False)]),
    F("ts", "int64", logical="io.debezium.time.MicroTimestamp"),
    F("tstz", "string", logical="io.debezium.time.ZonedTimestamp"),
    F("nano", "int64", logical="io.debezium.time.NanoTimestamp"),
    F("span", "int64", logical="io.debezium.time.MicroDuration"),
    F("attrs", "string", logical="io.debezium.data.Json"),
]
CRM = env.Table(prefix="crm", database="crm", schema="public", table="contacts", fields=PG_FIELDS,
                key=["id"], connector="postgresql")


def erp_row(**overrides):
    row = {
        "id": 42, "code": "SO-42",
        "amount": env.decimal_bytes(-12345678901234567890123456789012345678),  # 38 digits, scale 10
        "price": env.decimal_bytes(1234500),  # 123.4500
        "big_unsigned": env.decimal_bytes(18446744073709551615),
        "created": 1_700_000_000_123,  # DATETIME(3) 2023-11-14 22:13:20.123
        "updated_us": -1,  # one microsecond before the epoch
        "stamp": "2024-02-29T23:59:59.999999Z",
        "day": 19782,
        "duration": -(838 * 3600 + 59 * 60 + 59) * 1_000_000,  # MySQL TIME '-838:59:59'
        "t_millis": 45_296_789,
        "yr": 2024,
        "doc": '{"a": [1, 2.5, "x"], "b": null}',
        "status": "paid",
        "flags": "a,c",
        "mask": base64.b64encode(bytes([0b00000101, 0b00000010])).decode(),  # bits 1000000101
        "active": True,
        "blob": base64.b64encode(b"\x00\xffbin").decode(),
        "ratio": 0.5,
        "small": -7,
    }
    row.update(overrides)
    return row


def decode(table, op, *, before=None, after=None, position=None, **kwargs):
    postgres = table.connector == "postgresql"
    decoder = kwargs.pop("decoder", None) or EnvelopeDecoder("crm" if postgres else "erp", "b01")
    if position is None:
        position = (24_023_128,) if postgres else ("mariadb-bin.000003", 1234, 0)
    value = table.value(op, before=before, after=after, position=position, **kwargs)
    key = table.key_record(after if after is not None else before)
    return decoder.decode(table.topic, key, value)


def test_every_mariadb_logical_type_decodes_to_its_exact_python_type():
    result = decode(ERP, "c", after=erp_row())
    assert isinstance(result, RowChange)
    row = result.event.after
    assert row["amount"] == Decimal("-1234567890123456789012345678.9012345678")
    assert row["price"] == Decimal("123.4500") and str(row["price"]) == "123.4500"
    assert row["big_unsigned"] == 18446744073709551615 and type(row["big_unsigned"]) is int
    assert row["created"] == datetime(2023, 11, 14, 22, 13, 20, 123000) and row["created"].tzinfo is None
    assert row["updated_us"] == datetime(1969, 12, 31, 23, 59, 59, 999999)
    assert row["stamp"] == datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=UTC)
    assert row["day"] == date(2024, 2, 29)
    assert row["duration"] == -timedelta(hours=838, minutes=59, seconds=59)
    assert row["t_millis"] == timedelta(hours=12, minutes=34, seconds=56, milliseconds=789)
    assert row["yr"] == 2024
    assert row["doc"] == Json({"a": [1, 2.5, "x"], "b": None})
    assert row["status"] == "paid"
    assert row["flags"] == ["a", "c"]
    assert row["mask"] == "1000000101"
    assert row["active"] is True
    assert row["blob"] == b"\x00\xffbin"
    assert row["ratio"] == 0.5 and row["small"] == -7


def test_schema_columns_carry_types_precision_and_source_types():
    schema = decode(ERP, "c", after=erp_row()).schema
    assert schema.primary_key == ("id",)
    assert schema.id.qualified == "erp.orders" and schema.id.source == "erp" and schema.id.branch == "b01"
    types = {c.name: c.type for c in schema.columns}
    assert types == {
        "id": ColumnType.INT64, "code": ColumnType.STRING, "amount": ColumnType.DECIMAL,
        "price": ColumnType.DECIMAL, "big_unsigned": ColumnType.UINT64, "created": ColumnType.TIMESTAMP,
        "updated_us": ColumnType.TIMESTAMP, "stamp": ColumnType.TIMESTAMPTZ, "day": ColumnType.DATE,
        "duration": ColumnType.TIME, "t_millis": ColumnType.TIME, "yr": ColumnType.YEAR,
        "doc": ColumnType.JSON, "status": ColumnType.ENUM, "flags": ColumnType.SET, "mask": ColumnType.BITS,
        "active": ColumnType.BOOLEAN, "blob": ColumnType.BYTES, "ratio": ColumnType.FLOAT64,
        "small": ColumnType.INT16,
    }
    price = schema.column("price")
    assert (price.precision, price.scale, price.source_type) == (18, 4, "decimal(18,4)")
    assert schema.column("mask").length == 10
    assert schema.column("id").nullable is False and schema.column("code").nullable is False


def test_datetime_does_not_shift_with_the_host_time_zone():
    saved = os.environ.get("TZ")
    try:
        os.environ["TZ"] = "Pacific/Kiritimati"  # UTC+14
        time.tzset()
        row = decode(ERP, "c", after=erp_row()).event.after
    finally:
        if saved is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = saved
        time.tzset()
    assert row["created"] == datetime(2023, 11, 14, 22, 13, 20, 123000)


def test_decimal_never_passes_through_a_float_even_with_many_digits():
    unscaled = 99999999999999999999999999999999999999  # 38 nines
    row = decode(ERP, "c", after=erp_row(amount=env.decimal_bytes(unscaled))).event.after
    assert row["amount"] == Decimal("9999999999999999999999999999.9999999999")
    assert isinstance(row["amount"], Decimal)


def test_decimal_handling_mode_string_gives_exact_decimal():
    fields = [F("id", "int64", optional=False),
              F("total", "string", parameters={"__debezium.source.column.type": "DECIMAL",
                                               "__debezium.source.column.length": "20",
                                               "__debezium.source.column.scale": "6"})]
    table = env.Table(prefix="erp", database="erp", table="t", fields=fields, key=["id"])
    result = decode(table, "c", after={"id": 1, "total": "12345678901234.123456"},
                    position=("mariadb-bin.000001", 4, 0))
    assert result.event.after["total"] == Decimal("12345678901234.123456")
    column = result.schema.column("total")
    assert (column.type, column.precision, column.scale) == (ColumnType.DECIMAL, 20, 6)


def test_postgres_types_variable_scale_decimal_uuid_arrays_and_timestamps():
    value = {"scale": 3, "value": env.decimal_bytes(-1005)}
    after = {"id": 7, "uid": "5f0c6a1e-4b7a-4bd0-9a59-2f6f5a3c0b11", "note": "hi", "raw": "AAE=",
             "tags": ["x", None, "y"], "n": value, "ts": 1_700_000_000_000_001,
             "tstz": "2024-06-01T10:00:00Z", "nano": 1_700_000_000_000_001_999, "span": 90_061_000_001,
             "attrs": '{"k": "v"}'}
    result = decode(CRM, "c", after=after)
    row = result.event.after
    assert row["uid"] == uuid.UUID("5f0c6a1e-4b7a-4bd0-9a59-2f6f5a3c0b11")
    assert row["raw"] == b"\x00\x01"
    assert row["tags"] == ["x", None, "y"]
    assert row["n"] == Decimal("-1.005")
    assert row["ts"] == datetime(2023, 11, 14, 22, 13, 20, 1)
    assert row["tstz"] == datetime(2024, 6, 1, 10, tzinfo=UTC)
    assert row["nano"] == datetime(2023, 11, 14, 22, 13, 20, 1)
    assert row["span"] == timedelta(days=1, hours=1, minutes=1, seconds=1, microseconds=1)
    assert row["attrs"] == Json({"k": "v"})
    types = {c.name: c.type for c in result.schema.columns}
    assert types["tags"] is ColumnType.STRING_ARRAY and types["n"] is ColumnType.DECIMAL
    assert result.schema.column("n").precision is None
    assert types["uid"] is ColumnType.UUID and types["span"] is ColumnType.INTERVAL
    assert result.schema.id.schema_ == "public" and result.schema.id.qualified == "public.contacts"


def test_toast_placeholder_becomes_unchanged_and_never_the_placeholder_string():
    placeholder = "__debezium_unavailable_value"
    after = {"id": 7, "uid": None, "note": placeholder, "raw": base64.b64encode(placeholder.encode()).decode(),
             "tags": [placeholder], "n": None, "ts": None, "tstz": None, "nano": None, "span": None,
             "attrs": placeholder}
    row = decode(CRM, "u", before=None, after=after).event.after
    assert row["note"] is UNCHANGED
    assert row["raw"] is UNCHANGED
    assert row["tags"] is UNCHANGED
    assert row["attrs"] is UNCHANGED
    assert placeholder not in repr(row)


def test_placeholder_text_in_a_mariadb_column_is_an_ordinary_value():
    row = decode(ERP, "c", after=erp_row(code="__debezium_unavailable_value")).event.after
    assert row["code"] == "__debezium_unavailable_value"


def test_each_operation_and_its_key_and_images():
    before = erp_row(code="old")
    after = erp_row(code="new")
    create = decode(ERP, "c", after=after).event
    update = decode(ERP, "u", before=before, after=after).event
    delete = decode(ERP, "d", before=before).event
    read = decode(ERP, "r", after=after, snapshot="true").event
    assert [e.op for e in (create, update, delete, read)] == [Op.CREATE, Op.UPDATE, Op.DELETE, Op.READ]
    assert create.key == update.key == delete.key == read.key == {"id": 42}
    assert update.before is None and update.after["code"] == "new"  # old image of updates: opt-in
    full = decode(ERP, "u", before=before, after=after, decoder=EnvelopeDecoder("erp", "b01", keep_update_before=True))
    assert full.event.before["code"] == "old" and full.event.before["amount"] == update.after["amount"]
    assert delete.after is None and delete.row["code"] == "old"
    assert read.snapshot is True and create.snapshot is False


AFTER_COLUMN = env.Table(prefix="erp", database="erp", table="notes", key=["id"], fields=[
    F("id", "int64", optional=False), F("after", "string"), F("body", "string")])


@pytest.mark.parametrize("table", [ERP, AFTER_COLUMN], ids=["orders", "column-named-after"])
def test_later_records_of_a_topic_decode_like_the_first_and_deletes_keep_their_before_image(table):
    """A topic's later records take the fast path (schema matched by bytes, an update's ``before``
    cut off unparsed): each must decode exactly as a fresh decoder decodes it, even when a string
    holds ``,"after":`` or a column is named ``after``."""
    sneaky = '","after":{"id":1},"op":"d","x":"'
    if table is ERP:
        old, new = erp_row(code=sneaky), erp_row(code="new")
    else:
        old = {"id": 42, "after": sneaky, "body": ',"after":null'}
        new = {"id": 42, "after": "later", "body": "b"}
    shared = EnvelopeDecoder("erp", "b01")
    changes = [("c", None, new), ("u", old, new), ("d", old, None), ("u", new, old), ("d", new, None)]
    for op, before, after in changes:
        fast = decode(table, op, before=before, after=after, decoder=shared).event
        fresh = decode(table, op, before=before, after=after).event
        assert fast == fresh
        if op == "d":
            assert fast.before is not None and fast.before[table.key[0]] == 42
            assert fast.row == fresh.row
        if op == "u":
            assert fast.before is None and fast.after == fresh.after
    kept = EnvelopeDecoder("erp", "b01", keep_update_before=True)
    for _ in range(2):  # the second takes the fast path
        full = decode(table, "u", before=old, after=new, decoder=kept).event
    assert full.before == decode(table, "d", before=old).event.before


def test_a_before_image_is_cut_off_only_where_no_key_inside_it_can_read_after():
    plan_of = EnvelopeDecoder("erp", "b01")
    decode(ERP, "c", after=erp_row(), decoder=plan_of)
    assert next(iter(plan_of._plans.values())).before_separable
    decode(AFTER_COLUMN, "c", after={"id": 1, "after": "a", "body": "b"}, decoder=plan_of)
    assert not next(p for p in plan_of._plans.values() if p.fields[1].name == "after").before_separable
    mapped = env.Table(prefix="erp", database="erp", table="m", key=["id"], fields=[
        F("id", "int64", optional=False), F("attrs", "map", keys={"type": "string", "optional": False},
                                            values={"type": "string", "optional": True})])
    decode(mapped, "c", after={"id": 1, "attrs": {"after": "x"}}, decoder=plan_of)
    assert not next(p for p in plan_of._plans.values() if p.fields[1].name == "attrs").before_separable


def test_truncate_is_a_table_level_change_without_key():
    value = ERP.value("t", before=None, after=None, position=("mariadb-bin.000003", 900, 0))
    result = EnvelopeDecoder("erp", "b01").decode(ERP.topic, None, value)
    assert isinstance(result, RowChange)
    assert result.event.op is Op.TRUNCATE and result.event.key == {}
    assert result.schema.id.table == "orders"


def test_positions_source_ts_and_txid():
    mariadb = decode(ERP, "c", after=erp_row(), position=("mariadb-bin.000012", 98765, 3),
                     txid="0-1-77", ts_ms=1_700_000_000_250).event
    assert mariadb.position == binlog_position("mariadb-bin.000012", 98765, 3)
    assert mariadb.source_ts == datetime(2023, 11, 14, 22, 13, 20, 250000, tzinfo=UTC)
    assert mariadb.txid == "0-1-77"
    pg_after = {"id": 1, "uid": None, "note": "x", "raw": None, "tags": None, "n": None, "ts": None,
                "tstz": None, "nano": None, "span": None, "attrs": None}
    streamed = decode(CRM, "c", after=pg_after, position=(0x16B374D848,), txid=991).event
    assert streamed.position == lsn_position(0x16B374D848, 1)
    assert streamed.txid == "991"
    snapshot = decode(CRM, "r", after=pg_after, position=(0x16B374D848,), snapshot="true").event
    assert snapshot.position == 0 < streamed.position
    incremental = decode(CRM, "r", after=pg_after, position=(0x16B374D848,), snapshot="incremental").event
    assert incremental.position == lsn_position(0x16B374D848, 0)
    in_tx = decode(ERP, "u", before=erp_row(), after=erp_row(), txid="0-1-5",
                   transaction={"id": "file=x,pos=1", "total_order": 1, "data_collection_order": 1}).event
    assert in_tx.txid == "file=x,pos=1"


def test_a_change_begun_before_the_postgres_snapshot_still_wins_over_the_snapshot_row():
    """Debezium reads the initial snapshot at the slot's LSN, but a transaction that was open then
    commits later with WAL LSNs below it (why Debezium stopped filtering streamed events by the
    snapshot LSN, DBZ-2288). Were snapshot rows given the snapshot LSN, the guard would drop that
    change as older; at position 0 every streamed change wins."""
    from branchline.streams.dedupe import AppliedPositions, collapse

    snapshot_lsn = 0x16B374D848
    after = {"id": 1, "uid": None, "note": "snapshot", "raw": None, "tags": None, "n": None, "ts": None,
             "tstz": None, "nano": None, "span": None, "attrs": None}
    row = decode(CRM, "r", after=after, position=(snapshot_lsn,), snapshot="true")
    late = decode(CRM, "u", after={**after, "note": "committed after the snapshot"}, position=(snapshot_lsn - 0x200,))
    guard = AppliedPositions({})
    guard.record(collapse(guard.admit([(row.event, row.schema)])))
    kept = guard.admit([(late.event, late.schema)])
    assert [e.after["note"] for e, _ in kept] == ["committed after the snapshot"]


def test_tombstone_heartbeat_transaction_and_schema_change_are_not_rows():
    decoder = EnvelopeDecoder("erp", "b01")
    tomb = decoder.decode(ERP.topic, ERP.key_record({"id": 42}), None)
    assert tomb == Tombstone(ERP.topic, {"id": 42})
    topic, key, value = env.heartbeat("erp", ts_ms=1_700_000_000_000)
    beat = decoder.decode(topic, key, value)
    assert isinstance(beat, Heartbeat) and beat.ts == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    topic, key, value = env.transaction_marker("erp", "BEGIN", "0-1-9")
    assert decoder.decode(topic, key, value) == TransactionMarker(
        "BEGIN", "0-1-9", None, datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC))
    topic, key, value = env.transaction_marker("erp", "END", "0-1-9", event_count=3)
    end = decoder.decode(topic, key, value)
    assert isinstance(end, TransactionMarker) and end.status == "END" and end.event_count == 3
    ddl = orjson.dumps({"schema": {"type": "struct", "fields": [F("ddl", "string")], "optional": False,
                                   "name": "io.debezium.connector.mariadb.SchemaChangeValue"},
                        "payload": {"ddl": "ALTER TABLE orders ADD c INT"}})
    assert decoder.decode("erp", None, ddl) == SchemaChangeRecord("erp", "ALTER TABLE orders ADD c INT")
    message = orjson.dumps({"schema": {"type": "struct", "fields": [F("op", "string")], "optional": False,
                                       "name": "crm.Envelope.MessageValue"}, "payload": {"op": "m"}})
    assert isinstance(decoder.decode("crm.message", None, message), OtherRecord)


def test_table_without_primary_key_uses_the_whole_row_as_key():
    fields = [F("a", "int32"), F("b", "string")]
    table = env.Table(prefix="erp", database="erp", table="log", fields=fields, key=[])
    result = decode(table, "c", after={"a": 1, "b": "x"}, position=("mariadb-bin.000001", 4, 0))
    assert result.event.key == {"a": 1, "b": "x"} and result.schema.primary_key == ()


def test_schema_change_gives_a_new_table_schema_and_same_schema_is_reused():
    decoder = EnvelopeDecoder("erp", "b01")
    first = decode(ERP, "c", after=erp_row(), decoder=decoder).schema
    again = decode(ERP, "c", after=erp_row(id=43), decoder=decoder).schema
    assert again is first
    wider = env.Table(prefix="erp", database="erp", table="orders", fields=[*ERP_FIELDS, F("extra", "string")],
                      key=["id"])
    changed = decode(wider, "c", after=erp_row(id=44, extra="x"), decoder=decoder).schema
    assert changed != first and changed.column("extra").type is ColumnType.STRING


def test_pretty_printed_envelope_decodes_like_the_compact_one():
    value = ERP.value("c", before=None, after=erp_row(), position=("mariadb-bin.000003", 1234, 0))
    pretty = orjson.dumps(orjson.loads(value), option=orjson.OPT_INDENT_2)
    decoder = EnvelopeDecoder("erp", "b01")
    assert decoder.decode(ERP.topic, None, pretty).event.after == decoder.decode(ERP.topic, None, value).event.after


def test_bad_record_names_table_key_and_position():
    value = ERP.value("c", before=None, after=erp_row(day="not a day"), position=("mariadb-bin.000003", 77, 1))
    with pytest.raises(BadRecordError) as info:
        EnvelopeDecoder("erp", "b01").decode(ERP.topic, ERP.key_record({"id": 42}), value)
    message = str(info.value)
    assert "erp.orders" in message and "key {'id': 42}" in message and "column `day`" in message
    assert str(binlog_position("mariadb-bin.000003", 77, 1)) in message


def test_record_without_schema_is_a_bad_record():
    with pytest.raises(BadRecordError, match="schemas.enable=true"):
        EnvelopeDecoder("erp", "b01").decode(ERP.topic, None, b'{"before": null, "after": {"id": 1}}')


def test_fast_event_construction_equals_model_construct():
    from branchline.events import ChangeEvent
    from branchline.streams._construct import new_event

    event = decode(ERP, "c", after=erp_row()).event
    values = {name: getattr(event, name) for name in ChangeEvent.model_fields}
    assert event == ChangeEvent.model_construct(**values)
    assert event.model_copy(update={"position": 1}).position == 1
    assert new_event(dict(values)).model_dump() == ChangeEvent.model_construct(**values).model_dump()
    with pytest.raises(ValidationError):
        event.position = 5  # still frozen


def test_dates_come_from_a_bounded_cache_and_stay_exact():
    from branchline.streams import decode as module

    days = range(-719_000, 2_000_000, 97)  # more distinct days than the cache holds, before and after 1970
    for day in days:
        assert module._date(day) == date(1970, 1, 1) + timedelta(days=day)
        assert len(module._DATES) <= module._DATES_MAX
    assert module._date(19_000) is module._date(19_000)
