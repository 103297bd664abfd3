"""The package installs with its layout: each stage folder as a `branchline` subpackage."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import branchline
import click
from branchline.cli import SUBCOMMANDS, cli
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]


def test_tests_import_the_installed_package_not_a_top_level_folder() -> None:
    # core/ is mapped to `branchline`; there must be no stray importable `core` or `connectors`.
    assert Path(branchline.__file__).parent.name == "core"
    assert "core" not in sys.modules and "connectors" not in sys.modules


def test_wheel_holds_every_stage_and_the_stack_pins(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
    )
    (wheel,) = tmp_path.glob("branchline-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for stage in ("connectors", "streams", "sinks", "infra"):
        assert f"branchline/{stage}/__init__.py" in names
    assert "branchline/events.py" in names
    assert "branchline/infra/stack.toml" in names
    for top, installed in {"core": "branchline", "connectors": "branchline/connectors",
                           "streams": "branchline/streams", "sinks": "branchline/sinks",
                           "infra": "branchline/infra"}.items():
        for init in (ROOT / top).rglob("__init__.py"):
            relative = init.relative_to(ROOT / top).as_posix()
            assert f"{installed}/{relative}" in names, f"{init} is not packaged"


def _all_commands(group: click.Group, ctx: click.Context, prefix: tuple[str, ...] = ()):
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None, f"`branchline {' '.join(prefix + (name,))}` is listed but does not load"
        yield prefix + (name,)
        if isinstance(command, click.Group):
            yield from _all_commands(command, click.Context(command), prefix + (name,))


def test_every_subcommand_has_help() -> None:
    runner = CliRunner()
    paths = list(_all_commands(cli, click.Context(cli)))
    for path in [(), *paths]:
        result = runner.invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, f"`branchline {' '.join(path)} --help` failed: {result.output}"
        assert "Usage:" in result.output
    assert {name for (name, *_rest) in paths} <= set(SUBCOMMANDS)
