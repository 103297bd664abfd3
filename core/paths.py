"""Where Branchline keeps local state and downloads.

Both folders sit in the project (or in ``BRANCHLINE_HOME``) and are git-ignored: ``.branchline/``
holds server data, logs, pids and spools; ``.cache/`` holds jars and plugin archives from Maven Central.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The project folder: ``BRANCHLINE_HOME`` if set, else the current directory."""
    return Path(os.environ.get("BRANCHLINE_HOME") or Path.cwd()).resolve()


def state_dir() -> Path:
    """Server data, logs and pid files of the local stack; spools of the embedded runtime."""
    return Path(os.environ.get("BRANCHLINE_STATE") or home() / ".branchline")


def cache_dir() -> Path:
    """Downloads: Kafka and Debezium jars, the Maven repository. Safe to delete."""
    return Path(os.environ.get("BRANCHLINE_CACHE") or home() / ".cache")
