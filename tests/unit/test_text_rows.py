"""The runner's text path (`branchline.runtime.text_rows`): which spooled PostgreSQL rows it takes, how it
collapses them per key, and the COPY text it writes. `tests/integration/test_text_path.py` checks on the real
servers that the target rows equal the event path's."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
from branchline.connectors.embedded.pgoutput import Relation, RowChange, TextRow
from branchline.errors import BadRecordError
from branchline.events import Column, ColumnType, Op, TableId, TableSchema
from branchline.runtime.spool import encode
from branchline.runtime.text_rows import TextBatch, split_round

TABLE = TableId(source="crm", branch="hq", database="crm", schema_="public", table="items")
COLUMNS = [("id", 20, -1, True), ("label", 25, -1, False), ("price", 1700, -1, False), ("made", 1114, -1, False)]
SCHEMA = TableSchema(id=TABLE, columns=(Column(name="id", type=ColumnType.INT64),
                                        Column(name="label", type=ColumnType.STRING),
                                        Column(name="price", type=ColumnType.DECIMAL),
                                        Column(name="made", type=ColumnType.TIMESTAMP)), primary_key=("id",))
T1 = datetime(2026, 1, 2, 3, 4, 5, 600000, tzinfo=UTC)


def _batch(*changes: tuple[str, Any, Any], columns: list[tuple[str, int, int, bool]] = COLUMNS,
           schema: TableSchema = SCHEMA, start: int = 100) -> SimpleNamespace:
    """A spooled text batch of ``changes`` ((kind, old, new) each), read back as the runner reads it."""
    relation = Relation(1, "public", "items", "d", columns)
    rows = [TextRow(RowChange(kind, relation, old, new, kind != "U" or old is not None), TABLE, start + i, T1, "7")
            for i, (kind, old, new) in enumerate(changes)]
    return SimpleNamespace(text=TextBatch(encode(rows, {TABLE: schema})))


def _accept_all(schema: TableSchema) -> bool:
    return True


def test_changes_of_one_key_collapse_to_the_last_and_values_go_out_as_copy_text():
    split = split_round([_batch(
        ("I", None, ("1", "a", "1.50", "2026-01-01 00:00:00")),
        ("I", None, ["2", None, "2.00", "2026-01-01 00:00:01.5"]),
        ("U", None, ("1", "tab\there\\ and \\N", "3.25", "2026-01-02 00:00:00")),
        ("D", ["2", None, None, None], None),
    )], _accept_all)
    assert split.events == []
    (segment,) = split.segments
    stamp = T1.isoformat()
    assert segment.body == (f"1\ttab\\there\\\\ and \\\\N\t3.25\t2026-01-02 00:00:00\t102\tu\t{stamp}\n"
                            f"2\t\\N\t\\N\t\\N\t103\td\t{stamp}\n")
    assert (segment.count, segment.deletes, segment.min_position, segment.inserts_only) == (2, 1, 102, False)
    assert [m.op for m in segment.marks] == [Op.UPDATE, Op.DELETE]
    assert segment.rows == 4
    assert segment.describe(2) == "key (id='2') at position 103"


def test_nulls_without_other_escapes_keep_the_fast_form():
    split = split_round([_batch(("I", None, ["5", None, "1", "2026-01-01 00:00:00"]))], _accept_all)
    assert split.segments[0].body == f"5\t\\N\t1\t2026-01-01 00:00:00\t100\tc\t{T1.isoformat()}\n"
    assert split.segments[0].inserts_only


def test_values_the_event_path_reads_differently_send_the_table_there():
    split = split_round([_batch(("I", None, ("1", "a", "NaN", "2026-01-01 00:00:00")))], _accept_all)
    assert split.segments == []
    assert [e.after["price"].is_nan() for e, _ in split.events] == [True]
    for made in ("infinity", "0044-03-15 00:00:00 BC", "12026-01-01 00:00:00"):
        # the event path's decoder rejects them, naming the column: the run stops on a bad record, as before
        with pytest.raises(BadRecordError, match="made"):
            split_round([_batch(("I", None, ("1", "a", "1", made)))], _accept_all)


def test_changed_keys_unchanged_toast_values_and_refused_tables_take_the_event_path():
    key_change = _batch(("I", None, ("1", "a", "1", "2026-01-01 00:00:00")),
                        ("U", ["1", None, None, None], ("9", "a", "1", "2026-01-01 00:00:00")))
    toast = _batch(("U", None, ["1", ..., "1", "2026-01-01 00:00:00"]))
    for batch in (key_change, toast):
        split = split_round([batch], _accept_all)
        assert split.segments == []
        assert split.events
    key_change_events = split_round([key_change], _accept_all).events
    assert [e.op for e, _ in key_change_events] == [Op.CREATE, Op.DELETE, Op.CREATE]  # as the reader makes them
    refused = split_round([_batch(("I", None, ("1", "a", "1", "2026-01-01 00:00:00")))], lambda schema: False)
    assert refused.segments == [] and len(refused.events) == 1
    numeric_key = [("id", 1700, -1, True), *COLUMNS[1:]]
    schema = SCHEMA.model_copy(update={"columns": (Column(name="id", type=ColumnType.DECIMAL), *SCHEMA.columns[1:])})
    split = split_round([_batch(("I", None, ("1.0", "a", "1", "2026-01-01 00:00:00")), columns=numeric_key,
                                schema=schema)], _accept_all)
    assert split.segments == []  # "1.0" and "1.00" are one numeric key: only decoded values compare right


def test_a_table_with_events_in_the_round_keeps_all_its_rows_on_the_event_path():
    from branchline.events import ChangeEvent

    snapshot = ChangeEvent(op=Op.READ, table=TABLE, key={"id": 3}, after={"id": 3}, position=1, snapshot=True)
    events_batch = SimpleNamespace(text=None, events=[snapshot], schemas={TABLE: SCHEMA})
    split = split_round([events_batch, _batch(("I", None, ("1", "a", "1", "2026-01-01 00:00:00")))], _accept_all)
    assert split.segments == []
    assert [e.op for e, _ in split.events] == [Op.READ, Op.CREATE]  # in spool order


def test_rows_out_of_position_order_collapse_in_position_order():
    first = _batch(("I", None, ("1", "new", "1", "2026-01-01 00:00:00")), start=200)
    second = _batch(("I", None, ("1", "old", "1", "2026-01-01 00:00:00")), start=100)
    (segment,) = split_round([first, second], _accept_all).segments
    assert segment.body.split("\t")[1] == "new"


def test_the_sink_adds_the_branch_and_the_staging_tables_unchanged_column():
    from branchline.sinks.postgres.sink import _text_body

    rows = SimpleNamespace(body="1\ta\n2\tb\n", schema=SCHEMA.model_copy(
        update={"id": TABLE.model_copy(update={"branch": "ost\tsee"})}))
    assert _text_body(SimpleNamespace(branch_key=False), rows, staged=False) == "1\ta\n2\tb\n"
    assert _text_body(SimpleNamespace(branch_key=False), rows, staged=True) == "1\ta\t\\N\n2\tb\t\\N\n"
    assert _text_body(SimpleNamespace(branch_key=True), rows, staged=True) == (
        "ost\\tsee\t1\ta\t\\N\nost\\tsee\t2\tb\t\\N\n")
