"""`branchline run`: capture, spool and write in one process, without Kafka.

One capture thread per source (the drivers block) reads a consistent snapshot and then the log,
and appends batches to the spool together with the source's checkpoint; only then is the source
acknowledged. One asyncio drain reads the spool in order, collapses each batch per key (the same
`branchline.streams.dedupe.collapse` as the Faust workers) and writes it with the same sinks. When
a sink is unreachable the drain waits and retries while capture keeps filling the spool, up to its
size limit. PostgreSQL rows of tables without transforms, whose column types PostgreSQL's text form carries
exactly, skip the events: they go from the spool into a text COPY (`branchline.runtime.text_rows`).

Snapshot without a gap: the log position is recorded (and, on PostgreSQL, the slot created) before
the first table is read; tables are read in primary-key chunks; streaming then starts from the
recorded position. Changes made while the snapshot ran are replayed over it; the sinks' position
guard keeps that harmless, and the last change of each key wins.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import repeat
from operator import attrgetter
from pathlib import Path
from typing import Any

from branchline.config import BinlogSourceConfig, PipelineConfig, PostgresSourceConfig
from branchline.connectors.embedded.reader import Changes, Checkpoint, EmbeddedReader
from branchline.errors import BranchlineError, ConfigError, is_retryable
from branchline.events import ChangeEvent, TableId, TableSchema
from branchline.gc_tuning import tune_for_throughput
from branchline.paths import state_dir
from branchline.runtime.config import RuntimeConfig
from branchline.runtime.spool import Spool, SpooledBatch, batch_schemas
from branchline.runtime.text_rows import TextRound, split_round

log = logging.getLogger("branchline.runtime")


def table_filter(include: tuple[str, ...], exclude: tuple[str, ...]) -> Callable[[str, str], bool]:
    """`namespace.table` patterns of the pipeline file (``*`` = any name part) -> a predicate."""

    def accept(namespace: str, table: str) -> bool:
        name = f"{namespace}.{table}"
        if include:
            return any(fnmatch.fnmatchcase(name, p) for p in include)
        return not any(fnmatch.fnmatchcase(name, p) for p in exclude)

    return accept


def build_reader(source: BinlogSourceConfig | PostgresSourceConfig, runtime: RuntimeConfig, *,
                 spool_only: bool = False) -> EmbeddedReader:
    """The embedded reader of one `sources:` entry. ``spool_only``: its changes only go into the spool (a
    capture process), so a PostgreSQL reader hands them out undecoded (`PostgresReader.text_rows`) and a
    MariaDB/MySQL reader as the library's values, a rows event at a time (`MariaDbReader.raw_rows`): the
    spool's reader builds the events, and the capture process's CPU per row drops to about the stream's."""
    accept = table_filter(source.include, source.exclude)
    password = source.password.get_secret_value()
    if isinstance(source, BinlogSourceConfig):
        from branchline.connectors.embedded.mariadb import MariaDbReader

        return MariaDbReader(source=source.name, branch=source.branch, host=source.host, port=source.port,
                             user=source.user, password=password, databases=list(source.databases),
                             accept=accept, server_id=source.server_id, mariadb=source.kind == "mariadb",
                             raw_rows=spool_only)
    from branchline.connectors.embedded.postgres import PostgresReader

    return PostgresReader(source=source.name, branch=source.branch, host=source.host, port=source.port,
                          user=source.user, password=password, database=source.database,
                          schemas=list(source.schemas), accept=accept, slot=source.slot,
                          publication=source.publication, peek_changes=runtime.pg_peek_changes,
                          text_rows=spool_only)


@dataclass
class TableProgress:
    """Snapshot progress of one table, shown on screen and exported as metrics."""

    qualified: str
    total: int
    rows: int = 0
    started: float = field(default_factory=time.monotonic)
    done: bool = False

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.rows / elapsed if elapsed > 0 else 0.0

    @property
    def remaining_s(self) -> float | None:
        rate = self.rate
        if self.done or rate <= 0:
            return None
        return max(0.0, (self.total - self.rows) / rate)


@dataclass
class RunStats:
    """What the runner did so far; read by the CLI's progress display and by tests."""

    captured: int = 0
    written: int = 0
    written_as_text: int = 0
    """Of ``written``: row changes that took the text path (`branchline.runtime.text_rows`)."""
    snapshot: dict[str, TableProgress] = field(default_factory=dict)
    snapshot_done: dict[str, bool] = field(default_factory=dict)
    last_capture: float = field(default_factory=time.monotonic)
    last_write: float = field(default_factory=time.monotonic)
    sink_down_since: float | None = None
    error: BaseException | None = None


class SourceCapture:
    """Snapshot, then stream, one source into the spool (runs in its own thread)."""

    def __init__(self, source: BinlogSourceConfig | PostgresSourceConfig, reader: EmbeddedReader, spool: Spool,
                 runtime: RuntimeConfig, stop: threading.Event, stats: RunStats,
                 wake: Callable[[], None]) -> None:
        self.config = source
        self.name = source.name
        self.reader = reader
        self.spool = spool
        self.runtime = runtime
        self.stop = stop
        self.stats = stats
        self.wake = wake
        self.schemas: dict[TableId, TableSchema] = {}
        self._warned_full = False
        self.idle_since: float | None = None
        """When the reader last said it had nothing more to send (None: busy); for --exit-when-idle.

        Only user-table rows make it busy again. Heartbeat rows and commits of other tables do not:
        Debezium connectors on the same server write the heartbeat table every few seconds, and a
        busy server commits all the time, so a run counting them would never be idle."""
        self.observe_reads = True
        """Count changes read here; off in a capture process, whose metrics nobody serves (the runner
        counts them when it drains the spool)."""
        self.on_error: Callable[[BaseException, bool], None] = self._observe_error
        """Called with (error, retrying) on each capture failure; a capture process forwards it to the runner."""

    def _observe_error(self, exc: BaseException, retrying: bool) -> None:
        from branchline import metrics

        metrics.observe_error("source", self.name, exc)
        if retrying:
            metrics.observe_retry("source", self.name)

    # -- snapshot --------------------------------------------------------------------------------

    def _snapshot(self) -> Checkpoint:
        """Record the start position, then read every table not yet done; returns where to stream from."""
        start = self.spool.checkpoint(self.name)
        if start is None:
            schemas = self.reader.tables()
            start = self.reader.start_position()
            if self.runtime.snapshot == "initial":
                self.spool.plan_snapshot(self.name, start, [s.id.qualified for s in schemas], start.position)
            else:
                self.spool.plan_snapshot(self.name, start, [], start.position)
        state = self.spool.snapshot_state(self.name)
        pending = {q: s for q, s in state.items() if not s[1]}
        if not pending:
            self.stats.snapshot_done[self.name] = True
            return start
        from branchline import metrics

        by_name = {s.id.qualified: s for s in self.reader.tables()}
        for qualified, (position, _done, rows, last_key) in sorted(pending.items()):
            if self.stop.is_set():
                return start
            schema = by_name.get(qualified)
            if schema is None:  # dropped since
                self.spool.append(self.name, [], {}, snapshot_progress=(qualified, rows, last_key, True))
                continue
            self.schemas[schema.id] = schema
            estimate = getattr(self.reader, "estimate_rows", lambda t: 0)(schema.id)
            progress = TableProgress(f"{self.name}:{qualified}", max(estimate, rows), rows)
            progress.started = time.monotonic()
            self.stats.snapshot[progress.qualified] = progress
            base_rows = rows
            for events, last in self.reader.snapshot(schema, position, self.runtime.snapshot_chunk_rows,
                                                     after=last_key):
                if not self._wait_for_room():
                    return start
                rows += len(events)
                self.spool.append(self.name, events, {schema.id: schema},
                                  snapshot_progress=(qualified, rows, last, False))
                metrics.observe_snapshot_rows(schema.id, len(events))
                self.stats.captured += len(events)
                progress.rows = rows
                progress.total = max(progress.total, rows)
                # rows/s over this run only
                progress.started = progress.started if rows > base_rows else time.monotonic()
                self.wake()
                if self.stop.is_set():
                    return start
            self.spool.append(self.name, [], {}, snapshot_progress=(qualified, rows, last_key if rows == 0 else None,
                                                                    True))
            progress.done = True
            progress.total = rows
            log.info("snapshot of %s.%s done: %d rows in %.1f s", self.name, qualified, rows,
                     time.monotonic() - progress.started)
        self.stats.snapshot_done[self.name] = True
        return start

    def _wait_for_room(self) -> bool:
        limit = self.runtime.spool.max_bytes
        size = self.spool.size_bytes
        if size >= limit * self.runtime.spool.warn_fraction and not self._warned_full:
            log.warning("spool %s is %.0f%% full (%d of %d bytes): the target is not keeping up or unreachable",
                        self.spool.path, 100 * size / limit, size, limit)
            self._warned_full = True
        elif size < limit * self.runtime.spool.warn_fraction:
            self._warned_full = False
        if size >= limit:
            log.warning("spool %s is full (%d bytes): capture of %s pauses until the target drains it",
                        self.spool.path, size, self.name)
        return self.spool.wait_below(limit, self.stop)

    # -- stream ----------------------------------------------------------------------------------

    def _stream(self, start: Checkpoint) -> None:
        """Read the log from ``start``; spool batches with their checkpoints; acknowledge after each commit."""
        from branchline import metrics

        batch: list[ChangeEvent] = []
        rows = 0
        """The row changes ``batch`` holds (a `BinlogRows` item holds a rows event's)."""
        pending: Checkpoint | None = None
        last_spooled = 0.0
        """When the last batch was spooled: a commit after a pause is spooled at once, and under load
        batches are spooled at most every `batch_interval_ms` (not: each first change waits that long)."""
        last_checkpoint_write = time.monotonic()
        size, interval = self.runtime.batch_size, self.runtime.batch_interval_ms / 1000
        checkpoint_every = self.runtime.checkpoint_interval_ms / 1000
        branch = self.config.branch

        def flush() -> None:
            nonlocal batch, rows, pending, last_checkpoint_write, last_spooled
            if not self._wait_for_room():
                return
            self.spool.append(self.name, batch, batch_schemas(batch, self.schemas), pending,
                              count=rows if rows != len(batch) else None)
            if batch:
                last_spooled = time.monotonic()
                if self.observe_reads:
                    metrics.observe_changes_read(branch, self.name, batch)
                self.stats.captured += rows
                self.stats.last_capture = time.monotonic()
                self.wake()
            if pending is not None:
                self.reader.acknowledge(pending)
                last_checkpoint_write = time.monotonic()
            batch, rows, pending = [], 0, None

        heartbeat = tuple(self.config.heartbeat_table.split(".", 1))
        for changes in self.reader.stream(start, self.stop):
            if changes.events:
                if any((e.table.schema_ or e.table.database, e.table.table) != heartbeat for e in changes.events):
                    self.idle_since = None
            elif self.idle_since is None and not batch and changes.checkpoint is None:
                self.idle_since = time.monotonic()
            if changes.schemas:
                if batch and any(s.id in {e.table for e in batch} for s in changes.schemas):
                    flush()  # one schema per table per spooled batch
                for schema in changes.schemas:
                    self.schemas[schema.id] = schema
            if changes.events:
                known = None  # a run of one table's events shares its TableId object: one lookup per run
                for event in changes.events:
                    table = event.table
                    if table is not known:
                        if table not in self.schemas:
                            self.schemas[table] = self.reader.schema(table)
                        known = table
                batch.extend(changes.events)
                rows += len(changes.events) if changes.rows is None else changes.rows
            if changes.checkpoint is not None:
                pending = changes.checkpoint
            now = time.monotonic()
            if batch and (rows >= size or pending is not None and now - last_spooled >= interval) \
                    or not batch and pending is not None and now - last_checkpoint_write >= checkpoint_every:
                flush()
            elif batch and not changes.events and not changes.checkpoint:
                flush()  # idle: do not hold a partial transaction's changes back
            if self.stop.is_set():
                break
        if batch or pending is not None:
            flush()

    def run(self) -> None:
        """Snapshot then stream; reconnect on retryable source errors (from the spooled checkpoint)."""
        attempt = 0
        while not self.stop.is_set():
            try:
                start = self._snapshot()
                if self.stop.is_set():
                    return
                resume = self.spool.checkpoint(self.name) or start
                log.info("%s: streaming from %s", self.name, resume.data)
                self._stream(resume)
                return
            except BranchlineError as exc:
                if not is_retryable(exc):
                    self.stats.error = exc
                    self.stop.set()
                    log.error("%s: %s", self.name, exc)
                    self.on_error(exc, False)
                    return
                attempt += 1
                self.on_error(exc, True)
                delay = min(30.0, 0.5 * 2 ** min(attempt, 6))
                log.warning("%s: source unreachable (attempt %d, retrying in %.1f s): %s", self.name, attempt,
                            delay, exc)
                self.stop.wait(delay)
            except Exception as exc:  # a bug or an unmapped driver error: stop, say where
                self.stats.error = exc
                self.stop.set()
                log.exception("%s: capture failed", self.name)
                self.on_error(exc, False)
                return
            finally:
                try:
                    self.reader.close()
                except (BranchlineError, OSError) as exc:  # closing a broken connection may fail too
                    log.debug("closing %s reader: %s", self.name, exc)


_position_of = attrgetter("position")
_source_ts_of = attrgetter("source_ts")
_snapshot_of = attrgetter("snapshot")


def _read_marks(events: list[ChangeEvent]) -> list[ChangeEvent]:
    """The events `metrics.observe_changes_read` needs to give its answer for all of ``events``: the one with
    the highest position and one per commit-time object (it keeps the highest position and the newest commit
    time of the streamed ones). Why: it converts each event's time (~0.5 µs a change); a transaction's changes
    share one time object, so this picks them in C-level passes. Snapshot reads: all events, as they came."""
    if not events or any(map(_snapshot_of, events)):
        return events
    newest = max(events, key=_position_of)
    if newest.source_ts is None:  # not counted there: the next highest might be
        return events
    return [newest, *dict(zip(map(id, map(_source_ts_of, events)), events)).values()]


def _die_with_parent(parent_pid: int) -> None:
    """Linux: the capture process gets SIGKILL when the runner dies (kill -9 leaves no orphan reader).

    A runner killed while this process was still starting (imports take seconds on a busy machine) sent
    no signal: then the parent is already another process, and this one leaves at once."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the stop event still ends it
        pass
    if os.getppid() != parent_pid:  # checked after the prctl, so no death falls between the two
        os._exit(0)


def _capture_main(pipeline: PipelineConfig, source_name: str, spool_path: str, messages: Any, stop: Any,
                  parent_pid: int) -> None:
    """A capture process: one source's reader -> the shared spool. Reports progress to the runner."""
    _die_with_parent(parent_pid)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the runner decides when to stop
    runtime = pipeline.runtime if isinstance(pipeline.runtime, RuntimeConfig) else RuntimeConfig()
    source = pipeline.source(source_name)
    local_stop = threading.Event()

    def watch() -> None:
        stop.wait()
        local_stop.set()

    threading.Thread(target=watch, daemon=True).start()
    stats = RunStats()
    reader = build_reader(source, runtime, spool_only=True)
    # a reader whose acknowledge() releases nothing keeps its resume position in the spool alone: a commit
    # lost to a power cut loses that position with its batch and replays from the log, so no fsync per batch
    durable = getattr(reader, "durable_spool_required", True)
    spool = Spool(Path(spool_path), memory_bytes=0, shared=True, synchronous="FULL" if durable else "NORMAL")
    capture: SourceCapture | None = None

    def report() -> None:
        assert capture is not None
        snapshot = {q: (p.rows, p.total, p.done, p.started) for q, p in stats.snapshot.items()}
        messages.put(("progress", stats.captured, capture.idle_since, stats.snapshot_done.get(source_name, False),
                      snapshot))

    capture = SourceCapture(source, reader, spool, runtime, local_stop, stats, report)

    def forward_error(exc: BaseException, retrying: bool) -> None:  # this process's metrics are not served
        sent = exc if isinstance(exc, BranchlineError) else RuntimeError(repr(exc))
        messages.put(("error", sent, retrying))

    capture.on_error = forward_error
    capture.observe_reads = False
    finished = threading.Event()

    def heartbeat() -> None:  # idle state and snapshot progress reach the runner even when nothing is spooled
        while not finished.wait(0.25):
            report()

    threading.Thread(target=heartbeat, daemon=True).start()
    # start-up (imports, reader, spool) is built: out of the collector's sight before the first change
    tune_for_throughput()
    capture.run()
    finished.set()
    report()
    error = None
    if stats.error is not None:
        error = stats.error if isinstance(stats.error, BranchlineError) else RuntimeError(repr(stats.error))
    messages.put(("done", error))
    spool.close()


class RemoteCapture:
    """The runner's handle on a capture process (`runtime.capture_processes`): decoding a binlog is
    pure Python and holds the GIL, so it gets a core of its own while this process drains and writes."""

    def __init__(self, source: BinlogSourceConfig | PostgresSourceConfig, spool_path: Path,
                 pipeline: PipelineConfig, stats: RunStats, wake: Callable[[], None]) -> None:
        import multiprocessing

        self.name = source.name
        self.config = source
        self.idle_since: float | None = None
        self._stats = stats
        self._wake = wake
        self._captured = 0
        self._context = multiprocessing.get_context("spawn")
        self._messages = self._context.Queue()
        self._stop = self._context.Event()
        self._process = self._context.Process(
            target=_capture_main, args=(pipeline, source.name, str(spool_path), self._messages, self._stop,
                                        os.getpid()),
            name=f"branchline-capture-{source.name}", daemon=True)
        self._listener = threading.Thread(target=self._listen, name=f"capture-{source.name}-messages", daemon=True)
        self._snapshot_rows: dict[str, int] = {}

    def start(self) -> None:
        self._process.start()
        self._listener.start()

    def stop(self) -> None:
        self._stop.set()

    def is_alive(self) -> bool:
        return self._process.is_alive() or self._listener.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
        self._listener.join(2)

    def _listen(self) -> None:
        from branchline import metrics

        stats = self._stats
        while True:
            try:
                message = self._messages.get(timeout=0.5)
            except queue.Empty:  # the process may have died without a word
                if not self._process.is_alive():
                    if stats.error is None and not self._stop.is_set():
                        stats.error = RuntimeError(f"capture process of {self.name} exited with code "
                                                   f"{self._process.exitcode}")
                        log.error("%s", stats.error)
                        metrics.observe_error("source", self.name, stats.error)
                    self._wake()
                    return
                continue
            if message[0] == "error":
                metrics.observe_error("source", self.name, message[1])
                if message[2]:
                    metrics.observe_retry("source", self.name)
                continue
            if message[0] == "done":
                if message[1] is not None and stats.error is None:
                    stats.error = message[1]
                self._wake()
                return
            _, captured, idle_since, snapshot_done, snapshot = message
            stats.captured += captured - self._captured
            if captured != self._captured:
                stats.last_capture = time.monotonic()
            self._captured = captured
            self.idle_since = idle_since
            if snapshot_done:
                stats.snapshot_done[self.name] = True
            for qualified, (rows, total, done, started) in snapshot.items():
                progress = stats.snapshot.get(qualified)
                if progress is None:
                    progress = stats.snapshot[qualified] = TableProgress(qualified, total)
                progress.rows, progress.total, progress.done, progress.started = rows, total, done, started
                delta = rows - self._snapshot_rows.get(qualified, 0)
                if delta > 0:  # the capture process's counters do not reach this process's /metrics
                    table = qualified.split(":", 1)[1]
                    metrics.SNAPSHOT_ROWS.labels(self.config.branch, self.name, table).inc(delta)
                    self._snapshot_rows[qualified] = rows
            self._wake()


class Runner:
    """Runs every source of a pipeline file into its sinks until stopped (or until idle, for tests)."""

    def __init__(self, pipeline: PipelineConfig, *, sinks: list[str] | None = None,
                 spool_path: Path | None = None, exit_when_idle_s: float | None = None,
                 stop_after_snapshot: bool = False) -> None:
        self.pipeline = pipeline
        runtime = pipeline.runtime
        if not isinstance(runtime, RuntimeConfig):
            runtime = RuntimeConfig.model_validate(runtime or {})
        self.runtime = runtime
        names = sinks or list(pipeline.sinks)
        unknown = [n for n in names if n not in pipeline.sinks]
        if unknown or not names:
            raise ConfigError(f"`sinks` must name at least one of {sorted(pipeline.sinks)!r}; got {unknown or names!r}")
        self.sink_names = names
        path = spool_path or runtime.spool.path or state_dir() / "spool" / f"{pipeline.name}.sqlite"
        self.spool = Spool(Path(path), shared=runtime.capture_processes)
        self.stop = threading.Event()
        self.stats = RunStats()
        self.exit_when_idle_s = exit_when_idle_s
        self.stop_after_snapshot = stop_after_snapshot
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self.captures: list[SourceCapture] = []
        self._warned_retention = False
        self._compiled: dict[TableSchema, Any] = {}
        self._prefetch: tuple[int, Any] | None = None
        self._text_sinks = False
        """Every sink writes PostgreSQL text rows (`write_text`), and `runtime.text_copy` is on."""
        """(sequence read after, future of the next round's spool read) while a backlog drains."""

    def _wake_drain(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # loop closed during shutdown
                pass

    async def run(self) -> RunStats:
        from branchline import metrics
        from branchline.sinks.build import build_sink

        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        # heartbeat rows are measured when they reach a sink, never written into the target
        sinks = {name: metrics.skip_heartbeat_writes(build_sink(self.pipeline.sinks[name], name))
                 for name in self.sink_names}
        self._text_sinks = self.runtime.text_copy and all(hasattr(sink, "write_text") for sink in sinks.values())
        threads: list[Any] = []
        retention: dict[str, float | None] = {}
        for source in self.pipeline.sources:
            reader = build_reader(source, self.runtime)
            if self.runtime.capture_processes:
                retention[source.name] = self._retention(reader)
                reader.close()
                remote = RemoteCapture(source, self.spool.path, self.pipeline, self.stats, self._wake_drain)
                self.captures.append(remote)  # type: ignore[arg-type]
                threads.append(remote)
                remote.start()
                continue
            capture = SourceCapture(source, reader, self.spool, self.runtime, self.stop, self.stats, self._wake_drain)
            self.captures.append(capture)
            thread = threading.Thread(target=capture.run, name=f"capture-{source.name}", daemon=True)
            threads.append(thread)
            thread.start()
            retention[source.name] = self._retention(reader)
        tune_for_throughput()  # sinks and capture processes started: freeze what start-up built
        try:
            await self._drain(sinks, retention, threads)
        finally:
            self.stop.set()
            for thread in threads:
                if isinstance(thread, RemoteCapture):
                    thread.stop()
                await asyncio.to_thread(thread.join, 10)
            for sink in sinks.values():
                try:
                    await sink.close()
                except Exception:  # closing after an outage may fail; nothing is left unacknowledged
                    log.debug("closing sink failed", exc_info=True)
            metrics.set_spool(str(self.spool.path), self.spool.size_bytes, self.runtime.spool.max_bytes,
                              self.spool.oldest_spooled_at())
            self.spool.close()
        if self.stats.error is not None:
            raise self.stats.error
        return self.stats

    @staticmethod
    def _retention(reader: EmbeddedReader) -> float | None:
        try:
            return reader.retention_seconds()
        except BranchlineError:
            return None

    def _finished(self, threads: list[threading.Thread], unflushed: int = 0) -> bool:
        """True when the drain should stop. ``unflushed``: spooled batches already written into a buffering
        sink but not yet flushed; they count as drained here (the caller flushes them before it returns)."""
        if self.stats.error is not None:
            return True

        def drained() -> bool:
            return self.spool.batches <= unflushed

        if self.stop_after_snapshot and len(self.stats.snapshot_done) == len(self.captures) and drained():
            return True
        if self.exit_when_idle_s is not None and len(self.stats.snapshot_done) == len(self.captures):
            # every reader caught up (it said so, not merely slow) for a while, and the spool drained
            now = time.monotonic()
            caught_up = all(c.idle_since is not None and now - c.idle_since >= self.exit_when_idle_s
                            for c in self.captures)
            if caught_up and drained() and now - self.stats.last_write >= self.exit_when_idle_s:
                return True
        if self.stop.is_set() and (self.stats.sink_down_since is not None or drained()):
            return True
        return not any(t.is_alive() for t in threads) and drained()

    async def _drain(self, sinks: dict[str, Any], retention: dict[str, float | None],
                     threads: list[threading.Thread]) -> None:
        try:
            await self._drain_rounds(sinks, retention, threads)
        finally:
            if self._prefetch is not None:  # never leave a spool read running past the spool's close
                await asyncio.gather(self._prefetch[1], return_exceptions=True)
                self._prefetch = None

    async def _next_round(self, after_seq: int) -> tuple[list[SpooledBatch], TextRound]:
        """The spool's batches after ``after_seq``, split between the text and the event path: the read
        started while the last round was written, when it was for this sequence number, else a new read."""
        prefetched, self._prefetch = self._prefetch, None
        if prefetched is not None:
            round_ = await prefetched[1]
            if prefetched[0] == after_seq:
                return round_
        return await asyncio.to_thread(self._read_spool, after_seq)

    async def _drain_rounds(self, sinks: dict[str, Any], retention: dict[str, float | None],
                            threads: list[threading.Thread]) -> None:
        """Spool -> transforms -> collapse -> sinks, in spool order; delete from the spool what is durable.

        A sink that is durable on write acknowledges each round. A buffering sink (``durable_on_write``
        False, e.g. Delta) gets every round written as it comes, but is flushed only every
        ``commit_interval_s``, when the spool nears its limit, and before the drain stops (idle exit,
        shutdown); only a successful flush deletes those batches from the spool. After any failed write or
        flush the unflushed batches are read and written again (the sinks are idempotent), so a sink that
        lost its buffer in the failure loses nothing.
        """
        from branchline import metrics
        from branchline.streams.dedupe import collapse

        assert self._wake is not None
        attempt = 0
        spool_name = str(self.spool.path)
        buffering = {name: sink for name, sink in sinks.items()
                     if getattr(sink.capabilities, "durable_on_write", True) is False}
        intervals = [s.capabilities.commit_interval_s for s in buffering.values()
                     if getattr(s.capabilities, "commit_interval_s", None) is not None]
        commit_every = min(intervals) if intervals else 0.0
        warn_bytes = self.runtime.spool.max_bytes * self.runtime.spool.warn_fraction
        read_after = 0  # spool sequence written through (buffering sinks: not yet flushed)
        unflushed_batches = 0
        unflushed_changes = 0
        deferred: list[tuple[TableId, str, Any, float]] = []  # batch metrics of buffering sinks, until flushed
        last_flush = time.monotonic()

        def failed(exc: BaseException, sink_name: str) -> bool:
            """A write or flush failed: True to stop the drain, False to retry after a pause."""
            nonlocal read_after, unflushed_batches, unflushed_changes
            read_after, unflushed_batches, unflushed_changes = 0, 0, 0  # write the unflushed batches again
            deferred.clear()
            if not isinstance(exc, BranchlineError):  # a sink bug must stop the run, never spin
                metrics.observe_error("sink", sink_name, exc)  # sinks count their own errors (sinks/_retry.py)
                self.stats.error = exc
                self.stop.set()
                log.error("writing into the sink failed", exc_info=exc)
                return True
            if not is_retryable(exc):
                self.stats.error = exc
                self.stop.set()
                log.error("sink failed: %s", exc)
                return True
            now = time.monotonic()
            if self.stats.sink_down_since is None:
                self.stats.sink_down_since = now
                log.warning("target unreachable; capture continues into the spool: %s", exc)
            self._warn_outage(now - self.stats.sink_down_since, retention)
            if self.stop.is_set():
                log.warning("stopping with %d spooled batches undelivered; they drain on the next run",
                            self.spool.batches)
                return True
            metrics.observe_retry("sink", sink_name)
            return False

        def reachable_again() -> None:
            nonlocal attempt
            if self.stats.sink_down_since is not None:
                log.info("target reachable again after %.1f s; draining %d spooled batches",
                         time.monotonic() - self.stats.sink_down_since, self.spool.batches)
                self.stats.sink_down_since = None
                self._warned_retention = False
            attempt = 0

        async def pause() -> None:
            nonlocal attempt
            attempt += 1
            await asyncio.sleep(min(10.0, 0.5 * 2 ** min(attempt, 5)))

        while True:
            metrics.set_spool(spool_name, self.spool.size_bytes, self.runtime.spool.max_bytes,
                              self.spool.oldest_spooled_at())
            finished = self._finished(threads, unflushed_batches)
            if unflushed_batches and self.stats.error is None and not (
                    self.stop.is_set() and self.stats.sink_down_since is not None) and (
                    finished or time.monotonic() - last_flush >= commit_every
                    or self.spool.size_bytes >= warn_bytes):
                started = time.monotonic()
                flushing = ""
                try:
                    for flushing, sink in buffering.items():
                        await sink.flush()
                except Exception as exc:  # noqa: BLE001 - `failed` stops on anything not retryable
                    if failed(exc, flushing):
                        return
                    await pause()
                    continue
                reachable_again()
                for table, name, events, duration in deferred:
                    metrics.observe_batch_written(table, name, events, duration)
                deferred.clear()
                await asyncio.to_thread(self.spool.delete_through, read_after)
                self.stats.written += unflushed_changes
                log.debug("flushed %d changes in %d batches in %.3f s", unflushed_changes, unflushed_batches,
                          time.monotonic() - started)
                unflushed_batches = unflushed_changes = 0
                last_flush = time.monotonic()
                continue
            if finished:
                if unflushed_batches:
                    log.warning("stopping with %d written but unflushed batches; they are written again on the"
                                " next run", unflushed_batches)
                return
            try:
                round_ = await self._next_round(read_after)
            except BranchlineError as exc:  # a spooled PostgreSQL value that does not decode (a bad record)
                self.stats.error = exc
                self.stop.set()
                log.error("%s", exc)
                metrics.observe_error("transform", self.pipeline.name, exc)
                return
            if not round_[0]:
                self._wake.clear()
                timeout = 0.5
                if unflushed_batches:
                    timeout = max(0.01, min(timeout, commit_every - (time.monotonic() - last_flush)))
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except TimeoutError:
                    pass
                continue
            batches, split = round_
            count = sum(batch.count for batch in batches)
            if self.runtime.capture_processes:  # capture lag, measured here: the reader runs elsewhere
                for batch in batches:
                    first = batch.text.tables[0].id if batch.text is not None else batch.events[0].table
                    metrics.observe_changes_read(first.branch, first.source,
                                                 _read_marks(batch.events) if batch.marks is None else batch.marks)
            try:
                pairs = self._transformed(split.events)
            except BranchlineError as exc:  # a bad record or a `tables:` entry that does not fit
                self.stats.error = exc
                self.stop.set()
                log.error("%s", exc)
                metrics.observe_error("transform", self.pipeline.name, exc)
                return
            segments = collapse(pairs)
            if count >= self.runtime.batch_size or len(batches) >= 64:  # a backlog: read on while the sinks write
                self._prefetch = (batches[-1].seq,
                                  asyncio.ensure_future(asyncio.to_thread(self._read_spool, batches[-1].seq)))
            started = time.monotonic()
            name = ""
            as_text = 0
            try:
                # text segments first: the event segments may hold a heartbeat, which vouches for what came before
                for text in split.segments:
                    taken = 0
                    for name, sink in sinks.items():
                        began = time.monotonic()
                        if await sink.write_text(text.schema, text):
                            metrics.observe_batch_written(text.table, name, text.marks, time.monotonic() - began)
                            taken += 1
                            continue
                        for segment in collapse(self._transformed(list(zip(text.events(), repeat(text.schema))))):
                            began = time.monotonic()
                            await sink.write_batch(segment.schema, segment.events)
                            metrics.observe_batch_written(segment.table, name, segment.events,
                                                          time.monotonic() - began)
                    if taken == len(sinks):
                        as_text += text.rows
                for segment in segments:
                    for name, sink in sinks.items():
                        began = time.monotonic()
                        await sink.write_batch(segment.schema, segment.events)
                        if name in buffering:
                            deferred.append((segment.table, name, segment.events, time.monotonic() - began))
                        else:
                            metrics.observe_batch_written(segment.table, name, segment.events,
                                                          time.monotonic() - began)
            except Exception as exc:  # noqa: BLE001 - `failed` stops on anything not retryable
                if failed(exc, name):
                    return
                await pause()
                continue
            reachable_again()
            read_after = batches[-1].seq
            if split.segments or any(not metrics.is_heartbeat(segment.table) for segment in segments):
                self.stats.last_write = time.monotonic()  # user rows only: see `SourceCapture.idle_since`
            if buffering:
                unflushed_batches += len(batches)
                unflushed_changes += count
            else:
                await asyncio.to_thread(self.spool.delete_through, read_after)
                self.stats.written += count
                self.stats.written_as_text += as_text
            log.debug("wrote %d changes (%d segments) in %.3f s", count, len(segments), time.monotonic() - started)

    def _read_spool(self, after_seq: int) -> tuple[list[SpooledBatch], TextRound]:
        """Read, and decode or split, in a worker thread: it overlaps the sinks' waits on the store."""
        batches = list(self.spool.read(self.runtime.batch_size, after_seq))
        return batches, split_round(batches, self._takes_text)

    def _takes_text(self, schema: TableSchema) -> bool:
        """Whether a table's spooled PostgreSQL text rows may take the text path (`branchline.runtime.text_rows`):
        every sink writes text, no transform touches the table, and it is not a heartbeat table."""
        from branchline import metrics

        return (self._text_sinks and not metrics.is_heartbeat(schema.id)
                and self._transform_for(schema).identity)

    def _transformed(self, pairs: list[tuple[ChangeEvent, TableSchema]]) -> list[tuple[ChangeEvent, TableSchema]]:
        """The `tables:` transforms applied to each (event, schema); an event a transform drops is left out."""
        out: list[tuple[ChangeEvent, TableSchema]] = []
        append = out.append
        last: Any = None
        compiled: Any = None  # a run of one table's events shares its schema object: one lookup per run
        for event, schema in pairs:
            if schema is not last:
                last = schema
                compiled = self._transform_for(schema)
            if compiled.identity:  # `apply` would return the event as it is
                append((event, compiled.schema))
                continue
            transformed = compiled.apply(event)
            if transformed is not None:
                append((transformed, compiled.schema))
        return out

    def _transform_for(self, schema: TableSchema) -> Any:
        """The `tables:` transforms of a table, compiled once per schema (the Faust workers' code)."""
        from branchline.streams.transforms import compile_transforms

        cached = self._compiled.get(schema)  # by value: each spooled batch unpickles its own copy
        if cached is not None:
            return cached
        name = schema.id.qualified
        tables = self.pipeline.tables if isinstance(self.pipeline.tables, dict) else {}
        compiled = compile_transforms(schema, tables.get(name), name=name)
        self._compiled[schema] = compiled
        return compiled

    def _warn_outage(self, down_s: float, retention: dict[str, float | None]) -> None:
        if self._warned_retention:
            return
        fraction = self.runtime.retention_warning_fraction
        for name, seconds in retention.items():
            limit = self.runtime.source_retention_s or seconds
            if limit and down_s >= fraction * limit:
                log.warning("target outage of %.0f s has lasted %.0f%% of %s's log retention (%.0f s): if it"
                            " outlasts it, the spool cannot bridge the gap and a new snapshot is needed",
                            down_s, 100 * down_s / limit, name, limit)
                self._warned_retention = True


def reset_state(pipeline: PipelineConfig, spool_path: Path | None = None) -> None:
    """Forget checkpoints and the spool (a fresh snapshot follows); drop PostgreSQL slots we created."""
    runtime = pipeline.runtime if isinstance(pipeline.runtime, RuntimeConfig) else RuntimeConfig()
    path = Path(spool_path or runtime.spool.path or state_dir() / "spool" / f"{pipeline.name}.sqlite")
    for suffix in ("", "-wal", "-shm"):
        candidate = Path(str(path) + suffix)
        if candidate.exists():
            os.remove(candidate)
    for source in pipeline.sources:
        if isinstance(source, PostgresSourceConfig):
            reader = build_reader(source, runtime)
            try:
                reader.drop_slot()  # type: ignore[attr-defined]
            finally:
                reader.close()


__all__ = ["Changes", "RunStats", "Runner", "SourceCapture", "build_reader", "reset_state", "table_filter"]
