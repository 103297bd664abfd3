"""Create and evolve target tables so that they hold what the source sends.

Layout of a target table (``<schema>.<source table>``):

- ``_bl_branch text`` first, when branch keys are on (fan-in of several branches into one table);
- the source columns, mapped by `branchline.sinks.postgres.types` (non-key columns nullable: a delete
  may carry the key only);
- ``_bl_position numeric(38,0)`` the source position of the row's last change, ``_bl_op`` its
  operation (c/u/r/d/t), ``_bl_source_ts`` when the source committed it, ``_bl_synced_at`` when the
  sink wrote it, and ``_bl_deleted`` in soft-delete mode;
- ``_bl_synced_at`` defaults to now(), so a COPY straight into the table (insert-only batches) sets it
  as the upsert does;
- created with the sink's ``fillfactor`` (default 85): inserts leave room on each page, so an update
  can stay on its page (HOT: no new index entry); only the primary key is indexed, and it never
  changes on update;
- primary key: (``_bl_branch``,) source key. A table without a primary key is kept as a change log:
  one row per change, keyed by (``_bl_branch``,) ``_bl_position``; without a key "the row" that an
  update or delete means is ambiguous (duplicate rows are legal there).

Beside it, in the same schema: ``_bl_truncations`` (per table and branch, the position of the last
truncate: older changes are not applied again) and, in hard-delete mode, ``_bl_del_<table>``
tombstones (key -> position of the delete, and when it was written), so a replayed or late older
change cannot bring a deleted row back; the sink prunes those older than its retention
(`PostgresSinkConfig.tombstone_retention_h`); an index on their ``_bl_position`` lets a batch ask cheaply whether any tombstone
could guard it off.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from branchline.errors import FatalSinkError
from branchline.events import TableSchema
from branchline.sinks.postgres.types import merge_types, target_type
from psycopg import AsyncConnection, sql

PREFIX = "_bl_"
TRUNCATIONS = "_bl_truncations"
MAX_IDENTIFIER = 63


@dataclass(frozen=True, slots=True)
class TargetColumn:
    name: str
    type: str
    """As ``format_type()`` prints it."""
    oid: int
    has_default: bool = False


@dataclass(frozen=True, slots=True)
class TargetTable:
    """A target table as it exists after `ensure_table`."""

    schema: str
    name: str
    tombstones: str | None
    """Tombstone table name (hard-delete mode, tables with a key)."""
    key: tuple[str, ...]
    """Target primary key, bookkeeping columns included."""
    columns: dict[str, TargetColumn]
    tombstones_exist: bool = False
    """Whether the tombstone table held rows when the sink looked."""


def tombstone_name(table: str) -> str:
    name = f"{PREFIX}del_{table}"
    if len(name.encode()) <= MAX_IDENTIFIER:
        return name
    digest = hashlib.sha1(table.encode()).hexdigest()[:10]
    return f"{PREFIX}del_{table.encode()[:40].decode(errors='ignore')}_{digest}"


def tombstone_index_name(table: str) -> str:
    """The tombstone table's index on `_bl_position` (indexes share the schema's namespace)."""
    digest = hashlib.sha1(table.encode()).hexdigest()[:12]
    return f"{PREFIX}delpos_{table.encode()[:36].decode(errors='ignore')}_{digest}"


def _check_identifier(kind: str, name: str) -> None:
    if len(name.encode()) > MAX_IDENTIFIER:
        raise FatalSinkError(f"`{kind}` must be at most {MAX_IDENTIFIER} bytes in PostgreSQL; got {name!r}")


async def ensure_table(
    conn: AsyncConnection,
    schema: str,
    table: TableSchema,
    *,
    soft_delete: bool,
    branch_key: bool,
    fillfactor: int = 100,
) -> TargetTable:
    """Create the schema, the table and its side tables, or add and widen columns; one transaction.

    A new table gets ``fillfactor`` (room on each page for HOT updates, see
    `PostgresSinkConfig.fillfactor`); an existing one keeps its own. Concurrent writers of the same
    table serialize here on an advisory lock.
    """
    name = table.id.table
    _check_identifier("schema", schema)
    _check_identifier("table", name)
    for column in table.columns:
        if column.name.startswith(PREFIX):
            raise FatalSinkError(
                f"`column` names must not start with the reserved {PREFIX!r} in {table.id.qualified}; "
                f"got {column.name!r}"
            )
    ident = sql.Identifier(schema, name)
    keyed = bool(table.primary_key)
    branch = ("_bl_branch",) if branch_key else ()
    key = (*branch, *table.primary_key) if keyed else (*branch, "_bl_position")
    tombstones = tombstone_name(name) if keyed and not soft_delete else None

    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"branchline:{schema}.{name}"])
        await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        await conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (table_name text NOT NULL, branch text NOT NULL,"
                " position numeric(38,0) NOT NULL, PRIMARY KEY (table_name, branch))"
            ).format(sql.Identifier(schema, TRUNCATIONS))
        )
        existing = await _columns(conn, schema, name)
        wanted = {c.name: target_type(c) for c in table.columns}
        if not existing:
            definitions: list[sql.Composable] = []
            if branch_key:
                definitions.append(sql.SQL("_bl_branch text NOT NULL"))
            for column in table.columns:
                not_null = sql.SQL(" NOT NULL") if column.name in table.primary_key else sql.SQL("")
                definitions.append(
                    sql.SQL("{} {}{}").format(
                        sql.Identifier(column.name), sql.SQL(wanted[column.name]), not_null
                    )
                )
            definitions += [
                sql.SQL("_bl_position numeric(38,0) NOT NULL"),
                sql.SQL("_bl_op text NOT NULL"),
                sql.SQL("_bl_source_ts timestamp(6) with time zone"),
                sql.SQL("_bl_synced_at timestamp(6) with time zone NOT NULL DEFAULT now()"),
            ]
            if soft_delete:
                definitions.append(sql.SQL("_bl_deleted boolean NOT NULL DEFAULT false"))
            definitions.append(
                sql.SQL("PRIMARY KEY ({})").format(sql.SQL(", ").join(map(sql.Identifier, key)))
            )
            storage = (
                sql.SQL(" WITH (fillfactor = {})").format(sql.Literal(int(fillfactor)))
                if fillfactor < 100
                else sql.SQL("")
            )
            await conn.execute(
                sql.SQL("CREATE TABLE {} ({}){}").format(ident, sql.SQL(", ").join(definitions), storage)
            )
        else:
            current_key = await _primary_key(conn, schema, name)
            if current_key != key:
                raise FatalSinkError(
                    f"`primary key` of {schema}.{name} must be {list(key)!r} to match the source and the "
                    f"branch_key setting; got {list(current_key)!r}"
                )
            for column in table.columns:
                have = existing.get(column.name)
                want = wanted[column.name]
                if have is None:
                    await conn.execute(
                        sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                            ident, sql.Identifier(column.name), sql.SQL(want)
                        )
                    )
                    continue
                merged = merge_types(have.type, want)
                if merged is None:
                    raise FatalSinkError(
                        f"`type` of {schema}.{name}.{column.name} must widen to hold the source's {want!r}; "
                        f"got {have.type!r} in the target"
                    )
                if merged != have.type:
                    await conn.execute(
                        sql.SQL("ALTER TABLE {} ALTER COLUMN {} TYPE {} USING {}::{}").format(
                            ident,
                            sql.Identifier(column.name),
                            sql.SQL(merged),
                            sql.Identifier(column.name),
                            sql.SQL(merged),
                        )
                    )
            synced = existing.get("_bl_synced_at")
            if synced is not None and not synced.has_default:  # tables made before the direct COPY path
                await conn.execute(
                    sql.SQL("ALTER TABLE {} ALTER COLUMN _bl_synced_at SET DEFAULT now()").format(ident)
                )
            if soft_delete and "_bl_deleted" not in existing:
                await conn.execute(
                    sql.SQL("ALTER TABLE {} ADD COLUMN _bl_deleted boolean NOT NULL DEFAULT false").format(
                        ident
                    )
                )
        if tombstones:
            key_columns = await _columns(conn, schema, name)
            side: list[sql.Composable] = [
                sql.SQL("{} {} NOT NULL").format(sql.Identifier(k), sql.SQL(key_columns[k].type)) for k in key
            ]
            side.append(sql.SQL("_bl_position numeric(38,0) NOT NULL"))
            side.append(sql.SQL("_bl_synced_at timestamp(6) with time zone NOT NULL DEFAULT now()"))
            side.append(sql.SQL("PRIMARY KEY ({})").format(sql.SQL(", ").join(map(sql.Identifier, key))))
            await conn.execute(
                sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(
                    sql.Identifier(schema, tombstones), sql.SQL(", ").join(side)
                )
            )
            if "_bl_synced_at" not in await _columns(conn, schema, tombstones):
                # made by an older sink: existing tombstones count as written now (no table rewrite)
                await conn.execute(
                    sql.SQL(
                        "ALTER TABLE {} ADD COLUMN _bl_synced_at timestamp(6) with time zone NOT NULL DEFAULT now()"
                    ).format(sql.Identifier(schema, tombstones))
                )
            # the direct COPY path asks "any tombstone at or above this position?" once per batch
            await conn.execute(
                sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (_bl_position)").format(
                    sql.Identifier(tombstone_index_name(name)), sql.Identifier(schema, tombstones)
                )
            )
            cursor = await conn.execute(
                sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(sql.Identifier(schema, tombstones))
            )
            row = await cursor.fetchone()
            tombstones_exist = bool(row and row[0])
        else:
            tombstones_exist = False
        columns = await _columns(conn, schema, name)
    return TargetTable(schema, name, tombstones, key, columns, tombstones_exist)


async def _columns(conn: AsyncConnection, schema: str, name: str) -> dict[str, TargetColumn]:
    cursor = await conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.atttypid::int, a.atthasdef"
        " FROM pg_attribute a WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped"
        " ORDER BY a.attnum",
        [sql.Identifier(schema, name).as_string(conn)],
    )
    return {row[0]: TargetColumn(row[0], row[1], row[2], row[3]) for row in await cursor.fetchall()}


async def _primary_key(conn: AsyncConnection, schema: str, name: str) -> tuple[str, ...]:
    cursor = await conn.execute(
        "SELECT a.attname FROM pg_index i"
        " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
        " WHERE i.indrelid = to_regclass(%s) AND i.indisprimary"
        " ORDER BY array_position(i.indkey::int2[], a.attnum)",
        [sql.Identifier(schema, name).as_string(conn)],
    )
    return tuple(row[0] for row in await cursor.fetchall())
