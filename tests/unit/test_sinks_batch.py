"""Per-batch collapse: highest position wins per key, unchanged values filled from the same batch."""

from __future__ import annotations

from branchline.events import UNCHANGED, ChangeEvent, Column, ColumnType, Op, TableId, TableSchema
from branchline.sinks._batch import collapse, render, split_at_truncates

TID = TableId(source="erp", branch="b1", database="erp", table="t")
TABLE = TableSchema(
    id=TID,
    columns=(
        Column(name="id", type=ColumnType.INT32),
        Column(name="a", type=ColumnType.STRING),
        Column(name="b", type=ColumnType.STRING),
    ),
    primary_key=("id",),
)


def ev(op: Op, pos: int, id_: int, branch: str = "b1", **row: object) -> ChangeEvent:
    table = TID.model_copy(update={"branch": branch})
    image = {"id": id_, **row}
    if op is Op.DELETE:
        return ChangeEvent(op=op, table=table, key={"id": id_}, before=image, position=pos)
    return ChangeEvent(op=op, table=table, key={"id": id_}, after=image, position=pos)


def test_highest_position_wins_whatever_the_order() -> None:
    net = collapse(
        TABLE, [ev(Op.UPDATE, 5, 1, a="5"), ev(Op.CREATE, 1, 1, a="1"), ev(Op.UPDATE, 3, 1, a="3")]
    )
    assert [(c.position, c.row["a"]) for c in net] == [(5, "5")]


def test_delete_replaces_a_pending_upsert_and_keeps_its_values() -> None:
    (net,) = collapse(TABLE, [ev(Op.UPDATE, 1, 1, a="x", b="y"), ev(Op.DELETE, 2, 1)])
    assert net.is_delete and net.row == {"id": 1, "a": "x", "b": "y"}


def test_unchanged_value_is_taken_from_the_earlier_change_in_the_batch() -> None:
    (net,) = collapse(TABLE, [ev(Op.UPDATE, 1, 1, a="x", b="y"), ev(Op.UPDATE, 2, 1, a=UNCHANGED, b="z")])
    assert net.row == {"id": 1, "a": "x", "b": "z"} and net.unchanged_columns() == []
    (net,) = collapse(TABLE, [ev(Op.UPDATE, 2, 1, a=UNCHANGED, b="z")])
    assert net.unchanged_columns() == ["a"]


def test_same_key_on_two_branches_are_two_rows() -> None:
    assert len(collapse(TABLE, [ev(Op.CREATE, 1, 1), ev(Op.CREATE, 1, 1, branch="b2")])) == 2


def test_table_without_key_keeps_every_change() -> None:
    keyless = TABLE.model_copy(update={"primary_key": ()})
    assert len(collapse(keyless, [ev(Op.CREATE, 1, 1), ev(Op.CREATE, 2, 1)])) == 2


def test_split_at_truncates_keeps_batch_order() -> None:
    t = ChangeEvent(op=Op.TRUNCATE, table=TID, key={}, position=3)
    events = [ev(Op.CREATE, 1, 1), ev(Op.CREATE, 2, 2), t, ev(Op.CREATE, 4, 3)]
    parts = [
        ([e.position for e in changes], trunc.position if trunc else None)
        for changes, trunc in split_at_truncates(events)
    ]
    assert parts == [([1, 2], 3), ([4], None)]
    assert list(split_at_truncates([])) == [([], None)]


def test_render_fills_the_naming_template() -> None:
    assert render("{source}_{branch}/{table}", TID) == "erp_b1/t"


def test_without_branch_keys_one_key_is_one_row_whatever_the_branch() -> None:
    events = [ev(Op.CREATE, 1, 1, a="x"), ev(Op.UPDATE, 2, 1, branch="b2", a="y")]
    (net,) = collapse(TABLE, events, by_branch=False)
    assert net.row["a"] == "y"
