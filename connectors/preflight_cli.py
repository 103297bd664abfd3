"""`branchline preflight`: check source databases for change-data capture, for DBAs."""

from __future__ import annotations

import json
import sys

import click
from branchline.config import BinlogSourceConfig, PostgresSourceConfig, load_pipeline

_COLOURS = {"PASS": "green", "WARN": "yellow", "FAIL": "red"}


def _template_sources() -> list[BinlogSourceConfig | PostgresSourceConfig]:
    """Sources for `--print-setup-sql` without a pipeline file: placeholders the DBA edits."""
    return [
        BinlogSourceConfig(name="mariadb", kind="mariadb", branch="hq", user="branchline", databases=("erp",)),
        BinlogSourceConfig(name="mysql", kind="mysql", branch="hq", user="branchline", databases=("erp",)),
        PostgresSourceConfig(name="postgres", kind="postgres", branch="hq", user="branchline", database="crm"),
    ]


@click.command()
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@click.option("--source", "-s", "only", metavar="NAME", help="Only this source (default: all).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--print-setup-sql", is_flag=True,
              help="Print the SQL that creates a least-privilege replication user, its grants and Branchline's "
                   "control tables (for FILE's sources, or a template of each kind); check nothing.")
@click.option("--run-setup-sql", is_flag=True,
              help="Run that SQL on FILE's sources as --admin (idempotent), with the users' passwords from FILE; "
                   "then check.")
@click.option("--admin", metavar="USER", help="Administrator for --run-setup-sql (e.g. root, postgres).")
@click.option("--admin-password-env", metavar="VAR", default="BRANCHLINE_ADMIN_PASSWORD", show_default=True,
              help="Environment variable holding the administrator's password (never a command-line argument).")
@click.option("--user-host", default="%", show_default=True,
              help="MariaDB/MySQL: the host part of the replication user created by --run-setup-sql.")
def preflight(file: str | None, only: str | None, as_json: bool, print_setup_sql: bool, run_setup_sql: bool,
              admin: str | None, admin_password_env: str, user_host: str) -> None:
    """Check that each source of FILE is ready for CDC. Every check prints PASS, WARN or FAIL, what it saw,
    and the SQL or setting that fixes it. Exit 0 when all pass, 1 on warnings, 2 on failures."""
    import os

    from branchline.connectors.preflight import exit_code, run
    from branchline.connectors.setup_sql import run_setup, setup_script

    if print_setup_sql:
        if file:
            pipeline = load_pipeline(file)
            sources = [pipeline.source(only)] if only else list(pipeline.sources)
        else:
            sources = [s for s in _template_sources() if only in (None, s.name, s.kind)]
        click.echo("\n".join(setup_script(s) for s in sources), nl=False)
        return
    if not file:
        raise click.UsageError("FILE is required unless --print-setup-sql is given.")
    pipeline = load_pipeline(file)
    if run_setup_sql:
        if not admin:
            raise click.UsageError("--run-setup-sql needs --admin USER.")
        for source in [pipeline.source(only)] if only else pipeline.sources:
            done = run_setup(source, admin, os.environ.get(admin_password_env, ""), user_host)
            click.echo(f"source {source.name}: ran {len(done)} setup statements as {admin}", err=as_json)
    checks = run(pipeline, only)
    if as_json:
        click.echo(json.dumps({"exit_code": exit_code(checks), "checks": [c.to_json() for c in checks]}, indent=2))
    else:
        current = None
        for check in checks:
            if check.source != current:
                current = check.source
                src = pipeline.source(current)
                click.echo(f"{'' if check is checks[0] else chr(10)}source {src.name} ({src.kind} {src.host}:{src.port})")
            status = click.style(f"{check.status:<4}", fg=_COLOURS[check.status], bold=True)
            click.echo(f"  {status}  {check.check:<22} {check.saw}")
            if check.fix:
                click.echo(f"        {'':<22} fix: {check.fix}")
        counts = {s: sum(c.status == s for c in checks) for s in ("PASS", "WARN", "FAIL")}
        click.echo(f"\n{counts['PASS']} passed, {counts['WARN']} warnings, {counts['FAIL']} failures")
    sys.exit(exit_code(checks))
