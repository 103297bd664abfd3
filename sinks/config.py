"""The `sinks:` section of the pipeline file: one frozen model per sink kind.

`SinkConfig` is a union discriminated by ``kind``, so a typo in ``kind`` or in any field fails at
load time with the field path. Secrets are `SecretStr`: they never show in reprs, logs or errors.
The pipeline-file model (`branchline.config`) composes `SinkConfig`; `branchline.sinks.build` turns
one into a running sink.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class PostgresSinkConfig(_Frozen):
    """A PostgreSQL target (RDS, Cloud SQL, Azure, Neon, a plain server)."""

    kind: Literal["postgres"] = "postgres"
    dsn: SecretStr | None = None
    """A libpq connection string or URI; when set, host/port/user/password/database are ignored."""
    host: str = "127.0.0.1"
    port: int = Field(default=5432, ge=1, le=65535)
    user: str = "postgres"
    password: SecretStr | None = None
    """Leave empty to use PGPASSWORD or ~/.pgpass."""
    database: str = "postgres"
    schema_: str = Field(default="{source}", alias="schema")
    """Target schema; placeholders `{source}`, `{branch}`, `{database}`, `{schema}` (the source's)."""
    sslmode: SslMode = "prefer"
    """libpq sslmode; use `verify-full` with `sslrootcert` for a cloud server."""
    sslrootcert: Path | None = None
    """CA file that signed the server certificate."""
    soft_delete: bool = False
    """Keep deleted rows with `_bl_deleted = true` instead of deleting them."""
    branch_key: bool = False
    """Fan-in: the target key becomes (`_bl_branch`, source key), so branches never collide."""
    fillfactor: int = Field(default=85, ge=10, le=100)
    """Fill factor of the target tables the sink creates: pages are filled to this percent by inserts,
    so that an update can put the new row version on the same page (a HOT update: no index entry, less
    WAL, and the page's dead versions are pruned without VACUUM). Lower suits tables whose rows are
    updated often; 100 packs insert-only tables (on the bench's table, four passes updating every row:
    HOT 0% at 100, 18% rising to 49% at 85, 45% rising to 86% at 70, where the table ends smaller than at
    100 because pruned pages are reused). Applied at CREATE TABLE only: existing tables keep
    theirs (``ALTER TABLE .. SET (fillfactor = N)`` applies it to pages filled from then on). HOT also
    needs every changed column to be unindexed: an index on a bookkeeping column such as
    ``_bl_synced_at`` turns every update into a non-HOT one."""
    tombstone_retention_h: float | None = Field(default=168.0, gt=0)
    """Hard-delete mode: a deleted key's tombstone (which stops a replayed older change from bringing
    the row back) is pruned once it was written this many hours ago; None keeps tombstones forever.
    Keep it above how far back any replay can reach: the Kafka topics' retention, the binlog/WAL a
    connector may re-read after a reset, the local spool."""
    tombstone_prune_interval_s: float = Field(default=3600.0, ge=0)
    """How often this sink prunes each table's old tombstones (after a batch of that table, never
    inside it); 0 = after every batch."""
    pool_min_size: int = Field(default=1, ge=0)
    pool_max_size: int = Field(default=4, ge=1)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    application_name: str = "branchline"
    max_attempts: int = Field(default=5, ge=1)
    """Attempts per batch on retryable errors (connection lost, deadlock, server shutting down)."""
    retry_backoff_s: float = Field(default=0.5, ge=0)
    """First wait between attempts; doubles each time up to `retry_max_backoff_s`."""
    retry_max_backoff_s: float = Field(default=30.0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> PostgresSinkConfig:
        problems = []
        if self.pool_min_size > self.pool_max_size:
            problems.append(
                f"`pool_min_size` must be <= `pool_max_size`; got {self.pool_min_size!r} > {self.pool_max_size!r}"
            )
        if self.sslmode in ("verify-ca", "verify-full") and self.sslrootcert is None and self.dsn is None:
            problems.append(f"`sslrootcert` must be set when `sslmode` is {self.sslmode!r}; got None")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class S3Storage(_Frozen):
    """S3-compatible object storage. Unset fields fall back to the AWS_* environment variables."""

    endpoint_url: str | None = None
    """e.g. `http://127.0.0.1:9000` for a local server; None for AWS itself."""
    region: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    allow_http: bool = False
    """Needed for a plain-http endpoint (local test servers)."""
    virtual_hosted_style: bool = False
    """False = path-style requests (`endpoint/bucket/key`), which local servers expect."""
    allow_unsafe_rename: bool = True
    """Single writer per table (Branchline's model): commit without a lock provider."""
    max_retries: int = Field(default=3, ge=0)
    """Retries of one HTTP request inside delta-rs; the sink's own retries come on top."""
    retry_timeout_s: int = Field(default=30, ge=1)
    """Give up one request's retries after this long, so an outage surfaces as a retryable error."""
    connect_timeout_s: int = Field(default=5, ge=1)
    request_timeout_s: int = Field(default=60, ge=1)

    def storage_options(self) -> dict[str, str]:
        """Options for delta-rs (object_store keys); secrets revealed only here."""
        options: dict[str, str] = {}
        if self.endpoint_url:
            options["AWS_ENDPOINT_URL"] = self.endpoint_url
        if self.region:
            options["AWS_REGION"] = self.region
        if self.access_key_id:
            options["AWS_ACCESS_KEY_ID"] = self.access_key_id.get_secret_value()
        if self.secret_access_key:
            options["AWS_SECRET_ACCESS_KEY"] = self.secret_access_key.get_secret_value()
        if self.session_token:
            options["AWS_SESSION_TOKEN"] = self.session_token.get_secret_value()
        if self.allow_http:
            options["AWS_ALLOW_HTTP"] = "true"
        options["AWS_VIRTUAL_HOSTED_STYLE_REQUEST"] = "true" if self.virtual_hosted_style else "false"
        if self.allow_unsafe_rename:
            options["AWS_S3_ALLOW_UNSAFE_RENAME"] = "true"
        options["max_retries"] = str(self.max_retries)
        options["retry_timeout"] = f"{self.retry_timeout_s}s"
        options["connect_timeout"] = f"{self.connect_timeout_s}s"
        options["timeout"] = f"{self.request_timeout_s}s"
        return options


class DeltaSinkConfig(_Frozen):
    """Delta Lake tables on a local path or on S3-compatible object storage (delta-rs)."""

    kind: Literal["delta"] = "delta"
    uri: str
    """Root of the lake: a local path or `s3://bucket/prefix`."""
    table_path: str = "{source}/{table}"
    """Each table's path under `uri`; placeholders `{source}`, `{branch}`, `{database}`, `{schema}`, `{table}`."""
    s3: S3Storage = S3Storage()
    commit_interval_s: float = Field(default=60.0, ge=0)
    """Buffer changes and commit at most this often (each commit costs seconds on object storage)."""
    max_buffered_rows: int = Field(default=200_000, ge=1)
    """Commit earlier when this many changes wait in memory."""
    partition_by: tuple[str, ...] = ()
    """Source columns to partition new tables by (also `_bl_branch`)."""
    soft_delete: bool = False
    """Keep deleted rows with `_bl_deleted = true` instead of deleting them."""
    branch_key: bool = False
    """Fan-in: the target key becomes (`_bl_branch`, source key)."""
    max_attempts: int = Field(default=5, ge=1)
    retry_backoff_s: float = Field(default=1.0, ge=0)
    retry_max_backoff_s: float = Field(default=30.0, ge=0)


SinkConfig = Annotated[PostgresSinkConfig | DeltaSinkConfig, Field(discriminator="kind")]
"""One entry of the pipeline file's `sinks:` section."""
