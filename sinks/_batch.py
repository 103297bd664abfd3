"""What every sink does to a batch before writing it: split at truncates, collapse to one change per key.

Why a sink collapses on its own: a set-based upsert fails when a batch holds one key twice
("cannot affect row a second time"), and a sink must be correct on any input it is given, even when
the stream stage already deduplicated (`branchline.streams.dedupe`). This is deliberately small:
highest position wins per key, and a later change that carries `UNCHANGED` values takes them from the
earlier change in the same batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from operator import attrgetter
from typing import Any

from branchline.events import UNCHANGED, ChangeEvent, Op, TableId, TableSchema


@dataclass(slots=True)
class NetChange:
    """The net effect of a batch on one key (or, for a table without a key, one change)."""

    op: Op
    branch: str
    key: tuple[Any, ...]
    position: int
    source_ts: datetime | None
    row: dict[str, Any]
    """Values to write; may hold `UNCHANGED` for a value the source did not send. A delete's row holds
    what its image carried (often the key only); absent columns mean "keep the stored value"."""

    @property
    def is_delete(self) -> bool:
        return self.op is Op.DELETE

    def unchanged_columns(self) -> list[str]:
        return [name for name, value in self.row.items() if value is UNCHANGED]


def split_at_truncates(
    events: Sequence[ChangeEvent],
) -> Iterator[tuple[Sequence[ChangeEvent], ChangeEvent | None]]:
    """Yield (changes, truncate-or-None) segments in batch order: apply the changes, then the truncate."""
    if _TRUNCATE not in map(_op_of, events):  # the common case, in one pass at C speed
        yield events, None
        return
    start = 0
    for index, event in enumerate(events):
        if event.op is Op.TRUNCATE:
            yield events[start:index], event
            start = index + 1
    if start < len(events) or not events:
        yield events[start:], None


def _key_error(event: ChangeEvent, exc: KeyError) -> KeyError:
    return KeyError(f"`key` of {event.table.qualified} at position {event.position} must hold {exc}")


def collapse(table: TableSchema, events: Sequence[ChangeEvent], by_branch: bool = True) -> list[NetChange]:
    """One `NetChange` per (branch, key) — per key when ``by_branch`` is False, i.e. when the target
    key has no branch — : the change with the highest position wins.

    A table without a primary key keeps every change (sinks store such tables as a change log).
    Truncates must be split off first (`split_at_truncates`). Rows are shared with the events, never
    modified: a merge writes a new dict. This loop runs once per change, so it stays lean.
    """
    if not table.primary_key:
        return [
            NetChange(
                e.op,
                e.table.branch,
                (),
                e.position,
                e.source_ts,
                (e.before if e.op is _DELETE else e.after) or {},
            )
            for e in events
            if e.op is not Op.TRUNCATE
        ]
    key_columns = table.primary_key
    single = key_columns[0] if len(key_columns) == 1 else None
    latest: dict[Any, NetChange] = {}
    for event in events:
        op = event.op
        if op is _TRUNCATE:
            raise ValueError("truncates must be split off before collapse")
        source = event.key or event.row or {}
        try:
            key = (source[single],) if single is not None else tuple([source[k] for k in key_columns])
        except KeyError as exc:
            raise _key_error(event, exc) from exc
        branch = event.table.branch
        slot = (branch, key) if by_branch else key
        row = (event.before if op is _DELETE else event.after) or event.key
        change = NetChange(op, branch, key, event.position, event.source_ts, row)
        previous = latest.get(slot)
        if previous is None:
            latest[slot] = change
            continue
        if previous.position > change.position:
            previous, change = change, previous
        if not previous.is_delete:
            merged = dict(change.row)
            if change.is_delete:
                # a delete image may carry the key only: the other values are the upsert's
                for name, value in previous.row.items():
                    if name not in merged and value is not UNCHANGED:
                        merged[name] = value
            else:
                for name, value in change.row.items():
                    if value is UNCHANGED and previous.row.get(name, UNCHANGED) is not UNCHANGED:
                        merged[name] = previous.row[name]
            change.row = merged
        latest[slot] = change
    return list(latest.values())


_DELETE = Op.DELETE
_TRUNCATE = Op.TRUNCATE
_op_of = attrgetter("op")


def render(template: str, table: TableId) -> str:
    """Fill a naming template (`{source}`, `{branch}`, `{database}`, `{schema}`, `{table}`)."""
    return template.format(
        source=table.source,
        branch=table.branch,
        database=table.database,
        schema=table.schema_ or table.database,
        table=table.table,
    )
