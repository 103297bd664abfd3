"""`branchline infra up` turns each failure a user can act on into one sentence: cause, then fix.
These feed the classifiers the output apt and Maven really print in each case."""

from __future__ import annotations

import base64
import uuid
from pathlib import Path

import pytest
from branchline.errors import InfraError
from branchline.infra import _install
from branchline.infra._pins import load_pins


def test_not_enough_disk_names_free_space_and_fix(tmp_path):
    with pytest.raises(InfraError) as caught:
        _install.check_disk(tmp_path / "not" / "yet", 10**18, "Kafka and the Debezium plugins")
    message = str(caught.value)
    assert message.startswith("Not enough disk for Kafka and the Debezium plugins:")
    assert "BRANCHLINE_CACHE" in message and "run `branchline infra up` again" in message


@pytest.mark.parametrize(("output", "start"), [
    (("Err:1 http://deb.debian.org/debian bookworm InRelease\n  Temporary failure resolving 'deb.debian.org'\n"
     "E: Unable to locate package mariadb-server\n"), "apt could not reach its package mirrors"),
    ("E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 4242 (apt-get)\n",
     "apt is busy or interrupted"),
    ("E: Unable to locate package postgresql-15\n", "apt does not know a package the stack needs"),
    ("sudo: a password is required\n", "Installing mariadb-server postgresql-15 needs root"),
])
def test_apt_failures_are_one_sentence(output, start):
    message = str(_install.apt_error(output, ["mariadb-server", "postgresql-15"]))
    assert message.startswith(start)
    assert "\n" not in message


@pytest.mark.parametrize(("output", "start"), [
    (("[ERROR] Failed to execute goal ...: Could not find artifact io.debezium:debezium-connector-mariadb:tar.gz:"
     "plugin:3.6.1.Final in central (https://repo.maven.apache.org/maven2)"), "Maven Central has no `io.debezium"),
    (("[ERROR] Plugin org.apache.maven.plugins:maven-dependency-plugin:3.8.1 or one of its dependencies could not be "
     "resolved: Could not transfer artifact org.apache.maven.plugins:maven-dependency-plugin:pom:3.8.1 from/to "
     "central (https://repo.maven.apache.org/maven2): repo.maven.apache.org: Temporary failure in name resolution"),
     "Maven Central is unreachable (Could not transfer artifact"),
    (("[ERROR] Could not transfer artifact org.apache.kafka:kafka_2.13:jar:4.1.1 from/to central: "
     "Checksum validation failed, expected 1a but is 2b"), "A download from Maven Central is corrupt"),
    ("[ERROR] Failed to execute goal: java.io.IOException: No space left on device", "Maven ran out of disk space"),
])
def test_maven_failures_are_one_sentence(output, start):
    message = str(_install._maven_error(output, Path("/cache")))
    assert message.startswith(start)


def test_port_override_from_env_wins_over_stack_toml(monkeypatch):
    monkeypatch.setenv("BRANCHLINE_KAFKA_PORT", "29999")
    assert load_pins().ports["kafka"] == 29999


def test_port_override_must_be_a_port(monkeypatch):
    monkeypatch.setenv("BRANCHLINE_ERP_PORT", "80")
    with pytest.raises(InfraError, match=r"`ports.erp` must be between 1024 and 65535; got 80"):
        load_pins()


def test_kafka_cluster_id_never_starts_with_a_dash(monkeypatch):
    """kafka-storage reads `--cluster-id -abc...` as a missing argument (a CI run failed on it)."""
    from branchline.infra import _services
    dash_first = uuid.UUID(bytes=b"\xf8" + bytes(15))  # base64 "-A..."
    draws = iter([dash_first, dash_first, uuid.UUID(int=1)])
    monkeypatch.setattr(_services.uuid, "uuid4", lambda: next(draws))
    cluster_id = _services.new_cluster_id()
    assert cluster_id == "AAAAAAAAAAAAAAAAAAAAAQ"
    assert base64.urlsafe_b64encode(dash_first.bytes).decode().startswith("-")
