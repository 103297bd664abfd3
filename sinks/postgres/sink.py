"""`PostgresSink`: idempotent, position-guarded writes into a cloud PostgreSQL.

Each `write_batch` is one transaction (see `branchline.sinks.postgres.plan` for its statements), retried
as a whole on retryable errors; when it returns the batch is committed. Replays, restarts and late
older changes never move a row backwards: every statement compares the stored `_bl_position`.

Where the time goes (``python -m branchline.sinks.bench``): encoding rows for COPY is Python's share
(psycopg's C encoder fed by one flat loop, `branchline.sinks.postgres._copy`); the server's share is the
COPY itself and, for changes of stored rows, the UPDATE. Measured on the stack's PostgreSQL 15 (backend
CPU from /proc, 1k-20k-row batches of the bench's table), the UPDATE alone costs 1.5-2.8x the server CPU
of a plain COPY of the same rows, and COPY into staging 0.6-0.8x more: updates cannot reach a plain
COPY's rate, and the bench's "staged bare UPDATE" (no guard, no bookkeeping) shows where their ceiling
is. Tables are created with a fill factor (`PostgresSinkConfig.fillfactor`) so updates can stay on their
page (HOT), which saves the index entry and part of the WAL.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from datetime import UTC
from decimal import Decimal
from itertools import repeat
from operator import add, attrgetter, itemgetter
from typing import Any, TypeAlias

import orjson
import psycopg
from branchline.errors import FatalSinkError, SinkError
from branchline.events import UNCHANGED, ChangeEvent, Op, TableSchema
from branchline.sinks._batch import collapse, render, split_at_truncates
from branchline.sinks._retry import retrying
from branchline.sinks.config import PostgresSinkConfig
from branchline.sinks.contract import SinkCapabilities, TextRows
from branchline.sinks.postgres._copy import FLUSH_AT, BinaryRows
from branchline.sinks.postgres.ddl import MAX_IDENTIFIER, ensure_table
from branchline.sinks.postgres.errors import map_error
from branchline.sinks.postgres.plan import TablePlan, build_plan
from branchline.sinks.postgres.types import Converter
from psycopg import AsyncConnection, sql
from psycopg.conninfo import make_conninfo
from psycopg.types.json import set_json_dumps
from psycopg_pool import AsyncConnectionPool, PoolTimeout

log = logging.getLogger("branchline.sinks.postgres")
_DELETE = Op.DELETE
_OP_CODE = {op: op.value for op in Op}
_UNCHANGED_ID = id(UNCHANGED)
_STAGES_PER_CONNECTION = 8
_INSERTS = frozenset((Op.CREATE, Op.READ))
_op_of = attrgetter("op")
_position_of = attrgetter("position")
_key_of = attrgetter("key")
_table_of = attrgetter("table")
_PRUNE_SLICE = 10_000


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return orjson.Fragment(str(value))  # exact: never through float
    raise TypeError(f"`json value` must be JSON-serializable; got {type(value).__name__}")


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=_json_default)


def conninfo(config: PostgresSinkConfig) -> str:
    """The libpq connection string; the only place the password is revealed."""
    options: dict[str, Any] = {
        "application_name": config.application_name,
        "connect_timeout": max(1, int(config.connect_timeout_s)),
    }
    explicit = config.model_fields_set
    if config.dsn is None or "sslmode" in explicit:
        options["sslmode"] = config.sslmode
    if config.sslrootcert is not None:
        options["sslrootcert"] = str(config.sslrootcert)
    if config.dsn is not None:
        return make_conninfo(config.dsn.get_secret_value(), **options)
    options.update(host=config.host, port=config.port, user=config.user, dbname=config.database)
    if config.password is not None and config.password.get_secret_value():
        options["password"] = config.password.get_secret_value()  # empty = PGPASSWORD / ~/.pgpass
    return make_conninfo("", **options)


class PostgresSink:
    """Writes batches of changes into PostgreSQL tables, one transaction per batch."""

    def __init__(self, config: PostgresSinkConfig, name: str = "postgres") -> None:
        self.config = config
        self.name = name
        self.capabilities = SinkCapabilities(
            deletes=True,
            soft_deletes=config.soft_delete,
            truncate=True,
            add_columns=True,
            max_identifier_length=MAX_IDENTIFIER,
            durable_on_write=True,
        )
        self._pool: AsyncConnectionPool | None = None
        self._pool_lock = asyncio.Lock()
        self._plans: dict[tuple[str, str], TablePlan] = {}
        self._with_tombstones: set[str] = set()
        """Tables whose tombstone table may hold rows (seen at start-up, or deletes written since)."""
        self._stages: weakref.WeakKeyDictionary[AsyncConnection, OrderedDict[str, None]] = (
            weakref.WeakKeyDictionary()
        )
        """Per pooled connection: the staging tables it holds, least recently used first."""
        self._pruned_at: dict[str, float] = {}
        """Per table: when this sink last pruned its tombstones (monotonic seconds)."""
        self._direct_off: set[str] = set()
        """Tables whose last direct COPY met stored rows (a replay): stage until inserts are new again."""
        self._normalized: set[str] = set()
        """Tables whose values needed the contract-repairing conversions once: always apply them."""

    # --- Sink protocol ---------------------------------------------------------------------------

    async def write_batch(self, table: TableSchema, events: Sequence[ChangeEvent]) -> None:
        """Apply one table's changes in one transaction; see `Sink.write_batch` for the guarantees."""
        if not events:
            return
        plan = await self._plan(table)
        await self._write_retrying(plan, events, len(events))

    async def write_text(self, table: TableSchema, rows: TextRows) -> bool:
        """Apply one table's changes given as text COPY rows (`TextRows`), as `write_batch` applies events;
        False, writing nothing, when the table does not take text (`TablePlan.copy_text`) or the rows hold
        deletes in soft-delete mode (the event path fills what a key-only image lacks)."""
        plan = await self._plan(table)
        if plan.copy_text is None or (rows.deletes and plan.soft_delete):
            return False
        await self._write_retrying(plan, rows, rows.count)
        return True

    async def flush(self) -> None:
        """Nothing to do: every `write_batch` commits before it returns."""

    async def probe(self) -> None:
        """One round trip to the store, with the write path's retries and errors.

        Why: heartbeat rows are measured at the sink but never written (`metrics.HeartbeatSkippingSink`);
        the probe is what makes an unreachable store stop them, so lag rises on idle tables too.
        """

        async def select_one() -> None:
            try:
                pool = await self._get_pool()
                async with pool.connection() as conn:
                    await conn.execute("SELECT 1")
            except SinkError:
                raise
            except (psycopg.Error, PoolTimeout, OSError) as exc:
                raise map_error(exc, table="(heartbeat probe)") from exc

        await retrying(
            select_one,
            what="reaching the store",
            max_attempts=self.config.max_attempts,
            backoff_s=self.config.retry_backoff_s,
            max_backoff_s=self.config.retry_max_backoff_s,
            name=self.name,
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    # --- internals -------------------------------------------------------------------------------

    async def _configure(self, conn: AsyncConnection) -> None:
        set_json_dumps(_dumps, context=conn)
        # staging tables live in temp buffers (8 MB by default): keep a 20k-row batch off the disk
        await conn.execute("SET temp_buffers = '64MB'")
        # every join the sink runs is a staged batch against an index on the same key; without
        # statistics on the staging table the planner would hash it and scan the whole target
        await conn.execute("SET enable_hashjoin = off")
        await conn.execute("SET enable_mergejoin = off")
        await conn.commit()

    async def _get_pool(self) -> AsyncConnectionPool:
        async with self._pool_lock:
            if self._pool is None:
                pool = AsyncConnectionPool(
                    conninfo(self.config),
                    min_size=self.config.pool_min_size,
                    max_size=self.config.pool_max_size,
                    open=False,
                    configure=self._configure,
                    timeout=self.config.connect_timeout_s,
                    name=f"branchline-{self.name}",
                )
                try:
                    await pool.open(wait=True, timeout=self.config.connect_timeout_s)
                except Exception as exc:
                    await pool.close()
                    # the pool only says "incomplete"; one direct attempt names the real cause
                    try:
                        conn = await psycopg.AsyncConnection.connect(conninfo(self.config))
                    except Exception as cause:
                        raise map_error(cause, table="(connecting)") from cause
                    await conn.close()
                    raise map_error(exc, table="(connecting)") from exc
                self._pool = pool
            return self._pool

    def schema_for(self, table: TableSchema) -> str:
        return render(self.config.schema_, table.id)

    async def _plan(self, table: TableSchema) -> TablePlan:
        schema = self.schema_for(table)
        slot = (schema, table.id.table)
        plan = self._plans.get(slot)
        if plan is not None and plan.source == table:
            return plan

        async def create() -> TablePlan:
            pool = await self._get_pool()
            try:
                async with pool.connection() as conn:
                    target = await ensure_table(
                        conn,
                        schema,
                        table,
                        soft_delete=self.config.soft_delete,
                        branch_key=self.config.branch_key,
                        fillfactor=self.config.fillfactor,
                    )
            except SinkError:
                raise
            except Exception as exc:
                raise map_error(
                    exc, table=f"{schema}.{table.id.table}", where="(creating or altering the table)"
                ) from exc
            return build_plan(
                table, target, soft_delete=self.config.soft_delete, branch_key=self.config.branch_key
            )

        plan = await retrying(
            create,
            what=f"preparing {schema}.{table.id.table}",
            max_attempts=self.config.max_attempts,
            backoff_s=self.config.retry_backoff_s,
            max_backoff_s=self.config.retry_max_backoff_s,
            name=self.name,
        )
        if plan.target.tombstones_exist:
            self._with_tombstones.add(plan.qualified)
        self._plans[slot] = plan
        return plan

    async def _write_retrying(self, plan: TablePlan, changes: Sequence[ChangeEvent] | TextRows, count: int) -> None:
        """`_write` with the sink's retries, then the table's tombstone housekeeping."""
        await retrying(
            lambda: self._write(plan, changes),
            what=f"writing {count} changes into {plan.qualified}",
            max_attempts=self.config.max_attempts,
            backoff_s=self.config.retry_backoff_s,
            max_backoff_s=self.config.retry_max_backoff_s,
            name=self.name,
        )
        await self._prune_now_and_then(plan)

    async def _write(self, plan: TablePlan, events: Sequence[ChangeEvent] | TextRows) -> None:
        """One transaction: ``events`` (split at truncates and collapsed) or text rows, with retries of the
        transaction for the cases only a second form can write (`_Renormalize`, `_Restage`)."""
        pool = await self._get_pool()
        current: list[_Net] | TextRows = []
        text = not isinstance(events, Sequence)

        def describe(line: int) -> str:
            if not isinstance(current, list):
                return current.describe(line)
            if 1 <= line <= len(current):
                change = current[line - 1]
                return f"key {_describe_key(plan, change)} at position {change.position}"
            return ""

        async def transaction(normalize: bool, direct: bool) -> None:
            nonlocal current
            async with pool.connection() as conn:
                try:
                    async with conn.transaction():
                        staged = False
                        parts = [(events, None)] if text else split_at_truncates(events)  # type: ignore[arg-type]
                        for changes, truncate in parts:
                            net = changes if text else _net_changes(plan.source, changes, plan.branch_key)
                            current = net
                            if not _count(net):
                                pass
                            elif await self._direct(conn, plan, net, direct, normalize):
                                pass  # written straight into the target
                            else:
                                if staged:
                                    await conn.execute(plan.clear_stage)
                                else:
                                    await self._stage(conn, plan)
                                staged = True
                                upserted = await self._apply(conn, plan, net, normalize)
                                if (
                                    plan.table_id in self._direct_off
                                    and upserted == _count(net)
                                    and _only_inserts(net)
                                ):
                                    self._direct_off.discard(plan.table_id)  # new rows again: try COPY
                            if truncate is not None:
                                await self._truncate(conn, plan, truncate)
                except BaseException:
                    self._stages.pop(conn, None)  # a rollback may have undone a CREATE or a DROP
                    raise

        normalize = plan.table_id in self._normalized
        direct = True
        try:
            while True:
                try:
                    await transaction(normalize, direct)
                    return
                except _Renormalize:
                    if normalize:
                        raise
                    # a value outside the event contract (aware DATETIME, naive TIMESTAMP): the COPY was
                    # abandoned and rolled back; write the batch again with every conversion on
                    self._normalized.add(plan.table_id)
                    normalize = True
                except _Restage:
                    # an insert met a stored row (a replay) or an unchanged value: stage this batch
                    direct = False
        except SinkError:
            raise
        except KeyError as exc:  # from the collapse: an event without its key
            raise FatalSinkError(f"`{plan.qualified}` {exc.args[0] if exc.args else exc}") from exc
        except (psycopg.Error, PoolTimeout, OSError) as exc:
            if isinstance(events, Sequence):
                where = f"(positions {min(e.position for e in events)}..{max(e.position for e in events)})"
            else:
                where = f"(positions from {events.min_position})"
            raise map_error(exc, table=plan.qualified, describe_copy_line=describe, where=where) from exc

    async def _stage(self, conn: AsyncConnection, plan: TablePlan) -> None:
        """Make sure this connection has the table's staging table (empty: ON COMMIT DELETE ROWS).

        Every commit empties every such table of the session, so a connection keeps only the
        `_STAGES_PER_CONNECTION` most recently used ones; the rest are dropped.
        """
        stages = self._stages.setdefault(conn, OrderedDict())
        if plan.stage_name in stages:
            stages.move_to_end(plan.stage_name)
            return
        await conn.execute(plan.create_stage)
        stages[plan.stage_name] = None
        while len(stages) > _STAGES_PER_CONNECTION:
            oldest, _ = stages.popitem(last=False)
            await conn.execute(sql.SQL("DROP TABLE IF EXISTS pg_temp.{}").format(sql.Identifier(oldest)))

    async def _may_be_guarded(self, conn: AsyncConnection, plan: TablePlan, net: list[_Net] | TextRows) -> bool:
        """Whether a truncate mark or a tombstone lies at or above ``net``'s first position, so that
        new keys need the guarded INSERT (and insert-only changes cannot be COPYed into the target)."""
        first = min(map(_position_of, net)) if isinstance(net, list) else net.min_position
        cursor = await conn.execute(plan.direct_check, {"position": first})
        row = await cursor.fetchone()
        return row is None or bool(row[0])

    async def _direct(
        self, conn: AsyncConnection, plan: TablePlan, net: list[_Net] | TextRows, direct: bool, normalize: bool
    ) -> bool:
        """Write ``net`` by COPY straight into the target when it can be; True when it was.

        The direct COPY is for insert-only changes (``c``/``r``) that no truncate mark or tombstone
        guards off: it runs at the rate of a plain COPY. A key that exists after all (a replay, a late
        redelivery) fails it on the primary key: `_Restage` rolls the transaction back, the caller
        writes the batch again through staging, and this table skips the direct COPY until an
        insert-only batch is all new again. Other batches skip the guard query here: `_apply` asks it
        only if its UPDATE left rows for the INSERT (a round trip less per batch of updates).
        """
        if (
            not direct
            or plan.copy_direct is None
            or plan.table_id in self._direct_off
            or not _only_inserts(net)
            or await self._may_be_guarded(conn, plan, net)
        ):
            return False
        try:
            if not isinstance(net, list):
                assert plan.copy_direct_text is not None
                async with conn.cursor() as cur, cur.copy(plan.copy_direct_text) as copy:
                    await copy.write(_text_body(plan, net, staged=False))
                return True
            async with conn.cursor() as cur, cur.copy(plan.copy_direct) as copy:
                copy.set_types(plan.direct_types)
                await self._encode(BinaryRows(copy), plan, net, normalize, staged=False)
        except psycopg.errors.UniqueViolation as exc:
            self._direct_off.add(plan.table_id)
            raise _Restage from exc
        return True

    async def _apply(
        self, conn: AsyncConnection, plan: TablePlan, net: list[_Net] | TextRows, normalize: bool
    ) -> int:
        """Stage ``net`` and upsert it (then deletes and tombstones); returns the rows the upsert wrote.

        The guard query (`_may_be_guarded`) runs only when the UPDATE of stored rows left changes for the
        INSERT: a batch of updates costs COPY + UPDATE + COMMIT and no other round trip.
        """
        async with conn.cursor() as cursor:
            if isinstance(net, list):
                async with cursor.copy(plan.copy) as copy:
                    copy.set_types(plan.copy_types)
                    has_unchanged, deletes, has_upsert = await self._encode(
                        BinaryRows(copy), plan, net, normalize, staged=True
                    )
            else:
                assert plan.copy_text is not None
                async with cursor.copy(plan.copy_text) as copy:
                    await copy.write(_text_body(plan, net, staged=True))
                has_unchanged, deletes, has_upsert = False, net.deletes, net.deletes < net.count
            has_delete = deletes > 0
            if plan.prefill is not None and has_unchanged:
                await cursor.execute(plan.prefill)
            upserted = 0
            if plan.update_existing is not None:
                await cursor.execute(plan.update_existing)
                upserted = cursor.rowcount
            candidates = _count(net) if plan.soft_delete else _count(net) - deletes
            if plan.update_existing is None or upserted < candidates:  # new keys (or older changes) left
                guarded = await self._may_be_guarded(conn, plan, net)
                await cursor.execute(plan.upsert if guarded else plan.upsert_unguarded)
                upserted += cursor.rowcount
            if has_delete and plan.delete is not None and plan.tombstone is not None:
                await cursor.execute(plan.delete)
                await cursor.execute(plan.tombstone)
            if has_delete:
                self._with_tombstones.add(plan.qualified)
            if has_upsert and plan.tombstone_cleanup is not None and plan.qualified in self._with_tombstones:
                await cursor.execute(
                    plan.tombstone_cleanup
                )  # space only: stale tombstones never change a result
            return upserted

    async def _encode(
        self,
        rows: BinaryRows,
        plan: TablePlan,
        net: list[_Net],
        normalize: bool,
        *,
        staged: bool,
    ) -> tuple[bool, int, bool]:
        """Encode ``net`` into an open binary COPY: the staging layout
        (``staged``, last column the names of unchanged values) or the target's (`_Restage` on a value
        that needs the staging path). Returns (has unchanged values, number of deletes, has upserts)."""
        has_unchanged = has_upsert = False
        deletes = 0
        names = [c.name for c in plan.columns]
        converters = [
            (i, c.converter)
            for i, c in enumerate(plan.columns)
            if c.converter is not None and (normalize or not c.normalizer_only)
        ]
        soft_delete = plan.soft_delete
        branch_key = plan.branch_key
        pick = itemgetter(*names) if len(names) > 1 else (lambda row: (row[names[0]],))
        encode, transformer = rows.encode, rows.transformer
        plain = not converters and not branch_key  # no per-row fix-ups: values go out as `pick` made them
        # UNCHANGED: found by identity only where a dumper would take it; elsewhere the dumper raises
        loose = [i for i, c in enumerate(plan.columns) if c.dumps_any]
        op_code = _OP_CODE

        async def per_row(changes: Sequence[_Net]) -> None:
            """Each change on its own: deletes, fix-ups, unchanged values, and errors that name the row."""
            nonlocal has_unchanged, has_upsert, deletes
            buffer = rows.buffer
            size = len(buffer)
            seen_ts: Any = None  # a transaction's changes share one time object: its UTC form is made once
            utc_ts: Any = None
            for change in changes:
                fields = change.__dict__  # one attribute lookup (a pydantic model's ~70 ns each), then dict reads
                op = fields["op"]
                position = fields["position"]
                source_ts = fields["source_ts"]
                if op is _DELETE:
                    deletes += 1
                    row = fields["before"] or fields["key"]
                else:
                    has_upsert = True
                    row = fields["after"] or fields["key"]
                if source_ts is not seen_ts:
                    seen_ts = source_ts
                    utc_ts = source_ts.replace(tzinfo=UTC) if source_ts is not None and source_ts.tzinfo is None \
                        else source_ts
                source_ts = utc_ts
                try:
                    picked = pick(row)
                except KeyError:  # a key-only delete image, or a column the source no longer sends
                    picked = tuple([row.get(n) for n in names])
                unchanged: list[str] | None = None
                if (
                    plain
                    and not (soft_delete and op is _DELETE)
                    and not (loose and any([picked[i] is UNCHANGED for i in loose]))  # noqa: C419 (no generator)
                ):
                    values = picked
                    fixed = False
                else:
                    values, unchanged = self._fix(
                        plan, change, picked, names, converters, staged=staged, soft_delete=soft_delete
                    )
                    fixed = True
                bookkeeping = (position, op_code[op], source_ts)
                try:
                    encode(values + (bookkeeping + (unchanged,) if staged else bookkeeping), transformer, buffer)
                except TypeError as exc:
                    del buffer[size:]  # whatever part of the row the encoder wrote
                    # by identity: `UNCHANGED in values` would call Decimal.__eq__, which costs an ABC check
                    if fixed or _UNCHANGED_ID not in map(id, picked):
                        raise _type_error(plan, change, exc, normalize) from exc
                    values, unchanged = self._fix(
                        plan, change, picked, names, converters, staged=staged, soft_delete=soft_delete
                    )
                    try:
                        encode(
                            values + (bookkeeping + (unchanged,) if staged else bookkeeping), transformer, buffer
                        )
                    except TypeError as again:
                        del buffer[size:]
                        raise _type_error(plan, change, again, normalize) from again
                if unchanged is not None:
                    has_unchanged = True
                size = len(buffer)
                if size >= FLUSH_AT:
                    await rows.drain()
                    buffer = rows.buffer
                    size = 0

        if plain and not loose and not soft_delete:
            # upserts whose values go out as they are: encoded in C passes, `_PLAIN_CHUNK` changes at a time;
            # a chunk the passes do not take (a delete, a missing column, a value a dumper refuses: maybe
            # UNCHANGED) is written again change by change, which fixes or names it
            tail = (None,) if staged else ()
            for start in range(0, len(net), _PLAIN_CHUNK):
                chunk = net[start : start + _PLAIN_CHUNK]
                buffer = rows.buffer
                mark = len(buffer)
                try:
                    plain_rows = _plain_rows(chunk, pick, tail)
                    if plain_rows is None:
                        raise KeyError("a delete or an empty row")
                    deque(map(encode, plain_rows, repeat(transformer), repeat(buffer)), maxlen=0)
                    has_upsert = True
                except (KeyError, TypeError):
                    del buffer[mark:]
                    await per_row(chunk)
                if len(rows.buffer) >= FLUSH_AT:
                    await rows.drain()
        else:
            await per_row(net)
        await rows.finish()
        return has_unchanged, deletes, has_upsert

    @staticmethod
    def _fix(
        plan: TablePlan,
        change: _Net,
        values: tuple[Any, ...],
        names: list[str],
        converters: list[tuple[int, Converter]],
        *,
        staged: bool,
        soft_delete: bool,
    ) -> tuple[tuple[Any, ...], list[str] | None]:
        """The slow path of one row: unchanged values (staged as NULL and named), conversions, the
        branch column. Returns the values and the names of the unchanged columns (or None)."""
        row = _row(change)
        unchanged: list[str] | None = None
        if soft_delete and change.op is _DELETE:  # what a key-only image lacks: keep the stored value
            unchanged = [n for n in names if n not in row] or None
        if _UNCHANGED_ID in map(id, values):
            if not staged:
                raise _Restage
            unchanged = (unchanged or []) + [n for n, v in zip(names, values) if v is UNCHANGED]
            values = tuple([None if v is UNCHANGED else v for v in values])
        if converters:
            fixed = list(values)
            try:
                for index, convert in converters:
                    value = fixed[index]
                    if value is not None:
                        fixed[index] = convert(value)
            except (ValueError, TypeError) as exc:
                raise FatalSinkError(
                    f"`{plan.qualified}` value at key {_describe_key(plan, change)} position "
                    f"{change.position} must match its column type; got {exc}"
                ) from exc
            values = tuple(fixed)
        if plan.branch_key:
            values = (change.table.branch, *values)
        return values, unchanged

    async def _prune_now_and_then(self, plan: TablePlan) -> None:
        """Remove the table's tombstones older than the retention, at most once per prune interval.

        Housekeeping after the batch, in transactions of its own: a failure is logged and tried again
        at the next interval, never failing a batch that is already durable.
        """
        retention_h = self.config.tombstone_retention_h
        if (
            plan.prune_tombstones is None
            or retention_h is None
            or plan.qualified not in self._with_tombstones
        ):
            return
        now = time.monotonic()
        last = self._pruned_at.get(plan.qualified)
        if last is not None and now - last < self.config.tombstone_prune_interval_s:
            return
        self._pruned_at[plan.qualified] = now
        params = {"age_s": retention_h * 3600.0, "limit": _PRUNE_SLICE}
        removed = 0
        try:
            pool = await self._get_pool()
            while True:
                async with pool.connection() as conn, conn.transaction():
                    cursor = await conn.execute(plan.prune_tombstones, params)
                    removed += cursor.rowcount
                if cursor.rowcount < _PRUNE_SLICE:
                    break
        except (psycopg.Error, PoolTimeout, OSError, SinkError) as exc:
            error = map_error(exc, table=plan.qualified, where="(pruning tombstones)")
            log.warning(
                "pruning tombstones of %s failed after removing %d; next try in %.0fs: %s",
                plan.qualified,
                removed,
                self.config.tombstone_prune_interval_s,
                error,
            )
            return
        if removed:
            log.info("pruned %d tombstones older than %gh from %s", removed, retention_h, plan.qualified)

    async def _truncate(self, conn: AsyncConnection, plan: TablePlan, event: ChangeEvent) -> None:
        params = {
            "position": event.position,
            "branch": event.table.branch if plan.branch_key else "",
            "source_ts": event.source_ts,
        }
        await conn.execute(plan.truncate, params)
        if plan.truncate_tombstones is not None:
            await conn.execute(plan.truncate_tombstones, params)
        await conn.execute(plan.truncate_mark, params)


class _Renormalize(Exception):  # control flow only: never leaves the sink
    """The fast path met a value that needs a conversion it skipped."""


class _Restage(Exception):  # control flow only: never leaves the sink
    """The direct COPY met a stored row or an unchanged value: only the staging path handles those."""


_Net: TypeAlias = ChangeEvent
"""One net change to write: an event of the batch, or one the collapse made (a key's merged changes)."""


def _type_error(plan: TablePlan, change: _Net, exc: TypeError, normalize: bool) -> Exception:
    """A value psycopg would not encode: fatal once every conversion ran, else rewrite with them on."""
    if normalize:
        return FatalSinkError(
            f"`{plan.qualified}` row at key {_describe_key(plan, change)} position "
            f"{change.position} must match its column types; got {exc}"
        )
    return _Renormalize()


_PLAIN_CHUNK = 500
"""Changes per C-level encoding pass: the COPY buffer is sent once past `FLUSH_AT`, checked between chunks."""
_fields_of = attrgetter("__dict__")
_op_item = itemgetter("op")
_after_item = itemgetter("after")
_position_item = itemgetter("position")
_source_ts_item = itemgetter("source_ts")


def _plain_rows(chunk: Sequence[_Net], pick: Any, tail: tuple[Any, ...]) -> Iterator[tuple[Any, ...]] | None:
    """The COPY rows of a chunk of upserts (every ``after`` a non-empty row) as `_encode`'s per-row loop makes
    them when nothing needs fixing: picked values, position, op code, UTC commit time (+ ``tail``). None
    when the chunk holds a delete or an empty row. Lazy: `pick` raises KeyError for a missing column while
    the rows are encoded. Why: that loop's Python work per change was a third of the encoding's cost."""
    fields = list(map(_fields_of, chunk))
    ops = list(map(_op_item, fields))
    afters = list(map(_after_item, fields))
    if _DELETE in ops or not all(afters):
        return None
    stamps = list(map(_source_ts_item, fields))
    distinct = dict(zip(map(id, stamps), stamps))
    if any(s is not None and s.tzinfo is None for s in distinct.values()):
        utc = {k: s.replace(tzinfo=UTC) if s is not None and s.tzinfo is None else s for k, s in distinct.items()}
        stamps = list(map(utc.__getitem__, map(id, stamps)))
    bookkeeping = zip(map(_position_item, fields), map(_OP_CODE.__getitem__, ops), stamps, *map(repeat, tail))
    return map(add, map(pick, afters), bookkeeping)


def _inserts_only(net: list[_Net]) -> bool:
    return set(map(_op_of, net)) <= _INSERTS


def _only_inserts(net: list[_Net] | TextRows) -> bool:
    """Whether every change is an insert (``c``/``r``); for events, the first op is checked before the scan."""
    if isinstance(net, list):
        return net[0].op in _INSERTS and _inserts_only(net)
    return net.inserts_only


def _count(net: list[_Net] | TextRows) -> int:
    return len(net) if isinstance(net, list) else net.count


def _text_body(plan: TablePlan, rows: TextRows, *, staged: bool) -> str:
    """``rows.body`` in the plan's COPY layout: ``_bl_branch`` first when the key has it, and the staging
    table's ``_bl_unchanged`` (always NULL: text rows carry whole images) last."""
    body = rows.body
    if plan.branch_key:
        branch = rows.schema.id.branch
        prefix = branch.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r") + "\t"
        body = prefix + body[:-1].replace("\n", "\n" + prefix) + "\n"
    if staged:
        body = body[:-1].replace("\n", "\t\\N\n") + "\t\\N\n"
    return body


def _branches(events: Sequence[ChangeEvent]) -> set[str]:
    """The branches of ``events``: one `TableId` read per table object (a batch's events share a few)."""
    tables = list(map(_table_of, events))
    return {t.branch for t in dict(zip(map(id, tables), tables)).values()}


def _net_changes(table: TableSchema, events: Sequence[ChangeEvent], by_branch: bool) -> list[_Net]:
    """The changes to stage: the events themselves when every key occurs once (the common case after
    the stream stage's dedupe: no per-change objects), else the collapse (`branchline.sinks._batch`)."""
    keys = table.primary_key
    if keys:
        key_of = itemgetter(*keys)
        try:
            if by_branch and len(_branches(events)) > 1:
                unique = len({(e.table.branch, key_of(e.key)) for e in events}) == len(events)
            else:  # one branch (the common case): its keys alone tell, in C passes
                unique = len(set(map(key_of, map(_key_of, events)))) == len(events)
        except (KeyError, TypeError):  # a key missing from `key`, or an unhashable value
            unique = False
    else:
        unique = True  # a keyless table keeps every change
    if unique:
        return events if isinstance(events, list) else list(events)
    tables = {e.table.branch: e.table for e in events}
    construct = ChangeEvent.model_construct
    return [
        construct(
            op=c.op,
            table=tables[c.branch],
            key={},
            before=c.row if c.op is _DELETE else None,
            after=None if c.op is _DELETE else c.row,
            position=c.position,
            source_ts=c.source_ts,
            txid=None,
            snapshot=False,
        )
        for c in collapse(table, events, by_branch)
    ]


def _row(change: _Net) -> dict[str, Any]:
    return (change.before if change.op is _DELETE else change.after) or change.key


def _describe_key(plan: TablePlan, change: _Net) -> str:
    row = _row(change)
    if plan.keyed:
        pairs = ", ".join(f"{k}={row.get(k)!r}" for k in plan.source.primary_key)
    else:
        pairs = "(no primary key)"
    if plan.branch_key:
        pairs = f"_bl_branch={change.table.branch!r}, {pairs}"
    return f"({pairs})"
