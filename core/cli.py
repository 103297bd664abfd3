"""The `branchline` command. Each subcommand lives beside the code it drives and is loaded on
first use, so `branchline --help` stays fast and one broken optional part cannot break the rest."""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import click
from branchline.errors import BranchlineError

# name -> "module:attribute" of a click command or group
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "infra": ("branchline.infra.cli:infra", "Install, start, stop and inspect the local stack."),
    "sample": ("branchline.infra.sample.cli:sample", "Load sample ERP/CRM data and run a live workload."),
    "config": ("branchline.connectors.cli:config", "Validate a pipeline file."),
    "connectors": ("branchline.connectors.cli:connectors", "Operate Debezium connectors on Kafka Connect."),
    "snapshot": ("branchline.connectors.cli:snapshot", "Re-sync tables with an incremental snapshot."),
    "preflight": ("branchline.connectors.preflight_cli:preflight", "Check source databases for CDC."),
    "worker": ("branchline.streams.cli:worker", "Run a Faust worker of the distributed runtime."),
    "run": ("branchline.runtime.cli:run", "Replicate in one process, without Kafka."),
    "verify": ("branchline.runtime.verify_cli:verify", "Compare source and target row by row."),
    "status": ("branchline.status_cli:status", "One screen: sources, connectors, lag, spool."),
    "lake": ("branchline.sinks.delta.cli:lake", "Compact and vacuum Delta tables."),
    "bench": ("branchline.bench_cli:bench", "Benchmarks that print figures (streams, sinks, embedded)."),
}


class LazyGroup(click.Group):
    """Lists only the subcommands whose module is present; imports one when it is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name in SUBCOMMANDS if self._available(name))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in SUBCOMMANDS:
            return None
        target, _ = SUBCOMMANDS[cmd_name]
        module_name, attribute = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                return None
            raise
        command: click.Command = getattr(module, attribute)
        return command

    @staticmethod
    def _available(name: str) -> bool:
        module_name = SUBCOMMANDS[name][0].split(":")[0]
        try:
            return importlib.util.find_spec(module_name) is not None
        except ModuleNotFoundError:
            return False

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, SUBCOMMANDS[name][1]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.version_option(package_name="branchline")
def cli(verbose: bool) -> None:
    """Branchline replicates changes from MariaDB/MySQL and PostgreSQL into a cloud store."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main(argv: list[str] | None = None) -> Any:
    """Entry point: Branchline errors become one clear line on stderr and exit code 2."""
    try:
        return cli.main(args=argv, prog_name="branchline", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except BranchlineError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
