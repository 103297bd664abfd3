"""`branchline lake`: maintenance of the Delta tables a Delta sink writes.

Merges on an interval leave many small files and, after rewrites, files no version needs any more:
`compact` rewrites small files into large ones (a new version; readers are not disturbed) and `vacuum`
deletes unreferenced files older than the retention (default 7 days, Delta's own default, so that
readers of older versions and time travel keep working).
"""

from __future__ import annotations

import os
from pathlib import Path

import click
from branchline.errors import ConfigError
from branchline.sinks.config import DeltaSinkConfig


def _sink_config(pipeline: str | None, sink: str | None, uri: str | None) -> DeltaSinkConfig:
    if uri:
        return DeltaSinkConfig(uri=uri)
    if not pipeline:
        raise click.UsageError("give --uri, or --pipeline (and --sink when it has several Delta sinks)")
    from branchline.config import load_pipeline

    config = load_pipeline(pipeline)
    deltas = {name: s for name, s in config.sinks.items() if isinstance(s, DeltaSinkConfig)}
    if sink is not None:
        if sink not in deltas:
            raise ConfigError(
                f"`--sink` must name a Delta sink of {pipeline}; got {sink!r} (have {sorted(deltas)})"
            )
        return deltas[sink]
    if len(deltas) != 1:
        raise ConfigError(f"`--sink` must be given when {pipeline} has {len(deltas)} Delta sinks; got none")
    return next(iter(deltas.values()))


def _tables(config: DeltaSinkConfig, tables: tuple[str, ...]) -> list[str]:
    """Table URIs: the ones named (relative to the lake), or every table found under a local lake."""
    root = config.uri.rstrip("/")
    if tables:
        return [f"{root}/{t.strip('/')}" for t in tables]
    if "://" in root and not root.startswith("file://"):
        raise click.UsageError("name the tables with --table for a lake on object storage")
    found = []
    for directory, subdirs, _ in os.walk(root.removeprefix("file://")):
        if "_delta_log" in subdirs:
            subdirs.clear()
            found.append(directory)  # tables and their _bl_meta side tables alike
    if not found:
        click.echo(f"no Delta tables under {root}")
    return sorted(found)


_common = [
    click.option(
        "--pipeline", type=click.Path(exists=True, dir_okay=False), help="Pipeline file with the Delta sink."
    ),
    click.option("--sink", help="Name of the Delta sink in the pipeline file."),
    click.option("--uri", help="Lake root instead of a pipeline file (local path or s3://bucket/prefix)."),
    click.option(
        "--table", "tables", multiple=True, help="Table path under the lake root; default: every local table."
    ),
]


def _with_common(function: click.decorators.FC) -> click.decorators.FC:
    for option in reversed(_common):
        function = option(function)
    return function


@click.group("lake")
def lake() -> None:
    """Compact and vacuum Delta tables written by a Delta sink."""


@lake.command("compact")
@_with_common
@click.option("--target-size-mb", type=int, default=None, help="Target file size (delta-rs default: 100 MB).")
def compact(
    pipeline: str | None,
    sink: str | None,
    uri: str | None,
    tables: tuple[str, ...],
    target_size_mb: int | None,
) -> None:
    """Rewrite small files into large ones (one new version per table)."""
    from deltalake import DeltaTable

    config = _sink_config(pipeline, sink, uri)
    for table_uri in _tables(config, tables):
        storage = config.s3.storage_options() if table_uri.startswith("s3") else None
        table = DeltaTable(table_uri, storage_options=storage)
        size = target_size_mb * 1024 * 1024 if target_size_mb else None
        metrics = table.optimize.compact(target_size=size)
        click.echo(
            f"{_short(table_uri, config)}: {metrics.get('numFilesRemoved', 0)} files -> "
            f"{metrics.get('numFilesAdded', 0)} (version {table.version()})"
        )


@lake.command("vacuum")
@_with_common
@click.option(
    "--retention-hours",
    type=int,
    default=168,
    show_default=True,
    help="Keep files that versions younger than this still need.",
)
@click.option("--dry-run", is_flag=True, help="List what would be deleted.")
def vacuum(
    pipeline: str | None,
    sink: str | None,
    uri: str | None,
    tables: tuple[str, ...],
    retention_hours: int,
    dry_run: bool,
) -> None:
    """Delete files no version within the retention needs."""
    from deltalake import DeltaTable

    config = _sink_config(pipeline, sink, uri)
    for table_uri in _tables(config, tables):
        storage = config.s3.storage_options() if table_uri.startswith("s3") else None
        table = DeltaTable(table_uri, storage_options=storage)
        removed = table.vacuum(
            retention_hours=retention_hours,
            dry_run=dry_run,
            enforce_retention_duration=retention_hours >= 168,
        )
        verb = "would delete" if dry_run else "deleted"
        click.echo(f"{_short(table_uri, config)}: {verb} {len(removed)} files")


def _short(table_uri: str, config: DeltaSinkConfig) -> str:
    root = config.uri.rstrip("/")
    return table_uri[len(root) + 1 :] if table_uri.startswith(root + "/") else str(Path(table_uri))
