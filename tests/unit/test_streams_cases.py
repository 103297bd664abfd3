"""Decoding the envelopes recorded from the real Debezium connectors (tests/cases/debezium/*.jsonl):
every sample table and type, each operation, tombstones, heartbeats, transaction markers, DDL,
incremental snapshots and the TOAST placeholder."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, localcontext
from pathlib import Path
from typing import Any

import pytest
from branchline.events import UNCHANGED, ColumnType, Json, Op, binlog_position, lsn_position
from branchline.streams.decode import (
    PLACEHOLDER,
    EnvelopeDecoder,
    Heartbeat,
    OtherRecord,
    RowChange,
    SchemaChangeRecord,
    Tombstone,
    TransactionMarker,
)

CASES = Path(__file__).resolve().parents[1] / "cases" / "debezium"


def load() -> list[dict[str, Any]]:
    records = []
    for path in sorted(CASES.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                records.append(json.loads(line))
    return records


RECORDS = load() if CASES.exists() else []
pytestmark = pytest.mark.skipif(not RECORDS, reason="no recorded cases in tests/cases/debezium")


def source_of(topic: str) -> str:
    return "crm" if ".crm" in topic else "erp"


def decode_all() -> list[tuple[dict[str, Any], Any]]:
    decoders: dict[str, EnvelopeDecoder] = {}
    out = []
    for record in RECORDS:
        name = source_of(record["topic"])
        decoder = decoders.setdefault(name, EnvelopeDecoder(name, "rec"))
        key = None if record["key"] is None else record["key"].encode()
        value = None if record["value"] is None else record["value"].encode()
        out.append((record, decoder.decode(record["topic"], key, value)))
    return out


DECODED = decode_all() if RECORDS else []

PYTHON_TYPES: dict[ColumnType, tuple[type, ...]] = {
    ColumnType.BOOLEAN: (bool,), ColumnType.INT16: (int,), ColumnType.INT32: (int,), ColumnType.INT64: (int,),
    ColumnType.UINT64: (int,), ColumnType.DECIMAL: (Decimal,), ColumnType.FLOAT32: (float,),
    ColumnType.FLOAT64: (float,), ColumnType.STRING: (str,), ColumnType.BYTES: (bytes,), ColumnType.DATE: (date,),
    ColumnType.TIME: (timedelta,), ColumnType.TIMESTAMP: (datetime,), ColumnType.TIMESTAMPTZ: (datetime,),
    ColumnType.INTERVAL: (timedelta,), ColumnType.JSON: (Json,), ColumnType.UUID: (uuid.UUID,),
    ColumnType.ENUM: (str,), ColumnType.SET: (list,), ColumnType.BITS: (str,), ColumnType.YEAR: (int,),
    ColumnType.STRING_ARRAY: (list,),
}


def test_every_record_kind_decodes_to_its_result():
    expected_op = {"r": Op.READ, "r-incremental": Op.READ, "c": Op.CREATE, "u": Op.UPDATE, "d": Op.DELETE,
                   "t": Op.TRUNCATE}
    seen = set()
    for record, result in DECODED:
        kind = record["kind"]
        seen.add(kind)
        if kind in expected_op:
            assert isinstance(result, RowChange), record["topic"]
            assert result.event.op is expected_op[kind]
        elif kind == "tombstone":
            expected = None if record["key"] is None else json.loads(record["key"])["payload"]  # keyless table
            assert isinstance(result, Tombstone) and result.key == expected
        elif kind in ("BEGIN", "END"):
            assert isinstance(result, TransactionMarker) and result.status == kind and result.id
        elif kind == "ddl":
            assert isinstance(result, SchemaChangeRecord) and result.ddl
        elif record["topic"].startswith("__debezium-heartbeat"):
            assert isinstance(result, Heartbeat) and result.ts is not None
        else:
            assert isinstance(result, OtherRecord), (record["topic"], kind)
    assert {"r", "c", "u", "d", "t", "tombstone", "BEGIN", "END", "ddl", "r-incremental"} <= seen


def test_every_value_has_the_exact_type_of_its_column():
    checked = 0
    for record, result in DECODED:
        if not isinstance(result, RowChange) or result.event.op is Op.TRUNCATE:
            continue
        columns = {c.name: c for c in result.schema.columns}
        for image in (result.event.before, result.event.after):
            for name, value in (image or {}).items():
                if value is None or value is UNCHANGED:
                    continue
                column = columns[name]
                assert isinstance(value, PYTHON_TYPES[column.type]), (record["topic"], name, value)
                assert not isinstance(value, bool) or column.type is ColumnType.BOOLEAN
                if column.type is ColumnType.TIMESTAMPTZ:
                    assert value.tzinfo is UTC
                if column.type is ColumnType.TIMESTAMP:
                    assert value.tzinfo is None
                if column.type is ColumnType.BITS:
                    assert len(value) == column.length and set(value) <= {"0", "1"}
                if column.type is ColumnType.UINT64:
                    assert 0 <= value < 2**64
                checked += 1
    assert checked > 500


def test_the_toast_placeholder_never_survives_decoding():
    unchanged = 0
    for _, result in DECODED:
        if isinstance(result, RowChange):
            for image in (result.event.before, result.event.after):
                for value in (image or {}).values():
                    assert value != PLACEHOLDER and value != PLACEHOLDER.encode()
                    assert not (isinstance(value, list) and PLACEHOLDER in value)
                    unchanged += value is UNCHANGED
    assert unchanged >= 2  # the recorded TOAST-unchanged updates of crm.public.activities


def test_positions_follow_the_source_blocks():
    for record, result in DECODED:
        if not isinstance(result, RowChange):
            continue
        source = json.loads(record["value"])["payload"]["source"]
        event = result.event
        if source["connector"] == "postgresql":
            if source["snapshot"] == "incremental":
                lsn = max(int(v) for v in json.loads(source["sequence"]) if v is not None)
                assert event.position == lsn_position(lsn, 0)
            elif event.op is Op.READ:
                assert event.position == 0
            else:
                assert event.position == lsn_position(source["lsn"], 1)
                assert event.txid == str(json.loads(record["value"])["payload"]["transaction"]["id"]) or event.txid
        else:
            assert event.position == binlog_position(source["file"], source["pos"], source["row"])


def test_keys_name_the_key_fields_and_deletes_keep_their_key():
    for record, result in DECODED:
        if isinstance(result, RowChange) and result.event.op is not Op.TRUNCATE and record["key"]:
            key_fields = list(json.loads(record["key"])["payload"])
            assert list(result.event.key) == key_fields
            assert result.schema.primary_key == tuple(key_fields)
            assert all(v is not None for v in result.event.key.values())


def first(topic: str, kind: str) -> tuple[dict[str, Any], RowChange]:
    for record, result in DECODED:
        if record["topic"] == topic and record["kind"] == kind:
            return record, result
    raise AssertionError(f"no recorded {kind} on {topic}")


def unscaled(text: str) -> int:
    return int.from_bytes(base64.b64decode(text), "big", signed=True)


def test_exact_values_of_a_recorded_sales_order():
    record, result = first("rec.erp.erp.sales_orders", "r")
    raw = json.loads(record["value"])["payload"]["after"]
    row = result.event.after
    assert row["id"] == unscaled(raw["id"]) and result.schema.column("id").type is ColumnType.UINT64
    with localcontext() as ctx:
        ctx.prec = 60
        assert row["total"] == Decimal(unscaled(raw["total"])) / Decimal(10) ** 4
    assert row["ordered_at"] == datetime(1970, 1, 1) + timedelta(microseconds=raw["ordered_at"])
    assert row["promised_date"] is None or row["promised_date"] == date(1970, 1, 1) + timedelta(days=raw["promised_date"])
    assert row["status"] == raw["status"] and result.schema.column("status").type is ColumnType.ENUM
    assert row["updated_at"] == datetime.fromisoformat(raw["updated_at"]).astimezone(UTC)


def test_exact_values_of_a_recorded_customer():
    record, result = first("rec.erp.erp.customers", "r")
    raw = json.loads(record["value"])["payload"]["after"]
    row = result.event.after
    flags = int.from_bytes(base64.b64decode(raw["flags"]), "little")
    assert row["flags"] == format(flags, "010b")
    assert row["tags"] == (raw["tags"].split(",") if raw["tags"] else [])
    assert row["birth_date"] is None or row["birth_date"] == date(1970, 1, 1) + timedelta(days=raw["birth_date"])
    assert result.schema.column("credit_limit").scale == 4
    assert result.schema.column("credit_limit").source_type == "decimal(18,4)"


def test_exact_values_of_a_recorded_account():
    record, result = first("rec.crm.public.accounts", "r")
    raw = json.loads(record["value"])["payload"]["after"]
    row = result.event.after
    assert row["id"] == uuid.UUID(raw["id"])
    assert row["tags"] == raw["tags"]
    assert row["profile"] == Json(json.loads(raw["profile"]))
    if raw["logo"] is not None:
        assert row["logo"] == base64.b64decode(raw["logo"])
    if raw["annual_revenue"] is not None:
        with localcontext() as ctx:
            ctx.prec = 60
            assert row["annual_revenue"] == Decimal(unscaled(raw["annual_revenue"])) / 100


def test_postgres_delete_keeps_the_key_and_drops_debezium_fillers():
    _, result = first("rec.crm.public.contacts", "d")
    assert result.event.key["id"] == result.event.before["id"]
    assert result.event.before["account_id"] is None  # "" filler of a NOT NULL uuid is not a value
