"""`branchline sample`: load the sample ERP/CRM databases and run a live workload on them."""

from __future__ import annotations

import click

from .connect import Endpoint, endpoint
from .generate import DEFAULT_SEED

TARGET = click.Choice(["erp", "crm", "all"])


def _endpoints(erp_host: str | None, erp_port: int | None, crm_host: str | None,
               crm_port: int | None) -> tuple[Endpoint, Endpoint]:
    return endpoint("erp", erp_host, erp_port), endpoint("crm", crm_host, crm_port)


def _where(target: str, erp: Endpoint, crm: Endpoint) -> str:
    """Which servers a command is about to change, said before it changes them."""
    chosen = [ep for ep in (erp, crm) if target in (ep.name, "all")]
    return " and ".join(f"{ep.name} ({ep.address}/{ep.database})" for ep in chosen)


def _address_options(func: click.decorators.FC) -> click.decorators.FC:
    for option in reversed([
        click.option("--erp-host", envvar="BRANCHLINE_ERP_HOST", help="ERP MariaDB host [127.0.0.1]."),
        click.option("--erp-port", type=int, envvar="BRANCHLINE_ERP_PORT", help="ERP MariaDB port [stack.toml]."),
        click.option("--crm-host", envvar="BRANCHLINE_CRM_HOST", help="CRM PostgreSQL host [127.0.0.1]."),
        click.option("--crm-port", type=int, envvar="BRANCHLINE_CRM_PORT", help="CRM PostgreSQL port [stack.toml]."),
    ]):
        func = option(func)
    return func


@click.group()
def sample() -> None:
    """Sample ERP (MariaDB) and CRM (PostgreSQL) databases for demos and tests."""


@sample.command()
@click.option("--rows", "n", type=click.IntRange(min=0), default=10_000, show_default=True,
              help="Rows in the main tables (customers, sales_orders, accounts...); the others scale with it.")
@click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True, help="Same seed, same values.")
@click.option("--target", type=TARGET, default="all", show_default=True)
@_address_options
def load(n: int, seed: int, target: str, erp_host: str | None, erp_port: int | None, crm_host: str | None,
         crm_port: int | None) -> None:
    """Drop and recreate the sample tables, then bulk-load deterministic rows."""
    from .loader import TableLoad
    from .loader import load as run_load

    erp, crm = _endpoints(erp_host, erp_port, crm_host, crm_port)
    click.echo(f"recreating {_where(target, erp, crm)} with --rows {n} --seed {seed}")

    def report(result: TableLoad) -> None:
        click.echo(f"{result.database}.{result.table:<18} {result.rows:>9,} rows {result.seconds:7.2f} s "
                   f"{result.rows_per_second:>10,.0f} rows/s")

    results = run_load(target, n, seed, erp=erp, crm=crm, report=report)
    for database in ("erp", "crm"):
        mine = [r for r in results if r.database == database]
        if mine:
            total, seconds = sum(r.rows for r in mine), sum(r.seconds for r in mine)
            click.echo(f"{database} total: {total:,} rows in {seconds:.2f} s ({total / seconds if seconds else 0:,.0f} rows/s)")


@sample.command()
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=50.0, show_default=True,
              help="Changed rows per second on each database (approximate).")
@click.option("--duration", type=click.FloatRange(min=0), default=10.0, show_default=True, help="Seconds to run.")
@click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True)
@click.option("--target", type=TARGET, default="all", show_default=True)
@click.option("--reconnect-for", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Seconds to keep reopening a lost session (a restarted server); 0 fails at once.")
@_address_options
def churn(rate: float, duration: float, seed: int, target: str, reconnect_for: float, erp_host: str | None,
          erp_port: int | None, crm_host: str | None, crm_port: int | None) -> None:
    """Run a mixed insert/update/delete workload in multi-statement transactions."""
    from .workload import churn as run_churn

    erp, crm = _endpoints(erp_host, erp_port, crm_host, crm_port)
    click.echo(f"churning {_where(target, erp, crm)} at ~{rate:g} rows/s each for {duration:g} s")
    reports = run_churn(target, rate, duration, seed, erp=erp, crm=crm, reconnect_for=reconnect_for)
    for name in ("erp", "crm"):
        if name in reports:
            click.echo(reports[name].summary())
