"""verify's value normalisation: the same row read from a source and from its PostgreSQL target
compares equal, and a real difference does not."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, time, timedelta, timezone
from decimal import Decimal

from branchline.events import Column, ColumnType, Json, TableId, TableSchema
from branchline.runtime.verify import Difference, canonical, target_table
from branchline.sinks.config import PostgresSinkConfig

T = ColumnType


def test_source_and_target_spellings_of_one_value_are_equal():
    pairs = [
        (1.1, 1.100000023841858, T.FLOAT32),  # MariaDB FLOAT vs PostgreSQL real read as float
        (Json({"a": [1, 2.5]}), {"a": [1, 2.5]}, T.JSON),
        (["x", "z"], ["x", "z"], T.SET),
        (Decimal("1E-20"), Decimal("0.00000000000000000001"), T.DECIMAL),
        (18446744073709551615, Decimal(18446744073709551615), T.UINT64),
        (datetime(2024, 1, 1, 12, tzinfo=UTC), datetime(2024, 1, 1, 14, tzinfo=timezone(timedelta(hours=2))),
         T.TIMESTAMPTZ),
        (timedelta(hours=13, minutes=14, seconds=15), time(13, 14, 15), T.TIME),
        (uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"), "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", T.UUID),
        (b"\x00\xff", memoryview(b"\x00\xff"), T.BYTES),
    ]
    for source, target, kind in pairs:
        assert canonical(source, kind) == canonical(target, kind), (source, target, kind)
        assert hash(canonical(source, kind)) == hash(canonical(target, kind))


def test_real_differences_stay_different():
    assert canonical(1.1, T.FLOAT32) != canonical(1.2, T.FLOAT32)
    assert canonical(Json({"a": 1}), T.JSON) != canonical({"a": 2}, T.JSON)
    assert canonical(["x"], T.SET) != canonical(["x", "y"], T.SET)


def test_target_table_follows_renames_excludes_and_branch_keys():
    from branchline.streams.config import TableTransforms

    table = TableId(source="erp", branch="north", database="erp", table="orders")
    schema = TableSchema(id=table, columns=(Column(name="id", type=T.INT64), Column(name="note", type=T.STRING),
                                            Column(name="secret", type=T.STRING)), primary_key=("id",))
    sink = PostgresSinkConfig(schema="{branch}_{source}", branch_key=True)
    transforms = TableTransforms(rename="sales", rename_columns={"note": "remark"}, exclude=("secret",))
    target = target_table(sink, schema, transforms, {"id", "remark"})
    assert (target.schema, target.name, target.branch) == ("north_erp", "sales", "north")
    assert target.columns == {"id": "id", "note": "remark"}


def test_difference_lines_name_key_and_columns():
    line = Difference("different", {"id": 7}, {"qty": (1, 2)}).describe()
    assert line == "different id=7: qty: source=1 target=2"
    assert Difference("missing", {"id": 8}).describe() == "missing   id=8"
