"""`branchline bench`: the benchmark commands of each stage under one group. They print figures;
none of them is a test."""

from __future__ import annotations

import click
from branchline.runtime.bench import embedded
from branchline.sinks.bench import bench_sinks
from branchline.streams.bench import bench as streams_bench


@click.group()
def bench() -> None:
    """Benchmarks that print figures (not tests)."""


for name, command in streams_bench.commands.items():
    bench.add_command(command, f"streams-{name}" if name == "worker" else name)
bench.add_command(bench_sinks, "sinks")
bench.add_command(embedded, "embedded")
