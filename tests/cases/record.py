"""Record real Debezium envelopes from the running connectors into tests/cases/debezium/.

Why: the streams stage unit-tests its decoder on what Debezium really sends (logical types, TOAST
placeholders, tombstones, truncates, key changes, transaction and heartbeat records), not on
hand-written JSON.

What it does, against the local stack (`branchline infra up`, `branchline sample load`):
1. applies the connectors of examples/pipeline.yaml under a separate branch (default `rec`), so the
   recording starts from fresh topics `rec.erp.*` / `rec.crm.*` and a slot of its own;
2. waits for the initial snapshot (read events), runs `branchline sample churn` (inserts, updates,
   deletes in multi-statement transactions), then a few targeted changes: an update that leaves a
   TOASTed value alone, a primary-key change, a truncate of one table per source (its rows are put
   back afterwards), and an incremental snapshot of one table per source;
3. reads every topic of the two connectors and keeps, per topic and kind of record, the few records
   that together show every column both null and not null (and every placeholder/header seen);
4. writes one JSON-lines file per topic: {topic, partition, offset, timestamp, headers, key, value},
   `key`/`value` being the exact JSON text Kafka holds (null for a tombstone), plus INDEX.md;
5. deletes its connectors and drops its PostgreSQL slot and publication (unless --keep).

Run:  .venv/bin/python tests/cases/record.py [--branch rec] [--churn-seconds 5] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent / "debezium"
PIPELINE = ROOT / "examples" / "pipeline.yaml"


def log(message: str) -> None:
    print(f"[record {time.strftime('%H:%M:%S')}] {message}", flush=True)


def pipeline_for(branch: str) -> Any:
    from branchline.config import load_pipeline

    text = PIPELINE.read_text().replace("branch: hq", f"branch: {branch}")
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"branchline-record-{branch}.yaml"
    path.write_text(text)
    return load_pipeline(path)


def sample_tables() -> set[str]:
    """`namespace.table` of every sample table (from infra/sample/*.sql) and Branchline's control tables."""
    import re

    names = {"branchline.debezium_signal", "branchline.debezium_heartbeat"}
    for sql, namespace in (("erp.sql", "erp"), ("crm.sql", "public")):
        text = (ROOT / "infra" / "sample" / sql).read_text()
        names |= {f"{namespace}.{t}" for t in re.findall(r"CREATE TABLE (\w+)", text)}
    return names


def payload(value: bytes | None) -> Any:
    if value is None:
        return None
    body = json.loads(value)
    return body.get("payload", body) if isinstance(body, dict) and "payload" in body else body


def kind_of(record: Any) -> str:
    """A short label of what a record is: r, r-incremental, c, u, d, t, tombstone, BEGIN, END, ddl..."""
    body = payload(record.value)
    if body is None:
        return "tombstone"
    if not isinstance(body, dict):
        return "other"
    if "op" in body:
        snapshot = (body.get("source") or {}).get("snapshot")
        if body["op"] == "r" and snapshot == "incremental":
            return "r-incremental"
        return str(body["op"])
    if "status" in body:
        return str(body["status"])
    if "ddl" in body or "tableChanges" in body:
        return "ddl"
    if "aggregate_type" in body:
        return f"notification-{body.get('type')}"
    return "other"


def features(record: Any) -> set[str]:
    """What a record shows: each column null / not null / placeholder, and each header name."""
    out = {f"header:{name}" for name, _ in record.headers if not name.startswith("__debezium.context.")}
    body = payload(record.value)
    if isinstance(body, dict) and isinstance(body.get("ddl"), str):
        out.add("ddl:" + " ".join(body["ddl"].split()[:2]).upper())
    if isinstance(body, dict):
        for image in ("before", "after"):
            row = body.get(image)
            if isinstance(row, dict):
                for column, value in row.items():
                    state = "null" if value is None else "placeholder" if value == "__debezium_unavailable_value" else "value"
                    out.add(f"{image}:{column}:{state}")
            elif image in body:
                out.add(f"{image}:none")
    return out


def select(records: list[Any], cap: int) -> list[Any]:
    """Greedy: the records that add the most unseen features, at most `cap`, always at least one."""
    chosen: list[Any] = []
    seen: set[str] = set()
    pool = list(records)
    while pool and len(chosen) < cap:
        best = max(pool, key=lambda r: len(features(r) - seen))
        gain = features(best) - seen
        if chosen and not gain:
            break
        chosen.append(best)
        seen |= gain
        pool.remove(best)
    return sorted(chosen, key=lambda r: (r.partition, r.offset))


def wait_until(what: str, check: Any, timeout_s: float, every_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            log(f"{what}: done")
            return
        time.sleep(every_s)
    raise SystemExit(f"timed out waiting for {what}")


def targeted_changes(pipeline: Any) -> None:
    """Changes churn may not make: TOAST left alone, a key change, a truncate (rows put back)."""
    import psycopg
    import pymysql

    erp = pipeline.source("erp")
    conn = pymysql.connect(host=erp.host, port=erp.port, user="root", password="", database="erp", autocommit=True)
    with conn.cursor() as cur:
        cur.execute("SELECT MAX(id) FROM warehouses")
        (top,) = cur.fetchone()
        cur.execute("UPDATE warehouses SET id = id + 1000 WHERE id = %s", (top,))  # key change
        cur.execute("UPDATE warehouses SET id = id - 1000 WHERE id = %s", (top + 1000,))
        cur.execute("CREATE TEMPORARY TABLE keep_prices AS SELECT * FROM legacy_price_list")
        cur.execute("TRUNCATE TABLE legacy_price_list")
        cur.execute("INSERT INTO legacy_price_list SELECT * FROM keep_prices")
    conn.close()
    log("erp: key change on warehouses, truncate + restore of legacy_price_list")

    crm = pipeline.source("crm")
    with psycopg.connect(host=crm.host, port=crm.port, user="postgres", dbname=crm.database, autocommit=True) as pg:
        pg.execute("UPDATE activities SET done = NOT done WHERE id = (SELECT id FROM activities "
                   "WHERE length(body) > 8192 ORDER BY id LIMIT 1)")  # body is TOASTed and unchanged
        pg.execute("UPDATE contacts SET id = id + 1000000 WHERE id = (SELECT max(id) FROM contacts)")
        pg.execute("UPDATE contacts SET id = id - 1000000 WHERE id > 1000000")
        with pg.transaction():
            pg.execute("CREATE TEMPORARY TABLE keep_opps AS SELECT * FROM opportunities")
            pg.execute("TRUNCATE opportunities")
            pg.execute("INSERT INTO opportunities SELECT * FROM keep_opps")
    log("crm: TOAST-unchanged update on activities, key change on contacts, truncate + restore of opportunities")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--branch", default="rec", help="branch id of the recording connectors (topic prefix)")
    parser.add_argument("--churn-seconds", type=float, default=5.0)
    parser.add_argument("--cap", type=int, default=4, help="most records kept per topic and kind")
    parser.add_argument("--keep", action="store_true", help="leave the connectors, slot and topics in place")
    args = parser.parse_args()

    from branchline.connectors.connect import ConnectClient
    from branchline.connectors.debezium import heartbeat_topic, notification_topic
    from branchline.connectors.operate import apply
    from branchline.connectors.snapshot import latest_notification, request_snapshot
    from branchline.connectors.topics import read_topics

    pipeline = pipeline_for(args.branch)
    bootstrap = pipeline.kafka.bootstrap_servers
    prefixes = tuple(f"{s.topic_prefix}" for s in pipeline.sources)

    tables = sample_tables()

    def ours(topic: str) -> bool:
        parts = topic.split(".")
        if len(parts) == 4 and topic.startswith(tuple(p + "." for p in prefixes)):
            return ".".join(parts[2:]) in tables  # a table topic: only the sample's and ours
        return topic in prefixes or topic.startswith(tuple(p + "." for p in prefixes)) or topic in {
            *(heartbeat_topic(s) for s in pipeline.sources), *(notification_topic(s) for s in pipeline.sources)}

    with ConnectClient(pipeline.connect.url) as client:
        clean(client, pipeline, ours)
        for result in apply(client, pipeline, timeout_s=120):
            log(f"{result.name}: {result.action}, {result.state.state if result.state else '?'}")

        def snapshot_done() -> bool:
            kinds = {(r.topic.split(".")[1], payload(r.value).get("source", {}).get("snapshot"))
                     for r in read_topics(bootstrap, ours) if r.value and isinstance(payload(r.value), dict)
                     and "op" in payload(r.value)}
            return all((s.name, "last") in kinds for s in pipeline.sources)

        wait_until("initial snapshots", snapshot_done, 300)
        log(f"churn for {args.churn_seconds:g} s")
        subprocess.run([sys.executable, "-m", "branchline.cli", "sample", "churn", "--rate", "40",
                        "--duration", str(args.churn_seconds)], check=True, cwd=ROOT)
        targeted_changes(pipeline)
        started = int(time.time() * 1000)
        request_snapshot(pipeline.source("erp"), ["erp.warehouses"])
        request_snapshot(pipeline.source("crm"), ["public.accounts"])
        for source in pipeline.sources:
            wait_until(f"incremental snapshot of {source.name}", lambda s=source: (
                (latest_notification(pipeline, s, since_ms=started) or {}).get("type") == "COMPLETED"), 180)
        time.sleep(max(s.heartbeat_interval_ms for s in pipeline.sources) / 1000 + 2)

        records = read_topics(bootstrap, ours)
        log(f"read {len(records)} records from {len({r.topic for r in records})} topics")
        groups: dict[tuple[str, str], list[Any]] = defaultdict(list)
        for record in records:
            groups[(record.topic, kind_of(record))].append(record)

        OUT.mkdir(parents=True, exist_ok=True)
        for old in OUT.glob("*.jsonl"):
            old.unlink()
        by_topic: dict[str, list[Any]] = defaultdict(list)
        index = []
        for (topic, kind), group in sorted(groups.items()):
            cap = len(group) if kind.startswith("notification") else args.cap
            kept = select(group, cap)
            by_topic[topic] += [(kind, r) for r in kept]
            index.append(f"| `{topic}` | {kind} | {len(group)} | {len(kept)} |")
        for topic, kept in by_topic.items():
            with (OUT / f"{topic}.jsonl").open("w") as handle:
                for kind, r in sorted(kept, key=lambda kr: (kr[1].partition, kr[1].offset)):
                    handle.write(json.dumps({
                        "topic": r.topic, "partition": r.partition, "offset": r.offset, "timestamp": r.timestamp,
                        "kind": kind, "headers": {k: v.decode("utf-8", "replace") for k, v in r.headers},
                        "key": r.key.decode() if r.key is not None else None,
                        "value": r.value.decode() if r.value is not None else None,
                    }, ensure_ascii=False) + "\n")
        (OUT / "INDEX.md").write_text(
            "# Recorded Debezium envelopes\n\n"
            f"Regenerate with `.venv/bin/python tests/cases/record.py` (branch `{args.branch}`; topics "
            f"`{args.branch}.<source>.<namespace>.<table>`). Each `<topic>.jsonl` line is one Kafka record: "
            "`key`/`value` are the exact JSON text (JsonConverter, schemas enabled), null for a tombstone; "
            "`kind` is r, r-incremental, c, u, d, t, tombstone, BEGIN/END (transaction topic), ddl (schema "
            "changes), or notification-*.\n\n"
            "| topic | kind | records seen | kept |\n|---|---|---|---|\n" + "\n".join(index) + "\n")
        log(f"wrote {sum(len(v) for v in by_topic.values())} records into {OUT}")

        if not args.keep:
            clean(client, pipeline, ours)
    return 0


def clean(client: Any, pipeline: Any, ours: Any) -> None:
    """Retire the recording connectors (offsets forgotten), drop the slot, delete their topics."""
    from branchline.connectors.operate import retire
    from branchline.connectors.topics import delete_topics

    for source in pipeline.sources:
        if retire(client, source.connector_name):
            log(f"{source.connector_name}: stopped, offsets reset, deleted")
    drop_slot(pipeline)
    history = {f"__branchline-schema-history.{s.topic_prefix}" for s in pipeline.sources}
    deleted = delete_topics(pipeline.kafka.bootstrap_servers, lambda t: ours(t) or t in history
                            or t.startswith(tuple(f"{s.topic_prefix}." for s in pipeline.sources)))
    log(f"deleted {len(deleted)} topics")
    time.sleep(2)


def drop_slot(pipeline: Any) -> None:
    import psycopg

    crm = pipeline.source("crm")
    with psycopg.connect(host=crm.host, port=crm.port, user="postgres", dbname=crm.database, autocommit=True) as pg:
        for _ in range(30):
            active = pg.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (crm.slot,)).fetchone()
            if active is None:
                break
            if not active[0]:
                pg.execute("SELECT pg_drop_replication_slot(%s)", (crm.slot,))
                break
            time.sleep(1)
        pg.execute(f'DROP PUBLICATION IF EXISTS "{crm.publication}"')
    log(f"dropped slot and publication {crm.slot}")


if __name__ == "__main__":
    sys.exit(main())
