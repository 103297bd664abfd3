"""The embedded benchmark names the source's other replication readers: a Debezium connector or a leftover
run decodes the same log on the same two cores, and once skewed a session's figures unnoticed."""

from __future__ import annotations

import contextlib
import random
import subprocess
import threading
import uuid
from pathlib import Path

import psycopg
import pymysql
import pytest
from branchline.infra._pins import load_pins
from branchline.runtime.bench import _binlog_readers, _slot_readers
from pymysqlreplication import BinLogStreamReader

pytestmark = pytest.mark.integration

PG_BIN = Path(f"/usr/lib/postgresql/{load_pins().versions['postgres']}/bin")  # where `infra up` finds it


def test_an_active_slot_of_another_client_is_named_and_ours_is_not(crm, wait_for):
    slot = "bench_probe_" + uuid.uuid4().hex[:8]
    conn = psycopg.connect(host=crm.host, port=crm.port, user="postgres", dbname="crm", autocommit=True)
    conn.execute(f"CREATE PUBLICATION {slot}")  # no tables: the receiver decodes and sends nothing, and never fails
    conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    receiver = subprocess.Popen([str(PG_BIN / "pg_recvlogical"), "-h", crm.host, "-p", str(crm.port), "-U", "postgres",
                                 "-d", "crm", "-S", slot, "--start", "-o", "proto_version=1",
                                 "-o", f"publication_names={slot}", "-f", "/dev/null"])
    try:
        named = wait_for("the receiver's slot named", lambda: [r for r in _slot_readers(conn, "ours") if slot in r], 15)
        assert named == [f"slot {slot} (pgoutput)"]
        assert not [r for r in _slot_readers(conn, slot) if slot in r]  # the bench's own slot is left out
    finally:
        receiver.terminate()
        receiver.wait(10)
        wait_for("the receiver's slot released", lambda: not conn.execute(
            "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()[0], 15)
        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        conn.execute(f"DROP PUBLICATION {slot}")
        conn.close()


def test_a_binlog_dump_of_another_client_is_named(erp, wait_for):
    conn = pymysql.connect(host=erp.host, port=erp.port, user="root", password="", autocommit=True)
    before = set(_binlog_readers(conn.cursor()))
    stream = BinLogStreamReader(connection_settings={"host": erp.host, "port": erp.port, "user": "root",
                                                     "password": ""},
                                server_id=4_200_000 + random.randint(0, 99_999), blocking=True, is_mariadb=True,
                                only_events=[])

    def read() -> None:
        with contextlib.suppress(Exception):  # the dump ends when the test closes the stream under it
            next(iter(stream), None)

    reading = threading.Thread(target=read, daemon=True)
    reading.start()
    try:
        new = wait_for("the new binlog dump named", lambda: set(_binlog_readers(conn.cursor())) - before, 15)
        assert len(new) == 1 and next(iter(new)).startswith("binlog dump #")
    finally:
        stream.close()
        reading.join(10)
        conn.close()
