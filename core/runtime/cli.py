"""`branchline run FILE`: the embedded runtime's command."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click
from branchline.config import load_pipeline

log = logging.getLogger("branchline.runtime")


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


def _progress(runner: object, stop: threading.Event, interactive: bool) -> None:
    """Snapshot progress per table (rows, rows/s, time left), then a one-line status now and then."""
    from branchline.runtime.runner import Runner
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    assert isinstance(runner, Runner)
    stats = runner.stats
    console = Console(stderr=True)

    def render() -> Table:
        table = Table(title="branchline run", expand=False)
        for name in ("table", "rows", "of ~", "rows/s", "left", "state"):
            table.add_column(name, justify="right" if name != "table" else "left")
        for progress in stats.snapshot.values():
            table.add_row(progress.qualified, f"{progress.rows:,}", f"{progress.total:,}", f"{progress.rate:,.0f}",
                          _fmt_eta(progress.remaining_s), "done" if progress.done else "snapshot")
        state = "target DOWN, spooling" if stats.sink_down_since is not None else "streaming"
        table.caption = (f"{state} | captured {stats.captured:,} | written {stats.written:,} | "
                         f"spool {runner.spool.size_bytes / 1e6:,.1f} MB in {runner.spool.batches} batches")
        return table

    if interactive:
        with Live(render(), console=console, refresh_per_second=2, transient=False) as live:
            while not stop.wait(0.5):
                live.update(render())
            live.update(render())
        return
    last = 0.0
    while not stop.wait(1.0):
        now = time.monotonic()
        if now - last >= 10:
            last = now
            for progress in stats.snapshot.values():
                if not progress.done:
                    log.info("snapshot %s: %d of ~%d rows, %.0f rows/s, %s left", progress.qualified, progress.rows,
                             progress.total, progress.rate, _fmt_eta(progress.remaining_s))
            log.info("captured %d, written %d, spool %d bytes", stats.captured, stats.written, runner.spool.size_bytes)


def _heartbeats_on(pipeline: Any, idle_s: float | None, stop_after_snapshot: bool) -> Any:
    """The pipeline as `branchline run` runs it: heartbeat tables captured where a first beat worked.

    A run that exits on its own (``--exit-when-idle``, ``--stop-after-snapshot``) writes no heartbeats:
    it needs no live lag, and a heartbeat every interval would keep it from ever being idle.
    """
    from branchline.heartbeat import prepare_heartbeat_capture, with_heartbeat_capture
    from branchline.metrics_config import MetricsConfig

    config = pipeline.metrics if isinstance(pipeline.metrics, MetricsConfig) else MetricsConfig()
    if not config.heartbeat.enabled or idle_s is not None or stop_after_snapshot:
        heartbeat = config.heartbeat.model_copy(update={"enabled": False})
        return pipeline.model_copy(update={"metrics": config.model_copy(update={"heartbeat": heartbeat})})
    ready = []
    for source in pipeline.sources:
        try:
            prepare_heartbeat_capture(source)
            ready.append(source.name)
        except Exception as exc:  # noqa: BLE001 - no heartbeat is no reason not to replicate
            log.warning("heartbeats of %s are not captured (lag freezes while its tables are idle): %s",
                        source.name, exc)
    return with_heartbeat_capture(pipeline, ready)


def _track_tables(pipeline: Any, sinks: list[str]) -> None:
    """A lag series for every captured table from start-up, not only after its first change."""
    from branchline import metrics
    from branchline.heartbeat import heartbeat_table
    from branchline.monitoring import track_tables
    from branchline.runtime.config import RuntimeConfig
    from branchline.runtime.runner import build_reader

    runtime = pipeline.runtime if isinstance(pipeline.runtime, RuntimeConfig) else RuntimeConfig()
    for source in pipeline.sources:
        metrics.register_heartbeat_table(*heartbeat_table(source))  # no series of its own
        try:
            reader = build_reader(source, runtime)
            try:
                track_tables(reader.table_ids(), sinks)  # type: ignore[attr-defined]
            finally:
                reader.close()
        except Exception as exc:  # noqa: BLE001 - the series appear with the first change instead
            log.debug("listing tables of %s for metrics failed: %s", source.name, exc)


@click.command("run")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--sink", "sinks", multiple=True, help="Write into this sink only (repeatable; default: all).")
@click.option("--spool", "spool_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Spool file (default: runtime.spool.path or .branchline/spool/<name>.sqlite).")
@click.option("--reset", is_flag=True, help="Forget checkpoints and spool, drop our slots: snapshot again.")
@click.option("--exit-when-idle", "idle_s", type=float, default=None,
              help="Exit once snapshot is done, the spool is empty and nothing arrived for this many seconds "
                   "(writes no heartbeats).")
@click.option("--stop-after-snapshot", is_flag=True,
              help="Exit once the initial snapshot is written (writes no heartbeats).")
@click.option("--metrics-port", type=int, default=None, help="Serve /metrics on this port (0: any free port).")
@click.option("--no-metrics", is_flag=True, help="Do not serve /metrics.")
@click.option("--progress/--no-progress", default=None, help="Live table on a terminal (default: if a TTY).")
def run(file: Path, sinks: tuple[str, ...], spool_path: Path | None, reset: bool, idle_s: float | None,
        stop_after_snapshot: bool, metrics_port: int | None, no_metrics: bool, progress: bool | None) -> None:
    """Replicate FILE's sources into its sinks without Kafka: snapshot, then stream, via a local spool."""
    from branchline.runtime.runner import Runner, reset_state

    pipeline = load_pipeline(file)
    if reset:
        reset_state(pipeline, spool_path)
    if not no_metrics:
        from branchline import metrics
        from branchline.metrics_config import MetricsConfig

        config = pipeline.metrics
        if metrics_port is not None and isinstance(config, MetricsConfig):
            config = config.model_copy(update={"port": metrics_port})
        try:
            metrics.serve_metrics(config if isinstance(config, MetricsConfig) else None, runtime="run")
        except OSError as exc:
            log.warning("metrics endpoint not started: %s", exc)
    pipeline = _heartbeats_on(pipeline, idle_s, stop_after_snapshot)
    runner = Runner(pipeline, sinks=list(sinks) or None, spool_path=spool_path, exit_when_idle_s=idle_s,
                    stop_after_snapshot=stop_after_snapshot)
    if not no_metrics:
        _track_tables(pipeline, runner.sink_names)
    interactive = sys.stderr.isatty() if progress is None else progress
    shown = threading.Event()
    display = threading.Thread(target=_progress, args=(runner, shown, interactive), daemon=True)
    display.start()

    async def main() -> None:
        from branchline.monitoring import run_monitoring

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, runner.stop.set)
        # heartbeats into every source and the pollers (slot WAL, binlog files behind) beside the pipeline
        monitor = asyncio.create_task(run_monitoring(pipeline, runner.stop, runtime="run"))
        try:
            await runner.run()
        finally:
            runner.stop.set()
            try:
                await asyncio.wait_for(monitor, 30)
            except TimeoutError:
                log.warning("monitoring did not stop within 30 s")

    try:
        asyncio.run(main())
    finally:
        shown.set()
        display.join(2)
    click.echo(f"captured {runner.stats.captured} changes, wrote {runner.stats.written}"
               f" ({runner.stats.written_as_text} of them as text COPY rows)", err=True)
