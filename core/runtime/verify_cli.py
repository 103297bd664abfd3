"""`branchline verify FILE [--table T]`: source and target compared row by row; non-zero exit on any difference."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from branchline.config import load_pipeline


@click.command("verify")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--table", "tables", multiple=True,
              help="Only this table: `namespace.table`, `source:namespace.table` or `table` (repeatable).")
@click.option("--source", "sources", multiple=True, help="Only this source (repeatable).")
@click.option("--sink", "sink_name", default=None, help="The PostgreSQL sink to compare with (default: the first).")
@click.option("--chunk", "chunk_rows", type=int, default=10_000, show_default=True, help="Keys per chunk.")
@click.option("--max-differences", type=int, default=50, show_default=True,
              help="Differences printed per table (all are counted).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
def verify(file: Path, tables: tuple[str, ...], sources: tuple[str, ...], sink_name: str | None, chunk_rows: int,
           max_differences: int, progress: bool | None) -> None:
    """Compare FILE's source tables with their target tables by primary key; exit 1 on any difference."""
    from branchline.errors import ConfigError
    from branchline.runtime.config import RuntimeConfig
    from branchline.runtime.runner import build_reader
    from branchline.runtime.verify import (
        TableReport,
        TableVerifier,
        connect_target,
        require_postgres,
        target_columns,
        target_table,
    )
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    pipeline = load_pipeline(file)
    if not pipeline.sinks:
        raise ConfigError("`sinks` must name at least one sink to verify against; got none")
    name = sink_name or next(iter(pipeline.sinks))
    if name not in pipeline.sinks:
        raise ConfigError(f"`--sink` must be one of {sorted(pipeline.sinks)!r}; got {name!r}")
    sink = require_postgres(pipeline.sinks[name], name)
    runtime = pipeline.runtime if isinstance(pipeline.runtime, RuntimeConfig) else RuntimeConfig()
    console = Console(stderr=False, highlight=False, soft_wrap=True)
    show = sys.stderr.isatty() if progress is None else progress
    conn = connect_target(sink)
    reports: list[TableReport] = []

    def wanted(source: str, qualified: str, table: str) -> bool:
        if sources and source not in sources:
            return False
        return not tables or any(t in (qualified, table, f"{source}:{qualified}") for t in tables)

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), disable=not show, transient=False) as bar:
        for source in pipeline.sources:
            if sources and source.name not in sources:
                continue
            reader = build_reader(source, runtime)
            try:
                for schema in reader.tables():
                    qualified = schema.id.qualified
                    if not wanted(source.name, qualified, schema.id.table):
                        continue
                    transforms = pipeline.tables.get(qualified) if isinstance(pipeline.tables, dict) else None
                    if transforms is not None and getattr(transforms, "filters", None):
                        reports.append(TableReport(f"{source.name}:{qualified}", "-",
                                                   skipped="has row filters: target holds a subset by design"))
                        continue
                    probe = target_table(sink, schema, transforms, set())
                    existing = target_columns(conn, probe.schema, probe.name)
                    report = TableReport(f"{source.name}:{qualified}", f"{probe.schema}.{probe.name}")
                    if not existing:
                        report.skipped = "target table does not exist"
                        report.difference_count = 1
                        reports.append(report)
                        continue
                    target = target_table(sink, schema, transforms, existing)
                    estimate = getattr(reader, "estimate_rows", lambda t: 0)(schema.id)
                    task = bar.add_task(report.qualified, total=max(estimate, 1))
                    verifier = TableVerifier(reader, schema, target, conn, chunk_rows, max_differences)
                    verifier.run(report, lambda n, task=task: bar.advance(task, n))
                    bar.update(task, total=max(report.source_rows, 1), completed=max(report.source_rows, 1))
                    reports.append(report)
            finally:
                reader.close()
    conn.close()

    if not reports:
        raise ConfigError(f"`--table` must match a captured table; got {list(tables)!r}")
    differing = 0
    for report in reports:
        if report.skipped is not None:
            marker = "MISSING" if report.difference_count else "skipped"
            console.print(f"{marker:9} {report.qualified} -> {report.target}: {report.skipped}")
            differing += 1 if report.difference_count else 0
            continue
        if report.identical:
            console.print(f"identical {report.qualified} -> {report.target}: {report.source_rows} rows, "
                          f"{report.chunks} chunks")
            continue
        differing += 1
        console.print(f"DIFFERENT {report.qualified} -> {report.target}: {report.difference_count} differences "
                      f"(source {report.source_rows} rows, target {report.target_rows}; "
                      f"{report.chunks_differing} of {report.chunks} chunks differ)")
        for difference in report.differences:
            console.print(f"  {difference.describe()}", markup=False)
        if report.difference_count > len(report.differences):
            console.print(f"  ... and {report.difference_count - len(report.differences)} more")
    if differing:
        console.print(f"{differing} of {len(reports)} tables differ")
        sys.exit(1)
    skipped = sum(1 for r in reports if r.skipped is not None)
    compared = len(reports) - skipped
    console.print(f"all {compared} compared tables identical" + (f" ({skipped} skipped, see above)" if skipped else ""))
