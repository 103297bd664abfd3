"""`up`, `down` and `status` of the local stack, also callable from Python (tests, scripts).

`up` is idempotent: a service whose pid file names a live process of ours that answers is left alone;
stale pid files are cleaned; a port held by anything else stops `up` before it starts anything.
Databases start while Maven fetches Kafka and Kafka starts; Connect follows Kafka. If any step fails,
`up` stops what this call started, so nothing is left half-started.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from branchline import paths
from branchline.errors import InfraError
from branchline.infra import _install, _proc
from branchline.infra._pins import Pins, load_pins
from branchline.infra._services import (
    DEBEZIUM_PLUGINS,
    Cancelled,
    Connect,
    Kafka,
    MariaDb,
    Service,
    cloud,
    crm,
)

log = logging.getLogger("branchline.infra")

SERVICE_NAMES = ("erp", "crm", "cloud", "kafka", "connect")


def services(pins: Pins | None = None) -> dict[str, Service]:
    """The stack's services in start order."""
    pins = pins or load_pins()
    return {"erp": MariaDb(pins), "crm": crm(pins), "cloud": cloud(pins), "kafka": Kafka(pins),
            "connect": Connect(pins)}


@dataclass
class ServiceStatus:
    """One line of `branchline infra status`."""

    name: str
    kind: str
    address: str
    pid: int | None
    healthy: bool
    detail: str
    log: str
    facts: dict[str, object] = field(default_factory=dict)


@dataclass
class UpResult:
    """What `up` did: which services it started, which were already running, how long it took."""

    started: list[str]
    already_running: list[str]
    downloaded: bool
    seconds: float


def _status(svc: Service) -> ServiceStatus:
    pid = svc.pid()
    health = svc.probe()
    return ServiceStatus(svc.name, svc.kind, svc.address, pid, health.ok, health.detail, str(svc.log_file),
                         health.facts)


def status(pins: Pins | None = None) -> list[ServiceStatus]:
    """Probe every service (a real query each), in parallel."""
    svcs = list(services(pins).values())
    with ThreadPoolExecutor(len(svcs)) as pool:
        return list(pool.map(_status, svcs))


def connector_plugins(statuses: list[ServiceStatus]) -> list[dict[str, str]]:
    """The plugins Connect's REST API lists (empty when Connect is down)."""
    for s in statuses:
        if s.name == "connect":
            return list(s.facts.get("plugins", []))  # type: ignore[call-overload]
    return []


def _port_conflict(svc: Service) -> InfraError | None:
    for port_name, port in svc.ports.items():
        if not _proc.port_in_use(svc.host, port):
            continue
        owner = _proc.port_owner(port)
        who = f"pid {owner[0]} ({owner[1][:120]})" if owner else "another process"
        env = f"BRANCHLINE_{port_name.upper()}_PORT"
        return InfraError(
            f"Port {port} for `{svc.name}` ({svc.kind}) is already taken by {who}; stop that process, "
            f"or move `{svc.name}` to a free port with `ports.{port_name}` in infra/stack.toml or env {env}."
        )
    return None


def _select(pins: Pins | None, only: Iterable[str] | None) -> dict[str, Service]:
    svcs = services(pins)
    if only is None:
        return svcs
    wanted = set(only)
    unknown = wanted - set(svcs)
    if unknown:
        raise InfraError(f"`only` must name services among {', '.join(svcs)}; got {sorted(unknown)!r}")
    if "connect" in wanted:
        wanted.add("kafka")  # Connect keeps its state in Kafka
    return {name: svc for name, svc in svcs.items() if name in wanted}


def up(pins: Pins | None = None, *, only: Iterable[str] | None = None,
       on_progress: Callable[[str], None] | None = None) -> UpResult:
    """Install what is missing, start what is not running, wait until everything answers.

    Safe to call again at any time: running healthy services are left untouched. Raises InfraError
    (one sentence: cause and fix) after stopping whatever this call had started. ``only`` limits
    the call to some services (Connect brings Kafka)."""
    with _exclusive(on_progress):
        return _up(pins, only, on_progress)


@contextlib.contextmanager
def _exclusive(on_progress: Callable[[str], None] | None) -> Iterator[None]:
    """One `up`/`down` at a time per state folder: helpers and CI jobs share one stack."""
    folder = paths.state_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".infra.lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            (on_progress or log.info)("another `branchline infra up/down` is running; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _up(pins: Pins | None, only: Iterable[str] | None, on_progress: Callable[[str], None] | None) -> UpResult:
    began = time.monotonic()
    say = on_progress or log.info
    pins = pins or load_pins()
    svcs = _select(pins, only)
    todo: list[Service] = []
    running: list[str] = []
    for svc in svcs.values():
        pid = svc.pid()
        if pid is not None:
            if svc.probe().ok:
                running.append(svc.name)
                continue
            # ours but silent: give a server that is still starting (or recovering) a moment
            try:
                svc.wait_healthy(timeout=15)
                running.append(svc.name)
                continue
            except InfraError:
                say(f"{svc.name}: pid {pid} does not answer; restarting it")
                svc.stop()
        svc.clean_pid_file()
        todo.append(svc)
    if not todo:
        say("all services already up")
        return UpResult([], running, False, time.monotonic() - began)

    # every port must be free before anything starts: fail early, leave nothing behind
    for svc in todo:
        conflict = _port_conflict(svc)
        if conflict:
            raise conflict

    db_todo = [s for s in todo if s.name in ("erp", "crm", "cloud")]
    jvm_todo = [s for s in todo if s.name in ("kafka", "connect")]

    _, packages = _install.find_tools(pins)
    jvm_packages = [p for p in packages if p in ("openjdk-17-jre-headless", "maven")]
    db_packages = [p for p in packages if p not in jvm_packages] if db_todo else []
    if jvm_todo and jvm_packages:
        # Maven needs Java: install everything missing in one apt run before the lanes start
        _install.apt_install(jvm_packages + db_packages)
        db_packages = []

    started: list[Service] = []
    lock = threading.Lock()
    downloaded = False

    cancel = threading.Event()

    def start(svc: Service, tools: _install.Tools) -> None:
        if cancel.is_set():
            raise Cancelled(svc.name)
        t0 = time.monotonic()
        svc.prepare(tools)
        say(f"{svc.name}: starting {svc.kind} on {svc.address}")
        with lock:
            if cancel.is_set():  # another service failed while this one was being prepared
                raise Cancelled(svc.name)
            svc.launch(tools)
            started.append(svc)
        health = svc.wait_healthy(cancel=cancel)
        svc.bootstrap()
        say(f"{svc.name}: up in {time.monotonic() - t0:.1f} s ({health.detail})")

    def db_lane() -> None:
        if not db_todo:
            return
        _install.apt_install(db_packages)
        tools = _install.ensure_tools(pins)
        with ThreadPoolExecutor(len(db_todo)) as pool:
            futures = [pool.submit(guarded, start, svc, tools) for svc in db_todo]
        for future in futures:
            future.result()

    def jvm_lane() -> None:
        nonlocal downloaded
        if not jvm_todo:
            return
        tools = _install.ensure_tools(pins, install_databases=False)
        t0 = time.monotonic()
        downloaded = _install.resolve_jars(pins, tools, cancel=cancel)
        if downloaded:
            say(f"maven: Kafka and Debezium jars fetched in {time.monotonic() - t0:.1f} s")
        for svc in jvm_todo:
            start(svc, tools)

    errors: list[BaseException] = []

    def guarded(step: Callable[..., None], *args: object) -> None:
        """Run one step; on failure remember the error and tell the other steps to give up."""
        try:
            step(*args)
        except Cancelled:
            pass
        except BaseException as exc:  # noqa: BLE001 - re-raised by `up` after cleanup
            with lock:
                errors.append(exc)
            cancel.set()

    try:
        with ThreadPoolExecutor(2) as lanes:
            lanes.submit(guarded, db_lane)
            lanes.submit(guarded, jvm_lane)
        if errors:
            raise errors[0]
    except BaseException:
        with lock:
            cancel.set()  # after this, no step launches anything more
        _stop_started(started, say)
        raise
    seconds = time.monotonic() - began
    say(f"stack up in {seconds:.1f} s (started: {', '.join(s.name for s in started) or 'nothing'})")
    return UpResult([s.name for s in started], running, downloaded, seconds)


def _stop_started(started: list[Service], say: Callable[[str], None]) -> None:
    for svc in reversed(started):
        try:
            say(f"{svc.name}: stopping (this `up` failed)")
            svc.stop()
        except Exception as exc:  # noqa: BLE001 - best effort while reporting the first error
            log.warning("%s: could not stop: %s", svc.name, exc)


def down(pins: Pins | None = None, *, only: Iterable[str] | None = None,
         on_progress: Callable[[str], None] | None = None) -> list[str]:
    """Stop every service of ours by pid, Connect first, databases last. Returns the names stopped."""
    with _exclusive(on_progress):
        return _down(pins, only, on_progress)


def _down(pins: Pins | None, only: Iterable[str] | None, on_progress: Callable[[str], None] | None) -> list[str]:
    say = on_progress or log.info
    stopped = []
    failed = []
    selected = services(pins) if only is None else {n: s for n, s in services(pins).items() if n in set(only)}
    for svc in reversed(list(selected.values())):
        pid = svc.pid()
        if pid is None:
            svc.clean_pid_file()
            continue
        say(f"{svc.name}: stopping pid {pid}")
        if svc.stop():
            stopped.append(svc.name)
        else:
            failed.append(f"{svc.name} (pid {pid})")
    if failed:
        raise InfraError(f"Could not stop {', '.join(failed)}; kill them by hand (kill -9 <pid>).")
    return stopped


def status_dict(statuses: list[ServiceStatus]) -> dict[str, object]:
    """`status --json`: services and Connect's plugins."""
    rows = []
    for s in statuses:
        row = asdict(s)
        row.pop("facts")
        rows.append(row)
    return {
        "services": rows,
        "connector_plugins": connector_plugins(statuses),
        "healthy": all(s.healthy for s in statuses),
        "debezium_plugins_expected": list(DEBEZIUM_PLUGINS),
    }
