"""`branchline config`, `branchline connectors` and `branchline snapshot`: check the pipeline file,
operate the Debezium connectors on Kafka Connect, and re-sync tables while streaming continues."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from branchline.config import PipelineConfig, load_pipeline
from branchline.errors import ConfigError

FILE = click.argument("file", type=click.Path(dir_okay=False))
SOURCE = click.option("--source", "-s", "only", metavar="NAME", help="Only this source (default: all).")


def _connect_client(pipeline: PipelineConfig) -> Any:
    from branchline.connectors.connect import ConnectClient

    if pipeline.connect is None:
        raise ConfigError("`connect.url` must be set to operate connectors; got no `connect:` section")
    return ConnectClient(pipeline.connect.url, pipeline.connect.timeout_s)


# --------------------------------------------------------------------------------------------- config


@click.group()
def config() -> None:
    """Validate a pipeline file."""


@config.command("check")
@FILE
def config_check(file: str) -> None:
    """Validate FILE: every problem is listed with its field path; exit 2 if any."""
    from branchline.connectors.debezium import is_control_topic  # noqa: F401  (import check)

    pipeline = load_pipeline(file)
    click.echo(f"{file}: OK (pipeline `{pipeline.name}`)")
    for source in pipeline.sources:
        where = ", ".join(source.namespaces)
        extra = f"server_id {source.server_id}" if source.kind != "postgres" else f"slot {source.slot}"  # type: ignore[union-attr]
        click.echo(f"  source {source.name}: {source.kind} {source.host}:{source.port} [{where}] "
                   f"branch {source.branch}, topics {source.topic_prefix}.*, connector {source.connector_name}, {extra}")
    for name, sink in pipeline.sinks.items():
        click.echo(f"  sink {name}: {sink.kind}")
    if pipeline.tables:
        click.echo(f"  tables with settings: {len(pipeline.tables)}")


# ----------------------------------------------------------------------------------------- connectors


@click.group()
def connectors() -> None:
    """Operate the Debezium connectors of a pipeline file on Kafka Connect."""


@connectors.command("plan")
@FILE
@SOURCE
@click.option("--why", is_flag=True, help="Print each setting with the reason it is there.")
def connectors_plan(file: str, only: str | None, why: bool) -> None:
    """Print the exact connector configs `apply` would send (secrets masked)."""
    from branchline.connectors.debezium import MASK, masked, plan, settings_for

    pipeline = load_pipeline(file)
    if why:
        sources = [pipeline.source(only)] if only else pipeline.sources
        for source in sources:
            click.echo(f"# {source.connector_name}")
            for s in settings_for(source, pipeline):
                value = MASK if "password" in s.key else s.value
                click.echo(f"{s.key} = {value}\n    # {s.why}")
            click.echo()
        return
    body = [{"name": name, "config": masked(cfg)} for name, cfg in plan(pipeline, only).items()]
    click.echo(json.dumps(body, indent=2))


@connectors.command("apply")
@FILE
@SOURCE
@click.option("--wait/--no-wait", default=True, help="Wait until connector and tasks run (default: wait).")
@click.option("--timeout", default=120.0, show_default=True, help="Seconds to wait for RUNNING.")
@click.option("--skip-preflight", is_flag=True, help="Apply even when a source fails `branchline preflight`.")
def connectors_apply(file: str, only: str | None, wait: bool, timeout: float, skip_preflight: bool) -> None:
    """Create or update the connectors; unchanged ones are left alone (idempotent). Sources are checked
    with `branchline preflight` first: a FAIL stops before anything changes."""
    from branchline.connectors.operate import apply
    from branchline.connectors.preflight import run

    pipeline = load_pipeline(file)
    if not skip_preflight:
        failed = [c for c in run(pipeline, only) if c.status == "FAIL"]
        if failed:
            for check in failed:
                click.echo(f"FAIL  {check.source}: {check.check}: {check.saw}\n      fix: {check.fix}", err=True)
            click.echo(f"{len(failed)} preflight failures: nothing applied (fix them, or --skip-preflight).",
                       err=True)
            sys.exit(2)
    with _connect_client(pipeline) as client:
        results = apply(client, pipeline, only, wait=wait, timeout_s=timeout)
    unhealthy = False
    for result in results:
        click.echo(f"{result.name}: {result.action}" + (f", {result.state.state}" if result.state else ""))
        if result.state is not None and not result.state.healthy:
            unhealthy = True
            _echo_traces(result.state)
    if unhealthy:
        sys.exit(2)


def _echo_traces(state: Any) -> None:
    if state.trace:
        click.echo(f"  connector trace:\n{_indent(state.trace)}")
    for task in state.tasks:
        if task.trace:
            click.echo(f"  task {task.id} ({task.state}) trace:\n{_indent(task.trace)}")


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines())


@connectors.command("status")
@FILE
@SOURCE
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--snapshots/--no-snapshots", default=True, help="Also show incremental-snapshot progress.")
def connectors_status(file: str, only: str | None, as_json: bool, snapshots: bool) -> None:
    """Connector and task states, the trace of each failed task, and snapshot progress.
    Exit 0 when every connector runs, 1 when one is paused/missing, 2 when one failed."""
    from branchline.connectors.operate import status

    pipeline = load_pipeline(file)
    with _connect_client(pipeline) as client:
        reports = status(client, pipeline, only, snapshots=snapshots)
    if as_json:
        click.echo(json.dumps([r.to_json() for r in reports], indent=2))
    else:
        for report in reports:
            click.echo(report.render())
    worst = max((r.severity for r in reports), default=0)
    sys.exit(worst)


def _simple(action: str, help_text: str) -> click.Command:
    @click.command(action, help=help_text)
    @FILE
    @SOURCE
    def command(file: str, only: str | None) -> None:
        from branchline.connectors.operate import act

        pipeline = load_pipeline(file)
        with _connect_client(pipeline) as client:
            for name, outcome in act(client, pipeline, only, action):
                click.echo(f"{name}: {outcome}")

    return command


connectors.add_command(_simple("pause", "Pause the connectors (the log position is kept)."))
connectors.add_command(_simple("resume", "Resume paused connectors."))
connectors.add_command(_simple("restart", "Restart connectors and their tasks (resumes from the last offsets)."))
connectors.add_command(_simple("delete", "Delete the connectors from Kafka Connect. Offsets, topics and "
                                         "PostgreSQL slots are kept; drop a slot yourself when retiring a source."))


# ------------------------------------------------------------------------------------------ snapshot


@click.command()
@FILE
@click.argument("source")
@click.argument("tables", nargs=-1, required=True)
@click.option("--wait", is_flag=True, help="Wait and print progress until the snapshot completes.")
@click.option("--timeout", default=3600.0, show_default=True, help="Seconds to wait with --wait.")
def snapshot(file: str, source: str, tables: tuple[str, ...], wait: bool, timeout: float) -> None:
    """Re-sync TABLES of SOURCE with an incremental snapshot while streaming continues.

    TABLES are written `database.table` (MariaDB/MySQL) or `schema.table` (PostgreSQL). The request is a
    row in the source's signal table; `branchline connectors status FILE` shows the progress."""
    from branchline.connectors.snapshot import request_snapshot, wait_for_snapshot

    pipeline = load_pipeline(file)
    src = pipeline.source(source)
    signal_id = request_snapshot(src, tables)
    click.echo(f"{src.connector_name}: incremental snapshot of {', '.join(tables)} requested (signal {signal_id})")
    if wait:
        for line in wait_for_snapshot(pipeline, src, signal_id, timeout_s=timeout):
            click.echo(line)
