"""Shared fixtures: addresses of the local stack (infra/stack.toml, overridable from env).

Integration tests need the real services. When ``CI`` is set a missing service fails the test;
on a developer's machine it is skipped with the command that starts it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

STACK_TOML = Path(__file__).resolve().parents[1] / "infra" / "stack.toml"
PORTS: dict[str, int] = tomllib.loads(STACK_TOML.read_text())["ports"]


@dataclass(frozen=True)
class Service:
    name: str
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def service(name: str) -> Service:
    """The address of one stack service; env BRANCHLINE_<NAME>_HOST/_PORT override the defaults."""
    prefix = f"BRANCHLINE_{name.upper()}"
    host = os.environ.get(f"{prefix}_HOST", "127.0.0.1")
    port = int(os.environ.get(f"{prefix}_PORT", PORTS[name]))
    return Service(name, host, port)


def require(name: str) -> Service:
    """The service if it answers on TCP; otherwise fail (CI) or skip (a developer's machine)."""
    svc = service(name)
    try:
        with socket.create_connection((svc.host, svc.port), timeout=2):
            pass
    except OSError as exc:
        message = f"`{name}` must answer at {svc.address} (start it with `branchline infra up`); got {exc}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return svc


@pytest.fixture(scope="session")
def erp() -> Service:
    """MariaDB with the sample ERP database (user root, empty password, database `erp`)."""
    return require("erp")


@pytest.fixture(scope="session")
def crm() -> Service:
    """PostgreSQL source with the sample CRM (user postgres, database `crm`)."""
    return require("crm")


@pytest.fixture(scope="session")
def cloud() -> Service:
    """PostgreSQL that plays the cloud store (user postgres, database `cloud`)."""
    return require("cloud")


@pytest.fixture(scope="session")
def kafka() -> Service:
    return require("kafka")


@pytest.fixture(scope="session")
def connect() -> Service:
    """Kafka Connect REST API."""
    return require("connect")


class CuttableProxy:
    """A loopback TCP proxy whose `cut()` drops every connection and refuses new ones until `restore()`.

    It plays a WAN outage in front of a real service. Relayed sockets block without a timeout: an idle
    pooled connection must stay open for as long as the service would keep it.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._cut = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._cut.is_set():
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            with self._lock:
                self._sockets.difference_update((source, target))

    def cut(self) -> None:
        self._cut.set()
        with self._lock:
            live = list(self._sockets)
        for sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def restore(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self._listener.close()


@pytest.fixture
def cuttable_proxy() -> Iterator[Callable[[Service], CuttableProxy]]:
    """Make proxies in front of stack services; every one is closed when the test ends."""
    made: list[CuttableProxy] = []

    def make(target: Service) -> CuttableProxy:
        made.append(CuttableProxy((target.host, target.port)))
        return made[-1]

    yield make
    for proxy in made:
        proxy.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A real S3-compatible HTTP server for the whole session: moto's server mode as a subprocess on a
    free 127.0.0.1 port, with one bucket, ``lake``. Tests share it, so each writes under its own prefix.

    Yields ``endpoint``, ``bucket``, ``client`` (boto3) and ``storage`` (the sink's `S3Storage` for it).
    When moto's server is not installed it fails under CI and skips elsewhere; a server that does not
    start listening always fails the test, pointing at its log.
    """
    import shutil
    import subprocess
    import sys
    import time

    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if exe is None:
        message = "`moto_server` must be installed for the S3 tests (pip install 'moto[server]'); got none"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    import boto3
    from branchline.sinks.config import S3Storage

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    endpoint = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"`moto_server` must listen on {endpoint}; see {log_path}")
                    time.sleep(0.1)
            client = boto3.client(
                "s3",
                endpoint_url=endpoint,
                region_name="us-east-1",
                aws_access_key_id="testing",
                aws_secret_access_key="testing",
            )
            client.create_bucket(Bucket="lake")
            storage = S3Storage(
                endpoint_url=endpoint,
                region="us-east-1",
                access_key_id="testing",
                secret_access_key="testing",
                allow_http=True,
            )
            yield {"endpoint": endpoint, "bucket": "lake", "client": client, "storage": storage}
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


# -- watching a running pipeline: polling, free ports, a real Prometheus ------------------------------
# Fixtures, because test modules cannot import each other under --import-mode=importlib.

PROMETHEUS_DIR = STACK_TOML.parent / "prometheus"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _poll_until(what: str, check: Callable[[], Any], timeout_s: float = 120.0,
                failed: Callable[[], BaseException | None] = lambda: None) -> Any:
    """Poll ``check`` until truthy; fail naming ``what`` after ``timeout_s``, or at once when ``failed``
    reports an error (the pipeline under test died)."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        if (error := failed()) is not None:
            pytest.fail(f"the pipeline stopped while waiting for {what}: {error!r}")
        try:
            last = check()
            if last:
                return last
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.25)
    pytest.fail(f"{what} must happen within {timeout_s} s; last saw {last!r}")


@contextlib.contextmanager
def _running_prometheus(tmp_path: Path, targets: list[str]) -> Iterator[str]:
    """Prometheus from apt scraping ``targets`` every second with Branchline's alert rules; yields its URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        message = "`prometheus` must be installed (apt-get install prometheus); got nothing on PATH"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["scrape_configs"][0]["static_configs"] = [{"targets": targets}]
    config["rule_files"] = [str(PROMETHEUS_DIR / "alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    with (tmp_path / "prometheus.log").open("w") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
            stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            _poll_until("Prometheus to be ready", lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def wait_for() -> Callable[..., Any]:
    """``wait_for(what, check, timeout_s=120, failed=...)``: poll until ``check()`` is truthy."""
    return _poll_until


@pytest.fixture
def free_port() -> Callable[[], int]:
    """``free_port()``: a TCP port on 127.0.0.1 nothing listens on now."""
    return _free_port


@pytest.fixture
def prometheus() -> Callable[[Path, list[str]], contextlib.AbstractContextManager[str]]:
    """``with prometheus(tmp_path, ["127.0.0.1:9464"]) as url``: a real Prometheus scraping the targets."""
    return _running_prometheus
