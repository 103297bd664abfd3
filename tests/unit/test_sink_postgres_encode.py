"""`PostgresSink._encode`: the C-level passes for chunks of plain upserts write the very bytes the per-change
loop writes, and hand every chunk they cannot take (a delete, a missing column, UNCHANGED) to that loop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from branchline.events import UNCHANGED, ChangeEvent, Op, TableId
from branchline.sinks.postgres import sink as sink_module
from branchline.sinks.postgres._copy import SIGNATURE, TRAILER
from branchline.sinks.postgres.plan import StagedColumn
from branchline.sinks.postgres.sink import PostgresSink
from psycopg.adapt import Transformer
from psycopg.pq import Format

TABLE = TableId(source="crm", branch="b1", database="crm", schema_="public", table="orders")
NAMES = ("id", "amount", "note", "at")
TARGET_OIDS = [20, 1700, 25, 1114]
BOOKKEEPING_OIDS = [20, 25, 1184]


@dataclass
class _Plan:
    columns: list[StagedColumn]
    soft_delete: bool = False
    branch_key: bool = False
    qualified: str = "public.orders"
    keyed: bool = True
    source: Any = None


@dataclass
class _Rows:
    """`BinaryRows` without a COPY: what it would send, chunk by chunk."""

    staged: bool
    sent: list[bytes] = field(default_factory=list)
    buffer: bytearray = field(default_factory=lambda: bytearray(SIGNATURE))

    def __post_init__(self) -> None:
        self.transformer = Transformer()
        oids = TARGET_OIDS + BOOKKEEPING_OIDS + ([1009] if self.staged else [])
        self.transformer.set_dumper_types(oids, Format.BINARY)
        self.encode = sink_module.BinaryRows.encode

    async def drain(self) -> None:
        self.sent.append(bytes(self.buffer))
        self.buffer = bytearray()

    async def finish(self) -> None:
        self.buffer += TRAILER
        await self.drain()


def _plan(per_row: bool) -> _Plan:
    # a column whose dumper takes any object makes `_encode` scan for UNCHANGED: the per-change loop only
    return _Plan([StagedColumn(n, None, False, per_row and n == "note") for n in NAMES])


def _event(i: int, op: Op = Op.CREATE, ts: datetime | None = None, **values: Any) -> ChangeEvent:
    row = {"id": i, "amount": Decimal(i) / 100, "note": f"n{i}", "at": datetime(2024, 1, 1, i % 24), **values}
    return ChangeEvent(op=op, table=TABLE, key={"id": i}, before=row if op is Op.DELETE else None,
                       after=None if op is Op.DELETE else row, position=1000 + i,
                       source_ts=ts or datetime(2024, 5, 1, 12, i % 60, tzinfo=UTC), txid="7")


def _encode(net: list[ChangeEvent], *, per_row: bool, staged: bool) -> tuple[bytes, tuple[bool, int, bool]]:
    rows = _Rows(staged)
    sink = PostgresSink.__new__(PostgresSink)
    result = asyncio.run(sink._encode(rows, _plan(per_row), net, False, staged=staged))  # type: ignore[arg-type]
    return b"".join(rows.sent), result


@pytest.mark.parametrize(("case", "staged"), [
    (case, staged) for case in ("inserts", "naive commit times", "a delete", "a missing column")
    for staged in (False, True)] + [("unchanged", True)])
def test_chunks_encode_as_the_per_change_loop_does(case: str, staged: bool, monkeypatch) -> None:
    taken: list[bool] = []
    plain_rows = sink_module._plain_rows

    def counted(*args: Any) -> Any:
        rows = plain_rows(*args)
        taken.append(rows is not None)
        return rows

    monkeypatch.setattr(sink_module, "_plain_rows", counted)
    net = [_event(i, Op.UPDATE if i % 3 else Op.CREATE) for i in range(1, 1300)]  # three chunks
    if case == "naive commit times":
        net = [_event(i, ts=datetime(2024, 5, 1, 12, i % 7)) for i in range(1, 1300)]
    elif case == "a delete":
        net[700] = _event(700, Op.DELETE)
    elif case == "a missing column":
        del net[600].after["note"]  # type: ignore[index]
    elif case == "unchanged":
        net[1100].after["amount"] = UNCHANGED  # type: ignore[index]
    fast, fast_result = _encode(net, per_row=False, staged=staged)
    assert taken == [True, case != "a delete", True]  # the chunks the passes took (the 2nd holds #700)
    taken.clear()
    slow, slow_result = _encode(net, per_row=True, staged=staged)
    assert taken == []  # the per-change loop only
    assert fast == slow
    assert fast_result == slow_result
    assert fast_result[1] == (1 if case == "a delete" else 0)
    assert fast_result[0] == (case == "unchanged")


def test_unchanged_into_the_target_layout_still_asks_for_the_staging_path() -> None:
    net = [_event(i) for i in range(1, 20)]
    net[5].after["note"] = UNCHANGED  # type: ignore[index]
    with pytest.raises(sink_module._Restage):
        _encode(net, per_row=False, staged=False)


def test_net_changes_tells_repeated_keys_per_branch() -> None:
    from branchline.events import Column, ColumnType, TableSchema
    from branchline.sinks.postgres.sink import _net_changes

    schema = TableSchema(id=TABLE, columns=(Column(name="id", type=ColumnType.INT64),), primary_key=("id",))
    other = TABLE.model_copy(update={"branch": "b2"})
    one_branch = [_event(i) for i in range(1, 6)]
    assert _net_changes(schema, one_branch, True) is one_branch  # every key once: the events themselves
    repeated = [*one_branch, _event(3, Op.UPDATE)]
    assert len(_net_changes(schema, repeated, True)) == 5  # key 3 twice: collapsed
    two_branches = [*one_branch, _event(3).model_copy(update={"table": other})]
    assert _net_changes(schema, two_branches, True) is two_branches  # same key, another branch
    assert len(_net_changes(schema, two_branches, False)) == 5  # without the branch in the key: collapsed
    assert len(_net_changes(schema, [*two_branches, _event(4, Op.UPDATE)], True)) == 6
