"""Deduplication: collapsing a batch equals applying its changes one by one in position order, for
any interleaving; the cross-batch guard drops redelivered and older changes."""

from __future__ import annotations

import itertools
from typing import Any

from branchline.events import UNCHANGED, ChangeEvent, Column, ColumnType, Op, TableId, TableSchema
from branchline.streams.dedupe import AppliedPositions, GuardStats, collapse, guard_key
from hypothesis import given, settings
from hypothesis import strategies as st

ORDERS = TableId(source="erp", branch="b01", database="erp", table="orders")
LINES = TableId(source="erp", branch="b01", database="erp", table="lines")


def schema_of(table: TableId, extra: tuple[Column, ...] = ()) -> TableSchema:
    columns = (Column(name="id", type=ColumnType.INT64, nullable=False), Column(name="v", type=ColumnType.STRING),
               Column(name="note", type=ColumnType.STRING), *extra)
    return TableSchema(id=table, columns=columns, primary_key=("id",))


SCHEMAS = {ORDERS: schema_of(ORDERS), LINES: schema_of(LINES)}


def event(op: Op, table: TableId, key: int | None, position: int, v: Any = None, note: Any = None) -> ChangeEvent:
    row = None if key is None else {"id": key, "v": v, "note": note}
    return ChangeEvent(
        op=op, table=table, key={} if key is None else {"id": key},
        before=row if op is Op.DELETE else None,
        after=row if op in (Op.CREATE, Op.UPDATE, Op.READ) else None,
        position=position,
    )


# -- a model target: what a correct sink does with changes applied in order -------------------------


def apply(target: dict[TableId, dict[Any, dict[str, Any]]], e: ChangeEvent) -> None:
    rows = target.setdefault(e.table, {})
    if e.op is Op.TRUNCATE:
        rows.clear()
    elif e.op is Op.DELETE:
        rows.pop(e.key["id"], None)
    else:
        old = rows.get(e.key["id"], {})
        rows[e.key["id"]] = {k: (old.get(k) if v is UNCHANGED else v) for k, v in e.after.items()}


def applied_one_by_one(events: list[ChangeEvent]) -> dict:
    target: dict = {}
    for e in sorted(events, key=lambda e: e.position):
        apply(target, e)
    return target


def applied_collapsed(events: list[ChangeEvent]) -> dict:
    target: dict = {}
    for segment in collapse((e, SCHEMAS[e.table]) for e in events):
        keys = [e.key.get("id") for e in segment.events]
        assert len(keys) == len(set(keys)), "a segment must hold each key at most once"
        assert [e.position for e in segment.events] == sorted(e.position for e in segment.events)
        assert all(e.table == segment.table for e in segment.events)
        for e in segment.events:
            apply(target, e)
    return target


# -- histories: valid change sequences in position order ---------------------------------------------

step = st.tuples(
    st.sampled_from(["upsert", "upsert", "update_toast", "delete", "truncate"]),
    st.sampled_from([ORDERS, LINES]),
    st.integers(0, 3),
    st.integers(0, 9),
)


@st.composite
def histories(draw: st.DrawFn) -> list[ChangeEvent]:
    steps = draw(st.lists(step, max_size=40))
    live: dict[TableId, set[int]] = {ORDERS: set(), LINES: set()}
    events = []
    position = 0
    for kind, table, key, value in steps:
        position += draw(st.integers(1, 3))
        if kind == "truncate":
            events.append(event(Op.TRUNCATE, table, None, position))
            live[table].clear()
        elif kind == "delete":
            if key in live[table]:
                events.append(event(Op.DELETE, table, key, position, v=f"v{value}", note="n"))
                live[table].discard(key)
        elif kind == "update_toast":
            if key in live[table]:
                events.append(event(Op.UPDATE, table, key, position, v=f"v{value}", note=UNCHANGED))
        else:
            op = Op.UPDATE if key in live[table] else Op.CREATE
            events.append(event(op, table, key, position, v=f"v{value}", note=f"note{value}"))
            live[table].add(key)
    return events


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_collapse_over_any_interleaving_equals_applying_one_by_one_in_position_order(data: st.DataObject):
    history = data.draw(histories())
    arrival = data.draw(st.permutations(history))
    assert applied_collapsed(list(arrival)) == applied_one_by_one(history)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_redelivered_duplicates_inside_a_batch_change_nothing(data: st.DataObject):
    history = data.draw(histories())
    duplicates = data.draw(st.lists(st.sampled_from(history), max_size=10)) if history else []
    arrival = data.draw(st.permutations(history + duplicates))
    assert applied_collapsed(list(arrival)) == applied_one_by_one(history)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_batches_with_crashes_and_replays_reach_the_same_target(data: st.DataObject):
    """One partition in position order, cut into batches; after a crash the last unacknowledged
    batches are delivered again (the sink wrote them, the guard and the offset did not move)."""
    history = data.draw(histories())
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(history)), max_size=6))))
    bounds = [0, *cuts, len(history)]
    batches = [history[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    store: dict[str, int] = {}
    guard = AppliedPositions(store)
    target: dict = {}
    stats = GuardStats()
    i = 0
    replays = 0
    while i < len(batches):
        kept = guard.admit([(e, SCHEMAS[e.table]) for e in batches[i]], stats)
        segments = collapse(kept)
        for segment in segments:
            for e in segment.events:
                apply(target, e)
        crash = replays < 3 and data.draw(st.booleans())
        if crash:  # durable in the sink, but neither recorded nor committed: delivered again
            replays += 1
            back = data.draw(st.integers(0, min(i, 2)))
            guard_snapshot = i - back
            i = guard_snapshot
            continue
        guard.record(segments)
        i += 1
    assert target == applied_one_by_one(history)


def test_delete_replaces_a_pending_upsert():
    segments = collapse([(event(Op.CREATE, ORDERS, 1, 10, v="a"), SCHEMAS[ORDERS]),
                         (event(Op.DELETE, ORDERS, 1, 11, v="a"), SCHEMAS[ORDERS])])
    assert [(e.op, e.position) for s in segments for e in s.events] == [(Op.DELETE, 11)]


def test_truncate_ends_the_segment_and_stands_alone():
    s = SCHEMAS[ORDERS]
    segments = collapse([(event(Op.CREATE, ORDERS, 1, 10), s), (event(Op.TRUNCATE, ORDERS, None, 11), s),
                         (event(Op.CREATE, ORDERS, 1, 12), s), (event(Op.UPDATE, ORDERS, 1, 13), s)])
    assert [[e.position for e in seg.events] for seg in segments] == [[10], [11], [13]]
    assert segments[1].is_truncate and not segments[0].is_truncate


def test_schema_change_ends_the_segment():
    old = SCHEMAS[ORDERS]
    new = schema_of(ORDERS, (Column(name="extra", type=ColumnType.INT32),))
    segments = collapse([(event(Op.CREATE, ORDERS, 1, 10), old), (event(Op.CREATE, ORDERS, 2, 11), old),
                         (event(Op.UPDATE, ORDERS, 1, 12), new)])
    assert [(seg.schema is new, [e.position for e in seg.events]) for seg in segments] == [
        (False, [10, 11]), (True, [12])]


def test_toast_unchanged_value_is_filled_from_the_pending_upsert_it_replaces():
    s = SCHEMAS[ORDERS]
    (segment,) = collapse([(event(Op.UPDATE, ORDERS, 1, 10, v="a", note="long text"), s),
                           (event(Op.UPDATE, ORDERS, 1, 11, v="b", note=UNCHANGED), s)])
    assert segment.events[0].after == {"id": 1, "v": "b", "note": "long text"}


def test_guard_drops_redelivered_and_older_changes_and_counts_them():
    guard = AppliedPositions({})
    s = SCHEMAS[ORDERS]
    first = [(event(Op.CREATE, ORDERS, 1, 10), s), (event(Op.UPDATE, ORDERS, 1, 20), s)]
    guard.record(collapse(guard.admit(first)))
    assert guard.applied(ORDERS, {"id": 1}) == 20
    stats = GuardStats()
    kept = guard.admit([(event(Op.UPDATE, ORDERS, 1, 20), s), (event(Op.UPDATE, ORDERS, 1, 15), s),
                        (event(Op.UPDATE, ORDERS, 1, 21), s), (event(Op.CREATE, ORDERS, 2, 5), s)], stats)
    assert [e.position for e, _ in kept] == [21, 5]
    assert (stats.admitted, stats.dropped) == (2, 2)


def test_guard_drops_changes_older_than_an_applied_truncate_from_any_partition():
    guard = AppliedPositions({})
    s = SCHEMAS[ORDERS]
    guard.record(collapse([(event(Op.TRUNCATE, ORDERS, None, 100), s)]))
    kept = guard.admit([(event(Op.CREATE, ORDERS, 7, 90), s), (event(Op.CREATE, ORDERS, 8, 110), s),
                        (event(Op.CREATE, LINES, 7, 90), SCHEMAS[LINES])])
    assert [(e.table.table, e.position) for e, _ in kept] == [("orders", 110), ("lines", 90)]


def test_guard_keys_name_source_branch_table_and_key():
    assert guard_key(ORDERS, {"id": 5}) == '["erp","b01","erp.orders",[5]]'
    other_branch = ORDERS.model_copy(update={"branch": "b02"})
    assert guard_key(other_branch, {"id": 5}) != guard_key(ORDERS, {"id": 5})


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_dedupe_in_one_pass_equals_admit_then_collapse(data: st.DataObject):
    """`AppliedPositions.dedupe` against the two passes it replaces, over any arrival order, with
    duplicates, and with positions already applied (a store filled by an earlier prefix)."""
    history = data.draw(histories())
    duplicates = data.draw(st.lists(st.sampled_from(history), max_size=6)) if history else []
    arrival = [(e, SCHEMAS[e.table]) for e in data.draw(st.permutations(history + duplicates))]
    applied = history[:data.draw(st.integers(0, len(history)))]
    store_a: dict[str, int] = {}
    store_b: dict[str, int] = {}
    for store in (store_a, store_b):
        seed = AppliedPositions(store)
        seed.record(collapse([(e, SCHEMAS[e.table]) for e in applied]))
    one, two = AppliedPositions(store_a), AppliedPositions(store_b)
    stats_one, stats_two = GuardStats(), GuardStats()
    fused = one.dedupe(arrival, stats_one)
    passes = collapse(two.admit(arrival, stats_two))
    def per_table(segments: list) -> dict:  # segments of different tables are independent: their order is free
        grouped: dict = {}
        for segment in segments:
            grouped.setdefault(segment.table, []).append((segment.schema, segment.events))
        return grouped

    assert per_table(fused) == per_table(passes)
    assert (stats_one.admitted, stats_one.dropped, stats_one.dropped_tables) == (
        stats_two.admitted, stats_two.dropped, stats_two.dropped_tables)
    one.record(fused)
    two.record(passes)
    assert store_a == store_b
