"""Delta sink on a local path and on a real S3-compatible server (moto server mode): commits on an
interval, partitioning, every column type, branch fan-in, and `branchline lake compact/vacuum`."""

from __future__ import annotations

import asyncio
import time
import types
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

pytest.importorskip("deltalake")

from branchline.errors import RetryableSinkError
from branchline.events import ChangeEvent, Column, ColumnType, Json, Op, TableId, TableSchema
from branchline.sinks.build import build_sink
from branchline.sinks.config import DeltaSinkConfig, S3Storage
from branchline.sinks.delta.cli import lake
from deltalake import DeltaTable

pytestmark = pytest.mark.integration

ITEMS = TableSchema(
    id=TableId(source="erp", branch="b1", database="erp", table="items"),
    columns=(
        Column(name="id", type=ColumnType.INT32, nullable=False),
        Column(name="region", type=ColumnType.STRING),
        Column(name="price", type=ColumnType.DECIMAL, precision=10, scale=2),
    ),
    primary_key=("id",),
)


def item(
    position: int, id_: int, region: str = "eu", price: str = "1.00", op: Op = Op.CREATE, branch: str = "b1"
) -> ChangeEvent:
    row = {"id": id_, "region": region, "price": Decimal(price)}
    table = ITEMS.id.model_copy(update={"branch": branch})
    return ChangeEvent(
        op=op, table=table, key={"id": id_}, after=row, position=position, source_ts=datetime.now(UTC)
    )


def rows(
    uri: str, storage: dict[str, str] | None = None, columns: list[str] | None = None
) -> list[dict[str, Any]]:
    table = DeltaTable(uri, storage_options=storage).to_pyarrow_table(columns=columns)
    return sorted(table.to_pylist(), key=lambda r: (r.get("_bl_branch") or "", r["id"]))


def test_changes_are_committed_on_flush_or_interval_not_per_batch(tmp_path: Path) -> None:
    uri = str(tmp_path / "lake")
    table_uri = f"{uri}/erp/items"

    async def scenario() -> None:
        sink = build_sink(DeltaSinkConfig(uri=uri, commit_interval_s=3600))
        assert sink.capabilities.durable_on_write is False and sink.capabilities.commit_interval_s == 3600
        await sink.write_batch(ITEMS, [item(1, 1)])
        await sink.write_batch(ITEMS, [item(2, 2)])
        assert not DeltaTable.is_deltatable(table_uri)  # nothing committed yet
        await sink.flush()
        assert DeltaTable(table_uri).version() == 1 and len(rows(table_uri)) == 2  # create + one merge
        await sink.flush()  # nothing buffered: no new version
        assert DeltaTable(table_uri).version() == 1
        await sink.close()

        eager = build_sink(DeltaSinkConfig(uri=uri, commit_interval_s=0))
        await eager.write_batch(ITEMS, [item(3, 3)])  # the interval has passed: commits now
        assert DeltaTable(table_uri).version() == 2
        await eager.close()

        bounded = build_sink(DeltaSinkConfig(uri=uri, commit_interval_s=3600, max_buffered_rows=2))
        await bounded.write_batch(ITEMS, [item(4, 4)])
        assert DeltaTable(table_uri).version() == 2
        await bounded.write_batch(ITEMS, [item(5, 5)])  # the buffer is full: commits now
        assert DeltaTable(table_uri).version() == 3
        await bounded.close()

    asyncio.run(scenario())
    assert [r["id"] for r in rows(table_uri)] == [1, 2, 3, 4, 5]


def test_partitioned_table(tmp_path: Path) -> None:
    uri = str(tmp_path / "lake")

    async def scenario() -> None:
        sink = build_sink(DeltaSinkConfig(uri=uri, partition_by=("region",)))
        await sink.write_batch(
            ITEMS, [item(1, 1, "eu"), item(2, 2, "us"), item(3, 1, "us", "2.00", Op.UPDATE)]
        )
        await sink.flush()

    asyncio.run(scenario())
    table = DeltaTable(f"{uri}/erp/items")
    assert table.metadata().partition_columns == ["region"]
    assert {p["region"] for p in table.partitions()} == {"us"}
    assert [(r["id"], r["region"], r["price"]) for r in rows(f"{uri}/erp/items")] == [
        (1, "us", Decimal("2.00")),
        (2, "us", Decimal("1.00")),
    ]


def test_branch_key_keeps_branches_apart(tmp_path: Path) -> None:
    uri = str(tmp_path / "lake")

    async def scenario() -> None:
        sink = build_sink(DeltaSinkConfig(uri=uri, branch_key=True, table_path="{database}/{table}"))
        await sink.write_batch(ITEMS, [item(1, 1, "paris"), item(2, 2, "paris")])
        await sink.write_batch(ITEMS, [item(1, 1, "lyon", branch="b2")])
        await sink.write_batch(ITEMS, [ChangeEvent(op=Op.TRUNCATE, table=ITEMS.id, key={}, position=5)])
        await sink.write_batch(ITEMS, [item(6, 3, "paris new"), item(4, 2, "too old")])
        await sink.flush()

    asyncio.run(scenario())
    assert [(r["_bl_branch"], r["id"], r["region"]) for r in rows(f"{uri}/erp/items")] == [
        ("b1", 3, "paris new"),
        ("b2", 1, "lyon"),
    ]


ALL_TYPES = TableSchema(
    id=TableId(source="erp", branch="b1", database="erp", table="all_types"),
    columns=(
        Column(name="id", type=ColumnType.INT64, nullable=False),
        Column(name="flag", type=ColumnType.BOOLEAN),
        Column(name="small", type=ColumnType.INT16),
        Column(name="ubig", type=ColumnType.UINT64),
        Column(name="amount", type=ColumnType.DECIMAL, precision=38, scale=10),
        Column(name="anyscale", type=ColumnType.DECIMAL),
        Column(name="f64", type=ColumnType.FLOAT64),
        Column(name="raw", type=ColumnType.BYTES),
        Column(name="day", type=ColumnType.DATE),
        Column(name="dur", type=ColumnType.TIME),
        Column(name="local", type=ColumnType.TIMESTAMP),
        Column(name="instant", type=ColumnType.TIMESTAMPTZ),
        Column(name="doc", type=ColumnType.JSON),
        Column(name="uid", type=ColumnType.UUID),
        Column(name="tags", type=ColumnType.SET),
        Column(name="bits", type=ColumnType.BITS, length=10),
        Column(name="yr", type=ColumnType.YEAR),
    ),
    primary_key=("id",),
)


def test_every_column_type_is_stored_without_loss(tmp_path: Path) -> None:
    uri = str(tmp_path / "lake")
    u = uuid.UUID("12345678-1234-5678-1234-567812345678")
    row = {
        "id": -(2**63),
        "flag": False,
        "small": 32767,
        "ubig": 2**64 - 1,
        "amount": Decimal("1234567890123456789012345678.0123456789"),
        "anyscale": Decimal("-1E-30"),
        "f64": -0.1,
        "raw": b"\x00\xff",
        "day": date(2026, 2, 28),
        "dur": timedelta(hours=-838, minutes=-59, seconds=-59),
        "local": datetime(1970, 1, 1, 0, 0, 0, 1),
        "instant": datetime(2026, 3, 29, 1, 30, tzinfo=UTC),
        "doc": Json({"a": [1, Decimal("2.50")], "b": None}),
        "uid": u,
        "tags": ["red", "blue"],
        "bits": 0b1000000001,
        "yr": 1901,
    }

    async def scenario() -> None:
        sink = build_sink(DeltaSinkConfig(uri=uri))
        event = ChangeEvent(op=Op.CREATE, table=ALL_TYPES.id, key={"id": row["id"]}, after=row, position=1)
        await sink.write_batch(ALL_TYPES, [event])
        await sink.flush()

    asyncio.run(scenario())
    (got,) = rows(f"{uri}/erp/all_types", columns=[c.name for c in ALL_TYPES.columns])
    assert got == row | {
        "ubig": Decimal(2**64 - 1),
        "anyscale": "-1E-30",
        "dur": -(838 * 3600 + 59 * 60 + 59) * 10**6,
        "instant": got["instant"],
        "doc": '{"a":[1,2.50],"b":null}',
        "uid": str(u),
        "bits": "1000000001",
    }
    assert got["instant"] == row["instant"]


def test_lake_compact_and_vacuum(tmp_path: Path) -> None:
    uri = str(tmp_path / "lake")

    async def scenario() -> None:
        sink = build_sink(DeltaSinkConfig(uri=uri))
        for n in range(1, 6):
            await sink.write_batch(ITEMS, [item(n, n)])
            await sink.flush()

    asyncio.run(scenario())
    table_uri = f"{uri}/erp/items"
    before = len(DeltaTable(table_uri).file_uris())
    runner = CliRunner()
    result = runner.invoke(lake, ["compact", "--uri", uri], catch_exceptions=False)
    assert result.exit_code == 0 and "erp/items: " in result.output
    assert len(DeltaTable(table_uri).file_uris()) == 1 < before
    parquet = lambda: {p.name for p in Path(table_uri).glob("*.parquet")}
    on_disk = len(parquet())
    result = runner.invoke(
        lake,
        ["vacuum", "--uri", uri, "--table", "erp/items", "--retention-hours", "0"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0 and f"deleted {on_disk - 1} files" in result.output
    assert len(parquet()) == 1
    assert [r["id"] for r in rows(table_uri)] == [1, 2, 3, 4, 5]  # compaction and vacuum change no row


# --- S3 ------------------------------------------------------------------------------------------


def test_s3_objects_land_in_the_bucket_and_credentials_may_come_from_env(
    s3_server: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    s3 = s3_server  # the session's moto server (tests/conftest.py)
    prefix = f"p{uuid.uuid4().hex[:8]}"
    # nothing in the pipeline file but the endpoint: region and keys come from the environment
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    config = DeltaSinkConfig(
        uri=f"s3://lake/{prefix}", s3=S3Storage(endpoint_url=s3["endpoint"], allow_http=True)
    )

    async def scenario() -> None:
        sink = build_sink(config)
        await sink.write_batch(ITEMS, [item(1, 1), item(2, 2), item(3, 1, price="3.00", op=Op.UPDATE)])
        await sink.write_batch(
            ITEMS, [ChangeEvent(op=Op.DELETE, table=ITEMS.id, key={"id": 2}, before={"id": 2}, position=4)]
        )
        await sink.flush()

    asyncio.run(scenario())
    keys = {o["Key"] for o in s3["client"].list_objects_v2(Bucket="lake", Prefix=prefix)["Contents"]}
    assert f"{prefix}/erp/items/_delta_log/00000000000000000000.json" in keys
    assert any(k.startswith(f"{prefix}/erp/items/") and k.endswith(".parquet") for k in keys)
    assert any(
        k.startswith(f"{prefix}/erp/_bl_meta/items/_delta_log/") for k in keys
    )  # the tombstone of id 2
    got = rows(
        f"s3://lake/{prefix}/erp/items",
        config.s3.storage_options()
        | {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"},
    )
    assert [(r["id"], r["price"], int(r["_bl_position"])) for r in got] == [(1, Decimal("3.00"), 3)]

    # the CLI with a bare --uri takes the endpoint from the environment too
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3["endpoint"])
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    result = CliRunner().invoke(
        lake, ["compact", "--uri", f"s3://lake/{prefix}", "--table", "erp/items"], catch_exceptions=False
    )
    assert result.exit_code == 0 and "erp/items" in result.output


def test_unreachable_object_store_is_a_bounded_retryable_error() -> None:
    """Connection refused on the S3 endpoint: delta-rs gives up within its bounded request retries and
    the sink's own retries, and the caller gets a retryable error naming the cause."""
    config = DeltaSinkConfig(
        uri="s3://lake/down",
        s3=S3Storage(
            endpoint_url="http://127.0.0.1:1",
            region="us-east-1",
            access_key_id="a",
            secret_access_key="b",
            allow_http=True,
            max_retries=1,
            retry_timeout_s=2,
        ),
        max_attempts=2,
        retry_backoff_s=0,
    )

    async def scenario() -> None:
        sink = build_sink(config)
        await sink.write_batch(ITEMS, [item(1, 1)])
        try:
            await sink.flush()
        finally:
            await sink.close()

    started = time.monotonic()
    with pytest.raises(RetryableSinkError, match="Connection refused"):
        asyncio.run(scenario())
    assert time.monotonic() - started < 30


# --- interval commits: the sink's side of "acknowledge only after flush" ---------------------------


def test_commit_landed_but_never_acknowledged_then_replayed_changes_nothing(tmp_path: Path) -> None:
    """The process dies after `flush` committed but before the runtime acknowledged: a new sink receives
    the same batches again (plus newer ones) and the table ends as if each change was applied once."""
    uri = str(tmp_path / "lake")
    table_uri = f"{uri}/erp/items"
    batch1 = [item(1, 1), item(2, 2)]
    batch2 = [item(3, 1, price="3.00", op=Op.UPDATE), item(4, 3)]
    batch3 = [item(5, 2, price="5.00", op=Op.UPDATE)]

    async def scenario() -> None:
        first = build_sink(DeltaSinkConfig(uri=uri, commit_interval_s=3600))
        await first.write_batch(ITEMS, batch1)
        await first.write_batch(ITEMS, batch2)
        await first.flush()  # committed; the acknowledgement never happens
        await first.close()
        second = build_sink(DeltaSinkConfig(uri=uri, commit_interval_s=3600))
        for batch in (batch1, batch2, batch3):  # everything after the last acknowledgement, again
            await second.write_batch(ITEMS, batch)
        await second.flush()
        await second.close()

    asyncio.run(scenario())
    got = [(r["id"], r["price"], int(r["_bl_position"])) for r in rows(table_uri)]
    assert got == [(1, Decimal("3.00"), 3), (2, Decimal("5.00"), 5), (3, Decimal("1.00"), 4)]


def test_many_batches_of_several_tables_make_one_commit_per_table_per_flush(tmp_path: Path) -> None:
    """What the runtimes do with an interval sink: many `write_batch` calls, then one `flush`."""
    uri = str(tmp_path / "lake")
    other = ITEMS.model_copy(update={"id": ITEMS.id.model_copy(update={"table": "other"})})

    async def scenario() -> None:
        sink = build_sink(DeltaSinkConfig(uri=uri, commit_interval_s=3600))
        for n in range(1, 11):
            await sink.write_batch(ITEMS, [item(n, n)])
            await sink.write_batch(other, [item(n, n).model_copy(update={"table": other.id})])
        assert not DeltaTable.is_deltatable(f"{uri}/erp/items")
        await sink.flush()
        await sink.close()

    asyncio.run(scenario())
    for name in ("items", "other"):
        assert DeltaTable(f"{uri}/erp/{name}").version() == 1  # created, then one merge
        assert [r["id"] for r in rows(f"{uri}/erp/{name}")] == list(range(1, 11))


def test_failed_flush_keeps_the_buffer_and_a_replay_does_not_buffer_it_twice(
    s3_server: dict[str, Any], cuttable_proxy: Any
) -> None:
    """The object store goes away during `flush`: the error is retryable, nothing is lost from the buffer,
    the runtime's replay of the unacknowledged batches is not buffered twice (with room for only one
    copy, a second copy would force a commit and fail here), and once the store is back one `flush`
    commits every change exactly once."""
    upstream = s3_server["endpoint"].rsplit(":", 1)
    proxy = cuttable_proxy(types.SimpleNamespace(host="127.0.0.1", port=int(upstream[1])))
    storage = s3_server["storage"].model_copy(
        update={"endpoint_url": f"http://127.0.0.1:{proxy.port}", "max_retries": 0, "retry_timeout_s": 1}
    )
    prefix = f"p{uuid.uuid4().hex[:8]}"
    config = DeltaSinkConfig(
        uri=f"s3://lake/{prefix}",
        s3=storage,
        commit_interval_s=3600,
        max_buffered_rows=5,
        max_attempts=1,
    )
    batch1 = [item(1, 1), item(2, 2)]
    batch2 = [item(3, 1, price="3.00", op=Op.UPDATE), item(4, 3)]

    async def scenario() -> None:
        sink = build_sink(config)
        try:
            await sink.write_batch(ITEMS, batch1)
            await sink.write_batch(ITEMS, batch2)
            proxy.cut()
            with pytest.raises(RetryableSinkError):
                await sink.flush()
            for batch in (batch1, batch2):  # the runtime writes what it had not acknowledged again
                await sink.write_batch(ITEMS, batch)
            proxy.restore()
            await sink.flush()
        finally:
            await sink.close()

    asyncio.run(scenario())
    table_uri = f"s3://lake/{prefix}/erp/items"
    got = [
        (r["id"], r["price"], int(r["_bl_position"])) for r in rows(table_uri, config.s3.storage_options())
    ]
    assert got == [(1, Decimal("3.00"), 3), (2, Decimal("1.00"), 2), (3, Decimal("1.00"), 4)]
    assert DeltaTable(table_uri, storage_options=config.s3.storage_options()).version() == 1
