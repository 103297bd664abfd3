"""The SQL of one target table, built once per table schema and reused for every batch.

One batch = one transaction: COPY the net changes into a temporary staging table, then set-based
statements, each guarded so that a row's stored position only moves forward:

1. (only if the batch has unchanged TOAST values, or deletes in soft-delete mode) fill those staging
   values from the target row, so the upsert keeps what the target has (a target that never had the
   row has no value to keep: the column stays NULL until the source sends it);
2. upsert, in two statements: ``UPDATE .. FROM stage WHERE key matches AND t._bl_position < s._bl_position``
   for stored rows, then ``INSERT .. SELECT .. WHERE NOT EXISTS (stored row) .. ON CONFLICT (key) DO
   UPDATE .. WHERE t._bl_position < EXCLUDED._bl_position`` for new keys, skipping changes older than
   the table's last truncate or than a tombstone (the ON CONFLICT clause only covers a concurrent
   writer; the split avoids ON CONFLICT's speculative insert and row lock for every stored row);
3. (only if the batch has deletes, hard-delete mode) delete guarded the same way, and record tombstones.

The common path — no unchanged values, no deletes — is COPY + the UPDATE, and the INSERT only when
the UPDATE left some staged change unwritten. Only then (or before a direct COPY, below) one query
(`direct_check`) asks whether any truncate mark or tombstone lies at or above the batch's first
position; when none does, the guards cannot reject a row and the INSERT runs without them
(`upsert_unguarded`): a batch of updates to stored rows costs no such round trip. Both read under
READ COMMITTED, a few statements apart: a truncate committed concurrently by another writer of the
same table races with either form alike.

Faster still, insert-only changes (``c``/``r``) that no truncate mark or tombstone can guard off are
COPYed straight into the target; a key that exists after all (a replay) fails the COPY on the primary
key, the transaction rolls back and the batch is written again through staging. This is safe because
the target's primary key is exactly the conflict key, so no stored row can be silently replaced.

Tombstones (hard-delete mode) stay until a newer change of the key removes them or they outlive the
retention (`prune_tombstones`, run by the sink every `tombstone_prune_interval_s` per table): one small
row per deleted key, the price of never letting a late older change resurrect a deleted row. Past the
retention that protection is gone, which is why the retention must exceed how far back any replay
can reach.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from branchline.events import TableSchema
from branchline.sinks.postgres.ddl import TRUNCATIONS, TargetTable
from branchline.sinks.postgres.types import (
    DUMPS_ANY_OBJECT,
    TEXT_COPY_TYPES,
    Converter,
    converter,
    is_normalizer,
    staged_as_text,
)
from psycopg import sql

TEXT_OID = 25
TEXT_ARRAY_OID = 1009
NUMERIC_OID = 1700
TIMESTAMPTZ_OID = 1184


@dataclass(frozen=True)
class StagedColumn:
    name: str
    converter: Converter | None
    normalizer_only: bool = False
    """The converter only fixes values that break the event contract (e.g. an aware DATETIME): the
    fast path skips it and falls back when psycopg rejects a value."""
    dumps_any: bool = False
    """psycopg's dumper would accept `UNCHANGED` here (`types.DUMPS_ANY_OBJECT`): check by identity."""


@dataclass(frozen=True)
class TablePlan:
    """Everything needed to write batches of one table; rebuilt when the source schema changes."""

    source: TableSchema
    target: TargetTable
    keyed: bool
    soft_delete: bool
    branch_key: bool
    columns: tuple[StagedColumn, ...]
    copy_types: tuple[int, ...]
    stage_name: str
    create_stage: sql.Composed
    clear_stage: sql.Composed
    copy: sql.Composed
    copy_direct: sql.Composed | None
    """COPY of insert-only changes straight into the target (None when a column is staged as text)."""
    direct_types: tuple[int, ...]
    copy_text: sql.Composed | None
    """`copy` in COPY's text format, for `PostgresSink.write_text`; None when the table does not take text
    (a column type outside `types.TEXT_COPY_TYPES`, or no primary key)."""
    copy_direct_text: sql.Composed | None
    """`copy_direct` in COPY's text format (None as `copy_text`)."""
    direct_check: sql.Composed
    """True when a truncate mark or a tombstone could guard off a change at ``%(position)s`` or later:
    the batch needs the guarded upsert and must not COPY straight into the target."""
    prefill: sql.Composed | None
    update_existing: sql.Composed | None
    """Keyed tables: update the stored rows the batch has newer changes for (runs before `upsert`)."""
    upsert: sql.Composed
    """Insert what `update_existing` left (new keys), guarded; ON CONFLICT covers a concurrent insert."""
    upsert_unguarded: sql.Composed
    """The upsert without the truncate-mark and tombstone guards, for a batch `direct_check` cleared."""
    delete: sql.Composed | None
    tombstone: sql.Composed | None
    tombstone_cleanup: sql.Composed | None
    truncate: sql.Composed
    truncate_tombstones: sql.Composed | None
    prune_tombstones: sql.Composed | None
    """Remove up to ``%(limit)s`` tombstones written more than ``%(age_s)s`` seconds ago."""
    truncate_mark: sql.Composed

    @property
    def qualified(self) -> str:
        return f"{self.target.schema}.{self.target.name}"

    @property
    def table_id(self) -> str:
        return self.qualified


def _join(parts: Sequence[sql.Composable], sep: str = ", ") -> sql.Composed:
    return sql.SQL(sep).join(parts)


def build_plan(source: TableSchema, target: TargetTable, *, soft_delete: bool, branch_key: bool) -> TablePlan:
    keyed = bool(source.primary_key)
    table = sql.Identifier(target.schema, target.name)
    truncations = sql.Identifier(target.schema, TRUNCATIONS)
    names = [c.name for c in source.columns]
    target_type = {n: target.columns[n].type for n in names}
    text_staged = {n for n in names if staged_as_text(target_type[n])}

    def s(name: str) -> sql.Composable:
        """A staging column as the target type."""
        ref = sql.SQL("s.{}").format(sql.Identifier(name))
        if name in text_staged:
            return sql.SQL("{}::{}").format(ref, sql.SQL(target_type[name]))
        return ref

    # staging table: (_bl_branch,) source columns, bookkeeping, names of unchanged columns
    stage_defs: list[sql.Composable] = []
    copy_columns: list[sql.Composable] = []
    copy_types: list[int] = []
    if branch_key:
        stage_defs.append(sql.SQL("_bl_branch text"))
        copy_columns.append(sql.Identifier("_bl_branch"))
        copy_types.append(TEXT_OID)
    for name in names:
        staged = "text" if name in text_staged else target_type[name]
        stage_defs.append(sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(staged)))
        copy_columns.append(sql.Identifier(name))
        copy_types.append(TEXT_OID if name in text_staged else target.columns[name].oid)
    for definition, column, oid in (
        ("_bl_position numeric(38,0)", "_bl_position", NUMERIC_OID),
        ("_bl_op text", "_bl_op", TEXT_OID),
        ("_bl_source_ts timestamptz", "_bl_source_ts", TIMESTAMPTZ_OID),
        ("_bl_unchanged text[]", "_bl_unchanged", TEXT_ARRAY_OID),
    ):
        stage_defs.append(sql.SQL(definition))
        copy_columns.append(sql.Identifier(column))
        copy_types.append(oid)
    # one staging table per connection and table layout, kept for the session and emptied at each commit:
    # no catalog churn per batch (the sink keeps a few per connection: each commit empties them all)
    layout = f"{target.schema}.{target.name}|{stage_defs!r}"  # names and exact types, e.g. numeric(12,4)
    stage_name = "_bl_stage_" + hashlib.sha1(layout.encode()).hexdigest()[:16]
    stage = sql.Identifier(stage_name)
    create_stage = sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} ({}) ON COMMIT DELETE ROWS").format(
        stage, _join(stage_defs)
    )
    clear_stage = sql.SQL("TRUNCATE {}").format(stage)
    copy = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(stage, _join(copy_columns))
    # the same rows minus `_bl_unchanged`; `_bl_synced_at` defaults to now() like the upsert's
    copy_direct = None
    if not text_staged:
        copy_direct = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
            table, _join(copy_columns[:-1])
        )
    direct_types = tuple(copy_types[:-1])
    copy_text = copy_direct_text = None
    if keyed and copy_direct is not None and all(c.type in TEXT_COPY_TYPES for c in source.columns):
        copy_text = sql.SQL("COPY {} ({}) FROM STDIN").format(stage, _join(copy_columns))
        copy_direct_text = sql.SQL("COPY {} ({}) FROM STDIN").format(table, _join(copy_columns[:-1]))
    guards: list[sql.Composable] = [
        sql.SQL("EXISTS (SELECT 1 FROM {} WHERE table_name = {} AND position >= %(position)s)").format(
            truncations, sql.Literal(target.name)
        )
    ]
    if target.tombstones is not None:
        guards.append(
            sql.SQL("EXISTS (SELECT 1 FROM {} WHERE _bl_position >= %(position)s)").format(
                sql.Identifier(target.schema, target.tombstones)
            )
        )
    direct_check = sql.SQL("SELECT {}").format(_join(guards, " OR "))

    branch_value: sql.Composable = sql.SQL("s._bl_branch") if branch_key else sql.Literal("")
    key_match = _join(
        [
            sql.SQL("t.{} = {}").format(sql.Identifier(k), s(k) if k != "_bl_branch" else branch_value)
            for k in target.key
        ]
        if keyed
        else [sql.SQL("false")],
        " AND ",
    )

    # 1. prefill unchanged values (in soft-delete mode also what a key-only delete image lacks)
    prefill = None
    non_key = [n for n in names if n not in source.primary_key]
    if keyed and non_key:
        sets = [
            sql.SQL("{} = CASE WHEN {} = ANY(s._bl_unchanged) THEN t.{}{} ELSE s.{} END").format(
                sql.Identifier(n),
                sql.Literal(n),
                sql.Identifier(n),
                sql.SQL("::text") if n in text_staged else sql.SQL(""),
                sql.Identifier(n),
            )
            for n in non_key
        ]
        prefill = sql.SQL("UPDATE {} s SET {} FROM {} t WHERE {} AND s._bl_unchanged IS NOT NULL").format(
            stage, _join(sets), table, key_match
        )

    # 2. upsert
    insert_names = (["_bl_branch"] if branch_key else []) + names
    insert_names += ["_bl_position", "_bl_op", "_bl_source_ts", "_bl_synced_at"]
    select_values: list[sql.Composable] = ([branch_value] if branch_key else []) + [s(n) for n in names]
    select_values += [
        sql.SQL("s._bl_position"),
        sql.SQL("s._bl_op"),
        sql.SQL("s._bl_source_ts"),
        sql.SQL("now()"),
    ]
    if soft_delete:
        insert_names.append("_bl_deleted")
        select_values.append(sql.SQL("s._bl_op = 'd'"))
    insert_columns: list[sql.Composable] = [sql.Identifier(n) for n in insert_names]
    conditions: list[sql.Composable] = [sql.SQL("(w.position IS NULL OR s._bl_position > w.position)")]
    if keyed and not soft_delete:
        conditions.append(sql.SQL("s._bl_op <> 'd'"))
        tomb_match = _join(
            [
                sql.SQL("d.{} = {}").format(sql.Identifier(k), s(k) if k != "_bl_branch" else branch_value)
                for k in target.key
            ],
            " AND ",
        )
        assert target.tombstones is not None
        conditions.append(
            sql.SQL("NOT EXISTS (SELECT 1 FROM {} d WHERE {} AND d._bl_position >= s._bl_position)").format(
                sql.Identifier(target.schema, target.tombstones), tomb_match
            )
        )
    unguarded_conditions: list[sql.Composable] = []
    if keyed:
        # rows already stored were handled by `update_existing`; what is left are new keys
        new_key = sql.SQL("NOT EXISTS (SELECT 1 FROM {} t WHERE {})").format(table, key_match)
        conditions.append(new_key)
        unguarded_conditions.append(new_key)
    if keyed and not soft_delete:
        unguarded_conditions.append(sql.SQL("s._bl_op <> 'd'"))
    select = sql.SQL(
        "SELECT {} FROM {} s LEFT JOIN {} w ON w.table_name = {} AND w.branch = {} WHERE {}"
    ).format(
        _join(select_values),
        stage,
        truncations,
        sql.Literal(target.name),
        branch_value,
        _join(conditions, " AND "),
    )
    unguarded = sql.SQL("SELECT {} FROM {} s WHERE {}").format(
        _join(select_values),
        stage,
        _join(unguarded_conditions, " AND ") if unguarded_conditions else sql.SQL("true"),
    )
    update_existing = None
    if keyed:
        # stored rows are updated in place: a plain UPDATE costs less than ON CONFLICT's speculative
        # insert and row lock. No truncate or tombstone guard is needed here: a stored row is newer than
        # every truncate mark and tombstone of its key, and the update needs a newer position still.
        assignments = [
            sql.SQL("{} = {}").format(sql.Identifier(n), value)
            for n, value in zip(insert_names, select_values, strict=True)
            if n not in target.key
        ]
        update_existing = sql.SQL(
            "UPDATE {} AS t SET {} FROM {} s WHERE {} AND t._bl_position < s._bl_position{}"
        ).format(
            table,
            _join(assignments),
            stage,
            key_match,
            sql.SQL(" AND s._bl_op <> 'd'") if not soft_delete else sql.SQL(""),
        )
    key_list = _join([sql.Identifier(k) for k in target.key])
    if keyed:
        updates = [
            sql.SQL("{} = EXCLUDED.{}").format(sql.Identifier(n), sql.Identifier(n))
            for n in insert_names
            if n not in target.key
        ]
        upsert, upsert_unguarded = (
            sql.SQL(
                "INSERT INTO {} AS t ({}) {} ON CONFLICT ({}) DO UPDATE SET {}"
                " WHERE t._bl_position < EXCLUDED._bl_position"
            ).format(table, _join(insert_columns), source, key_list, _join(updates))
            for source in (select, unguarded)
        )
    else:
        upsert, upsert_unguarded = (
            sql.SQL("INSERT INTO {} AS t ({}) {} ON CONFLICT ({}) DO NOTHING").format(
                table, _join(insert_columns), source, key_list
            )
            for source in (select, unguarded)
        )

    # 3. hard deletes and tombstones
    delete = tombstone = tombstone_cleanup = truncate_tombstones = prune_tombstones = None
    if keyed and not soft_delete:
        assert target.tombstones is not None
        tombs = sql.Identifier(target.schema, target.tombstones)
        delete = sql.SQL(
            "DELETE FROM {} t USING {} s WHERE s._bl_op = 'd' AND {} AND t._bl_position < s._bl_position"
        ).format(table, stage, key_match)
        tomb_values = [s(k) if k != "_bl_branch" else branch_value for k in target.key]
        tombstone = sql.SQL(
            "INSERT INTO {} AS d ({}, _bl_position) SELECT {}, s._bl_position FROM {} s WHERE s._bl_op = 'd'"
            " ON CONFLICT ({}) DO UPDATE SET _bl_position = EXCLUDED._bl_position, _bl_synced_at = now()"
            " WHERE d._bl_position < EXCLUDED._bl_position"
        ).format(tombs, key_list, _join(tomb_values), stage, key_list)
        tomb_match_cleanup = _join(
            [
                sql.SQL("d.{} = {}").format(sql.Identifier(k), s(k) if k != "_bl_branch" else branch_value)
                for k in target.key
            ],
            " AND ",
        )
        tombstone_cleanup = sql.SQL(
            "DELETE FROM {} d USING {} s WHERE s._bl_op <> 'd' AND {} AND d._bl_position < s._bl_position"
        ).format(tombs, stage, tomb_match_cleanup)
        truncate_tombstones = sql.SQL("DELETE FROM {} WHERE _bl_position < %(position)s{}").format(
            tombs, sql.SQL(" AND _bl_branch = %(branch)s") if branch_key else sql.SQL("")
        )
        # in slices, so pruning a large backlog never holds one long transaction
        prune_tombstones = sql.SQL(
            "DELETE FROM {} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {}"
            " WHERE _bl_synced_at < now() - make_interval(secs => %(age_s)s) LIMIT %(limit)s))"
        ).format(tombs, tombs)

    # truncate: older rows go (or are marked deleted); the mark stops older changes from coming back
    branch_filter = sql.SQL(" AND _bl_branch = %(branch)s") if branch_key else sql.SQL("")
    if soft_delete:
        moves = sql.SQL(", _bl_position = %(position)s") if keyed else sql.SQL("")
        truncate = sql.SQL(
            "UPDATE {} SET _bl_deleted = true, _bl_op = 't', _bl_source_ts = %(source_ts)s, _bl_synced_at = now(){}"
            " WHERE _bl_position < %(position)s{}"
        ).format(table, moves, branch_filter)
    else:
        truncate = sql.SQL("DELETE FROM {} WHERE _bl_position < %(position)s{}").format(table, branch_filter)
    truncate_mark = sql.SQL(
        "INSERT INTO {} AS w (table_name, branch, position) VALUES ({}, %(branch)s, %(position)s)"
        " ON CONFLICT (table_name, branch) DO UPDATE SET position = EXCLUDED.position"
        " WHERE w.position < EXCLUDED.position"
    ).format(truncations, sql.Literal(target.name))

    return TablePlan(
        source=source,
        target=target,
        keyed=keyed,
        soft_delete=soft_delete,
        branch_key=branch_key,
        columns=tuple(
            StagedColumn(c.name, converter(c), is_normalizer(c), c.type in DUMPS_ANY_OBJECT)
            for c in source.columns
        ),
        copy_types=tuple(copy_types),
        stage_name=stage_name,
        create_stage=create_stage,
        clear_stage=clear_stage,
        copy=copy,
        copy_direct=copy_direct,
        direct_types=direct_types,
        copy_text=copy_text,
        copy_direct_text=copy_direct_text,
        direct_check=direct_check,
        prefill=prefill,
        update_existing=update_existing,
        upsert=upsert,
        upsert_unguarded=upsert_unguarded,
        delete=delete,
        tombstone=tombstone,
        tombstone_cleanup=tombstone_cleanup,
        truncate=truncate,
        truncate_tombstones=truncate_tombstones,
        prune_tombstones=prune_tombstones,
        truncate_mark=truncate_mark,
    )
