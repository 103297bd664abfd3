"""TLS to the target: sslmode=verify-full with a CA file against a real PostgreSQL that requires TLS.

The stack's cloud PostgreSQL has no certificate, so this test starts its own throwaway server on a
free loopback port with a certificate signed by a CA made for the test (as a managed cloud server
would present one), and refuses plain connections (`hostssl` only).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from branchline.errors import FatalSinkError
from branchline.events import ChangeEvent, Column, ColumnType, Op, TableId, TableSchema
from branchline.sinks.build import build_sink
from branchline.sinks.config import PostgresSinkConfig

pytestmark = pytest.mark.integration

PG_BIN = Path(os.environ.get("BRANCHLINE_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _missing(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _as_postgres(argv: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: drop to the `postgres` user when we are root."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def tls_server() -> Iterator[dict[str, Any]]:
    if not (PG_BIN / "initdb").exists() or shutil.which("openssl") is None:
        _missing(f"`initdb` ({PG_BIN}) and `openssl` must be installed for the TLS test; got none")
    # not under pytest's tmp dir: the `postgres` user cannot traverse root's private folders
    base = Path(tempfile.mkdtemp(prefix="branchline-tls-"))
    certs = base / "certs"
    certs.mkdir()
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=branchline test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        cwd=certs,
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        cwd=certs,
    )
    (certs / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
        cwd=certs,
    )
    data = base / "data"
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        for path in [certs, *certs.iterdir()]:
            shutil.chown(path, "postgres")
    (certs / "server.key").chmod(0o600)
    subprocess.run(
        _as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]),
        check=True,
        capture_output=True,
    )
    (data / "pg_hba.conf").write_text(
        "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n"
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options = (
        f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c ssl=on -c ssl_cert_file={certs / 'server.crt'}"
        f" -c ssl_key_file={certs / 'server.key'} -c fsync=off"
    )
    subprocess.run(
        _as_postgres(
            [
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(base / "pg.log"),
                "-o",
                options,
                "-w",
                "start",
            ]
        ),
        check=True,
        capture_output=True,
    )
    try:
        yield {"port": port, "ca": certs / "ca.crt", "wrong_ca": _other_ca(base)}
    finally:
        subprocess.run(
            _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
            check=False,
            capture_output=True,
        )
        shutil.rmtree(base, ignore_errors=True)


def _other_ca(base: Path) -> Path:
    other = base / "other"
    other.mkdir()
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=someone else",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        cwd=other,
    )
    return other / "ca.crt"


TABLE = TableSchema(
    id=TableId(source="erp", branch="b1", database="erp", table="items"),
    columns=(
        Column(name="id", type=ColumnType.INT32, nullable=False),
        Column(name="name", type=ColumnType.STRING),
    ),
    primary_key=("id",),
)


async def _write(config: PostgresSinkConfig) -> None:
    sink = build_sink(config)
    try:
        event = ChangeEvent(
            op=Op.CREATE,
            table=TABLE.id,
            key={"id": 1},
            after={"id": 1, "name": "tls"},
            position=1,
            source_ts=datetime.now(UTC),
        )
        await sink.write_batch(TABLE, [event])
    finally:
        await sink.close()


def test_verify_full_with_the_right_ca_writes_over_tls(tls_server: dict[str, Any]) -> None:
    config = PostgresSinkConfig(
        host="localhost",
        port=tls_server["port"],
        schema="tls",
        sslmode="verify-full",
        sslrootcert=tls_server["ca"],
    )
    asyncio.run(_write(config))
    with psycopg.connect(
        f"host=localhost port={tls_server['port']} user=postgres sslmode=verify-full "
        f"sslrootcert={tls_server['ca']}"
    ) as conn:
        assert conn.execute("SELECT name FROM tls.items").fetchall() == [("tls",)]
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)


def test_verify_full_with_another_ca_is_refused(tls_server: dict[str, Any]) -> None:
    config = PostgresSinkConfig(
        host="localhost",
        port=tls_server["port"],
        schema="tls2",
        sslmode="verify-full",
        sslrootcert=tls_server["wrong_ca"],
        max_attempts=1,
        connect_timeout_s=3,
    )
    with pytest.raises(FatalSinkError, match="certificate verify failed"):
        asyncio.run(_write(config))


def test_plain_connection_is_rejected_by_the_server(tls_server: dict[str, Any]) -> None:
    config = PostgresSinkConfig(
        host="127.0.0.1",
        port=tls_server["port"],
        schema="tls3",
        sslmode="disable",
        max_attempts=1,
        connect_timeout_s=3,
    )
    with pytest.raises(FatalSinkError, match="no encryption|pg_hba"):
        asyncio.run(_write(config))
