"""Debezium JSON envelopes in the exact JsonConverter layout, built from a table description.

Used by the unit tests (until and beside the envelopes recorded from the real connectors in
tests/cases/) and by the benchmark, which needs many realistic ERP rows without a broker.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson

# Connect field schemas of the types the sample ERP/CRM schemas produce.


def field(name: str, kind: str, *, optional: bool = True, logical: str | None = None,
          parameters: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    """One Connect field schema as JsonConverter writes it."""
    schema: dict[str, Any] = {"type": kind, "optional": optional}
    if logical is not None:
        schema["name"] = logical
        schema["version"] = 1
    if parameters:
        schema["parameters"] = parameters
    schema.update(extra)
    schema["field"] = name
    return schema


def decimal_field(name: str, precision: int, scale: int, *, optional: bool = True,
                  source_type: str = "DECIMAL") -> dict[str, Any]:
    return field(name, "bytes", optional=optional, logical="org.apache.kafka.connect.data.Decimal",
                 parameters={"scale": str(scale), "connect.decimal.precision": str(precision),
                             "__debezium.source.column.type": source_type,
                             "__debezium.source.column.length": str(precision),
                             "__debezium.source.column.scale": str(scale)})


def decimal_bytes(unscaled: int) -> str:
    """Connect Decimal value: base64 of the big-endian two's complement unscaled integer."""
    length = max(1, (unscaled + (unscaled < 0)).bit_length() // 8 + 1)
    return base64.b64encode(unscaled.to_bytes(length, "big", signed=True)).decode()


_MARIADB_SOURCE = [
    field("version", "string", optional=False), field("connector", "string", optional=False),
    field("name", "string", optional=False), field("ts_ms", "int64", optional=False),
    field("snapshot", "string", logical="io.debezium.data.Enum",
          parameters={"allowed": "true,first,first_in_data_collection,last_in_data_collection,last,false,incremental"},
          default="false"),
    field("db", "string", optional=False), field("sequence", "string"), field("ts_us", "int64"),
    field("ts_ns", "int64"), field("table", "string"), field("server_id", "int64", optional=False),
    field("gtid", "string"), field("file", "string", optional=False), field("pos", "int64", optional=False),
    field("row", "int32", optional=False), field("thread", "int64"), field("query", "string"),
]
_POSTGRES_SOURCE = [
    field("version", "string", optional=False), field("connector", "string", optional=False),
    field("name", "string", optional=False), field("ts_ms", "int64", optional=False),
    field("snapshot", "string", logical="io.debezium.data.Enum",
          parameters={"allowed": "true,first,first_in_data_collection,last_in_data_collection,last,false,incremental"},
          default="false"),
    field("db", "string", optional=False), field("sequence", "string"), field("ts_us", "int64"),
    field("ts_ns", "int64"), field("schema", "string", optional=False), field("table", "string", optional=False),
    field("txId", "int64"), field("lsn", "int64"), field("xmin", "int64"),
]
_TRANSACTION = {"type": "struct", "fields": [
    field("id", "string", optional=False), field("total_order", "int64", optional=False),
    field("data_collection_order", "int64", optional=False)],
    "optional": True, "name": "event.block", "version": 1, "field": "transaction"}


class Table:
    """One source table: builds the key and value records Debezium would write for its changes."""

    def __init__(self, *, prefix: str, database: str, table: str, fields: list[dict[str, Any]],
                 key: list[str], connector: str = "mariadb", schema: str | None = None) -> None:
        self.prefix, self.database, self.table, self.connector = prefix, database, table, connector
        self.schema_name = schema
        middle = schema if connector == "postgresql" else database
        self.topic = f"{prefix}.{middle}.{table}"
        self.fields = fields
        self.key = key
        row_schema = {"type": "struct", "fields": fields, "optional": True, "name": f"{self.topic}.Value"}
        source = _POSTGRES_SOURCE if connector == "postgresql" else _MARIADB_SOURCE
        self.value_schema = {
            "type": "struct",
            "fields": [
                {**row_schema, "field": "before"}, {**row_schema, "field": "after"},
                {"type": "struct", "fields": source, "optional": False,
                 "name": f"io.debezium.connector.{connector}.Source", "version": 1, "field": "source"},
                _TRANSACTION,
                field("op", "string", optional=False), field("ts_ms", "int64"), field("ts_us", "int64"),
                field("ts_ns", "int64"),
            ],
            "optional": False, "name": f"{self.topic}.Envelope", "version": 2,
        }
        by_name = {f["field"]: f for f in fields}
        self.key_schema = {"type": "struct", "fields": [{**by_name[k], "optional": False} for k in key],
                           "optional": False, "name": f"{self.topic}.Key"} if key else None

    def source_block(self, *, position: tuple[Any, ...], ts_ms: int, snapshot: str = "false",
                     txid: Any = None) -> dict[str, Any]:
        base: dict[str, Any] = {"version": "3.6.1.Final", "connector": self.connector, "name": self.prefix,
                                "ts_ms": ts_ms, "snapshot": snapshot, "db": self.database, "sequence": None,
                                "ts_us": ts_ms * 1000, "ts_ns": ts_ms * 1_000_000, "table": self.table}
        if self.connector == "postgresql":
            (lsn,) = position
            base.update(schema=self.schema_name, txId=txid, lsn=lsn, xmin=None,
                        sequence=orjson.dumps([str(lsn - 8) , str(lsn)]).decode())
        else:
            file, pos, row = position
            base.update(server_id=1, gtid=txid, file=file, pos=pos, row=row, thread=7, query=None)
        return base

    def value(self, op: str, *, before: dict[str, Any] | None, after: dict[str, Any] | None,
              position: tuple[Any, ...], ts_ms: int = 1_700_000_000_000, snapshot: str = "false",
              txid: Any = None, transaction: dict[str, Any] | None = None) -> bytes:
        payload = {"before": before, "after": after,
                   "source": self.source_block(position=position, ts_ms=ts_ms, snapshot=snapshot, txid=txid),
                   "transaction": transaction, "op": op, "ts_ms": ts_ms + 5, "ts_us": (ts_ms + 5) * 1000,
                   "ts_ns": (ts_ms + 5) * 1_000_000}
        return orjson.dumps({"schema": self.value_schema, "payload": payload})

    def key_record(self, row: dict[str, Any]) -> bytes | None:
        if self.key_schema is None:
            return None
        return orjson.dumps({"schema": self.key_schema, "payload": {k: row[k] for k in self.key}})


def heartbeat(prefix: str, ts_ms: int = 1_700_000_000_000) -> tuple[str, bytes, bytes]:
    """(topic, key, value) of a Debezium heartbeat record."""
    key = {"schema": {"type": "struct", "fields": [field("serverName", "string", optional=False)],
                      "optional": False, "name": "io.debezium.connector.common.ServerNameKey"},
           "payload": {"serverName": prefix}}
    value = {"schema": {"type": "struct", "fields": [field("ts_ms", "int64", optional=False)],
                        "optional": False, "name": "io.debezium.connector.common.Heartbeat"},
             "payload": {"ts_ms": ts_ms}}
    return f"__debezium-heartbeat.{prefix}", orjson.dumps(key), orjson.dumps(value)


def transaction_marker(prefix: str, status: str, txid: str, event_count: int | None = None,
                       ts_ms: int = 1_700_000_000_000) -> tuple[str, bytes, bytes]:
    """(topic, key, value) of a BEGIN or END record of ``provide.transaction.metadata``."""
    key = {"schema": {"type": "struct", "fields": [field("id", "string", optional=False)], "optional": False,
                      "name": "io.debezium.connector.common.TransactionMetadataKey"}, "payload": {"id": txid}}
    collection = {"type": "struct", "fields": [field("data_collection", "string", optional=False),
                                               field("event_count", "int64", optional=False)], "optional": False}
    value = {"schema": {"type": "struct", "fields": [
        field("status", "string", optional=False), field("id", "string", optional=False),
        field("event_count", "int64"),
        {"type": "array", "items": collection, "optional": True, "field": "data_collections"},
        field("ts_ms", "int64", optional=False)], "optional": False,
        "name": "io.debezium.connector.common.TransactionMetadataValue", "version": 1},
        "payload": {"status": status, "id": txid, "event_count": event_count,
                    "data_collections": None if status == "BEGIN" else [], "ts_ms": ts_ms}}
    return f"{prefix}.transaction", orjson.dumps(key), orjson.dumps(value)
