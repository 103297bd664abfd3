"""Where the sample databases are and how to open a session on them.

Defaults come from the local stack (infra/stack.toml [ports]); each part can be overridden with
env ``BRANCHLINE_ERP_HOST`` / ``_PORT`` / ``_USER`` / ``_PASSWORD`` / ``_DATABASE`` (and ``CRM``),
the same variables the test fixtures read, or with explicit arguments. Sessions run in UTC so that
TIMESTAMP / timestamptz values read back as the instants that were written.
"""

from __future__ import annotations

import os
import tomllib
from functools import cache
from importlib import resources
from typing import Any, Literal

import psycopg
import pymysql
from branchline.errors import InfraError
from psycopg import sql
from pydantic import BaseModel, ConfigDict, SecretStr

Database = Literal["erp", "crm"]

_DEFAULT_USER = {"erp": "root", "crm": "postgres"}


@cache
def stack_ports() -> dict[str, int]:
    """The [ports] table of the installed infra/stack.toml."""
    text = resources.files("branchline.infra").joinpath("stack.toml").read_text(encoding="utf-8")
    return dict(tomllib.loads(text)["ports"])


class Endpoint(BaseModel):
    """How to reach one sample database."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Database
    """`erp` (MariaDB) or `crm` (PostgreSQL)."""
    host: str = "127.0.0.1"
    """Server address; the local stack binds 127.0.0.1 only."""
    port: int
    """TCP port; the stack's come from infra/stack.toml."""
    user: str
    """Login; root for MariaDB, postgres for PostgreSQL in the local stack."""
    password: SecretStr = SecretStr("")
    """Empty for the local stack."""
    database: str
    """Database name, `erp` or `crm` unless overridden."""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def endpoint(name: Database, host: str | None = None, port: int | None = None, database: str | None = None) -> Endpoint:
    """The endpoint of ``name``: arguments first, then env ``BRANCHLINE_<NAME>_*``, then the stack."""
    prefix = f"BRANCHLINE_{name.upper()}_"
    env = os.environ
    raw_port = port if port is not None else env.get(prefix + "PORT") or stack_ports()[name]
    try:
        port_number = int(raw_port)
    except ValueError as exc:
        raise InfraError(f"`{prefix}PORT` must be an integer; got {raw_port!r}") from exc
    return Endpoint(
        name=name,
        host=host or env.get(prefix + "HOST") or "127.0.0.1",
        port=port_number,
        user=env.get(prefix + "USER") or _DEFAULT_USER[name],
        password=SecretStr(env.get(prefix + "PASSWORD", "")),
        database=database or env.get(prefix + "DATABASE") or name,
    )


def _unreachable(ep: Endpoint, exc: Exception) -> InfraError:
    return InfraError(
        f"`{ep.name}` must answer at {ep.address} as {ep.user!r}, database {ep.database!r} "
        f"(start it with `branchline infra up`); got {type(exc).__name__}: {exc}"
    )


def erp_connect(ep: Endpoint | None = None, *, database: str | None = "", **kwargs: Any) -> pymysql.Connection:
    """A pymysql session on the sample ERP (utf8mb4, time_zone UTC, no autocommit).

    ``database=None`` connects without selecting a database (to create it).
    """
    ep = ep or endpoint("erp")
    try:
        options: dict[str, Any] = {"autocommit": False, "connect_timeout": 5, **kwargs}
        return pymysql.connect(
            host=ep.host, port=ep.port, user=ep.user, password=ep.password.get_secret_value(),
            database=ep.database if database == "" else database, charset="utf8mb4",
            init_command="SET time_zone = '+00:00'", **options,
        )
    except pymysql.err.OperationalError as exc:
        raise _unreachable(ep, exc) from exc


def crm_connect(ep: Endpoint | None = None, *, dbname: str | None = None, **kwargs: Any) -> psycopg.Connection[Any]:
    """A psycopg session on the sample CRM (TimeZone UTC, no autocommit)."""
    ep = ep or endpoint("crm")
    try:
        options: dict[str, Any] = {"connect_timeout": 5, **kwargs}
        return psycopg.connect(
            host=ep.host, port=ep.port, user=ep.user, password=ep.password.get_secret_value() or None,
            dbname=dbname or ep.database, options="-c TimeZone=UTC", **options,
        )
    except psycopg.OperationalError as exc:
        raise _unreachable(ep, exc) from exc


def ensure_erp_database(ep: Endpoint) -> None:
    """Create the ERP database if it is missing (the stack creates it; a private server may not)."""
    with erp_connect(ep, database=None, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE IF NOT EXISTS `{ep.database}` CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")


def ensure_crm_database(ep: Endpoint) -> None:
    """Create the CRM database if it is missing."""
    with crm_connect(ep, dbname="postgres", autocommit=True) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (ep.database,)).fetchone()
        if not found:
            conn.execute(sql.SQL("CREATE DATABASE {} ENCODING 'UTF8' TEMPLATE template0").format(
                sql.Identifier(ep.database)))
