"""`build_sink` turns every `sinks:` entry of the example pipeline files into the right sink."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from branchline.config import load_pipeline
from branchline.errors import RetryableSinkError
from branchline.sinks.build import build_sink
from branchline.sinks.config import PostgresSinkConfig
from branchline.sinks.contract import Sink
from branchline.sinks.postgres.sink import conninfo

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_sink_builds(path: Path) -> None:
    pipeline = load_pipeline(path, env={})
    for name, config in pipeline.sinks.items():
        sink = build_sink(config, name)
        assert isinstance(sink, Sink)
        assert sink.capabilities.durable_on_write is (config.kind == "postgres")
        if config.kind == "delta":
            assert sink.capabilities.commit_interval_s == config.commit_interval_s


def test_empty_password_from_env_default_leaves_libpq_to_find_one() -> None:
    assert "password" not in conninfo(PostgresSinkConfig(password=""))


def test_unreachable_server_is_retryable_and_bounded() -> None:
    sink = build_sink(
        PostgresSinkConfig(host="127.0.0.1", port=1, max_attempts=2, retry_backoff_s=0, connect_timeout_s=2)
    )
    from branchline.events import ChangeEvent, Column, ColumnType, Op, TableId, TableSchema

    table = TableSchema(
        id=TableId(source="s", branch="b", database="d", table="t"),
        columns=(Column(name="id", type=ColumnType.INT32),),
        primary_key=("id",),
    )
    event = ChangeEvent(op=Op.CREATE, table=table.id, key={"id": 1}, after={"id": 1}, position=1)
    with pytest.raises(RetryableSinkError, match="connecting"):
        asyncio.run(sink.write_batch(table, [event]))
    asyncio.run(sink.close())
