"""Sink throughput benchmark: prints figures, asserts nothing (not a timed test).

Run: ``python -m branchline.sinks.bench [--port 15433] [--rows 40000] [--no-delta]`` (the click
command `bench_sinks`, meant for ``branchline bench sinks``).

For batches of 1k, 5k and 20k rows of a 10-column ERP table it measures, in one run against the same
server: a plain COPY into an identical table (the ceiling: no staging, no upsert, no bookkeeping; same
rows, same COPY writer as the sink), the PostgreSQL sink inserting new rows (``c`` events), updating
them (``u`` events) and receiving the inserts again (a replay: every row stays), the ceiling for
updates (the same updates COPYed into a temp table and applied by a bare ``UPDATE .. FROM``: no
guard, no bookkeeping), and optionally the Delta sink on a local path. Each sink batch is interleaved
with a plain COPY batch; PostgreSQL rates are the best of ``--rounds`` rounds on fresh tables, and
"vs COPY" is the median over rounds of the sink's rate over the interleaved COPY's rate (robust to
other load on a shared machine). Timings cover `write_batch` (and, for Delta, the commit), not event
generation.
"""

from __future__ import annotations

import asyncio
import gc
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from operator import itemgetter

import click
import psycopg
from branchline.events import ChangeEvent, Column, ColumnType, Op, TableId, TableSchema
from branchline.sinks.build import build_sink
from branchline.sinks.config import DeltaSinkConfig, PostgresSinkConfig
from branchline.sinks.contract import Sink
from branchline.sinks.postgres._copy import FLUSH_AT, BinaryRows

TABLE_ID = TableId(source="bench", branch="b1", database="erp", table="order_lines")
COLUMNS = (
    Column(name="id", type=ColumnType.INT64, nullable=False),
    Column(name="order_id", type=ColumnType.INT64),
    Column(name="sku", type=ColumnType.STRING),
    Column(name="qty", type=ColumnType.INT32),
    Column(name="unit_price", type=ColumnType.DECIMAL, precision=12, scale=2),
    Column(name="amount", type=ColumnType.DECIMAL, precision=14, scale=2),
    Column(name="status", type=ColumnType.ENUM),
    Column(name="created", type=ColumnType.TIMESTAMP, precision=6),
    Column(name="updated", type=ColumnType.TIMESTAMPTZ, precision=6),
    Column(name="note", type=ColumnType.STRING),
)
TABLE = TableSchema(id=TABLE_ID, columns=COLUMNS, primary_key=("id",))
PLAIN_DDL = (
    "CREATE TABLE {t} (id bigint PRIMARY KEY, order_id bigint, sku text, qty integer, unit_price numeric(12,2),"
    " amount numeric(14,2), status text, created timestamp(6), updated timestamptz(6), note text)"
)
TYPES = ("int8", "int8", "text", "int4", "numeric", "numeric", "text", "timestamp", "timestamptz", "text")
"""The COPY types of `COLUMNS`, as `PLAIN_DDL` declares them."""
T0 = datetime(2026, 1, 1, 8, 0, 0)


def _events(
    table: TableId, first_id: int, count: int, position: int, op: Op, version: int
) -> list[ChangeEvent]:
    """``count`` changes of ids first_id.. at positions position.. (built outside the timed part)."""
    out = []
    for i in range(count):
        id_ = first_id + i
        qty = (id_ % 17) + version
        price = Decimal(id_ % 1000) + Decimal("0.99")
        row = {
            "id": id_,
            "order_id": id_ // 8,
            "sku": f"SKU-{id_ % 5000:05d}",
            "qty": qty,
            "unit_price": price,
            "amount": price * qty,
            "status": ("open", "shipped", "billed")[(id_ + version) % 3],
            "created": T0 + timedelta(seconds=id_),
            "updated": (T0 + timedelta(seconds=id_ + version)).replace(tzinfo=UTC),
            "note": f"line {id_} v{version}",
        }
        out.append(
            ChangeEvent.model_construct(
                op=op,
                table=table,
                key={"id": id_},
                before=None,
                after=row,
                position=position + i,
                source_ts=row["updated"],
                txid=None,
                snapshot=False,
            )
        )
    return out


@dataclass
class Figure:
    target: str
    batch: int
    kind: str
    rows: int
    seconds: float
    ratio: float | None = None
    """Median over rounds of this rate / the plain COPY's rate measured interleaved with it."""

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


class _PlainCopy:
    """COPY the same rows into a plain table, one transaction per batch.

    The ceiling (``wide=False``): the 10 source columns only, no staging, no upsert, no bookkeeping.
    ``wide=True`` adds the columns a sink's target holds (position, operation, source time, sync time
    by default), COPYed as the sink's direct path does: how much of the gap is the bookkeeping itself.
    """

    def __init__(self, dsn: str, table: str, wide: bool = False) -> None:
        self.dsn = dsn
        self.table = table
        self.wide = wide
        self.conn: psycopg.AsyncConnection | None = None
        self._stage = False

    async def open(self) -> None:
        self.conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        ddl = PLAIN_DDL.format(t=self.table)
        if self.wide:
            ddl = ddl[:-1] + (
                ", _bl_position numeric(38,0) NOT NULL, _bl_op text NOT NULL, _bl_source_ts timestamptz(6),"
                " _bl_synced_at timestamptz(6) NOT NULL DEFAULT now())"
            )
        await self.conn.execute(ddl)

    async def write(self, batch: list[ChangeEvent]) -> None:
        assert self.conn is not None
        names = [c.name for c in COLUMNS]
        types = list(TYPES)
        columns = names + (["_bl_position", "_bl_op", "_bl_source_ts"] if self.wide else [])
        statement = f"COPY {self.table} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)"
        # the sink's own COPY writer: the comparison measures staging + upsert, not the encoding
        pick = itemgetter(*names)
        wide = self.wide
        async with self.conn.transaction(), self.conn.cursor() as cursor, cursor.copy(statement) as copy:
            copy.set_types(types + (["numeric", "text", "timestamptz"] if wide else []))
            rows = BinaryRows(copy)
            encode, transformer, buffer = rows.encode, rows.transformer, rows.buffer
            for event in batch:
                values = pick(event.after)
                if wide:
                    values += (event.position, "c", event.source_ts)
                encode(values, transformer, buffer)
                if len(buffer) >= FLUSH_AT:
                    await rows.drain()
                    buffer = rows.buffer
            await rows.finish()

    async def update(self, batch: list[ChangeEvent]) -> None:
        """Apply ``batch`` to the rows this table holds the cheapest set-based way: COPY into a temp
        table, then ``UPDATE .. FROM`` it on the key, with no position guard and no bookkeeping.

        The ceiling for updates: what the server charges any COPY-then-UPDATE writer, next to the plain
        COPY of the same rows (one transaction per batch, the same COPY writer)."""
        assert self.conn is not None and not self.wide
        names = [c.name for c in COLUMNS]
        if not self._stage:
            await self.conn.execute(
                f"CREATE TEMP TABLE _bench_stage (LIKE {self.table}) ON COMMIT DELETE ROWS"
            )
            # the sink's session settings (`PostgresSink._configure`): without statistics on the temp
            # table the planner may hash it and scan the whole target; a batch probes the key's index
            for setting in ("temp_buffers = '64MB'", "enable_hashjoin = off", "enable_mergejoin = off"):
                await self.conn.execute(f"SET {setting}")
            self._stage = True
        async with self.conn.transaction():
            await self._copy("_bench_stage", names, batch)
            await self.conn.execute(
                f"UPDATE {self.table} t SET {', '.join(f'{n} = s.{n}' for n in names[1:])}"
                " FROM _bench_stage s WHERE t.id = s.id"
            )

    async def _copy(self, table: str, names: list[str], batch: list[ChangeEvent]) -> None:
        assert self.conn is not None
        statement = f"COPY {table} ({', '.join(names)}) FROM STDIN (FORMAT BINARY)"
        pick = itemgetter(*names)
        async with self.conn.cursor() as cursor, cursor.copy(statement) as copy:
            copy.set_types(TYPES)
            rows = BinaryRows(copy)
            encode, transformer, buffer = rows.encode, rows.transformer, rows.buffer
            for event in batch:
                encode(pick(event.after), transformer, buffer)
                if len(buffer) >= FLUSH_AT:
                    await rows.drain()
                    buffer = rows.buffer
            await rows.finish()

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()


async def _timed(call: Awaitable[None]) -> float:
    started = time.perf_counter()
    await call
    return time.perf_counter() - started


async def _durable(sink: Sink, table: TableSchema, batch: list[ChangeEvent]) -> None:
    await sink.write_batch(table, batch)
    if not sink.capabilities.durable_on_write:
        await sink.flush()


def _batches(
    table: TableId, size: int, total: int, first_id: int, position: int, op: Op, version: int
) -> list[list[ChangeEvent]]:
    count = max(1, total // size)
    return [_events(table, first_id + i * size, size, position + i * size, op, version) for i in range(count)]


async def _postgres_round(
    dsn: str,
    schema: str,
    table: TableSchema,
    size: int,
    round_: int,
    inserts: list[list[ChangeEvent]],
    updates: list[list[ChangeEvent]],
) -> dict[str, float]:
    """One round on fresh tables: seconds of the plain COPY and of each sink measure.

    Every sink batch is interleaved with a plain COPY of the same rows (into its own fresh table), so
    that load from other processes hits both alike; the ceiling is all those COPYs together."""
    schema = f"{schema}_r{round_}"  # fresh tables, same events
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
    plain_new = _PlainCopy(dsn, f'"{schema}".plain_{size}_a')
    plain_upd = _PlainCopy(dsn, f'"{schema}".plain_{size}_b')
    plain_wide = _PlainCopy(dsn, f'"{schema}".plain_{size}_c', wide=True)
    pg = build_sink(PostgresSinkConfig(dsn=dsn, schema=schema, sslmode="disable"))
    seconds = dict.fromkeys(
        ("copy_new", "copy_update", "copy_wide", "new", "update", "bare_update", "replay"), 0.0
    )
    try:
        await plain_new.open()
        await plain_upd.open()
        await plain_wide.open()
        warm_up = _events(table.id, 10**9, 1, 1, Op.CREATE, 0)
        await pg.write_batch(table, warm_up)  # pool and table exist before the clock starts
        for batch in inserts:
            seconds["copy_new"] += await _timed(plain_new.write(batch))
            seconds["new"] += await _timed(pg.write_batch(table, batch))
        for plain_batch, batch in zip(inserts, updates, strict=True):
            seconds["copy_update"] += await _timed(plain_upd.write(plain_batch))
            seconds["update"] += await _timed(pg.write_batch(table, batch))
            # the same changes into the plain table that holds these rows: the ceiling for updates
            seconds["bare_update"] += await _timed(plain_new.update(batch))
        for batch in inserts:  # every key exists at a newer position: nothing may change
            seconds["copy_wide"] += await _timed(plain_wide.write(batch))
            seconds["replay"] += await _timed(pg.write_batch(table, batch))
    finally:
        await plain_new.close()
        await plain_upd.close()
        await plain_wide.close()
        await pg.close()
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    return seconds


async def run_sink_benchmark(
    host: str = "127.0.0.1",
    port: int = 15433,
    database: str = "cloud",
    user: str = "postgres",
    sizes: Sequence[int] = (1_000, 5_000, 20_000),
    rows_per_size: int = 40_000,
    delta: bool = True,
    rounds: int = 3,
) -> list[Figure]:
    """Measure every target for every batch size; returns the figures (and `bench_sinks` prints them).

    PostgreSQL figures are the best of ``rounds`` rounds (fresh tables each), per measure."""
    dsn = f"host={host} port={port} user={user} dbname={database}"
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    figures: list[Figure] = []
    lake = tempfile.mkdtemp(prefix="branchline-bench-lake-")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        for size in sizes:
            table = TABLE.model_copy(
                update={"id": TABLE_ID.model_copy(update={"table": f"order_lines_{size}"})}
            )
            inserts = _batches(table.id, size, rows_per_size, 1, 1_000_000, Op.CREATE, 0)
            updates = _batches(table.id, size, rows_per_size, 1, 10_000_000, Op.UPDATE, 1)
            rows = sum(len(b) for b in inserts)
            # the generated events are input, not work: keep the collector from re-scanning them in every measure
            gc.collect()
            gc.freeze()
            best: dict[str, float] = {}
            ratios: dict[str, list[float]] = {
                "new": [],
                "update": [],
                "bare_update": [],
                "replay": [],
                "wide": [],
            }
            for round_ in range(rounds):
                got = await _postgres_round(dsn, schema, table, size, round_, inserts, updates)
                got["copy"] = got["copy_new"] + got["copy_update"]
                for kind, seconds in got.items():
                    best[kind] = min(seconds, best.get(kind, seconds))
                ratios["new"].append(got["copy_new"] / got["new"])
                ratios["update"].append(got["copy_update"] / got["update"])
                ratios["bare_update"].append(got["copy_update"] / got["bare_update"])
                ratios["replay"].append(got["copy"] / 2 / got["replay"])
                ratios["wide"].append(got["copy"] / 2 / got["copy_wide"])
            figures.append(Figure("postgres", size, "plain COPY (ceiling)", 2 * rows, best["copy"], 1.0))
            figures.append(
                Figure(
                    "postgres",
                    size,
                    "plain COPY +bookkeeping",
                    rows,
                    best["copy_wide"],
                    statistics.median(ratios["wide"]),
                )
            )
            figures.append(
                Figure(
                    "postgres",
                    size,
                    "staged bare UPDATE",
                    rows,
                    best["bare_update"],
                    statistics.median(ratios["bare_update"]),
                )
            )
            for kind, label in (("new", "new rows"), ("update", "updates"), ("replay", "replayed inserts")):
                ratio = statistics.median(ratios[kind])
                figures.append(Figure("postgres", size, f"sink: {label}", rows, best[kind], ratio))
            if delta:
                try:
                    import deltalake  # noqa: F401
                except ImportError:
                    continue
                # each commit costs a new file set and a log entry: measure two batches, commit per batch
                dl = build_sink(DeltaSinkConfig(uri=lake, commit_interval_s=3600))
                try:
                    n = sum(len(b) for b in inserts[:2])
                    seconds = sum([await _timed(_durable(dl, table, b)) for b in inserts[:2]])
                    figures.append(
                        Figure("delta (local, commit per batch)", size, "sink: new rows", n, seconds)
                    )
                    seconds = sum([await _timed(_durable(dl, table, b)) for b in updates[:2]])
                    figures.append(
                        Figure("delta (local, commit per batch)", size, "sink: updates", n, seconds)
                    )
                    # as configured in production: buffer every batch, one commit for all of them
                    again = [
                        [e.model_copy(update={"position": e.position + 50_000_000}) for e in b]
                        for b in updates
                    ]
                    started = time.perf_counter()
                    for batch in again:
                        await dl.write_batch(table, batch)
                    await dl.flush()
                    figures.append(
                        Figure(
                            "delta (local, one commit per run)",
                            size,
                            "sink: updates",
                            rows,
                            time.perf_counter() - started,
                        )
                    )
                finally:
                    await dl.close()
            gc.unfreeze()
    finally:
        gc.unfreeze()
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        shutil.rmtree(lake, ignore_errors=True)
    return figures


def format_figures(figures: Sequence[Figure]) -> str:
    lines = [f"{'target':<34} {'batch':>6} {'measure':<22} {'rows':>7} {'rows/s':>9} {'vs COPY':>8}"]
    for f in figures:
        ratio = f"{f.ratio:.0%}" if f.ratio is not None else ""
        lines.append(f"{f.target:<34} {f.batch:>6} {f.kind:<22} {f.rows:>7} {f.rate:>9,.0f} {ratio:>8}")
    lines.append(
        "rows/s: best of the rounds; vs COPY: median over rounds of the sink's rate over the rate of the plain"
        " COPY interleaved with it, batch by batch (replays and COPY +bookkeeping: over both ceiling loops of the"
        " round)"
    )
    lines.append(
        "staged bare UPDATE: the same updates COPYed into a temp table, then UPDATE .. FROM it on the key, with no"
        " position guard and no bookkeeping — what the server charges any COPY-then-UPDATE writer, the ceiling"
        " for 'sink: updates'"
    )
    return "\n".join(lines)


@click.command("sinks")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=15433, show_default=True, help="The cloud PostgreSQL of the local stack.")
@click.option("--database", default="cloud", show_default=True)
@click.option("--user", default="postgres", show_default=True)
@click.option(
    "--rows", "rows_per_size", default=40_000, show_default=True, help="Rows per batch size and measure."
)
@click.option("--sizes", default="1000,5000,20000", show_default=True)
@click.option("--no-delta", is_flag=True, help="Skip the Delta sink.")
@click.option(
    "--rounds", default=3, show_default=True, help="PostgreSQL rounds per batch size; best of them is shown."
)
def bench_sinks(
    host: str,
    port: int,
    database: str,
    user: str,
    rows_per_size: int,
    sizes: str,
    no_delta: bool,
    rounds: int,
) -> None:
    """Rows/s of each sink for 1k/5k/20k-row batches, next to a plain COPY measured in the same run."""
    figures = asyncio.run(
        run_sink_benchmark(
            host=host,
            port=port,
            database=database,
            user=user,
            sizes=[int(s) for s in sizes.split(",")],
            rows_per_size=rows_per_size,
            delta=not no_delta,
            rounds=rounds,
        )
    )
    click.echo(format_figures(figures))


if __name__ == "__main__":
    bench_sinks()
