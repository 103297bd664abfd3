"""Generated histories: random inserts, updates, deletes and truncates on a few keys, delivered in random
batches, with replays and (in hard-delete mode) out-of-order redelivery. Whatever the delivery, the
target must equal the table the history implies, row by row.

Out-of-order delivery is generated only in hard-delete mode: in soft-delete mode a delete or truncate
delivered before older changes of a key the target never saw cannot know that key's last values, so
only replays (in-order redelivery from an earlier point) are generated there.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from branchline.events import ChangeEvent, Column, ColumnType, Op, TableId, TableSchema
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.integration

COLUMNS = (
    Column(name="id", type=ColumnType.INT32, nullable=False),
    Column(name="qty", type=ColumnType.INT32),
    Column(name="price", type=ColumnType.DECIMAL, precision=10, scale=2),
)

step = st.tuples(st.sampled_from(["c", "u", "d", "t"]), st.integers(1, 2), st.integers(0, 999))


def history_of(steps: list[tuple[str, int, int]], table: TableSchema) -> list[ChangeEvent]:
    """A source history: positions 10, 20, ... in commit order; full row images (MariaDB, FULL identity)."""
    events = []
    ts = datetime(2026, 1, 1, tzinfo=UTC)
    for index, (op, key, qty) in enumerate(steps):
        position = (index + 1) * 10
        row = {"id": key, "qty": qty, "price": Decimal(qty) / 4}
        if op == "t":
            events.append(
                ChangeEvent(op=Op.TRUNCATE, table=table.id, key={}, position=position, source_ts=ts)
            )
        elif op == "d":
            events.append(
                ChangeEvent(op=Op.DELETE, table=table.id, key={"id": key}, before=row, position=position)
            )
        else:
            events.append(
                ChangeEvent(
                    op=Op(op), table=table.id, key={"id": key}, after=row, position=position, source_ts=ts
                )
            )
    return events


@st.composite
def deliveries(draw: st.DrawFn, shuffle: bool) -> tuple[list[tuple[str, int, int]], list[list[int]]]:
    """Steps, and batches as lists of indexes into the history (replays and reordering included)."""
    steps = draw(st.lists(step, min_size=2, max_size=12))
    n = len(steps)
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), min_size=1, max_size=6)))
    bounds = [0, *cuts, n]
    batches = [list(range(a, b)) for a, b in itertools.pairwise(bounds) if a < b]
    # replays: redeliver everything from an earlier batch on, as a runtime does after a crash
    if len(batches) > 1 and draw(st.booleans()):
        restart = draw(st.integers(0, len(batches) - 1))
        batches = batches + batches[restart:]
    # a late duplicate: an older batch redelivered after newer ones (safe in every mode)
    if len(batches) > 1 and draw(st.booleans()):
        batches = [*batches, draw(st.sampled_from(batches[:-1]))]
    if shuffle and draw(st.booleans()):
        batches = draw(st.permutations(batches))
    return steps, batches


def run(harness: Any, steps: list[tuple[str, int, int]], batches: list[list[int]]) -> None:
    table = TableSchema(
        id=TableId(source="prop", branch="b1", database="erp", table=f"t_{uuid.uuid4().hex[:8]}"),
        columns=COLUMNS,
        primary_key=("id",),
    )
    events = history_of(steps, table)

    async def scenario() -> dict:
        sink = harness.sink()
        try:
            for batch in batches:
                await harness.write(sink, table, [events[i] for i in batch])
        finally:
            await sink.close()
        return await harness.read(table)

    actual = asyncio.run(scenario())
    assert actual == harness.expected(table, events)


@pytest.mark.parametrize(
    "harness", ["postgres", "postgres-soft", "delta-local", "delta-local-soft"], indirect=True
)
def test_any_delivery_of_a_history_converges_to_its_table(harness: Any) -> None:
    examples = {"postgres": 100, "postgres-soft": 50, "delta-local": 15, "delta-local-soft": 10}[harness.kind]

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(deliveries(shuffle=not harness.soft_delete))
    def check(case: tuple[list[tuple[str, int, int]], list[list[int]]]) -> None:
        run(harness, *case)

    check()
