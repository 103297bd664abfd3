"""The five private servers of the local stack. Each knows its folder under the state dir, how to
create its data once, start detached, answer a real health query, bootstrap its databases/users
(idempotently, after every start) and stop by pid. Orchestration lives in `branchline.infra.stack`."""

from __future__ import annotations

import base64
import logging
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from branchline import paths
from branchline.errors import InfraError
from branchline.infra import _proc
from branchline.infra._install import MIN_FREE_STATE, Cancelled, Tools, check_disk, kafka_libs, plugins_dir
from branchline.infra._pins import Pins

log = logging.getLogger("branchline.infra")
# health probes poll Connect's REST API; one INFO line per request would drown the progress messages
logging.getLogger("httpx").setLevel(logging.WARNING)

LOG4J2 = Path(__file__).resolve().parent / "log4j2.xml"
#: connector classes `up` waits for on Connect's plugin list
DEBEZIUM_PLUGINS = (
    "io.debezium.connector.mariadb.MariaDbConnector",
    "io.debezium.connector.mysql.MySqlConnector",
    "io.debezium.connector.postgresql.PostgresConnector",
)


@dataclass
class Health:
    """One probe: did the service answer a real query, and what did it say."""

    ok: bool
    detail: str
    facts: dict[str, object] = field(default_factory=dict)


class Service(ABC):
    """A server of the stack. Subclasses fill in the specifics."""

    name: str
    kind: str
    start_timeout: float = 90.0

    def __init__(self, pins: Pins, port_name: str | None = None) -> None:
        self.pins = pins
        self.port_name = port_name or self.name
        self.port = pins.ports[self.port_name]
        self.host = pins.host
        self.dir = paths.state_dir() / self.name
        self._launched_pid: int | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def ports(self) -> dict[str, int]:
        """Every port this service binds, by stack.toml name."""
        return {self.port_name: self.port}

    @property
    @abstractmethod
    def pid_file(self) -> Path: ...

    @property
    @abstractmethod
    def log_file(self) -> Path: ...

    @property
    @abstractmethod
    def marker(self) -> str:
        """A string in the server's command line that proves the pid is ours (data dir or config)."""

    def pid(self) -> int | None:
        """Our server's pid, when it runs."""
        return _proc.owned_pid(self.pid_file, self.marker)

    @abstractmethod
    def probe(self) -> Health:
        """A real query against the server (never only a TCP connect)."""

    @abstractmethod
    def prepare(self, tools: Tools) -> None:
        """Create the data folder once and (re)write the config files."""

    @abstractmethod
    def launch(self, tools: Tools) -> None:
        """Start the server detached from this process; return without waiting."""

    def bootstrap(self) -> None:
        """Create databases and users; idempotent, runs after each start."""

    def stop(self) -> bool:
        """Stop our server by pid (SIGTERM, then SIGKILL). True when it is gone."""
        pid = self.pid()
        if pid is None:
            self.clean_pid_file()
            return True
        gone = _proc.terminate(pid, timeout=60)
        if gone:
            self.clean_pid_file()
        return gone

    def clean_pid_file(self) -> None:
        """Remove a pid file whose process is gone."""
        if self.pid_file.exists() and self.pid() is None:
            self.pid_file.unlink(missing_ok=True)

    def wait_healthy(self, timeout: float | None = None, cancel: threading.Event | None = None) -> Health:
        """Poll the probe until it answers; fail early when the server died (with its log tail) or
        when ``cancel`` is set because another service of the same `up` failed."""
        limit = timeout or self.start_timeout
        deadline = time.monotonic() + limit
        health = Health(False, "not probed")
        while time.monotonic() < deadline:
            health = self.probe()
            if health.ok:
                return health
            if self._died():
                raise self.failure("stopped while starting")
            if cancel is not None and cancel.wait(0.4):
                raise Cancelled(self.name)
            time.sleep(0.1)
        raise self.failure(f"did not answer within {limit:.0f} s ({health.detail})")

    def _died(self) -> bool:
        """True when the process we launched has exited."""
        return self._launched_pid is not None and not _proc.alive(self._launched_pid)

    def failure(self, what: str) -> InfraError:
        """The error for a server that will not start: cause, fix, and the tail of its log."""
        logs = self.log_files()
        tails = "\n".join(f"--- {p} (last lines) ---\n{t}" for p in logs if (t := _proc.tail(p)))
        return InfraError(
            f"`{self.name}` ({self.kind} on {self.address}) {what}; read the log below "
            f"(full log: {self.log_file}), fix the cause and run `branchline infra up` again.\n{tails}"
        )

    def log_files(self) -> list[Path]:
        return [self.log_file]

    def _spawn(self, command: list[str], console: Path) -> int:
        """Start a server detached from this process (reparented to init through a shell, so no
        zombie and no Popen left behind), stdout/stderr appended to ``console``. Returns its pid."""
        console.parent.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            ["/bin/sh", "-c", '"$@" </dev/null >>"$BRANCHLINE_CONSOLE" 2>&1 & echo $!', "sh", *command],
            check=False, capture_output=True, text=True, cwd=self.dir, start_new_session=True,
            env={**os.environ, "BRANCHLINE_CONSOLE": str(console)})
        try:
            pid = int(result.stdout.strip())
        except ValueError:
            raise self.failure(f"could not be launched ({result.stderr.strip() or 'no pid'})") from None
        self._launched_pid = pid
        return pid


# --- MariaDB: "erp" -----------------------------------------------------------------------------------


class MariaDb(Service):
    """MariaDB with the binlog a CDC reader needs: ROW, FULL image, FULL metadata, GTID."""

    name = "erp"
    kind = "MariaDB"
    start_timeout = 60.0
    USER = "branchline"
    PASSWORD = "branchline"  # local dev only, documented in infra/README

    @property
    def data(self) -> Path:
        return self.dir / "data"

    @property
    def pid_file(self) -> Path:
        return self.dir / "mariadb.pid"

    @property
    def log_file(self) -> Path:
        return self.dir / "mariadb.err"

    @property
    def marker(self) -> str:
        return f"--datadir={self.data}"

    def log_files(self) -> list[Path]:
        return [self.log_file, self.dir / "console.log"]

    def probe(self) -> Health:
        import pymysql

        try:
            conn = pymysql.connect(host=self.host, port=self.port, user="root", password="",
                                   connect_timeout=2, read_timeout=5)
        except pymysql.MySQLError as exc:
            return Health(False, f"no answer ({exc.args[-1] if exc.args else exc})")
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT @@version, @@log_bin, @@binlog_format, @@binlog_row_image, "
                            "@@binlog_row_metadata, @@gtid_strict_mode, @@server_id, @@character_set_server")
                row = cur.fetchone()
        except pymysql.MySQLError as exc:
            return Health(False, f"query failed ({exc})")
        finally:
            conn.close()
        assert row is not None
        keys = ("version", "log_bin", "binlog_format", "binlog_row_image", "binlog_row_metadata",
                "gtid_strict_mode", "server_id", "character_set_server")
        facts = dict(zip(keys, row))
        return Health(True, f"MariaDB {row[0].split('-')[0]}, binlog {row[2]}/{row[3]}, server_id {row[6]}", facts)

    def prepare(self, tools: Tools) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "binlog").mkdir(exist_ok=True)
        if (self.data / "mysql").is_dir():
            return
        check_disk(self.dir, MIN_FREE_STATE, "the MariaDB data")
        staging = self.dir / "data.init"
        shutil.rmtree(staging, ignore_errors=True)
        command = [str(tools.mariadb_install_db), "--no-defaults", f"--datadir={staging}",
                   "--auth-root-authentication-method=normal", "--skip-test-db"]
        if os.geteuid() == 0:
            command.append("--user=root")
        log.info("erp: creating MariaDB data in %s", self.data)
        result = subprocess.run(command, check=False, capture_output=True, text=True)
        if result.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            last = (result.stdout + result.stderr).strip().splitlines()[-5:]
            raise InfraError(f"`mariadb-install-db` failed for `erp`: {' | '.join(last)}; "
                             f"fix that and run `branchline infra up` again.")
        staging.rename(self.data)

    def launch(self, tools: Tools) -> None:
        command = [
            str(tools.mariadbd), "--no-defaults", f"--datadir={self.data}", f"--port={self.port}",
            f"--bind-address={self.host}", f"--socket={self.dir / 'mariadb.sock'}",
            f"--pid-file={self.pid_file}", f"--log-error={self.log_file}",
            f"--log-bin={self.dir / 'binlog' / 'erp-bin'}", "--binlog-format=ROW", "--binlog-row-image=FULL",
            "--binlog-row-metadata=FULL", "--server-id=1", "--gtid-domain-id=0", "--gtid-strict-mode=ON",
            "--log-slave-updates=ON", "--binlog-expire-logs-seconds=604800",
            "--character-set-server=utf8mb4", "--collation-server=utf8mb4_general_ci",
            "--skip-name-resolve", "--max-connections=300", "--innodb-buffer-pool-size=256M",
        ]
        if os.geteuid() == 0:
            command.append("--user=root")
        self.pid_file.unlink(missing_ok=True)
        pid = self._spawn(command, self.dir / "console.log")
        self.pid_file.write_text(f"{pid}\n")  # mariadbd rewrites it with the same pid

    def bootstrap(self) -> None:
        import pymysql

        conn = pymysql.connect(host=self.host, port=self.port, user="root", password="", autocommit=True)
        try:
            with conn.cursor() as cur:
                cur.execute("CREATE DATABASE IF NOT EXISTS erp CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")
                for host in ("127.0.0.1", "localhost"):
                    user = f"'{self.USER}'@'{host}'"
                    cur.execute(f"CREATE USER IF NOT EXISTS {user} IDENTIFIED BY %s", (self.PASSWORD,))
                    # what Debezium's MariaDB connector needs (snapshot + binlog); BINLOG MONITOR is
                    # MariaDB's name for REPLICATION CLIENT (SHOW BINARY LOGS / MASTER STATUS)
                    cur.execute("GRANT SELECT, RELOAD, SHOW DATABASES, REPLICATION SLAVE, REPLICATION CLIENT, "
                                f"BINLOG MONITOR, SLAVE MONITOR, LOCK TABLES ON *.* TO {user}")
                    # incremental snapshots write watermarks into a signal table in the source database
                    cur.execute(f"GRANT INSERT, UPDATE, DELETE, CREATE ON erp.* TO {user}")
        finally:
            conn.close()


# --- PostgreSQL: "crm" and "cloud" --------------------------------------------------------------------


class Postgres(Service):
    """A private PostgreSQL cluster, run as the `postgres` user when we are root (initdb refuses root)."""

    kind = "PostgreSQL"
    start_timeout = 60.0

    def __init__(self, pins: Pins, name: str, database: str, settings: dict[str, str]) -> None:
        self.name = name
        super().__init__(pins)
        self.database = database
        self.settings = settings
        self.bin = Path(f"/usr/lib/postgresql/{pins.versions['postgres']}/bin")

    @property
    def data(self) -> Path:
        return self.dir / "data"

    @property
    def pid_file(self) -> Path:
        return self.data / "postmaster.pid"

    @property
    def log_file(self) -> Path:
        return self.dir / "postgres.log"

    @property
    def marker(self) -> str:
        return str(self.data)

    def _as_owner(self, command: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command

    def _chown(self, path: Path) -> None:
        if os.geteuid() != 0:
            return
        import pwd

        try:
            entry = pwd.getpwnam("postgres")
        except KeyError as exc:
            raise InfraError("The `postgres` system user must exist (apt creates it with postgresql); "
                             "reinstall postgresql and run `branchline infra up` again.") from exc
        os.chown(path, entry.pw_uid, entry.pw_gid)
        for root, dirs, files in os.walk(path):
            for item in dirs + files:
                os.chown(os.path.join(root, item), entry.pw_uid, entry.pw_gid, follow_symlinks=False)

    def probe(self) -> Health:
        import psycopg

        try:
            with psycopg.connect(host=self.host, port=self.port, user="postgres", dbname="postgres",
                                 connect_timeout=2) as conn:
                version, wal_level, slots = conn.execute(
                    "SELECT current_setting('server_version'), current_setting('wal_level'), "
                    "current_setting('max_replication_slots')").fetchone()  # type: ignore[misc]
        except psycopg.Error as exc:
            return Health(False, f"no answer ({str(exc).strip().splitlines()[0] if str(exc) else exc})")
        facts = {"version": version, "wal_level": wal_level, "max_replication_slots": int(slots)}
        return Health(True, f"PostgreSQL {version.split()[0]}, wal_level={wal_level}", facts)

    def _check_reachable(self) -> None:
        """As root we run PostgreSQL as `postgres`, which must be able to walk down to its folder."""
        if os.geteuid() != 0:
            return
        for folder in reversed(self.dir.parents):
            if folder.exists() and not folder.stat().st_mode & 0o001:
                raise InfraError(
                    f"The state folder {self.dir} must be reachable by the `postgres` user, but {folder} "
                    f"is closed to others; run `chmod o+x {folder}` or set BRANCHLINE_STATE to another folder."
                )

    def prepare(self, tools: Tools) -> None:
        self._check_reachable()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._chown(self.dir)
        if not (self.data / "PG_VERSION").exists():
            check_disk(self.dir, MIN_FREE_STATE, f"the PostgreSQL data of `{self.name}`")
            staging = self.dir / "data.init"
            shutil.rmtree(staging, ignore_errors=True)
            log.info("%s: creating PostgreSQL data in %s", self.name, self.data)
            result = subprocess.run(
                self._as_owner([str(tools.pg_bin / "initdb"), "-D", str(staging), "-U", "postgres",
                                "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync"]),
                check=False, capture_output=True, text=True)
            if result.returncode != 0:
                shutil.rmtree(staging, ignore_errors=True)
                last = (result.stdout + result.stderr).strip().splitlines()[-5:]
                raise InfraError(f"`initdb` failed for `{self.name}`: {' | '.join(last)}; "
                                 f"fix that and run `branchline infra up` again.")
            with (staging / "postgresql.conf").open("a") as conf:
                conf.write("\n# written by branchline infra up; settings live in branchline.conf\n"
                           "include_if_exists = 'branchline.conf'\n")
            staging.rename(self.data)
        settings = {
            "listen_addresses": f"'{self.host}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.dir}'",
            **self.settings,
        }
        (self.data / "branchline.conf").write_text(
            "# Regenerated by `branchline infra up` before each start; edit infra/_services.py instead.\n"
            + "".join(f"{k} = {v}\n" for k, v in settings.items()))
        (self.data / "pg_hba.conf").write_text(
            "# local development only: trust on loopback, including replication connections\n"
            "local all all trust\n"
            "host all all 127.0.0.1/32 trust\n"
            "host replication all 127.0.0.1/32 trust\n"
            "local replication all trust\n")
        self._chown(self.dir)

    def launch(self, tools: Tools) -> None:
        if self.pid_file.exists() and self.pid() is None:
            self.pid_file.unlink()  # stale after a crash; no live postmaster uses it
        self._launched_at = time.monotonic()
        console = self.dir / "console.log"
        with console.open("ab") as out:
            # pg_ctl forks the postmaster into the background itself and returns at once
            result = subprocess.run(self._as_owner([str(tools.pg_bin / "pg_ctl"), "-D", str(self.data), "-l",
                                                    str(self.log_file), "--no-wait", "start"]),
                                    check=False, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=self.dir, start_new_session=True)
        if result.returncode != 0:
            raise self.failure(f"could not be launched (pg_ctl exit code {result.returncode})")

    def _died(self) -> bool:
        # the server died when no postmaster has appeared (or stayed) a moment after pg_ctl returned
        return self.pid() is None and time.monotonic() - self._launched_at > 2

    def log_files(self) -> list[Path]:
        return [self.log_file, self.dir / "console.log"]

    def bootstrap(self) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(host=self.host, port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database)))

    def stop(self) -> bool:
        pid = self.pid()
        if pid is None:
            return True
        pg_ctl = self.bin / "pg_ctl"
        if pg_ctl.exists():
            subprocess.run(self._as_owner([str(pg_ctl), "-D", str(self.data), "-m", "fast", "-w", "-t", "60",
                                           "stop"]), check=False, capture_output=True, text=True)
        return _proc.terminate(pid, timeout=30) if _proc.alive(pid) else True


def crm(pins: Pins) -> Postgres:
    """The CRM source: logical decoding on, room for slots and senders."""
    return Postgres(pins, "crm", "crm", {
        "wal_level": "logical", "max_replication_slots": "20", "max_wal_senders": "20",
        # a forgotten slot must not fill the disk: past this much WAL the slot is invalidated
        "max_slot_wal_keep_size": "'4GB'",
    })


def cloud(pins: Pins) -> Postgres:
    """The cloud store stand-in: an ordinary cluster."""
    return Postgres(pins, "cloud", "cloud", {"max_connections": "200"})


# --- Kafka (KRaft) and Kafka Connect -----------------------------------------------------------------


class _Jvm(Service):
    """A JVM server run from the Maven-assembled classpath."""

    main_class: str
    heap_key: str

    @property
    def pid_file(self) -> Path:
        return self.dir / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.dir / f"{self.name}.log"

    @property
    def config(self) -> Path:
        return self.dir / f"{self.name}.properties"

    @property
    def marker(self) -> str:
        return str(self.config)

    def log_files(self) -> list[Path]:
        return [self.log_file, self.dir / "console.log"]

    def java_command(self, tools: Tools, main: str, *args: str, heap: list[str] | None = None,
                     log_file: Path | None = None) -> list[str]:
        return [
            str(tools.java), *(heap if heap is not None else self.pins.heap.get(self.heap_key, ["-Xmx512m"])),
            "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={LOG4J2}", f"-Dbranchline.log.file={log_file or self.log_file}",
            f"-Dkafka.logs.dir={self.dir}", "-cp", f"{kafka_libs(self.pins)}/*", main, *args,
        ]

    def launch(self, tools: Tools) -> None:
        pid = self._spawn(self.java_command(tools, self.main_class, str(self.config)), self.dir / "console.log")
        self.pid_file.write_text(f"{pid}\n")

    @staticmethod
    def write_properties(path: Path, props: dict[str, object]) -> None:
        path.write_text("# Regenerated by `branchline infra up` before each start; edit infra/_services.py.\n"
                        + "".join(f"{k}={v}\n" for k, v in props.items()))


class Kafka(_Jvm):
    """One KRaft node, broker and controller in one process."""

    name = "kafka"
    kind = "Kafka"
    main_class = "kafka.Kafka"
    heap_key = "kafka"
    start_timeout = 120.0

    @property
    def ports(self) -> dict[str, int]:
        return {"kafka": self.port, "kafka_controller": self.pins.ports["kafka_controller"]}

    @property
    def data(self) -> Path:
        return self.dir / "data"

    def prepare(self, tools: Tools) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        controller = self.pins.ports["kafka_controller"]
        self.write_properties(self.config, {
            "process.roles": "broker,controller",
            "node.id": 1,
            "controller.quorum.voters": f"1@{self.host}:{controller}",
            "listeners": f"PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{controller}",
            "advertised.listeners": f"PLAINTEXT://{self.host}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": self.data,
            "num.partitions": 1,
            "auto.create.topics.enable": "true",
            "offsets.topic.replication.factor": 1,
            "transaction.state.log.replication.factor": 1,
            "transaction.state.log.min.isr": 1,
            "share.coordinator.state.topic.replication.factor": 1,
            "share.coordinator.state.topic.min.isr": 1,
            "group.initial.rebalance.delay.ms": 0,
            "log.retention.hours": 168,
            "log.segment.bytes": 268435456,
        })
        if (self.data / "meta.properties").exists():
            return
        check_disk(self.dir, MIN_FREE_STATE, "the Kafka log")
        cluster_id = new_cluster_id()
        log.info("kafka: formatting KRaft storage in %s", self.data)
        command = self.java_command(tools, "kafka.tools.StorageTool", "format", "--ignore-formatted",
                                    "--cluster-id", cluster_id, "--config", str(self.config),
                                    heap=["-Xmx256m"], log_file=self.dir / "format.log")
        result = subprocess.run(command, check=False, capture_output=True, text=True, cwd=self.dir)
        if result.returncode != 0:
            shutil.rmtree(self.data, ignore_errors=True)
            last = (result.stdout + result.stderr).strip().splitlines()[-5:]
            raise InfraError(f"Formatting the Kafka storage failed: {' | '.join(last)}; "
                             f"fix that and run `branchline infra up` again.")

    def probe(self) -> Health:
        try:
            brokers, cluster = kafka_metadata(self.host, self.port)
        except (OSError, ValueError, struct.error) as exc:
            return Health(False, f"no answer ({exc})")
        if not brokers:
            return Health(False, "no broker registered yet")
        return Health(True, f"Kafka {self.pins.versions['kafka']} KRaft, cluster {cluster}, {len(brokers)} broker",
                      {"brokers": brokers, "cluster_id": cluster})


def new_cluster_id() -> str:
    """A KRaft cluster id: a random UUID in URL-safe base64, never starting with "-".

    One id in 64 would start with "-", and kafka-storage's argument parser then reads it as an
    option ("--cluster-id: expected one argument"). Kafka's own Uuid.randomUuid() draws again in
    that case; so does this."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def kafka_metadata(host: str, port: int, timeout: float = 3.0) -> tuple[list[str], str | None]:
    """A Metadata v4 request (Kafka 4 dropped v0-v3): the brokers' addresses and the cluster id."""
    client = b"branchline-infra"
    body = struct.pack(">i", 0) + b"\x00"  # topics: empty array (no topic data), no auto-create
    header = struct.pack(">hhih", 3, 4, 7, len(client)) + client
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        payload = header + body
        sock.sendall(struct.pack(">i", len(payload)) + payload)
        size = struct.unpack(">i", _recv(sock, 4))[0]
        data = _recv(sock, size)
    offset = 4 + 4  # correlation id, throttle time
    (count,) = struct.unpack_from(">i", data, offset)
    offset += 4
    brokers = []
    for _ in range(count):
        _node, hlen = struct.unpack_from(">ih", data, offset)
        offset += 6
        bhost = data[offset:offset + hlen].decode()
        offset += hlen
        (bport, rlen) = struct.unpack_from(">ih", data, offset)
        offset += 6 + max(rlen, 0)
        brokers.append(f"{bhost}:{bport}")
    (clen,) = struct.unpack_from(">h", data, offset)
    cluster = data[offset + 2:offset + 2 + clen].decode() if clen >= 0 else None
    return brokers, cluster


def _recv(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ValueError("connection closed")
        chunks += chunk
    return bytes(chunks)


class Connect(_Jvm):
    """One Kafka Connect worker in distributed mode, Debezium plugins on its plugin.path."""

    name = "connect"
    kind = "Kafka Connect"
    main_class = "org.apache.kafka.connect.cli.ConnectDistributed"
    heap_key = "connect"
    start_timeout = 240.0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def prepare(self, tools: Tools) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.write_properties(self.config, {
            "bootstrap.servers": f"{self.host}:{self.pins.ports['kafka']}",
            "group.id": "branchline-connect",
            "key.converter": "org.apache.kafka.connect.json.JsonConverter",
            "value.converter": "org.apache.kafka.connect.json.JsonConverter",
            "key.converter.schemas.enable": "true",
            "value.converter.schemas.enable": "true",
            "config.storage.topic": "branchline-connect-configs",
            "offset.storage.topic": "branchline-connect-offsets",
            "status.storage.topic": "branchline-connect-status",
            "config.storage.replication.factor": 1,
            "offset.storage.replication.factor": 1,
            "status.storage.replication.factor": 1,
            "offset.flush.interval.ms": 5000,
            "listeners": f"http://{self.host}:{self.port}",
            "rest.advertised.host.name": self.host,
            "rest.advertised.port": self.port,
            "plugin.path": plugins_dir(),
            # Debezium's jars declare their connectors through ServiceLoader manifests: skip the slow
            # reflective scan of every jar on plugin.path
            "plugin.discovery": "service_load",
            "topic.creation.enable": "true",
        })

    def probe(self) -> Health:
        import httpx

        try:
            health = httpx.get(f"{self.url}/health", timeout=3)
            if health.status_code != 200:
                return Health(False, f"worker not ready ({health.status_code}: {health.text[:120]})")
            plugins = httpx.get(f"{self.url}/connector-plugins", timeout=5)
            plugins.raise_for_status()
            root = httpx.get(f"{self.url}/", timeout=3).json()
        except (httpx.HTTPError, ValueError) as exc:
            return Health(False, f"no answer ({type(exc).__name__}: {exc})")
        listed = plugins.json()
        classes = [p["class"] for p in listed]
        missing = [c for c in DEBEZIUM_PLUGINS if c not in classes]
        detail = f"Kafka Connect {root.get('version')}, {len(listed)} connector plugins"
        facts: dict[str, object] = {"plugins": listed, "version": root.get("version")}
        if missing:
            return Health(False, detail + f"; missing {', '.join(c.rsplit('.', 1)[1] for c in missing)}", facts)
        return Health(True, detail, facts)
