"""Ports, versions and heap sizes of the local stack, read from infra/stack.toml (the one place they
are pinned). ``BRANCHLINE_<SERVICE>_PORT`` overrides a port, the same variables the test fixtures read,
so a developer whose port is taken can move one service without editing the file."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from branchline.errors import InfraError

STACK_TOML = Path(__file__).resolve().parent / "stack.toml"

#: every port the stack binds; all must be pinned in stack.toml
PORT_NAMES = ("erp", "crm", "cloud", "kafka", "kafka_controller", "connect")


@dataclass(frozen=True)
class Pins:
    """The parsed pins: ``ports[name]``, ``versions[name]``, ``heap[jvm]``."""

    ports: dict[str, int]
    versions: dict[str, str]
    heap: dict[str, list[str]]

    @property
    def host(self) -> str:
        """Every service binds loopback only."""
        return "127.0.0.1"


def load_pins(path: Path = STACK_TOML) -> Pins:
    """Read stack.toml and apply ``BRANCHLINE_<NAME>_PORT`` overrides."""
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InfraError(f"`{path}` must be a readable TOML file; got {exc}") from exc
    ports: dict[str, int] = {}
    for name in PORT_NAMES:
        env = f"BRANCHLINE_{name.upper()}_PORT"
        value = os.environ.get(env) or raw.get("ports", {}).get(name)
        try:
            port = int(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise InfraError(f"`ports.{name}` in {path} (or env {env}) must be a port number; got {value!r}")
        if not 1024 <= port <= 65535:
            raise InfraError(f"`ports.{name}` must be between 1024 and 65535; got {port!r}")
        ports[name] = port
    versions = {k: str(v) for k, v in raw.get("versions", {}).items()}
    for key in ("kafka", "scala", "debezium", "debezium_mariadb", "log4j", "maven_dependency_plugin", "postgres"):
        if key not in versions:
            raise InfraError(f"`versions.{key}` must be pinned in {path}; got nothing")
    heap = {k: str(v).split() for k, v in raw.get("heap", {}).items()}
    return Pins(ports=ports, versions=versions, heap=heap)
