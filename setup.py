"""Computes the package list: each top-level stage folder installs as a subpackage of `branchline`
(see [tool.setuptools] package-dir in pyproject.toml). Everything else is in pyproject.toml."""

from pathlib import Path

from setuptools import setup

FOLDERS = {"branchline": "core", "branchline.connectors": "connectors", "branchline.streams": "streams",
           "branchline.sinks": "sinks", "branchline.infra": "infra"}


def packages() -> list[str]:
    found = []
    for package, folder in FOLDERS.items():
        root = Path(folder)
        for init in sorted(root.rglob("__init__.py")):
            relative = init.parent.relative_to(root).parts
            found.append(".".join((package, *relative)))
    return found


setup(packages=packages())
