"""Sink config models: the `kind` discriminator, typos rejected, secrets hidden, TLS options passed on."""

from __future__ import annotations

import pytest
from branchline.sinks.config import DeltaSinkConfig, PostgresSinkConfig, S3Storage, SinkConfig
from branchline.sinks.postgres.sink import conninfo
from pydantic import TypeAdapter, ValidationError

ADAPTER: TypeAdapter = TypeAdapter(SinkConfig)


def test_kind_selects_the_model() -> None:
    assert isinstance(ADAPTER.validate_python({"kind": "postgres", "schema": "erp"}), PostgresSinkConfig)
    assert isinstance(ADAPTER.validate_python({"kind": "delta", "uri": "/tmp/lake"}), DeltaSinkConfig)


def test_unknown_field_and_unknown_kind_are_rejected() -> None:
    with pytest.raises(ValidationError, match="extra_forbidden|Extra inputs"):
        ADAPTER.validate_python({"kind": "postgres", "sslmod": "require"})
    with pytest.raises(ValidationError):
        ADAPTER.validate_python({"kind": "bigquery"})


def test_secrets_never_show_in_repr() -> None:
    config = PostgresSinkConfig(password="hunter2", dsn="postgresql://u:pw2@h/db")
    delta = DeltaSinkConfig(uri="s3://b/p", s3=S3Storage(access_key_id="AKIA1", secret_access_key="s3cret"))
    text = repr(config) + str(config) + repr(delta)
    assert "hunter2" not in text and "pw2" not in text and "s3cret" not in text and "AKIA1" not in text


def test_verify_full_needs_a_ca_file() -> None:
    with pytest.raises(ValidationError, match="sslrootcert"):
        PostgresSinkConfig(sslmode="verify-full")
    config = PostgresSinkConfig(sslmode="verify-full", sslrootcert="/etc/ssl/rds-ca.pem", password="pw")
    info = conninfo(config)
    assert (
        "sslmode=verify-full" in info and "sslrootcert=/etc/ssl/rds-ca.pem" in info and "password=pw" in info
    )


def test_dsn_keeps_its_own_sslmode_unless_the_file_sets_one() -> None:
    assert "sslmode=prefer" not in conninfo(PostgresSinkConfig(dsn="host=db sslmode=verify-full"))
    assert "sslmode=require" in conninfo(PostgresSinkConfig(dsn="host=db", sslmode="require"))


def test_pool_sizes_must_be_ordered() -> None:
    with pytest.raises(ValidationError, match="pool_min_size"):
        PostgresSinkConfig(pool_min_size=5, pool_max_size=2)


def test_s3_storage_options_fall_back_to_the_environment_when_unset() -> None:
    assert S3Storage().storage_options() == {
        "AWS_VIRTUAL_HOSTED_STYLE_REQUEST": "false",
        "AWS_S3_ALLOW_UNSAFE_RENAME": "true",
        "max_retries": "3",
        "retry_timeout": "30s",
        "connect_timeout": "5s",
        "timeout": "60s",
    }
    options = S3Storage(
        endpoint_url="http://127.0.0.1:9",
        region="eu-west-1",
        access_key_id="a",
        secret_access_key="b",
        allow_http=True,
    ).storage_options()
    assert options["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9" and options["AWS_SECRET_ACCESS_KEY"] == "b"
    assert options["AWS_ALLOW_HTTP"] == "true"


def test_delta_defaults_commit_every_minute() -> None:
    assert DeltaSinkConfig(uri="/tmp/x").commit_interval_s == 60


def test_tombstone_retention_defaults_to_a_week_may_be_off_and_must_be_positive() -> None:
    config = PostgresSinkConfig()
    assert config.tombstone_retention_h == 168 and config.tombstone_prune_interval_s == 3600
    assert PostgresSinkConfig(tombstone_retention_h=None).tombstone_retention_h is None
    with pytest.raises(ValidationError, match="tombstone_retention_h"):
        PostgresSinkConfig(tombstone_retention_h=0)
    with pytest.raises(ValidationError, match="tombstone_prune_interval_s"):
        PostgresSinkConfig(tombstone_prune_interval_s=-1)


def test_fillfactor_defaults_to_85_and_must_be_a_postgresql_fill_factor() -> None:
    assert PostgresSinkConfig().fillfactor == 85
    assert ADAPTER.validate_python({"kind": "postgres", "fillfactor": 100}).fillfactor == 100
    for wrong in (9, 101, "full"):
        with pytest.raises(ValidationError, match="fillfactor"):
            ADAPTER.validate_python({"kind": "postgres", "fillfactor": wrong})
