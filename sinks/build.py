"""The one place that builds a sink from the pipeline file; nothing else imports a concrete sink.

Concrete sinks are imported lazily, so a pipeline that writes only into PostgreSQL never imports
delta-rs (an optional dependency: `branchline[lake]`).
"""

from __future__ import annotations

from branchline.errors import ConfigError
from branchline.sinks.config import DeltaSinkConfig, PostgresSinkConfig, SinkConfig
from branchline.sinks.contract import Sink


def build_sink(config: SinkConfig, name: str = "default") -> Sink:
    """A ready-to-use sink for one entry of the `sinks:` section; connections open on first write."""
    if isinstance(config, PostgresSinkConfig):
        from branchline.sinks.postgres.sink import PostgresSink

        return PostgresSink(config, name=name)
    if isinstance(config, DeltaSinkConfig):
        try:
            from branchline.sinks.delta.sink import DeltaSink
        except ImportError as exc:
            raise ConfigError(
                f"`sinks.{name}.kind` delta must have deltalake and pyarrow installed "
                f"(pip install 'branchline[lake]'); got ImportError {exc.name!r}"
            ) from exc
        return DeltaSink(config, name=name)
    raise ConfigError(
        f"`sinks.{name}.kind` must be one of 'postgres', 'delta'; got {type(config).__name__!r}"
    )
