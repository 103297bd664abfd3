"""The suite every sink must pass. Each test writes batches through a real sink, reads the target back
and compares it row by row with the table the source history implies (`expected_table`)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from branchline.events import UNCHANGED, ChangeEvent, Column, ColumnType, Json, Op, TableId, TableSchema

pytestmark = pytest.mark.integration

TID = TableId(source="erp", branch="b1", database="erp", table="orders")
COLUMNS = (
    Column(name="id", type=ColumnType.INT64, nullable=False),
    Column(name="customer", type=ColumnType.STRING),
    Column(name="qty", type=ColumnType.INT32),
    Column(name="price", type=ColumnType.DECIMAL, precision=12, scale=2),
    Column(name="serial", type=ColumnType.UINT64),
    Column(name="placed", type=ColumnType.TIMESTAMP, precision=6),
    Column(name="paid_at", type=ColumnType.TIMESTAMPTZ, precision=6),
    Column(name="note", type=ColumnType.STRING),
    Column(name="active", type=ColumnType.BOOLEAN),
    Column(name="doc", type=ColumnType.JSON),
)
TABLE = TableSchema(id=TID, columns=COLUMNS, primary_key=("id",))
T0 = datetime(2026, 1, 2, 3, 4, 5, 678901)


def values(id_: int, **changes: Any) -> dict[str, Any]:
    row = {
        "id": id_,
        "customer": f"customer {id_}",
        "qty": id_ * 3,
        "price": Decimal(id_) + Decimal("0.25"),
        "serial": 2**64 - id_,
        "placed": T0 + timedelta(days=id_),
        "paid_at": (T0 + timedelta(hours=id_)).replace(tzinfo=UTC),
        "note": "n" * 50 + str(id_),
        "active": id_ % 2 == 0,
        "doc": Json({"lines": [id_, Decimal("1.50")], "ok": True}),
    }
    row.update(changes)
    return row


def event(op: Op, position: int, id_: int, table: TableSchema = TABLE, **changes: Any) -> ChangeEvent:
    full_image = changes.pop("full_image", True)
    row = values(id_, **changes)
    row = {c.name: row.get(c.name) for c in table.columns}
    ts = (T0 + timedelta(seconds=position)).replace(tzinfo=UTC)
    if op is Op.DELETE:
        before = row if full_image else {"id": id_}
        return ChangeEvent(
            op=op, table=table.id, key={"id": id_}, before=before, position=position, source_ts=ts
        )
    return ChangeEvent(op=op, table=table.id, key={"id": id_}, after=row, position=position, source_ts=ts)


def insert(position: int, id_: int, **changes: Any) -> ChangeEvent:
    return event(Op.CREATE, position, id_, **changes)


def update(position: int, id_: int, **changes: Any) -> ChangeEvent:
    return event(Op.UPDATE, position, id_, **changes)


def delete(position: int, id_: int, full_image: bool = True) -> ChangeEvent:
    """A delete with the whole old row (MariaDB/MySQL, REPLICA IDENTITY FULL) or the key only (PostgreSQL's
    default replica identity)."""
    return event(Op.DELETE, position, id_, full_image=full_image)


def truncate(position: int) -> ChangeEvent:
    return ChangeEvent(op=Op.TRUNCATE, table=TID, key={}, position=position, source_ts=T0.replace(tzinfo=UTC))


def check(harness: Any, batches: Sequence[Sequence[ChangeEvent]], table: TableSchema = TABLE) -> dict:
    """Write every batch through one sink, then compare the target with the expected table."""

    async def scenario() -> dict:
        sink = harness.sink()
        try:
            for batch in batches:
                await harness.write(sink, table, batch)
        finally:
            await sink.close()
        return await harness.read(table)

    actual = asyncio.run(scenario())
    expected = harness.expected(table, [e for b in batches for e in b])
    assert actual == expected
    return actual


def test_duplicate_events_for_one_key_keep_the_last(harness: Any) -> None:
    repeated = update(3, 1, qty=30)
    actual = check(harness, [[insert(1, 1), update(2, 1, qty=20), repeated, repeated, insert(4, 2)]])
    assert actual[(1,)]["qty"] == 30 and actual[(1,)]["_bl_position"] == 3


def test_duplicates_across_batches_keep_the_last(harness: Any) -> None:
    check(harness, [[insert(1, 1), insert(2, 2)], [insert(1, 1), update(3, 1, qty=7)], [update(3, 1, qty=7)]])


def test_update_then_delete_in_one_batch(harness: Any) -> None:
    actual = check(
        harness,
        [
            [insert(1, 1), insert(2, 2)],
            [
                update(3, 1, qty=9),
                delete(4, 1, False),
                update(5, 2, qty=1),
                delete(6, 2, False),
                insert(7, 2, qty=2),
            ],
        ],
    )
    assert actual[(2,)]["qty"] == 2


def test_delete_of_a_missing_row_is_harmless(harness: Any) -> None:
    check(harness, [[insert(1, 1)], [delete(5, 99), delete(6, 98, full_image=False)]])


def test_late_insert_after_delete_does_not_resurrect_the_row(harness: Any) -> None:
    actual = check(
        harness, [[insert(1, 1), insert(2, 2)], [delete(10, 1)], [insert(1, 1), update(5, 1, qty=5)]]
    )
    assert (1,) not in actual or actual[(1,)].get("_bl_deleted") is True


def test_delete_then_reinsert_with_a_newer_position_brings_the_row_back(harness: Any) -> None:
    actual = check(harness, [[insert(1, 1)], [delete(2, 1)], [insert(3, 1, qty=42)]])
    assert actual[(1,)]["qty"] == 42


def test_truncate_removes_older_rows_and_keeps_newer_ones(harness: Any) -> None:
    check(
        harness,
        [[insert(1, 1), insert(2, 2)], [insert(3, 3), truncate(10), insert(11, 4), update(12, 4, qty=1)]],
    )


def test_replay_of_batches_older_than_a_truncate_restores_nothing(harness: Any) -> None:
    first = [insert(1, 1), insert(2, 2)]
    check(harness, [first, [truncate(10)], [insert(11, 3)], first])


def test_added_column_is_created_and_filled(harness: Any) -> None:
    wider = TableSchema(
        id=TID,
        columns=(*COLUMNS, Column(name="discount", type=ColumnType.DECIMAL, precision=5, scale=2)),
        primary_key=("id",),
    )
    old = [insert(1, 1), insert(2, 2)]
    new = [
        event(Op.UPDATE, 3, 1, table=wider, discount=Decimal("1.50")),
        event(Op.CREATE, 4, 3, table=wider, discount=Decimal("0.05")),
    ]

    async def scenario() -> dict:
        sink = harness.sink()
        try:
            await harness.write(sink, TABLE, old)
            await harness.write(sink, wider, new)
        finally:
            await sink.close()
        return await harness.read(wider)

    actual = asyncio.run(scenario())
    assert actual == harness.expected(wider, old + new)
    assert actual[(2,)]["discount"] is None and actual[(1,)]["discount"] == Decimal("1.50")


def test_empty_batch_changes_nothing(harness: Any) -> None:
    check(harness, [[]])
    check(harness, [[insert(1, 1)], [], [update(2, 1, qty=4)], []])


def test_replayed_batch_leaves_target_unchanged(harness: Any) -> None:
    batch = [insert(1, 1), insert(2, 2), update(3, 1, qty=5), delete(4, 2)]
    check(harness, [batch, batch, batch])


def test_older_event_after_newer_one_is_ignored(harness: Any) -> None:
    actual = check(
        harness, [[insert(1, 1), update(20, 1, qty=20)], [update(10, 1, qty=10)], [update(5, 1, qty=5)]]
    )
    assert actual[(1,)]["qty"] == 20


def test_out_of_order_events_within_one_batch_keep_the_highest_position(harness: Any) -> None:
    actual = check(harness, [[update(9, 1, qty=9), insert(1, 1), update(4, 1, qty=4)]])
    assert actual[(1,)]["qty"] == 9


def test_unchanged_toast_value_keeps_the_stored_value(harness: Any) -> None:
    actual = check(
        harness,
        [
            [insert(1, 1, note="long " * 100)],
            [update(2, 1, qty=2, note=UNCHANGED, doc=UNCHANGED)],
            [update(3, 1, note="new"), update(4, 1, qty=4, note=UNCHANGED)],
        ],
    )
    assert actual[(1,)]["note"] == "new" and actual[(1,)]["qty"] == 4


def test_crash_between_write_and_acknowledgement_then_replay(harness: Any) -> None:
    """The first sink writes batch 2 but dies before the runtime acknowledges it; a new sink gets
    batch 2 again (everything after the last acknowledgement), then batch 3."""
    batch1 = [insert(1, 1), insert(2, 2), insert(3, 3)]
    batch2 = [update(4, 1, qty=40), delete(5, 2), insert(6, 4)]
    batch3 = [update(7, 4, qty=70), update(8, 3, qty=80)]

    async def scenario() -> dict:
        crashed = harness.sink()
        await harness.write(crashed, TABLE, batch1)
        await crashed.write_batch(TABLE, batch2)  # no flush, no acknowledgement: the process dies here
        await crashed.close()
        restarted = harness.sink()
        try:
            await harness.write(restarted, TABLE, batch2)
            await harness.write(restarted, TABLE, batch3)
        finally:
            await restarted.close()
        return await harness.read(TABLE)

    actual = asyncio.run(scenario())
    assert actual == harness.expected(TABLE, batch1 + batch2 + batch3)
