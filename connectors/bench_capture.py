"""Capture latency: source commit -> record on Kafka, through the running connectors of a pipeline file.

Writes a row (id 999) into each source's heartbeat table as the source's own user, waits for its change
record on the heartbeat table's topic, and prints median / p90 / max over N writes. A command that
prints figures, not a test:

    .venv/bin/python -m branchline.connectors.bench_capture examples/pipeline.yaml --writes 20
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable

from branchline.config import AnySource, PostgresSourceConfig, load_pipeline

BENCH_ROW_ID = 999


def _writer(source: AnySource) -> Callable[[], None]:
    namespace, table = source.heartbeat_table.split(".", 1)
    password = source.password.get_secret_value()
    if isinstance(source, PostgresSourceConfig):
        import psycopg

        pg = psycopg.connect(host=source.host, port=source.port, user=source.user, password=password or None,
                             dbname=source.database, autocommit=True)
        return lambda: pg.execute(  # type: ignore[return-value]
            f'INSERT INTO "{namespace}"."{table}" (id, ts) VALUES ({BENCH_ROW_ID}, clock_timestamp()) '
            "ON CONFLICT (id) DO UPDATE SET ts = EXCLUDED.ts")
    import pymysql

    conn = pymysql.connect(host=source.host, port=source.port, user=source.user, password=password, autocommit=True)

    def write() -> None:
        with conn.cursor() as cursor:
            cursor.execute(f"INSERT INTO `{namespace}`.`{table}` (id, ts) VALUES ({BENCH_ROW_ID}, UTC_TIMESTAMP(6)) "
                           "ON DUPLICATE KEY UPDATE ts = VALUES(ts)")

    return write


async def _measure(bootstrap: str, topic: str, write: Callable[[], None], writes: int) -> list[float]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = (await consumer._client.fetch_all_metadata()).partitions_for_topic(topic) or {0}
        assigned = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(assigned)
        marker = f'"id":{BENCH_ROW_ID}'.encode()
        out = []
        for _ in range(writes):
            await consumer.seek_to_end(*assigned)
            for tp in assigned:
                await consumer.position(tp)
            started = time.perf_counter()
            write()
            while True:
                batch = await consumer.getmany(*assigned, timeout_ms=5000)
                if any(marker in (r.value or b"") for rs in batch.values() for r in rs):
                    out.append((time.perf_counter() - started) * 1000)
                    break
                if time.perf_counter() - started > 60:
                    raise TimeoutError(f"no change record on {topic} within 60 s")
            await asyncio.sleep(0.2)
        return out
    finally:
        await consumer.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--writes", type=int, default=20)
    args = parser.parse_args(argv)
    pipeline = load_pipeline(args.file)
    assert pipeline.kafka is not None, "the pipeline file needs a `kafka:` section"
    for source in pipeline.sources:
        namespace, table = source.heartbeat_table.split(".", 1)
        topic = source.table_topic(namespace, table)
        ms = sorted(asyncio.run(_measure(pipeline.kafka.bootstrap_servers, topic, _writer(source), args.writes)))
        print(f"{source.name} ({source.kind}): commit -> Kafka over {len(ms)} writes: "
              f"median {statistics.median(ms):.0f} ms, p90 {ms[max(0, int(len(ms) * 0.9) - 1)]:.0f} ms, "
              f"max {ms[-1]:.0f} ms")


if __name__ == "__main__":
    main()
