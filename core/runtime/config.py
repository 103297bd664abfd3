"""The `runtime` section of the pipeline file: settings of the embedded runtime (`branchline run`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SpoolConfig(BaseModel):
    """The durable local spool between capture and sink (SQLite in WAL mode)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path | None = None
    """Spool file; default ``<state dir>/spool/<pipeline name>.sqlite``."""
    max_bytes: int = Field(default=2 * 1024**3, gt=0)
    """Capture pauses when the spool holds this many bytes of undelivered changes."""
    warn_fraction: float = Field(default=0.8, gt=0, le=1)
    """Warn once the spool is this full."""


class RuntimeConfig(BaseModel):
    """How `branchline run` batches, snapshots, spools and checkpoints."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    spool: SpoolConfig = SpoolConfig()
    """The local spool; capture continues into it while the target is unreachable."""
    batch_size: int = Field(default=5000, gt=0)
    """Changes per sink batch (and per spool transaction)."""
    batch_interval_ms: int = Field(default=20, ge=0)
    """Shortest time between two spooled batches of one source while changes stream in (a commit after a
    pause is spooled at once); bounds the latency that batching adds."""
    snapshot: Literal["initial", "never"] = "initial"
    """``initial``: read every table once (primary-key chunks) before streaming; ``never``: stream only."""
    snapshot_chunk_rows: int = Field(default=10_000, gt=0)
    """Rows per primary-key chunk of the initial snapshot."""
    pg_peek_changes: int = Field(default=20_000, gt=0)
    """Changes per `pg_logical_slot_peek_binary_changes` call; each call re-decodes from the slot's start."""
    retention_warning_fraction: float = Field(default=0.5, gt=0, le=1)
    """Warn when a target outage has lasted this fraction of the source's binlog/WAL retention."""
    source_retention_s: int | None = Field(default=None, gt=0)
    """Source log retention in seconds; default: read from the server (binlog_expire_logs_seconds)."""
    capture_processes: bool = True
    """Run each source's reader in its own process: binlog decoding is pure Python and holds the GIL,
    so it gets a core of its own while the runner process drains the spool into the sinks."""
    checkpoint_interval_ms: int = Field(default=1000, ge=0)
    """Longest wait before a durable spool write is checkpointed at the source (slot advance)."""
    text_copy: bool = True
    """PostgreSQL sources into PostgreSQL sinks: rows of tables without transforms, whose columns have types
    that PostgreSQL's text form carries exactly, go from the spool into a text COPY without being decoded
    (`branchline.runtime.text_rows`); off: every row is decoded into an event first. Same target rows."""
