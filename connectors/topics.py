"""Read what the connectors wrote: every record of some topics, from the beginning up to their current
end. For `branchline connectors status` (snapshot notifications), the envelope recorder in
tests/cases/ and the capture tests; not for the hot path (the Faust workers consume there)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()


async def _read(bootstrap: str, select: Callable[[str], bool], timeout_s: float) -> list[Record]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                auto_offset_reset="earliest", request_timeout_ms=int(timeout_s * 1000))
    await consumer.start()
    try:
        # the consumer's own partitions_for_topic() only knows subscribed topics; ask the cluster
        metadata = await consumer._client.fetch_all_metadata()
        topics = sorted(t for t in metadata.topics() if select(t))
        assigned = []
        for topic in topics:
            for partition in sorted(metadata.partitions_for_topic(topic) or ()):
                assigned.append(TopicPartition(topic, partition))
        if not assigned:
            return []
        consumer.assign(assigned)
        await consumer.seek_to_beginning(*assigned)
        end = await consumer.end_offsets(assigned)
        pending = {tp for tp in assigned if end[tp] > 0}
        out: list[Record] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while pending and loop.time() < deadline:
            batch = await consumer.getmany(*pending, timeout_ms=500)
            for tp, records in batch.items():
                for r in records:
                    if r.offset < end[tp]:
                        out.append(Record(r.topic, r.partition, r.offset, r.timestamp, r.key, r.value,
                                          tuple((k, v) for k, v in (r.headers or ()))))
            for tp in list(pending):
                if await consumer.position(tp) >= end[tp]:
                    pending.discard(tp)
        if pending:
            raise TimeoutError(f"`topics` must be readable to their end within {timeout_s:.0f}s; got "
                               f"{len(pending)} partitions unfinished")
        return out
    finally:
        await consumer.stop()


def read_topics(bootstrap: str, select: Callable[[str], bool], timeout_s: float = 60.0) -> list[Record]:
    """Every record currently in the selected topics, in offset order per partition."""
    return asyncio.run(_read(bootstrap, select, timeout_s))


def topic_names(bootstrap: str) -> list[str]:
    async def names() -> list[str]:
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
        await consumer.start()
        try:
            return sorted(await consumer.topics())
        finally:
            await consumer.stop()

    return asyncio.run(names())


def delete_topics(bootstrap: str, select: Callable[[str], bool]) -> list[str]:
    """Delete the selected topics (tests and the recorder start from empty topics)."""

    async def run() -> list[str]:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            names = sorted(t for t in await admin.list_topics() if select(t))
            if names:
                await admin.delete_topics(names)
            return names
        finally:
            await admin.close()

    return asyncio.run(run())
