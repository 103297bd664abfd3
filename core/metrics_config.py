"""The `metrics:` section of the pipeline file: where `/metrics` listens and how often heartbeats go.

Kept apart from `branchline.metrics` so that loading a pipeline file imports pydantic only, not the
Prometheus client. Example::

    metrics:
      port: 9464            # /metrics and /status.json of `branchline run` / `branchline worker`
      host: 127.0.0.1       # loopback by default; set 0.0.0.0 to let a remote Prometheus scrape
      heartbeat:
        interval_s: 10      # one heartbeat row per source every 10 s
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

HEARTBEAT_TABLE = ("branchline", "debezium_heartbeat")
"""(namespace, table) of the heartbeat table in each source: MariaDB database / PostgreSQL schema
`branchline`, the table Debezium's ``heartbeat.action.query`` writes too (see `branchline.heartbeat`)."""


class HeartbeatConfig(BaseModel):
    """Heartbeat rows written into each source, so lag stays true when no user table changes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    """Write heartbeat rows. Without them lag is measured on user changes only and freezes on idle tables."""
    interval_s: float = Field(default=10.0, gt=0)
    """Seconds between heartbeat rows; lag reads at most this much too high on an idle source."""


class MetricsConfig(BaseModel):
    """The Prometheus endpoint of one runtime process."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    """Serve `/metrics`; heartbeats and pollers still run when this is off."""
    host: str = "127.0.0.1"
    """Listen address. Loopback by default: metrics name your tables and branches."""
    port: int = Field(default=9464, ge=0, le=65535)
    """Listen port; 0 picks a free one (logged at start-up). Run one process per port."""
    heartbeat: HeartbeatConfig = HeartbeatConfig()
    poll_interval_s: float = Field(default=15.0, gt=0)
    """Seconds between polls of source-side state: slot WAL retained, binlog files behind, Connect."""
