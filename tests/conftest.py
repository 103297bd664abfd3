"""Shared fixtures: addresses of the local stack (infra/stack.toml, overridable from env).

Integration tests need the real services. When ``CI`` is set a missing service fails the test;
on a developer's machine it is skipped with the command that starts it.
"""

from __future__ import annotations

import os
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

STACK_TOML = Path(__file__).resolve().parents[1] / "infra" / "stack.toml"
PORTS: dict[str, int] = tomllib.loads(STACK_TOML.read_text())["ports"]


@dataclass(frozen=True)
class Service:
    name: str
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def service(name: str) -> Service:
    """The address of one stack service; env BRANCHLINE_<NAME>_HOST/_PORT override the defaults."""
    prefix = f"BRANCHLINE_{name.upper()}"
    host = os.environ.get(f"{prefix}_HOST", "127.0.0.1")
    port = int(os.environ.get(f"{prefix}_PORT", PORTS[name]))
    return Service(name, host, port)


def require(name: str) -> Service:
    """The service if it answers on TCP; otherwise fail (CI) or skip (a developer's machine)."""
    svc = service(name)
    try:
        with socket.create_connection((svc.host, svc.port), timeout=2):
            pass
    except OSError as exc:
        message = f"`{name}` must answer at {svc.address} (start it with `branchline infra up`); got {exc}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return svc


@pytest.fixture(scope="session")
def erp() -> Service:
    """MariaDB with the sample ERP database (user root, empty password, database `erp`)."""
    return require("erp")


@pytest.fixture(scope="session")
def crm() -> Service:
    """PostgreSQL source with the sample CRM (user postgres, database `crm`)."""
    return require("crm")


@pytest.fixture(scope="session")
def cloud() -> Service:
    """PostgreSQL that plays the cloud store (user postgres, database `cloud`)."""
    return require("cloud")


@pytest.fixture(scope="session")
def kafka() -> Service:
    return require("kafka")


@pytest.fixture(scope="session")
def connect() -> Service:
    """Kafka Connect REST API."""
    return require("connect")
