"""PostgreSQL sink against the stack's cloud PostgreSQL: types, fan-in, keyless tables, schema changes,
errors that name the row, and a retry after the server kills the sink's connection mid-batch."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from branchline import metrics
from branchline.errors import FatalSinkError
from branchline.events import ChangeEvent, Column, ColumnType, Json, Op, TableId, TableSchema
from branchline.sinks.build import build_sink
from branchline.sinks.config import PostgresSinkConfig

pytestmark = pytest.mark.integration


@pytest.fixture
def target(cloud: Any) -> Iterator[dict[str, Any]]:
    """A fresh schema in the cloud database, dropped afterwards."""
    schema = f"it_{uuid.uuid4().hex[:10]}"
    dsn = f"host={cloud.host} port={cloud.port} user=postgres dbname=cloud"
    yield {"schema": schema, "dsn": dsn, "host": cloud.host, "port": cloud.port}
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def config(target: dict[str, Any], **options: Any) -> PostgresSinkConfig:
    return PostgresSinkConfig(
        host=target["host"], port=target["port"], database="cloud", schema=target["schema"], **options
    )


def fetch(target: dict[str, Any], query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(target["dsn"]) as conn:
        conn.execute(f'SET search_path TO "{target["schema"]}"')
        return conn.execute(query).fetchall()


def tid(table: str, branch: str = "b1") -> TableId:
    return TableId(source="erp", branch=branch, database="erp", table=table)


def change(
    table: TableSchema, op: Op, position: int, row: dict[str, Any], branch: str | None = None
) -> ChangeEvent:
    table_id = table.id if branch is None else table.id.model_copy(update={"branch": branch})
    key = {k: row[k] for k in table.primary_key} if table.primary_key else dict(row)
    image = {"before": row} if op is Op.DELETE else {"after": row}
    return ChangeEvent(
        op=op, table=table_id, key=key, position=position, source_ts=datetime.now(UTC), **image
    )


async def write(cfg: PostgresSinkConfig, table: TableSchema, *batches: list[ChangeEvent]) -> None:
    sink = build_sink(cfg)
    try:
        for batch in batches:
            await sink.write_batch(table, batch)
    finally:
        await sink.close()


ALL_TYPES = TableSchema(
    id=tid("all_types"),
    columns=(
        Column(name="id", type=ColumnType.INT32, nullable=False),
        Column(name="flag", type=ColumnType.BOOLEAN),
        Column(name="small", type=ColumnType.INT16),
        Column(name="big", type=ColumnType.INT64),
        Column(name="ubig", type=ColumnType.UINT64, source_type="bigint unsigned"),
        Column(name="amount", type=ColumnType.DECIMAL, precision=38, scale=10),
        Column(name="anyscale", type=ColumnType.DECIMAL),
        Column(name="f32", type=ColumnType.FLOAT32),
        Column(name="f64", type=ColumnType.FLOAT64),
        Column(name="txt", type=ColumnType.STRING),
        Column(name="raw", type=ColumnType.BYTES),
        Column(name="day", type=ColumnType.DATE),
        Column(name="dur", type=ColumnType.TIME, source_type="time(6)"),
        Column(name="local", type=ColumnType.TIMESTAMP, precision=6),
        Column(name="instant", type=ColumnType.TIMESTAMPTZ, precision=3),
        Column(name="span", type=ColumnType.INTERVAL),
        Column(name="doc", type=ColumnType.JSON),
        Column(name="uid", type=ColumnType.UUID),
        Column(name="state", type=ColumnType.ENUM),
        Column(name="tags", type=ColumnType.SET),
        Column(name="bits", type=ColumnType.BITS, length=10),
        Column(name="yr", type=ColumnType.YEAR),
        Column(name="names", type=ColumnType.STRING_ARRAY),
    ),
    primary_key=("id",),
)


def test_every_column_type_round_trips_exactly(target: dict[str, Any]) -> None:
    u = uuid.UUID("12345678-1234-5678-1234-567812345678")
    rows = [
        {
            "id": 1,
            "flag": True,
            "small": -32768,
            "big": -(2**63),
            "ubig": 2**64 - 1,
            "amount": Decimal("1234567890123456789012345678.0123456789"),
            "anyscale": Decimal("-0.000000000000000000000001"),
            "f32": 1.5,
            "f64": 1e308,
            "txt": "žluťoučký kůň ✓",
            "raw": b"\x00\xff\x10",
            "day": date(1, 1, 1),
            "dur": timedelta(hours=-838, minutes=-59, seconds=-59),
            "local": datetime(9999, 12, 31, 23, 59, 59, 999999),
            "instant": datetime(2026, 3, 29, 1, 30, 0, 123000, tzinfo=UTC),
            "span": timedelta(days=40, microseconds=1),
            "doc": Json({"a": [1, 2.5, None], "b": {"c": "d"}}),
            "uid": str(u),
            "state": "shipped",
            "tags": ["red", "blue"],
            "bits": 0b1000000001,
            "yr": 2155,
            "names": ["x", "y,z"],
        },
        {c.name: None for c in ALL_TYPES.columns} | {"id": 2, "doc": Json(None), "bits": b"\x02\x01"},
        {c.name: None for c in ALL_TYPES.columns}
        | {"id": 3, "bits": "0000000011", "tags": "a,b", "uid": u.bytes},
    ]
    asyncio.run(
        write(config(target), ALL_TYPES, [change(ALL_TYPES, Op.CREATE, i + 1, r) for i, r in enumerate(rows)])
    )
    names = [c.name for c in ALL_TYPES.columns]
    got = fetch(target, f"SELECT {', '.join(names)}, doc IS NULL FROM all_types ORDER BY id")
    first = dict(zip(names, got[0][:-1], strict=True))
    expected = dict(rows[0], doc={"a": [1, 2.5, None], "b": {"c": "d"}}, uid=u, bits="1000000001")
    assert first == expected
    assert got[1][names.index("doc")] is None and got[1][-1] is False  # JSON null stays a document
    assert got[1][names.index("bits")] == "1000000001"
    assert got[2][names.index("bits")] == "0000000011"
    assert got[2][names.index("tags")] == ["a", "b"] and got[2][names.index("uid")] == u
    types = dict(
        fetch(
            target,
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = 'all_types'::regclass AND attnum > 0",
        )
    )
    assert types["ubig"] == "numeric(20,0)" and types["amount"] == "numeric(38,10)"
    assert (
        types["local"] == "timestamp(6) without time zone"
        and types["instant"] == "timestamp(3) with time zone"
    )
    assert types["doc"] == "jsonb" and types["tags"] == "text[]" and types["bits"] == "bit varying(10)"
    assert types["dur"] == "interval" and types["state"] == "text"
    assert (
        types["_bl_position"] == "numeric(38,0)" and types["_bl_source_ts"] == "timestamp(6) with time zone"
    )


ITEMS = TableSchema(
    id=tid("items"),
    columns=(
        Column(name="id", type=ColumnType.INT32, nullable=False),
        Column(name="name", type=ColumnType.STRING),
        Column(name="price", type=ColumnType.DECIMAL, precision=10, scale=2),
    ),
    primary_key=("id",),
)


def item(id_: int, name: str, price: str = "1.00") -> dict[str, Any]:
    return {"id": id_, "name": name, "price": Decimal(price)}


def test_branch_key_keeps_branches_with_the_same_ids_apart(target: dict[str, Any]) -> None:
    cfg = config(target, branch_key=True)
    asyncio.run(
        write(
            cfg,
            ITEMS,
            [change(ITEMS, Op.CREATE, 1, item(1, "paris")), change(ITEMS, Op.CREATE, 2, item(2, "paris"))],
            [change(ITEMS, Op.CREATE, 1, item(1, "lyon"), branch="b2")],
            [change(ITEMS, Op.UPDATE, 5, item(1, "lyon v2"), branch="b2")],
            [ChangeEvent(op=Op.TRUNCATE, table=ITEMS.id, key={}, position=10)],  # truncates branch b1 only
            [change(ITEMS, Op.CREATE, 11, item(3, "paris new"))],
        )
    )
    assert fetch(target, "SELECT _bl_branch, id, name FROM items ORDER BY 1, 2") == [
        ("b1", 3, "paris new"),
        ("b2", 1, "lyon v2"),
    ]
    key = fetch(
        target,
        "SELECT array_agg(a.attname ORDER BY a.attnum) FROM pg_index i JOIN pg_attribute a"
        " ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) WHERE i.indrelid = 'items'::regclass"
        " AND i.indisprimary",
    )
    assert key == [(["_bl_branch", "id"],)]


def test_table_without_primary_key_is_kept_as_a_change_log(target: dict[str, Any]) -> None:
    log_table = TableSchema(id=tid("audit"), columns=ITEMS.columns, primary_key=())
    batch = [
        change(log_table, Op.CREATE, 1, item(1, "a")),
        change(log_table, Op.CREATE, 2, item(1, "a")),  # a duplicate row is legal without a key
        change(log_table, Op.DELETE, 3, item(1, "a")),
    ]
    deletes_only = [change(log_table, Op.DELETE, 4, item(2, "b"))]
    asyncio.run(write(config(target), log_table, batch, batch, deletes_only))
    assert fetch(target, "SELECT _bl_position, _bl_op, id, name FROM audit ORDER BY 1") == [
        (1, "c", 1, "a"),
        (2, "c", 1, "a"),
        (3, "d", 1, "a"),
        (4, "d", 2, "b"),
    ]


def test_new_columns_are_added_and_compatible_types_widened(target: dict[str, Any]) -> None:
    wider = TableSchema(
        id=ITEMS.id,
        columns=(
            Column(name="id", type=ColumnType.INT64, nullable=False),
            Column(name="name", type=ColumnType.STRING),
            Column(name="price", type=ColumnType.DECIMAL, precision=12, scale=4),
            Column(name="stock", type=ColumnType.UINT64),
        ),
        primary_key=("id",),
    )
    asyncio.run(
        write(
            config(target),
            ITEMS,
            [change(ITEMS, Op.CREATE, 1, item(1, "a", "12345678.99"))],
        )
    )
    asyncio.run(
        write(
            config(target),
            wider,
            [change(wider, Op.CREATE, 2, item(2**40, "b", "99999999.9999") | {"stock": 2**64 - 1})],
        )
    )
    types = dict(
        fetch(
            target,
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = 'items'::regclass AND attnum > 0",
        )
    )
    assert (types["id"], types["price"], types["stock"]) == ("bigint", "numeric(12,4)", "numeric(20,0)")
    assert fetch(target, "SELECT id, price, stock FROM items ORDER BY id") == [
        (1, Decimal("12345678.9900"), None),
        (2**40, Decimal("99999999.9999"), 2**64 - 1),
    ]
    narrower = TableSchema(id=ITEMS.id, columns=ITEMS.columns, primary_key=("id",))
    asyncio.run(write(config(target), narrower, [change(narrower, Op.UPDATE, 3, item(1, "still fits"))]))
    assert fetch(target, "SELECT name FROM items WHERE id = 1") == [("still fits",)]


def test_incompatible_type_change_stops_with_the_column_named(target: dict[str, Any]) -> None:
    asyncio.run(write(config(target), ITEMS, [change(ITEMS, Op.CREATE, 1, item(1, "a"))]))
    changed = TableSchema(
        id=ITEMS.id,
        columns=(ITEMS.columns[0], Column(name="name", type=ColumnType.INT32), ITEMS.columns[2]),
        primary_key=("id",),
    )
    with pytest.raises(FatalSinkError, match=r"items\.name.*'integer'.*'text'"):
        asyncio.run(
            write(config(target), changed, [change(changed, Op.UPDATE, 2, item(1, "a") | {"name": 5})])
        )


def test_bad_value_stops_the_batch_naming_table_key_and_position(target: dict[str, Any]) -> None:
    asyncio.run(write(config(target), ITEMS, [change(ITEMS, Op.CREATE, 1, item(1, "kept"))]))
    batch = [
        change(ITEMS, Op.UPDATE, 2, item(1, "not kept")),
        change(ITEMS, Op.CREATE, 3, item(7, "nul \x00 byte")),
    ]
    with pytest.raises(FatalSinkError) as raised:
        asyncio.run(write(config(target), ITEMS, batch))
    message = str(raised.value)
    assert "items" in message and "id=7" in message and "position 3" in message
    assert fetch(target, "SELECT id, name FROM items ORDER BY id") == [(1, "kept")]  # the batch is atomic


def test_numeric_overflow_is_fatal_and_names_the_batch(target: dict[str, Any]) -> None:
    with pytest.raises(FatalSinkError, match=r"items.*22003"):
        asyncio.run(
            write(config(target), ITEMS, [change(ITEMS, Op.CREATE, 1, item(1, "x", "123456789012.5"))])
        )


def test_connection_killed_mid_batch_is_retried(
    target: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The server terminates the sink's backend while its upsert waits on a lock; attempt 2 commits."""
    app = f"bl-kill-{uuid.uuid4().hex[:6]}"
    cfg = config(target, application_name=app, retry_backoff_s=0.2)
    asyncio.run(write(cfg, ITEMS, [change(ITEMS, Op.CREATE, 1, item(1, "a"))]))

    async def scenario() -> None:
        locker = await psycopg.AsyncConnection.connect(target["dsn"])
        await locker.execute(f'LOCK TABLE "{target["schema"]}".items IN ACCESS EXCLUSIVE MODE')
        sink = build_sink(cfg)
        try:
            writing = asyncio.create_task(
                sink.write_batch(ITEMS, [change(ITEMS, Op.UPDATE, 2, item(1, "b"))])
            )
            async with await psycopg.AsyncConnection.connect(target["dsn"], autocommit=True) as admin:
                for _ in range(100):
                    cursor = await admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE application_name = %s AND wait_event_type = 'Lock'",
                        [app],
                    )
                    if await cursor.fetchall():
                        break
                    await asyncio.sleep(0.05)
                else:
                    pytest.fail("the sink never waited on the lock")
            await locker.rollback()
            await writing
        finally:
            await locker.close()
            await sink.close()

    labels = {"component": "sink", "name": "default"}  # build_sink's default name
    retries_before = metrics.sample("branchline_retries_total", labels) or 0.0
    with caplog.at_level(logging.WARNING, logger="branchline.sinks.retry"):
        asyncio.run(scenario())
    assert fetch(target, "SELECT name, _bl_position FROM items") == [("b", 2)]
    assert any("attempt 1 of 5" in r.getMessage() and "57P01" in r.getMessage() for r in caplog.records)
    assert (metrics.sample("branchline_retries_total", labels) or 0.0) == retries_before + 1


def test_soft_delete_keeps_the_row_flagged(target: dict[str, Any]) -> None:
    asyncio.run(
        write(
            config(target, soft_delete=True),
            ITEMS,
            [change(ITEMS, Op.CREATE, 1, item(1, "a")), change(ITEMS, Op.CREATE, 2, item(2, "b"))],
            [change(ITEMS, Op.DELETE, 3, {"id": 1})],
        )
    )
    assert fetch(target, "SELECT id, name, _bl_deleted, _bl_op FROM items ORDER BY id") == [
        (1, "a", True, "d"),
        (2, "b", False, "c"),
    ]


def test_switching_branch_key_on_an_existing_table_is_refused(target: dict[str, Any]) -> None:
    asyncio.run(write(config(target), ITEMS, [change(ITEMS, Op.CREATE, 1, item(1, "a"))]))
    with pytest.raises(FatalSinkError, match="primary key"):
        asyncio.run(
            write(config(target, branch_key=True), ITEMS, [change(ITEMS, Op.CREATE, 2, item(2, "b"))])
        )


def test_times_outside_the_event_contract_are_normalized_not_rejected(target: dict[str, Any]) -> None:
    """An aware DATETIME or a naive TIMESTAMP makes psycopg refuse the fast path; the batch is written
    again with conversions: aware -> naive UTC wall time, naive -> read as UTC."""
    times = TableSchema(
        id=tid("times"),
        columns=(
            Column(name="id", type=ColumnType.INT32, nullable=False),
            Column(name="local", type=ColumnType.TIMESTAMP),
            Column(name="instant", type=ColumnType.TIMESTAMPTZ),
        ),
        primary_key=("id",),
    )
    plus2 = timezone(timedelta(hours=2))
    batch = [
        change(
            times,
            Op.CREATE,
            1,
            {"id": 1, "local": datetime(2026, 1, 1, 12), "instant": datetime(2026, 1, 1, 12, tzinfo=UTC)},
        ),
        change(
            times,
            Op.CREATE,
            2,
            {"id": 2, "local": datetime(2026, 1, 1, 12, tzinfo=plus2), "instant": datetime(2026, 1, 1, 12)},
        ),
    ]
    asyncio.run(
        write(
            config(target),
            times,
            batch,
            [change(times, Op.UPDATE, 3, {"id": 1, "local": datetime(2026, 1, 2), "instant": None})],
        )
    )
    assert fetch(target, "SELECT id, local, instant FROM times ORDER BY id") == [
        (1, datetime(2026, 1, 2), None),
        (2, datetime(2026, 1, 1, 10), datetime(2026, 1, 1, 12, tzinfo=UTC)),
    ]


def test_a_connection_keeps_few_staging_tables_however_many_tables_it_writes(target: dict[str, Any]) -> None:
    """Each commit empties every ON COMMIT DELETE ROWS table of the session, so the sink drops the least
    recently used staging tables beyond a few per connection, and creates them again when needed."""
    app = f"bl-stages-{uuid.uuid4().hex[:6]}"
    tables = [TableSchema(id=tid(f"t{i}"), columns=ITEMS.columns, primary_key=("id",)) for i in range(12)]

    async def scenario() -> int:
        sink = build_sink(config(target, application_name=app, pool_min_size=1, pool_max_size=1))
        try:
            for round_ in (1, 2):
                for table in tables:
                    # updates: insert-only batches COPY straight into the target, without staging
                    await sink.write_batch(
                        table, [change(table, Op.UPDATE, round_, item(round_, f"r{round_}"))]
                    )
            async with await psycopg.AsyncConnection.connect(target["dsn"]) as admin:
                cursor = await admin.execute(
                    "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE c.relname LIKE '\\_bl\\_stage\\_%%' AND n.nspname = (SELECT 'pg_temp_' || b"
                    " FROM pg_stat_get_backend_idset() b JOIN pg_stat_activity a"
                    " ON a.pid = pg_stat_get_backend_pid(b) WHERE a.application_name = %s)",
                    [app],
                )
                row = await cursor.fetchone()
                return int(row[0]) if row else -1
        finally:
            await sink.close()

    assert asyncio.run(scenario()) == 8
    for table in tables:
        assert fetch(target, f"SELECT id, name FROM {table.id.table} ORDER BY id") == [(1, "r1"), (2, "r2")]


def _staging_tables(dsn: str, app: str) -> int:
    """Staging tables the sink's pooled connection (named by application_name) holds right now."""
    with psycopg.connect(dsn) as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.relname LIKE '\\_bl\\_stage\\_%%' AND n.nspname = (SELECT 'pg_temp_' || b"
            " FROM pg_stat_get_backend_idset() b JOIN pg_stat_activity a"
            " ON a.pid = pg_stat_get_backend_pid(b) WHERE a.application_name = %s)",
            [app],
        ).fetchone()
    return int(row[0]) if row else -1


def test_new_rows_are_copied_straight_into_the_target_and_a_replay_falls_back_to_the_guarded_upsert(
    target: dict[str, Any],
) -> None:
    """Insert-only batches that no tombstone or truncate mark can guard off skip the staging table; when
    their keys exist after all (a replay after a crash), the batch is written through the guarded upsert
    and no newer row moves back."""
    app = f"bl-direct-{uuid.uuid4().hex[:6]}"
    inserts = [change(ITEMS, Op.CREATE, i, item(i, f"v{i}")) for i in range(1, 6)]

    async def scenario() -> tuple[int, int]:
        sink = build_sink(config(target, application_name=app, pool_min_size=1, pool_max_size=1))
        try:
            await sink.write_batch(ITEMS, inserts)
            direct = await asyncio.to_thread(_staging_tables, target["dsn"], app)
            await sink.write_batch(ITEMS, [change(ITEMS, Op.UPDATE, 10, item(2, "newer"))])
            await sink.write_batch(ITEMS, inserts)  # the replay: every key is stored
            await sink.write_batch(ITEMS, [change(ITEMS, Op.CREATE, 11, item(6, "after"))])
            staged = await asyncio.to_thread(_staging_tables, target["dsn"], app)
            return direct, staged
        finally:
            await sink.close()

    direct, staged = asyncio.run(scenario())
    assert direct == 0  # the first batch never made a staging table
    assert staged == 1
    assert fetch(
        target, "SELECT id, name, _bl_position, _bl_op, _bl_synced_at IS NOT NULL FROM items ORDER BY id"
    ) == [
        (1, "v1", 1, "c", True),
        (2, "newer", 10, "u", True),
        (3, "v3", 3, "c", True),
        (4, "v4", 4, "c", True),
        (5, "v5", 5, "c", True),
        (6, "after", 11, "c", True),
    ]


def test_direct_copy_stores_every_type_as_the_staged_upsert_does(target: dict[str, Any]) -> None:
    """The same rows as inserts (COPY straight into the target) and as updates (staging + upsert) end as
    identical tables. BIT columns are staged as text, so such tables always take the staging path."""
    columns = tuple(c for c in ALL_TYPES.columns if c.type is not ColumnType.BITS)
    direct = TableSchema(id=tid("direct_types"), columns=columns, primary_key=("id",))
    staged = TableSchema(id=tid("staged_types"), columns=columns, primary_key=("id",))
    u = uuid.UUID("12345678-1234-5678-1234-567812345678")
    full = {
        "id": 1,
        "flag": False,
        "small": 7,
        "big": 2**62,
        "ubig": 2**64 - 1,
        "amount": Decimal("-1.5"),
        "anyscale": Decimal("1e-20"),
        "f32": -0.25,
        "f64": 3.5,
        "txt": "a\tb\nc",
        "raw": b"\x00\x01",
        "day": date(2026, 2, 28),
        "dur": timedelta(hours=30),
        "local": datetime(2026, 1, 1, 8, 30),
        "instant": datetime(2026, 1, 1, 8, 30, tzinfo=timezone(timedelta(hours=2))),
        "span": timedelta(days=-1),
        "doc": Json([1, {"x": None}]),
        "uid": u,
        "state": "open",
        "tags": ["a"],
        "yr": 1901,
        "names": [],
    }
    rows = [full, {c.name: None for c in columns} | {"id": 2}]
    asyncio.run(
        write(
            config(target),
            direct,
            [change(direct, Op.CREATE, i + 1, r) for i, r in enumerate(rows)],
        )
    )
    asyncio.run(
        write(
            config(target),
            staged,
            [change(staged, Op.UPDATE, i + 1, r) for i, r in enumerate(rows)],
        )
    )
    names = ", ".join(c.name for c in columns)
    got_direct = fetch(target, f"SELECT {names}, _bl_position, doc IS NULL FROM direct_types ORDER BY id")
    got_staged = fetch(target, f"SELECT {names}, _bl_position, doc IS NULL FROM staged_types ORDER BY id")
    assert got_direct == got_staged
    first = dict(zip([c.name for c in columns], got_direct[0], strict=False))
    expected = dict(full, doc=[1, {"x": None}], instant=datetime(2026, 1, 1, 6, 30, tzinfo=UTC))
    assert first == expected
    assert got_direct[1][: len(columns)] == (2,) + (None,) * (len(columns) - 1)


def test_a_table_made_before_the_direct_copy_gets_its_sync_time_default(target: dict[str, Any]) -> None:
    """Tables created by an older sink have no DEFAULT on `_bl_synced_at`; the sink adds it, so the
    direct COPY still stamps every row."""
    asyncio.run(write(config(target), ITEMS, [change(ITEMS, Op.UPDATE, 1, item(1, "old"))]))
    with psycopg.connect(target["dsn"], autocommit=True) as conn:
        conn.execute(f'ALTER TABLE "{target["schema"]}".items ALTER COLUMN _bl_synced_at DROP DEFAULT')
    asyncio.run(write(config(target), ITEMS, [change(ITEMS, Op.CREATE, 2, item(2, "new"))]))
    assert fetch(target, "SELECT id, name, _bl_synced_at IS NOT NULL FROM items ORDER BY id") == [
        (1, "old", True),
        (2, "new", True),
    ]


def _tombstones(target: dict[str, Any]) -> list[tuple[Any, ...]]:
    return fetch(target, "SELECT id, _bl_position FROM _bl_del_items ORDER BY id")


def _age_tombstones(target: dict[str, Any], ids: list[int], hours: float) -> None:
    with psycopg.connect(target["dsn"], autocommit=True) as conn:
        conn.execute(
            f'UPDATE "{target["schema"]}"._bl_del_items'
            " SET _bl_synced_at = now() - make_interval(secs => %s) WHERE id = ANY(%s)",
            [hours * 3600, ids],
        )


def test_tombstones_older_than_the_retention_are_pruned_and_newer_ones_still_guard(
    target: dict[str, Any],
) -> None:
    """Pruning removes tombstones written more than `tombstone_retention_h` ago (by sync time) and keeps
    the rest, which still stop a late older change from resurrecting its row."""
    cfg = config(target, tombstone_retention_h=24, tombstone_prune_interval_s=0)

    async def scenario() -> list[tuple[Any, ...]]:
        sink = build_sink(cfg)
        try:
            await sink.write_batch(ITEMS, [change(ITEMS, Op.CREATE, i, item(i, f"v{i}")) for i in (1, 2, 3)])
            await sink.write_batch(ITEMS, [change(ITEMS, Op.DELETE, 10 + i, item(i, "")) for i in (1, 2, 3)])
            before = await asyncio.to_thread(_tombstones, target)
            await asyncio.to_thread(_age_tombstones, target, [1, 2], 25)  # past the retention
            await asyncio.to_thread(_age_tombstones, target, [3], 23)  # not yet
            await sink.write_batch(ITEMS, [change(ITEMS, Op.CREATE, 20, item(4, "v4"))])  # prunes after it
            # late older changes: key 3 is still guarded; key 1's protection is gone by design
            await sink.write_batch(
                ITEMS,
                [
                    change(ITEMS, Op.UPDATE, 5, item(3, "stale")),
                    change(ITEMS, Op.UPDATE, 5, item(1, "stale")),
                ],
            )
            return before
        finally:
            await sink.close()

    before = asyncio.run(scenario())
    assert before == [(1, 11), (2, 12), (3, 13)]
    assert _tombstones(target) == [(3, 13)]
    assert fetch(target, "SELECT id, name FROM items ORDER BY id") == [(1, "stale"), (4, "v4")]


def test_tombstones_are_pruned_at_most_once_per_interval_and_never_without_a_retention(
    target: dict[str, Any],
) -> None:
    async def scenario(cfg: PostgresSinkConfig, age_between_batches: bool) -> None:
        sink = build_sink(cfg)
        try:
            await sink.write_batch(ITEMS, [change(ITEMS, Op.DELETE, 1, item(1, ""))])  # prunes (nothing old)
            if age_between_batches:
                await asyncio.to_thread(_age_tombstones, target, [1], 1000)
            await sink.write_batch(ITEMS, [change(ITEMS, Op.CREATE, 2, item(2, "v2"))])
        finally:
            await sink.close()

    asyncio.run(scenario(config(target, tombstone_retention_h=1, tombstone_prune_interval_s=3600), True))
    assert _tombstones(target) == [(1, 1)]  # old now, but the interval has not passed
    asyncio.run(scenario(config(target, tombstone_retention_h=None, tombstone_prune_interval_s=0), True))
    assert _tombstones(target) == [(1, 1)]  # no retention: kept forever
    asyncio.run(scenario(config(target, tombstone_retention_h=1, tombstone_prune_interval_s=0), False))
    assert _tombstones(target) == []  # a new sink prunes on its first batch of the table


def test_a_tombstone_table_made_before_pruning_gets_its_sync_time(target: dict[str, Any]) -> None:
    """Tombstone tables of an older sink have no `_bl_synced_at`: it is added, existing tombstones count
    as written at that moment (kept for a full retention), and pruning works from then on."""
    asyncio.run(write(config(target), ITEMS, [change(ITEMS, Op.DELETE, 1, item(1, ""))]))
    with psycopg.connect(target["dsn"], autocommit=True) as conn:
        conn.execute(f'ALTER TABLE "{target["schema"]}"._bl_del_items DROP COLUMN _bl_synced_at')
    cfg = config(target, tombstone_retention_h=1, tombstone_prune_interval_s=0)
    asyncio.run(write(cfg, ITEMS, [change(ITEMS, Op.DELETE, 2, item(2, ""))]))
    assert _tombstones(target) == [(1, 1), (2, 2)]
    _age_tombstones(target, [1], 2)
    asyncio.run(write(cfg, ITEMS, [change(ITEMS, Op.CREATE, 3, item(3, "v3"))]))
    assert _tombstones(target) == [(2, 2)]


PLAIN = TableSchema(
    id=tid("plain"),
    columns=(
        Column(name="id", type=ColumnType.INT32, nullable=False),
        Column(name="note", type=ColumnType.STRING),
        Column(name="price", type=ColumnType.DECIMAL, precision=10, scale=2),
        Column(name="flag", type=ColumnType.BOOLEAN),
        Column(name="dur", type=ColumnType.TIME),
        Column(name="raw", type=ColumnType.BYTES),
    ),
    primary_key=("id",),
)


@pytest.mark.parametrize("soft_delete", [False, True])
def test_unchanged_values_in_columns_without_a_converter_keep_the_stored_values(
    target: dict[str, Any], soft_delete: bool
) -> None:
    """Such columns take the fast path: `UNCHANGED` is found by identity where psycopg would accept it
    (boolean, interval) and through the encoder's refusal elsewhere; either way the stored value stays.
    An insert carrying one cannot COPY straight into the target and is restaged."""
    from branchline.events import UNCHANGED

    def row(id_: int, **values: Any) -> dict[str, Any]:
        base = {
            "id": id_,
            "note": "n",
            "price": Decimal("1.00"),
            "flag": True,
            "dur": timedelta(hours=1),
            "raw": b"r",
        }
        return base | values

    # stored values differ from what a dumper would make of the sentinel (a truthy object is True)
    first = [change(PLAIN, Op.CREATE, i, row(i, note=f"note {i}", flag=False)) for i in (1, 2, 3, 4)]
    updates = [
        change(PLAIN, Op.UPDATE, 11, row(1, note=UNCHANGED, price=Decimal("2.00"))),
        change(PLAIN, Op.UPDATE, 12, row(2, flag=UNCHANGED, dur=UNCHANGED, note="two")),
        change(PLAIN, Op.UPDATE, 13, row(3, price=UNCHANGED, raw=UNCHANGED, flag=False)),
        change(PLAIN, Op.UPDATE, 14, row(4, dur=timedelta(hours=4))),
    ]
    late_insert = [change(PLAIN, Op.CREATE, 15, row(5, note=UNCHANGED))]  # never stored: NULL
    asyncio.run(write(config(target, soft_delete=soft_delete), PLAIN, first, updates, late_insert))
    assert fetch(
        target, "SELECT id, note, price, flag, dur, raw, _bl_position::int FROM plain ORDER BY id"
    ) == [
        (1, "note 1", Decimal("2.00"), True, timedelta(hours=1), b"r", 11),
        (2, "two", Decimal("1.00"), False, timedelta(hours=1), b"r", 12),
        (3, "n", Decimal("1.00"), False, timedelta(hours=1), b"r", 13),
        (4, "n", Decimal("1.00"), True, timedelta(hours=4), b"r", 14),
        (5, None, Decimal("1.00"), True, timedelta(hours=1), b"r", 15),
    ]


def test_a_large_mixed_batch_written_in_pipelined_chunks_matches_the_history(target: dict[str, Any]) -> None:
    """Batches of several thousand staged changes are written chunk by chunk (the next chunk encoded while
    the server applies the current one): updates, unchanged values, deletes and new keys spread over
    every chunk end as applying the changes one by one would leave them."""
    from branchline.events import UNCHANGED

    first = [change(ITEMS, Op.CREATE, i, item(i, f"n{i}", "1.00")) for i in range(1, 5001)]
    mixed: list[ChangeEvent] = []
    expected = {i: (f"n{i}", Decimal("1.00")) for i in range(1, 5001)}
    position = 10_000
    for i in range(1, 9001):
        position += 1
        if i <= 5000 and i % 5 == 0:
            mixed.append(change(ITEMS, Op.DELETE, position, item(i, "")))
            del expected[i]
        elif i <= 5000 and i % 7 == 0:
            mixed.append(
                change(
                    ITEMS, Op.UPDATE, position, item(i, "x") | {"name": UNCHANGED, "price": Decimal("7.00")}
                )
            )
            expected[i] = (f"n{i}", Decimal("7.00"))
        elif i <= 5000:
            mixed.append(change(ITEMS, Op.UPDATE, position, item(i, f"u{i}", "2.00")))
            expected[i] = (f"u{i}", Decimal("2.00"))
        else:
            mixed.append(change(ITEMS, Op.CREATE, position, item(i, f"c{i}", "3.00")))
            expected[i] = (f"c{i}", Decimal("3.00"))
    late = [change(ITEMS, Op.UPDATE, 100, item(i, "too old")) for i in range(1, 5001)]  # older than stored
    asyncio.run(write(config(target), ITEMS, first, mixed, late))
    got = {row[0]: (row[1], row[2]) for row in fetch(target, "SELECT id, name, price FROM items")}
    assert got == expected
    assert fetch(target, "SELECT count(*) FROM _bl_del_items")[0][0] == 1000


def test_a_bad_value_in_a_later_chunk_names_its_own_key(target: dict[str, Any]) -> None:
    batch = [change(ITEMS, Op.UPDATE, i, item(i, f"v{i}")) for i in range(1, 6001)]
    batch[4499] = change(ITEMS, Op.UPDATE, 4500, item(4500, "x", "123456789012.5"))  # numeric(10,2) overflow
    with pytest.raises(FatalSinkError) as raised:
        asyncio.run(write(config(target), ITEMS, batch))
    message = str(raised.value)
    assert "22003" in message and "id=4500" in message and "position 4500" in message
    assert fetch(target, "SELECT count(*) FROM items") == [(0,)]  # the batch is atomic


def _reloptions(target: dict[str, Any], table: str) -> list[str] | None:
    rows = fetch(
        target,
        "SELECT c.reloptions FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        f" WHERE n.nspname = '{target['schema']}' AND c.relname = '{table}'",
    )
    return rows[0][0]


def _pages_moved(target: dict[str, Any], fillfactor: int, table: TableSchema) -> int:
    """Fill a table with the sink at ``fillfactor``, update every 10th row, and count the rows whose
    new version left its page (a non-HOT update; a HOT one stays on its page)."""
    name = "x" * 60
    rows = [change(table, Op.CREATE, i, item(i, name)) for i in range(1, 401)]
    asyncio.run(write(config(target, fillfactor=fillfactor), table, rows))
    query = f"SELECT id, (ctid::text::point)[0]::int FROM {table.id.table} WHERE id % 10 = 0 ORDER BY id"
    before = fetch(target, query)
    updates = [change(table, Op.UPDATE, 1000 + i, item(i, name[:-1] + "y")) for i in range(10, 401, 10)]
    asyncio.run(write(config(target, fillfactor=fillfactor), table, updates))
    after = fetch(target, query)
    assert [r[0] for r in after] == [r[0] for r in before]
    assert fetch(target, f"SELECT count(*) FROM {table.id.table} WHERE name LIKE '%y'") == [(40,)]
    return sum(1 for b, a in zip(before, after, strict=True) if b[1] != a[1])


def test_new_tables_get_the_fill_factor_so_updates_stay_on_their_page(target: dict[str, Any]) -> None:
    """The configured fill factor leaves room on each page: updating a tenth of the rows keeps every
    new version on its page (HOT: no new index entry). Packed pages (100) push them elsewhere."""
    roomy = TableSchema(id=tid("roomy"), columns=ITEMS.columns, primary_key=("id",))
    packed = TableSchema(id=tid("packed"), columns=ITEMS.columns, primary_key=("id",))
    assert _pages_moved(target, 70, roomy) == 0
    assert _pages_moved(target, 100, packed) >= 20
    assert _reloptions(target, "roomy") == ["fillfactor=70"]
    assert _reloptions(target, "packed") is None
    assert PostgresSinkConfig().fillfactor == 85  # the documented default


def test_an_existing_table_keeps_its_fill_factor(target: dict[str, Any]) -> None:
    asyncio.run(write(config(target, fillfactor=100), ITEMS, [change(ITEMS, Op.CREATE, 1, item(1, "a"))]))
    asyncio.run(write(config(target, fillfactor=50), ITEMS, [change(ITEMS, Op.UPDATE, 2, item(1, "b"))]))
    assert _reloptions(target, "items") is None
    assert fetch(target, "SELECT id, name, _bl_position FROM items") == [(1, "b", 2)]


def test_the_guard_query_runs_only_when_new_keys_are_left_to_insert(
    target: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that only updates stored rows costs no guard round trip; a batch with a new key asks
    once, and a deleted key's tombstone still stops a late older insert in that same batch."""
    from branchline.sinks.postgres.sink import PostgresSink

    asked: list[int] = []
    original = PostgresSink._may_be_guarded

    async def counting(self: PostgresSink, conn: Any, plan: Any, net: Any) -> bool:
        asked.append(len(net))
        return await original(self, conn, plan, net)

    monkeypatch.setattr(PostgresSink, "_may_be_guarded", counting)
    created = [change(ITEMS, Op.CREATE, i, item(i, f"v{i}")) for i in range(1, 4)]
    asyncio.run(
        write(
            config(target),
            ITEMS,
            created,  # direct COPY: asks once
            [change(ITEMS, Op.DELETE, 20, item(3, ""))],  # no upsert candidates: no INSERT, no guard
            [change(ITEMS, Op.UPDATE, 21, item(1, "u1")), change(ITEMS, Op.UPDATE, 22, item(2, "u2"))],
            [change(ITEMS, Op.UPDATE, 23, item(1, "w1")), change(ITEMS, Op.CREATE, 5, item(3, "late"))],
        )
    )
    assert asked == [3, 2]  # the direct COPY's check, then the last batch's INSERT of key 3
    assert fetch(target, "SELECT id, name, _bl_position FROM items ORDER BY id") == [
        (1, "w1", 23),
        (2, "u2", 22),
    ]
