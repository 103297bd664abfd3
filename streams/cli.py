"""`branchline worker FILE`: run one Faust worker of the distributed runtime.

Start as many as you like with the same file: they share the source topics' partitions through the
consumer group named after the pipeline (``branchline-<name>``).
"""

from __future__ import annotations

import logging

import click
from branchline.errors import ConfigError


@click.command("worker")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--loglevel", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]), help="Faust's log level.")
@click.option("--no-key-check", is_flag=True, help="Skip the start-up check that topics are keyed by the primary key.")
def worker(file: str, loglevel: str, no_key_check: bool) -> None:
    """Consume the pipeline's Debezium topics and write them into its sinks."""
    from branchline.config import load_pipeline
    from branchline.streams.app import build_app, run_preflight, tune_gc
    from branchline.streams.config import WorkerSettings

    config = load_pipeline(file)
    settings = config.worker if isinstance(config.worker, WorkerSettings) else WorkerSettings()
    if no_key_check:
        settings = settings.model_copy(update={"check_topic_keys": False})
    if not config.sinks:
        raise ConfigError("`sinks` must name at least one target for a worker; got none", file)
    layout = run_preflight(config, settings)
    logging.getLogger("branchline.streams").info(
        "consuming %d topics with %d partitions each: %s", len(layout.topics), layout.partitions,
        ", ".join(layout.topics))
    app = build_app(config, layout, settings=settings)
    tune_gc()

    import faust

    worker_ = faust.Worker(app, loglevel=loglevel)
    worker_.execute_from_commandline()
