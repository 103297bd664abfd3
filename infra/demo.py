"""`make demo`: the README's main command, end to end on the local stack (`branchline infra up` first).

Loads the sample ERP and CRM data, prepares the sources (`preflight --run-setup-sql`), replicates them
with `branchline run FILE --exit-when-idle 10`, drives the churn workload for a minute while a
live screen shows each table's events/s, replication lag and newest applied source position, and ends
with `branchline verify FILE`. The exit code is verify's: 0 only when source and target are identical.

Re-runnable: the sample tables are reloaded, the pipeline's target schemas dropped and its spool,
checkpoints and slot reset, so every run starts from the same state. The demo changes only the local
stack; Debezium connectors of the same pipeline that hold its PostgreSQL slot are stopped for the run
and resumed afterwards (the slot has one reader at a time).

Environment: DEMO_ROWS (sample size, 10000), DEMO_CHURN_SECONDS (60), DEMO_CHURN_RATE (changed rows/s
per database, 100), DEMO_METRICS_PORT (0: any free port), DEMO_CATCH_UP_S (how long the run may take
to catch up after the churn, 300).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import click
import httpx
from branchline.config import PipelineConfig, PostgresSourceConfig, load_pipeline
from branchline.events import TableId, format_lsn
from branchline.paths import state_dir

_ROW_BITS = 24
_POS_BITS = 40


def _branchline() -> list[str]:
    """The `branchline` of this interpreter's environment (the venv's when run via `make demo`)."""
    script = Path(sys.executable).parent / "branchline"
    if script.exists():
        return [str(script)]
    found = shutil.which("branchline")
    if found is None:
        raise click.ClickException("`branchline` must be on PATH; got none (pip install -e . first)")
    return [found]


def _step(text: str) -> None:
    click.secho(f"\n==> {text}", bold=True, err=True)


def _call(args: list[str], *, ok: tuple[int, ...] = (0,)) -> int:
    """Run one `branchline` command in the foreground; stop the demo on an unexpected exit code."""
    click.echo("$ branchline " + " ".join(args), err=True)
    code = subprocess.call([*_branchline(), *args])
    if code not in ok:
        raise click.ClickException(f"`branchline {args[0]}` must succeed; got exit code {code!r}")
    return code


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise click.ClickException(f"`{name}` must be an integer; got {value!r}") from None


# -- Debezium connectors holding our slot ----------------------------------------------------------


def _running_connectors(pipeline: PipelineConfig) -> list[str]:
    """Connectors of this pipeline that run on Kafka Connect and read a PostgreSQL slot the run needs."""
    if pipeline.connect is None:
        return []
    names = [s.connector_name for s in pipeline.sources if isinstance(s, PostgresSourceConfig)]
    running = []
    for name in names:
        try:
            response = httpx.get(f"{pipeline.connect.url.rstrip('/')}/connectors/{name}/status", timeout=5)
        except httpx.HTTPError:
            return []  # no Connect here: nothing can hold the slot through it
        if response.status_code == 200 and response.json().get("connector", {}).get("state") in ("RUNNING",
                                                                                                "PAUSED"):
            running.append(name)
    return running


def _connectors(pipeline: PipelineConfig, names: list[str], action: str) -> None:
    """`stop` (a paused task keeps its replication connection, a stopped one closes it) or `resume`."""
    assert pipeline.connect is not None
    for name in names:
        response = httpx.put(f"{pipeline.connect.url.rstrip('/')}/connectors/{name}/{action}", timeout=30)
        click.echo(f"PUT /connectors/{name}/{action}: {response.status_code}", err=True)
        if response.status_code >= 300:
            raise click.ClickException(f"`{action}` of connector {name} must succeed; got HTTP "
                                       f"{response.status_code!r}: {response.text[:300]}")


def _wait_slots_free(pipeline: PipelineConfig, timeout_s: float = 30) -> None:
    import psycopg

    for source in pipeline.sources:
        if not isinstance(source, PostgresSourceConfig):
            continue
        deadline = time.monotonic() + timeout_s
        with psycopg.connect(host=source.host, port=source.port, user=source.user, dbname=source.database,
                             password=source.password.get_secret_value() or None, autocommit=True) as conn:
            while True:
                row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                                   (source.slot,)).fetchone()
                if row is None or not row[0]:
                    break
                if time.monotonic() > deadline:
                    raise click.ClickException(f"slot `{source.slot}` must be free for the embedded run; it is "
                                               f"still in use after {timeout_s:.0f} s")
                time.sleep(0.5)


# -- target --------------------------------------------------------------------------------------


def _sink(pipeline: PipelineConfig) -> tuple[str, Any]:
    from branchline.sinks.config import PostgresSinkConfig

    for name, config in pipeline.sinks.items():
        if isinstance(config, PostgresSinkConfig):
            return name, config
    raise click.ClickException(f"`sinks` must hold a PostgreSQL sink for the demo's verify; got {sorted(pipeline.sinks)!r}")


def _connect_target(config: Any) -> Any:
    import psycopg
    from branchline.sinks.postgres.sink import conninfo

    return psycopg.connect(conninfo(config), autocommit=True)


def _target_schema(config: Any, source: Any) -> str:
    from branchline.sinks._batch import render

    database = getattr(source, "database", None) or next(iter(getattr(source, "databases", ())), "")
    return render(config.schema_, TableId(source=source.name, branch=source.branch, database=database,
                                          schema_=None, table=""))


def _drop_targets(pipeline: PipelineConfig) -> None:
    """Each source's target schema goes: the reloaded sample must not meet rows of the last demo."""
    from psycopg import sql

    _, config = _sink(pipeline)
    schemas = sorted({_target_schema(config, source) for source in pipeline.sources})
    with _connect_target(config) as conn:
        for schema in schemas:
            click.echo(f"DROP SCHEMA IF EXISTS {schema} CASCADE  (target {config.host}:{config.port}/{config.database})",
                       err=True)
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def _position_text(kind: str, position: int | None) -> str:
    if position is None:
        return "-"
    if position == 0:
        return "snapshot"
    if kind == "postgres":
        return format_lsn(position >> _ROW_BITS)
    file_seq = position >> (_POS_BITS + _ROW_BITS)
    return f"{file_seq:06d}:{(position >> _ROW_BITS) & ((1 << _POS_BITS) - 1)}"


# -- the live screen -----------------------------------------------------------------------------


class Screen:
    """Per table: events/s (rows written over the last 5 s), replication lag, newest applied position."""

    def __init__(self, pipeline: PipelineConfig, url: str) -> None:
        self.pipeline = pipeline
        self.url = url
        self.kinds = {s.name: s.kind for s in pipeline.sources}
        self.sources = {s.name: s for s in pipeline.sources}
        self.sink_name, self.sink = _sink(pipeline)
        self.history: dict[tuple[str, str], deque[tuple[float, float]]] = {}
        self.positions: dict[tuple[str, str], int | None] = {}
        self.last: dict[str, Any] = {}
        self._target: Any = None

    def poll(self) -> None:
        try:
            self.last = httpx.get(f"{self.url}/status.json", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            return
        now = time.monotonic()
        for table in self.last.get("tables", []):
            if table["sink"] != self.sink_name:
                continue
            key = (table["source"], table["table"])
            window = self.history.setdefault(key, deque())
            window.append((now, table["rows_written"] or 0.0))
            while len(window) > 2 and now - window[0][0] > 5:
                window.popleft()
        self._poll_positions()

    def _poll_positions(self) -> None:
        import psycopg
        from psycopg import sql

        try:
            if self._target is None or self._target.closed:
                self._target = _connect_target(self.sink)
            for source, qualified in list(self.history):
                schema = _target_schema(self.sink, self.sources[source])
                table = qualified.split(".", 1)[1]
                row = self._target.execute(sql.SQL("SELECT max(_bl_position) FROM {}.{}").format(
                    sql.Identifier(schema), sql.Identifier(table))).fetchone()
                self.positions[(source, qualified)] = None if row is None or row[0] is None else int(row[0])
        except psycopg.Error:  # a table being created, or the target restarting: keep the last figures
            self._target = None

    def rate(self, key: tuple[str, str]) -> float:
        window = self.history.get(key)
        if not window or len(window) < 2 or window[-1][0] <= window[0][0]:
            return 0.0
        return (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0])

    def render(self, title: str) -> Any:
        from rich.table import Table

        table = Table(title=title, title_justify="left", expand=False)
        for column, justify in (("table", "left"), ("events/s", "right"), ("lag", "right"),
                                ("position (binlog / LSN)", "left"), ("rows written", "right")):
            table.add_column(column, justify=justify)  # type: ignore[arg-type]
        lags = {(t["source"], t["table"]): t for t in self.last.get("tables", []) if t["sink"] == self.sink_name}
        for key in sorted(self.history):
            entry = lags.get(key, {})
            lag = entry.get("replication_lag_s")
            color = "green" if lag is not None and lag < 5 else "yellow" if lag is not None and lag < 60 else "red"
            table.add_row(f"{key[0]}:{key[1].split('.', 1)[1]}", f"{self.rate(key):,.0f}",
                          "-" if lag is None else f"[{color}]{lag:,.1f} s[/]",
                          _position_text(self.kinds.get(key[0], ""), self.positions.get(key)),
                          f"{entry.get('rows_written') or 0:,.0f}")
        spools = self.last.get("spools", [])
        spooled = sum(s.get("bytes") or 0 for s in spools)
        table.caption = f"lag: now - commit time of the newest change applied | spool {spooled / 1e6:,.1f} MB"
        return table

    def close(self) -> None:
        if self._target is not None:
            self._target.close()


# -- the demo ------------------------------------------------------------------------------------


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@click.command("demo")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                default=Path("examples/pipeline.yaml"))
def demo(file: Path) -> None:
    """Sample data -> `branchline run` under churn with a live screen -> `branchline verify` (exit code)."""
    from rich.console import Console

    rows = _env_int("DEMO_ROWS", 10_000)
    churn_s = _env_int("DEMO_CHURN_SECONDS", 60)
    churn_rate = _env_int("DEMO_CHURN_RATE", 100)
    catch_up_s = _env_int("DEMO_CATCH_UP_S", 300)
    port = _env_int("DEMO_METRICS_PORT", 0) or _free_port()
    pipeline = load_pipeline(file)
    logs = state_dir() / "demo"
    logs.mkdir(parents=True, exist_ok=True)
    run_log, churn_log = logs / "run.log", logs / "churn.log"

    _step(f"load the sample ERP and CRM data ({rows:,} rows in the main tables)")
    _call(["sample", "load", "--rows", str(rows)])

    paused = _running_connectors(pipeline)
    if paused:
        _step(f"stop the Debezium connectors that hold this pipeline's slot for the run: {', '.join(paused)}")
        _connectors(pipeline, paused, "stop")
        _wait_slots_free(pipeline)

    try:
        from branchline.runtime.runner import reset_state

        _step("forget the last demo's run: spool, checkpoints, replication slot and publication")
        reset_state(pipeline)

        _step("prepare the sources for CDC (idempotent setup SQL, then checks)")
        for source in pipeline.sources:
            admin = "postgres" if source.kind == "postgres" else "root"
            _call(["preflight", str(file), "--source", source.name, "--run-setup-sql", "--admin", admin],
                  ok=(0, 1))  # 1: warnings only (a superuser, a key-less sample table)

        _step("start from a clean target: drop the pipeline's target schemas")
        _drop_targets(pipeline)

        code = _replicate(file, pipeline, port, run_log, churn_log, churn_s, churn_rate, catch_up_s)
        if code != 0:
            raise click.ClickException(f"`branchline run` must exit 0; got {code!r}. Its log ({run_log}):\n"
                                       + _tail(run_log))

        _step("compare source and target row by row")
        verified = subprocess.call([*_branchline(), "verify", str(file)])
    finally:
        if paused:
            _step(f"resume the Debezium connectors stopped for the demo: {', '.join(paused)}")
            _connectors(pipeline, paused, "resume")
    Console(stderr=True).print(
        "[bold green]demo: source and target are identical[/]" if verified == 0 else
        f"[bold red]demo: verify found differences (exit code {verified})[/]; logs in {logs}")
    sys.exit(verified)


def _replicate(file: Path, pipeline: PipelineConfig, port: int, run_log: Path, churn_log: Path, churn_s: int,
               churn_rate: int, catch_up_s: int) -> int:
    """`branchline run` from a fresh snapshot, churn beside it, the live screen until the run caught up."""
    from rich.console import Console
    from rich.live import Live

    url = f"http://127.0.0.1:{port}"
    _step(f"branchline run {file} --exit-when-idle 10 (log: {run_log}, metrics: {url}/metrics)")
    runner: subprocess.Popen[bytes] | None = None
    churn: subprocess.Popen[bytes] | None = None
    screen = Screen(pipeline, url)
    console = Console(stderr=True)
    if not console.is_terminal:  # a log: a frame every 15 s instead of a redrawn screen
        console = Console(stderr=True, width=100)
    last_frame = 0.0
    try:
        with run_log.open("wb") as out:
            runner = subprocess.Popen([*_branchline(), "run", str(file), "--exit-when-idle", "10",
                                       "--metrics-port", str(port), "--no-progress"],
                                      stdout=out, stderr=subprocess.STDOUT)
        started = time.monotonic()
        churn_started: float | None = None
        churn_done_at: float | None = None
        sources = len(pipeline.sources)
        with Live(screen.render("starting"), console=console, refresh_per_second=2,
                  auto_refresh=console.is_terminal) as live:
            while runner.poll() is None:
                screen.poll()
                now = time.monotonic()
                if churn is None:
                    log = run_log.read_text(errors="replace")
                    done, streaming = log.count("snapshot of "), log.count(": streaming from ")
                    title = (f"initial snapshot: {done} tables read, {streaming} of {sources} sources streaming, "
                             f"then the spool drains")
                    spooled = sum(s.get("bytes") or 0 for s in screen.last.get("spools", []))
                    if streaming >= sources and spooled == 0 and screen.last.get("spools"):
                        # the snapshot is in the target: the churn minute is all streaming
                        churn_started = now
                        with churn_log.open("wb") as out:
                            churn = subprocess.Popen([*_branchline(), "sample", "churn", "--rate", str(churn_rate),
                                                      "--duration", str(churn_s)], stdout=out,
                                                     stderr=subprocess.STDOUT)
                    elif now - started > catch_up_s:
                        raise click.ClickException(f"the initial snapshot must end within {catch_up_s} s; it did "
                                                   f"not. The run's log ({run_log}):\n" + _tail(run_log))
                elif churn_done_at is None and churn.poll() is not None:
                    churn_done_at = now
                    if churn.returncode != 0:
                        raise click.ClickException(f"`branchline sample churn` must exit 0; got "
                                                   f"{churn.returncode!r}:\n" + _tail(churn_log))
                if churn is not None and churn_done_at is None:
                    assert churn_started is not None
                    title = (f"streaming; churn at ~{churn_rate} rows/s per database: "
                             f"{max(0, churn_s - (now - churn_started)):.0f} s left")
                elif churn_done_at is not None:
                    title = f"churn done; the run exits once caught up and idle for 10 s ({now - churn_done_at:.0f} s)"
                    if now - churn_done_at > catch_up_s:
                        raise click.ClickException(f"`branchline run` must catch up within {catch_up_s} s of the "
                                                   f"churn's end; it did not. Its log ({run_log}):\n" + _tail(run_log))
                if console.is_terminal:
                    live.update(screen.render(title))
                elif now - last_frame >= 15:
                    last_frame = now
                    console.print(screen.render(title))
                time.sleep(1)
            live.update(screen.render("run caught up and exited"))
        if churn is None or churn.poll() is None:  # the run stopped first: a failure, its log says why
            return runner.returncode or 1
        console.print(_tail(churn_log, 4))
        console.print(_tail(run_log, 3))
        return runner.returncode
    finally:
        _stop(churn)
        _stop(runner)
        screen.close()


if __name__ == "__main__":
    demo()
