"""`branchline infra up | down | status`: the local stack of private servers bound to 127.0.0.1."""

from __future__ import annotations

import sys

import click
import orjson
from branchline.infra import stack


def _say(message: str) -> None:
    click.echo(message, err=True)


@click.group()
def infra() -> None:
    """Install, start, stop and inspect the local stack (MariaDB `erp`, PostgreSQL `crm` and `cloud`,
    Kafka, Kafka Connect with Debezium). Ports and versions: infra/stack.toml."""


_ONLY = click.option("--only", multiple=True, type=click.Choice(stack.SERVICE_NAMES),
                     help="Limit to these services (repeatable); connect brings kafka.")


@infra.command()
@_ONLY
def up(only: tuple[str, ...]) -> None:
    """Install what is missing and start what is not running; a second `up` changes nothing."""
    result = stack.up(only=only or None, on_progress=_say)
    if not result.started:
        _say(f"nothing to do: {', '.join(result.already_running)} already up ({result.seconds:.1f} s)")


@infra.command()
@_ONLY
def down(only: tuple[str, ...]) -> None:
    """Stop the services `up` started (by pid). Data stays under the state folder."""
    stopped = stack.down(only=only or None, on_progress=_say)
    _say(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@infra.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def status(as_json: bool) -> None:
    """Each service with address, pid and health, and the plugins Connect lists. Exit 1 if any is down."""
    statuses = stack.status()
    if as_json:
        click.echo(orjson.dumps(stack.status_dict(statuses), option=orjson.OPT_INDENT_2).decode())
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="Branchline local stack")
        for column in ("service", "kind", "address", "pid", "health", "detail"):
            table.add_column(column)
        for s in statuses:
            table.add_row(s.name, s.kind, s.address, str(s.pid or "-"),
                          "[green]up[/green]" if s.healthy else "[red]down[/red]", s.detail)
        console = Console()
        if not console.is_terminal:
            console = Console(width=max(console.width, 160))  # logs and CI: do not wrap the details
        console.print(table)
        plugins = stack.connector_plugins(statuses)
        if plugins:
            plugin_table = Table(title="Connector plugins (GET /connector-plugins)")
            for column in ("class", "type", "version"):
                plugin_table.add_column(column)
            for p in plugins:
                plugin_table.add_row(p.get("class", ""), p.get("type", ""), p.get("version", ""))
            console.print(plugin_table)
    if not all(s.healthy for s in statuses):
        sys.exit(1)
