"""Installs what the local stack needs and is missing: Debian packages through apt, Kafka's jars and
the Debezium plugin archives through Maven (into the git-ignored cache). Every failure becomes one
InfraError sentence naming the cause and the fix."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from branchline import paths
from branchline.errors import InfraError
from branchline.infra._pins import Pins

log = logging.getLogger("branchline.infra")


class Cancelled(Exception):
    """Raised inside `up` when another service failed and this step should give up."""

POM = Path(__file__).resolve().parent / "pom.xml"
GIB = 1024**3
#: free space needed before downloading (the cache holds ~300 MB) and before creating server data
MIN_FREE_CACHE = 1 * GIB
MIN_FREE_STATE = 1 * GIB

_NETWORK = re.compile(
    r"UnknownHost|Temporary failure (in name )?resolv|Could not resolve|Connection refused|Connection timed out|"
    r"connect timed out|Network is unreachable|No route to host|Could not connect|Failed to fetch|"
    r"Could not transfer artifact|Read timed out|SSLException|handshake",
    re.IGNORECASE,
)


def check_disk(folder: Path, needed: int, what: str) -> None:
    """Refuse to start writing when the file system holding ``folder`` is nearly full."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise InfraError(
            f"Not enough disk for {what}: {free / GIB:.1f} GiB free under {probe}, "
            f"need {needed / GIB:.1f} GiB; free some space (or point BRANCHLINE_CACHE / BRANCHLINE_STATE "
            f"at a larger disk) and run `branchline infra up` again."
        )


# --- Debian packages -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tools:
    """Where the installed server binaries are."""

    mariadbd: Path
    mariadb_install_db: Path
    pg_bin: Path
    java: Path
    mvn: Path
    promtool: Path


def _which(name: str, *extra_dirs: str) -> Path | None:
    found = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *extra_dirs]))
    return Path(found) if found else None


def _java_17_or_newer() -> Path | None:
    """A `java` of version 17 or newer: JAVA_HOME, then PATH, then /usr/lib/jvm."""
    candidates: list[Path] = []
    if os.environ.get("JAVA_HOME"):
        candidates.append(Path(os.environ["JAVA_HOME"]) / "bin" / "java")
    on_path = _which("java")
    if on_path:
        candidates.append(on_path)
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/jvm/*/bin/java"), reverse=True)]
    for java in candidates:
        if not java.exists():
            continue
        try:
            out = subprocess.run([str(java), "-version"], check=False, capture_output=True, text=True, timeout=30).stderr
        except (OSError, subprocess.TimeoutExpired):
            continue
        match = re.search(r'version "(\d+)', out)
        if match and int(match.group(1)) >= 17:
            return java
    return None


def find_tools(pins: Pins) -> tuple[dict[str, Path | None], list[str]]:
    """Locate each tool; return what was found and the apt packages that would supply the missing."""
    pg_bin = Path(f"/usr/lib/postgresql/{pins.versions['postgres']}/bin")
    found: dict[str, Path | None] = {
        "mariadbd": _which("mariadbd", "/usr/sbin"),
        "mariadb_install_db": _which("mariadb-install-db", "/usr/bin", "/usr/sbin"),
        "pg_bin": pg_bin if (pg_bin / "initdb").exists() and (pg_bin / "pg_ctl").exists() else None,
        "java": _java_17_or_newer(),
        "mvn": _which("mvn"),
        # Prometheus and promtool: the alert rules are checked with promtool, and the monitoring
        # tests start a real Prometheus (never as the Debian service).
        "promtool": _which("promtool"),
    }
    packages: list[str] = []
    if not found["mariadbd"] or not found["mariadb_install_db"]:
        packages.append("mariadb-server")
    if not found["pg_bin"]:
        packages.append(f"postgresql-{pins.versions['postgres']}")
    if not found["java"]:
        packages.append("openjdk-17-jre-headless")
    if not found["mvn"]:
        packages.append("maven")
    if not found["promtool"]:
        packages.append("prometheus")
    return found, packages


def apt_install(packages: list[str]) -> None:
    """`apt-get update` once, then install ``packages`` non-interactively (as root, or through sudo)."""
    if not packages:
        return
    command = " ".join(packages)
    if not shutil.which("apt-get"):
        raise InfraError(
            f"These tools are missing and this machine has no apt-get: {command}; "
            f"install them with your package manager and run `branchline infra up` again."
        )
    prefix: list[str] = []
    if os.geteuid() != 0:
        if not shutil.which("sudo"):
            raise InfraError(
                f"Installing {command} needs root; run `sudo apt-get install -y {command}` "
                f"(or `branchline infra up` as root)."
            )
        prefix = ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log.info("apt: installing %s", command)
    update = subprocess.run([*prefix, "apt-get", "update", "-q"], check=False, capture_output=True, text=True, env=env)
    install = subprocess.run([*prefix, "apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
                             check=False, capture_output=True, text=True, env=env)
    if install.returncode != 0:
        # a failed `update` (unreachable mirror) only matters when the install fails too
        raise apt_error(update.stdout + update.stderr + install.stdout + install.stderr, packages)


def apt_error(output: str, packages: list[str]) -> InfraError:
    """One sentence for a failed `apt-get install`: busy, unreachable, full disk, or unknown package."""
    command = " ".join(packages)
    lines = [ln for ln in output.strip().splitlines() if ln.startswith(("E:", "W:", "Err:"))]
    last = (lines or output.strip().splitlines() or ["no output"])[-1][:300]
    if "password is required" in output:
        return InfraError(f"Installing {command} needs root; run `sudo apt-get install -y {command}` yourself "
                          f"and then `branchline infra up` again.")
    if "Could not get lock" in output or "dpkg was interrupted" in output:
        return InfraError(
            f"apt is busy or interrupted ({last}); wait for the other apt/dpkg process to finish "
            f"(or run `dpkg --configure -a`) and run `branchline infra up` again."
        )
    if "No space left" in output:
        return InfraError(f"apt ran out of disk space ({last}); free some space and run `branchline infra up` again.")
    if _NETWORK.search(output):
        return InfraError(
            f"apt could not reach its package mirrors ({last}); check the network or proxy "
            f"(/etc/apt/sources.list*) and run `branchline infra up` again, "
            f"or install by hand: apt-get install -y {command}."
        )
    if "Unable to locate package" in output or "has no installation candidate" in output:
        return InfraError(
            f"apt does not know a package the stack needs ({last}); this needs Debian 12 or a similar "
            f"release with {command}; install them by hand and run `branchline infra up` again."
        )
    return InfraError(f"`apt-get install {command}` failed ({last}); fix what it names, or install by hand.")


def ensure_tools(pins: Pins, *, install_databases: bool = True) -> Tools:
    """Install the missing apt packages and return where every tool lives."""
    found, packages = find_tools(pins)
    if not install_databases:
        packages = [p for p in packages if p in ("openjdk-17-jre-headless", "maven")]
    apt_install(packages)
    if packages:
        found, still = find_tools(pins)
        if still:
            raise InfraError(
                f"apt installed {' '.join(packages)} but these are still missing: {' '.join(still)}; "
                f"install them by hand and run `branchline infra up` again."
            )
    return Tools(**{k: v for k, v in found.items()})  # type: ignore[arg-type]


# --- Maven Central -----------------------------------------------------------------------------------


def kafka_libs(pins: Pins) -> Path:
    """The broker + Connect classpath folder for the pinned Kafka version."""
    return paths.cache_dir() / f"kafka-{pins.versions['kafka']}" / "libs"


def plugins_dir() -> Path:
    """Connect's plugin.path: one unpacked Debezium plugin per subfolder."""
    return paths.cache_dir() / "plugins"


def _wanted(pins: Pins) -> dict[str, str]:
    keys = ("kafka", "scala", "debezium", "debezium_mariadb", "log4j", "maven_dependency_plugin")
    return {k: pins.versions[k] for k in keys} | {"pom": hashlib.sha256(POM.read_bytes()).hexdigest()}


def resolve_jars(pins: Pins, tools: Tools, cancel: threading.Event | None = None) -> bool:
    """Fetch Kafka's jars and unpack the Debezium plugins unless the cache already holds the pinned
    versions. Returns True when something was downloaded."""
    cache = paths.cache_dir()
    stamp = cache / "jars.json"
    libs, plugins = kafka_libs(pins), plugins_dir()
    wanted = _wanted(pins)
    try:
        if json.loads(stamp.read_text()) == wanted and libs.is_dir() and plugins.is_dir():
            return False
    except (OSError, ValueError):
        pass
    check_disk(cache, MIN_FREE_CACHE, "Kafka and the Debezium plugins")
    # a half-finished or outdated copy must not mix with the new one
    for folder in (libs, plugins):
        shutil.rmtree(folder, ignore_errors=True)
    stamp.unlink(missing_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    # the plugin spelled out (not the `dependency:` prefix) so that an offline Maven names what it failed
    plugin = f"org.apache.maven.plugins:maven-dependency-plugin:{pins.versions['maven_dependency_plugin']}"
    command = [
        str(tools.mvn), "-B", "-q", "-f", str(POM),
        f"-Dmaven.repo.local={cache / 'm2'}",
        f"-Dkafka.version={pins.versions['kafka']}",
        f"-Dscala.version={pins.versions['scala']}",
        f"-Ddebezium.version={pins.versions['debezium']}",
        f"-Ddebezium.mariadb.version={pins.versions['debezium_mariadb']}",
        f"-Dlog4j.version={pins.versions['log4j']}",
        f"-Ddependency.plugin.version={pins.versions['maven_dependency_plugin']}",
        f"-Dlibs.dir={libs}", f"-Dplugins.dir={plugins}", f"-Dbuild.dir={cache / 'maven-build'}",
        f"{plugin}:copy-dependencies@kafka-libs", f"{plugin}:unpack@debezium-plugins",
    ]
    env = {**os.environ, "JAVA_HOME": str(tools.java.resolve().parent.parent)}
    log.info("maven: fetching Kafka %s and Debezium %s / MariaDB %s into %s", pins.versions["kafka"],
             pins.versions["debezium"], pins.versions["debezium_mariadb"], cache)
    with tempfile.TemporaryFile("w+") as output:
        proc = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, text=True, env=env)
        while proc.poll() is None:
            if cancel is not None and cancel.wait(0.3):
                proc.kill()
                proc.wait()
                for folder in (libs, plugins):
                    shutil.rmtree(folder, ignore_errors=True)
                raise Cancelled("maven")
        output.seek(0)
        text = output.read()
    if proc.returncode != 0:
        for folder in (libs, plugins):
            shutil.rmtree(folder, ignore_errors=True)
        raise _maven_error(text, cache)
    stamp.write_text(json.dumps(wanted))
    return True


def _maven_error(output: str, cache: Path) -> InfraError:
    output = re.sub(r"\x1b\[[0-9;]*m", "", output)
    errors = [line for line in output.splitlines() if "[ERROR]" in line] or output.strip().splitlines()[-3:]
    first = errors[0].replace("[ERROR]", "").strip() if errors else "no output"
    transfer = first.find("Could not transfer artifact")
    first = first[max(0, transfer):][:400]
    if "No space left" in output:
        return InfraError(f"Maven ran out of disk space ({first}); free some space under {cache} and retry.")
    missing = re.search(r"Could not find artifact (\S+)", output)
    if missing:
        return InfraError(
            f"Maven Central has no `{missing.group(1)}`; pin a version that exists in infra/stack.toml "
            f"[versions] and run `branchline infra up` again."
        )
    if re.search(r"Checksum validation failed|invalid LOC header|zip END header|Not in GZIP format|"
                 r"Error (while )?unpack", output, re.IGNORECASE):
        return InfraError(
            f"A download from Maven Central is corrupt ({first}); delete {cache / 'm2'} "
            f"and run `branchline infra up` again."
        )
    if _NETWORK.search(output):
        return InfraError(
            f"Maven Central is unreachable ({first}); check the network or a proxy in ~/.m2/settings.xml "
            f"and run `branchline infra up` again."
        )
    return InfraError(f"Maven failed to fetch Kafka and the Debezium plugins ({first}); fix that and retry.")
