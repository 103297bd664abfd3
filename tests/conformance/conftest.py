"""The conformance harness: one target per sink kind, read back row by row, and the expected table.

Every test in this folder runs against each sink (`harness` is parametrized). A harness writes through
the real sink into a real target (PostgreSQL of the local stack; Delta tables on a local path and on
an S3-compatible server), in a fresh schema / path per test, and reads the target back with an
independent client (psycopg; deltalake -> pyarrow). `expected_table` computes the table a correct
sink must end with by applying the source history one change at a time in position order — plain
Python, sharing no code with the sinks.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import psycopg
import pytest
from branchline.events import UNCHANGED, ChangeEvent, Json, Op, TableSchema
from branchline.sinks.build import build_sink
from branchline.sinks.config import DeltaSinkConfig, PostgresSinkConfig, S3Storage
from branchline.sinks.contract import Sink

SOURCE_COLUMNS_ONLY = ("_bl_position", "_bl_op", "_bl_deleted")


def expected_table(
    table: TableSchema, events: Iterable[ChangeEvent], *, soft_delete: bool = False
) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Key -> row a correct sink holds after every change in ``events`` (in any delivery order, repeats
    included): the source history applied one change at a time in position order."""
    history = sorted({e.position: e for e in events}.values(), key=lambda e: e.position)
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    names = [c.name for c in table.columns]
    for event in history:
        if event.op is Op.TRUNCATE:
            if soft_delete:
                for row in rows.values():
                    row.update(_bl_deleted=True, _bl_op="t", _bl_position=event.position)
            else:
                rows.clear()
            continue
        key = tuple(event.key[k] for k in table.primary_key)
        old = rows.get(key)
        if event.op is Op.DELETE:
            if not soft_delete:
                rows.pop(key, None)
                continue
            image = event.before or event.key
            base = {n: image[n] if n in image else (old[n] if old else None) for n in names}
            rows[key] = {**base, "_bl_position": event.position, "_bl_op": "d", "_bl_deleted": True}
            continue
        after = event.after or {}
        row = {}
        for n in names:
            value = after.get(n)
            if value is UNCHANGED:
                value = old[n] if old else None
            row[n] = value
        row.update(_bl_position=event.position, _bl_op=event.op.value)
        if soft_delete:
            row["_bl_deleted"] = False
        rows[key] = row
    return {k: _normalized(v) for k, v in rows.items()}


def _normalized(row: dict[str, Any]) -> dict[str, Any]:
    """Values as both readers return them: JSON parsed, numbers exact, timestamps aware UTC."""
    out = {}
    for name, value in row.items():
        if isinstance(value, Json):
            value = value.value
        elif isinstance(value, datetime) and value.tzinfo is not None:
            value = value.astimezone(UTC)
        elif isinstance(value, Decimal) and name == "_bl_position":
            value = int(value)
        out[name] = value
    return out


class Harness:
    """A sink under test and an independent reader of its target."""

    kind: str
    soft_delete: bool = False
    buffering: bool = False

    def sink(self) -> Sink:
        raise NotImplementedError

    async def read(self, table: TableSchema) -> dict[tuple[Any, ...], dict[str, Any]]:
        raise NotImplementedError

    async def write(self, sink: Sink, table: TableSchema, events: Sequence[ChangeEvent]) -> None:
        """Write one batch and make it durable, as a runtime does before it acknowledges."""
        await sink.write_batch(table, events)
        if not sink.capabilities.durable_on_write:
            await sink.flush()

    async def cleanup(self) -> None:
        return None

    def expected(
        self, table: TableSchema, events: Iterable[ChangeEvent]
    ) -> dict[tuple[Any, ...], dict[str, Any]]:
        return expected_table(table, events, soft_delete=self.soft_delete)


def _compare_columns(table: TableSchema, soft: bool) -> list[str]:
    names = [c.name for c in table.columns] + ["_bl_position", "_bl_op"]
    return [*names, "_bl_deleted"] if soft else names


class PostgresHarness(Harness):
    def __init__(self, host: str, port: int, soft_delete: bool) -> None:
        self.kind = "postgres-soft" if soft_delete else "postgres"
        self.soft_delete = soft_delete
        self.schema = f"conf_{uuid.uuid4().hex[:10]}"
        self.dsn = f"host={host} port={port} user=postgres dbname=cloud"
        self.config = PostgresSinkConfig(
            host=host,
            port=port,
            database="cloud",
            schema=self.schema,
            soft_delete=soft_delete,
            pool_max_size=2,
        )

    def sink(self) -> Sink:
        return build_sink(self.config, name=self.kind)

    async def read(self, table: TableSchema) -> dict[tuple[Any, ...], dict[str, Any]]:
        columns = _compare_columns(table, self.soft_delete)
        async with await psycopg.AsyncConnection.connect(self.dsn) as conn:
            exists = await (
                await conn.execute("SELECT to_regclass(%s)", [f'"{self.schema}"."{table.id.table}"'])
            ).fetchone()
            if exists is None or exists[0] is None:
                return {}
            select = ", ".join(f'"{c}"' for c in columns)
            cursor = await conn.execute(f'SELECT {select} FROM "{self.schema}"."{table.id.table}"')
            rows = await cursor.fetchall()
        out = {}
        for values in rows:
            row = _normalized(dict(zip(columns, values, strict=True)))
            out[tuple(row[k] for k in table.primary_key)] = row
        return out

    async def cleanup(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')


class DeltaHarness(Harness):
    buffering = True

    def __init__(self, uri: str, s3: S3Storage | None, kind: str, soft_delete: bool = False) -> None:
        self.kind = kind
        self.soft_delete = soft_delete
        self.config = DeltaSinkConfig(
            uri=uri, s3=s3 or S3Storage(), commit_interval_s=3600, soft_delete=soft_delete
        )

    def sink(self) -> Sink:
        return build_sink(self.config, name=self.kind)

    async def read(self, table: TableSchema) -> dict[tuple[Any, ...], dict[str, Any]]:
        from branchline.sinks._batch import render
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        uri = self.config.uri.rstrip("/") + "/" + render(self.config.table_path, table.id)
        try:
            delta = DeltaTable(
                uri, storage_options=self.config.s3.storage_options() if uri.startswith("s3") else None
            )
        except TableNotFoundError:
            return {}
        columns = _compare_columns(table, self.soft_delete)
        arrow = delta.to_pyarrow_table(columns=columns)
        out = {}
        json_columns = {c.name for c in table.columns if c.type.value == "json"}
        for row in arrow.to_pylist():
            for name in json_columns:
                if row[name] is not None:
                    row[name] = orjson.loads(row[name])
            row = _normalized(row)
            out[tuple(row[k] for k in table.primary_key)] = row
        return out


HARNESS_KINDS = ["postgres", "postgres-soft", "delta-local", "delta-local-soft", "delta-s3"]


@pytest.fixture(params=HARNESS_KINDS)
def harness(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Harness]:
    kind = request.param
    if kind.startswith("postgres"):
        cloud = request.getfixturevalue("cloud")
        h: Harness = PostgresHarness(cloud.host, cloud.port, soft_delete=kind == "postgres-soft")
    elif kind.startswith("delta-local"):
        pytest.importorskip("deltalake")
        h = DeltaHarness(str(tmp_path / "lake"), None, kind, soft_delete=kind.endswith("-soft"))
    else:
        s3 = request.getfixturevalue("s3_server")
        h = DeltaHarness(f"s3://{s3['bucket']}/{uuid.uuid4().hex[:10]}", s3["storage"], kind)
    yield h
    asyncio.run(h.cleanup())
