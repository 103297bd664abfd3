"""The pipeline file: one YAML file that names the sources, Kafka, Kafka Connect, the sinks and the
per-table transforms, for both runtimes.

`load_pipeline` is the only way in. It reads the YAML (duplicate keys are errors), substitutes
``${ENV}`` / ``${ENV:-default}`` in string values (``$${`` is a literal ``${``), validates the whole
tree with pydantic and raises one `ConfigError` that lists *every* problem as
``<file>: <field.path>: <message>``. Values that came from the environment, and every secret field,
are never echoed back.

Sections owned by other stages are composed here, not redefined: ``sinks:`` is
`branchline.sinks.config.SinkConfig`, ``tables:`` `branchline.streams.config.TableTransforms`,
``worker:`` `branchline.streams.config.WorkerSettings`, ``runtime:``
`branchline.runtime.config.RuntimeConfig`, ``metrics:`` `branchline.metrics_config.MetricsConfig`.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeAlias

import yaml
from branchline.errors import ConfigError
from branchline.metrics_config import MetricsConfig
from branchline.runtime.config import RuntimeConfig
from branchline.sinks.config import SinkConfig
from branchline.streams.config import TableTransforms, WorkerSettings
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

IDENTIFIER = r"^[a-z][a-z0-9_]{0,30}$"
"""Source and branch names: lower-case, short, safe in topic, slot, connector and schema names."""

SnapshotMode = Literal["initial", "initial_only", "no_data", "when_needed", "always"]
"""Debezium ``snapshot.mode``: ``initial`` snapshots once then streams; ``no_data`` streams only."""

CONTROL_NAMESPACE = "branchline"
"""Database (MariaDB/MySQL) or schema (PostgreSQL) holding Branchline's signal and heartbeat tables."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ---------------------------------------------------------------------------------------------- sources

_TABLE_NAME = re.compile(r"^[A-Za-z0-9_$*]+\.[A-Za-z0-9_$*]+$")


class _SourceBase(_Model):
    name: Annotated[str, Field(pattern=IDENTIFIER)]
    """The source's name in this file; part of topic and connector names (e.g. `erp`)."""
    branch: Annotated[str, Field(pattern=IDENTIFIER)]
    """The branch (site) this source runs at; defaults to the file's top-level `branch`."""
    host: str = "127.0.0.1"
    """The database server's address as the Kafka Connect workers (or `branchline run`) reach it."""
    user: str
    """The replication user (see `branchline preflight --print-setup-sql`)."""
    password: SecretStr = SecretStr("")
    """Use `${ENV_VAR}`; never write a real password into the file."""
    include: tuple[str, ...] = ()
    """Tables to capture as `database.table` (MariaDB/MySQL) or `schema.table` (PostgreSQL);
    `*` matches any name part. Empty = every table of the listed databases/schemas."""
    exclude: tuple[str, ...] = ()
    """Tables to leave out; same form as `include`. Debezium accepts only one of the two lists."""
    snapshot_mode: SnapshotMode = "initial"
    """Debezium `snapshot.mode`: `initial` copies existing rows once, then streams."""
    heartbeat_interval_ms: int = Field(10_000, ge=1_000)
    """How often the connector emits a heartbeat and runs the heartbeat query (lag; slot advance on PostgreSQL)."""
    min_log_retention_hours: int = Field(72, ge=1)
    """Preflight fails when binlogs are kept for less: an outage longer than the retention needs a re-snapshot."""
    signal_table: Annotated[str, Field(pattern=r"^[A-Za-z0-9_]+\.[A-Za-z0-9_]+$")] = f"{CONTROL_NAMESPACE}.debezium_signal"
    """Debezium's signal table (`namespace.table`), used for incremental snapshots."""
    heartbeat_table: Annotated[str, Field(pattern=r"^[A-Za-z0-9_]+\.[A-Za-z0-9_]+$")] = (
        f"{CONTROL_NAMESPACE}.debezium_heartbeat")
    """Table the heartbeat query writes every heartbeat: lag stays measurable and, on PostgreSQL, the
    slot advances while the captured tables are idle."""
    debezium: dict[str, str] = {}
    """Extra Debezium/Connect properties, applied last (override Branchline's choices at your own risk)."""

    @field_validator("include", "exclude", mode="after")
    @classmethod
    def _check_table_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            if not _TABLE_NAME.match(entry):
                raise ValueError(f"each table must be written `namespace.table` (letters, digits, _, $, *); got {entry!r}")
        return value

    @model_validator(mode="after")
    def _check_lists(self) -> _SourceBase:
        if self.include and self.exclude:
            raise ValueError("`include` and `exclude` must not both be set (Debezium accepts one); "
                             f"got include={list(self.include)!r} exclude={list(self.exclude)!r}")
        namespaces = set(self.namespaces)
        for entry in (*self.include, *self.exclude):
            namespace = entry.split(".", 1)[0]
            if "*" not in namespace and namespace not in namespaces:
                raise ValueError(f"table `{entry}` must be in one of {sorted(namespaces)!r}; got namespace {namespace!r}")
        return self

    @property
    def namespaces(self) -> tuple[str, ...]:
        """The databases (MariaDB/MySQL) or schemas (PostgreSQL) captured."""
        raise NotImplementedError

    @property
    def topic_prefix(self) -> str:
        """Debezium `topic.prefix`: `<branch>.<source>`; table topics are `<prefix>.<namespace>.<table>`."""
        return f"{self.branch}.{self.name}"

    @property
    def connector_name(self) -> str:
        """The connector's name on Kafka Connect."""
        return f"branchline.{self.branch}.{self.name}"

    def table_topic(self, namespace: str, table: str) -> str:
        """The Kafka topic of one captured table."""
        return f"{self.topic_prefix}.{namespace}.{table}"


def _derived_server_id(branch: str, name: str) -> int:
    """A stable server id per (branch, source), far from the small ids DBAs give real servers."""
    return 1_000_000 + zlib.crc32(f"{branch}.{name}".encode()) % 1_000_000_000


class BinlogSourceConfig(_SourceBase):
    """A MariaDB or MySQL source, read from the binlog."""

    kind: Literal["mariadb", "mysql"]
    """`mariadb` uses Debezium's MariaDB connector (the MySQL one fails on MariaDB 10.11)."""
    port: int = Field(3306, ge=1, le=65535)
    databases: tuple[Annotated[str, Field(min_length=1)], ...] = Field(min_length=1)
    """Databases to capture."""
    server_id: int = Field(ge=1, le=4_294_967_295)
    """The connector's replication server id: unique among all replicas of this server.
    Default: derived from branch and source name."""
    gtid: bool = True
    """Preflight expects GTIDs (MariaDB always has them; MySQL needs gtid_mode=ON)."""

    @model_validator(mode="before")
    @classmethod
    def _default_server_id(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("server_id") is None:
            branch, name = data.get("branch"), data.get("name")
            if isinstance(name, str):
                data = {**data, "server_id": _derived_server_id(str(branch), name)}
        return data

    @property
    def namespaces(self) -> tuple[str, ...]:
        return self.databases


class PostgresSourceConfig(_SourceBase):
    """A PostgreSQL source, read through a logical replication slot with pgoutput."""

    kind: Literal["postgres"]
    port: int = Field(5432, ge=1, le=65535)
    database: Annotated[str, Field(min_length=1)]
    """The one database this source captures (a slot belongs to one database)."""
    schemas: tuple[Annotated[str, Field(min_length=1)], ...] = Field(("public",), min_length=1)
    """Schemas to capture."""
    slot: Annotated[str, Field(pattern=r"^[a-z0-9_]{1,63}$")]
    """Replication slot name; default `branchline_<branch>_<source>`."""
    publication: Annotated[str, Field(min_length=1, max_length=63)]
    """Publication name; default `branchline_<branch>_<source>`; limited to the captured tables."""

    @model_validator(mode="before")
    @classmethod
    def _default_names(cls, data: Any) -> Any:
        if isinstance(data, dict):
            branch, name = data.get("branch"), data.get("name")
            if isinstance(name, str):
                derived = f"branchline_{branch}_{name}"
                data = {**data}
                data.setdefault("slot", derived)
                data.setdefault("publication", derived)
                if data["slot"] is None:
                    data["slot"] = derived
                if data["publication"] is None:
                    data["publication"] = derived
        return data

    @property
    def namespaces(self) -> tuple[str, ...]:
        return self.schemas


SourceConfig = Annotated[BinlogSourceConfig | PostgresSourceConfig, Field(discriminator="kind")]
"""One entry of `sources:`; `kind` picks the model."""

AnySource: TypeAlias = BinlogSourceConfig | PostgresSourceConfig
"""A validated source, for type hints."""


# ----------------------------------------------------------------------------------- kafka and connect


class KafkaConfig(_Model):
    """The Kafka cluster of the distributed runtime."""

    bootstrap_servers: str = "127.0.0.1:19092"
    replication_factor: int = Field(1, ge=1)
    """Replication factor of topics the connectors create (3 in production)."""
    partitions: int = Field(1, ge=1)
    """Partitions of each table topic; the message key is the primary key, so a row stays in order."""


class ConnectConfig(_Model):
    """The Kafka Connect cluster that runs the Debezium connectors."""

    url: Annotated[str, Field(pattern=r"^https?://[^\s/]+")] = "http://127.0.0.1:18083"
    timeout_s: float = Field(30.0, gt=0)


# ----------------------------------------------------------------------------------------- the file


class PipelineConfig(_Model):
    """The whole pipeline file."""

    name: Annotated[str, Field(pattern=IDENTIFIER)] = "branchline"
    """The pipeline's name (Faust app id, metrics label)."""
    branch: Annotated[str, Field(pattern=IDENTIFIER)] | None = None
    """Default branch id for sources that do not set their own."""
    sources: tuple[SourceConfig, ...] = Field(min_length=1)
    kafka: KafkaConfig | None = None
    """Needed by the distributed runtime only."""
    connect: ConnectConfig | None = None
    """Needed by `branchline connectors` and `snapshot` only."""
    sinks: dict[Annotated[str, Field(pattern=IDENTIFIER)], SinkConfig] = {}
    """Targets by name."""
    tables: dict[str, TableTransforms] = {}
    """Per-table transforms (`branchline.streams.config.TableTransforms`), keyed by `namespace.table`."""
    worker: WorkerSettings = WorkerSettings()
    """Faust workers of the distributed runtime (`branchline.streams.config.WorkerSettings`)."""
    runtime: RuntimeConfig = RuntimeConfig()
    """The embedded runtime, `branchline run` (`branchline.runtime.config.RuntimeConfig`)."""
    metrics: MetricsConfig = MetricsConfig()
    """The Prometheus endpoint and heartbeats (`branchline.metrics_config.MetricsConfig`)."""

    @model_validator(mode="before")
    @classmethod
    def _inherit_branch(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("sources"), list):
            branch = data.get("branch")
            sources = []
            for source in data["sources"]:
                if isinstance(source, dict) and source.get("branch") is None and branch is not None:
                    source = {**source, "branch": branch}
                sources.append(source)
            data = {**data, "sources": sources}
        return data

    @model_validator(mode="after")
    def _check_unique(self) -> PipelineConfig:
        problems: list[str] = []
        seen: dict[tuple[Any, ...], str] = {}
        for source in self.sources:
            for what, value in (("name", source.name), ("connector", source.connector_name)):
                if (what, value) in seen:
                    problems.append(f"`sources.{source.name}.{what}` must be unique; got {value!r} twice")
                seen[(what, value)] = source.name
            if isinstance(source, BinlogSourceConfig):
                key: tuple[Any, ...] = ("server_id", source.host, source.port, source.server_id)
                if key in seen:
                    problems.append(
                        f"`sources.{source.name}.server_id` must differ from `{seen[key]}`'s; got {source.server_id!r}"
                    )
                seen[key] = source.name
            else:
                for what, value in (("slot", source.slot), ("publication", source.publication)):
                    key = (what, source.host, source.port, source.database, value)
                    if key in seen:
                        problems.append(f"`sources.{source.name}.{what}` must differ from `{seen[key]}`'s; got {value!r}")
                    seen[key] = source.name
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def source(self, name: str) -> AnySource:
        """The source called `name`; a ConfigError naming the known ones otherwise."""
        for source in self.sources:
            if source.name == name:
                return source
        raise ConfigError(f"`source` must be one of {[s.name for s in self.sources]!r}; got {name!r}")


# ------------------------------------------------------------------------------------------ loading

_TAGS = ("mariadb", "mysql", "postgres", "delta")
_SECRET_WORDS = ("password", "secret", "token", "dsn", "key_id", "access_key", "salt")
_ENV = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that rejects a key given twice in one mapping (PyYAML keeps the last silently)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
            )
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _interpolate(value: Any, path: tuple[Any, ...], env: Mapping[str, str], problems: list[tuple[tuple[Any, ...], str]],
                 from_env: set[tuple[Any, ...]]) -> Any:
    """Substitute ``${VAR}`` in every string of the tree; record missing variables and which paths used env."""
    if isinstance(value, dict):
        return {k: _interpolate(v, (*path, k), env, problems, from_env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, (*path, i), env, problems, from_env) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        name, default = match.group(1), match.group(2)
        from_env.add(path)
        if name in env:
            return env[name]
        if default is not None:
            return default
        problems.append((path, f"environment variable `{name}` must be set; got nothing"))
        return ""

    return _ENV.sub(replace, value)


def _source_label(raw: Any, index: int) -> str:
    if isinstance(raw, dict) and isinstance(raw.get("sources"), list) and index < len(raw["sources"]):
        source = raw["sources"][index]
        if isinstance(source, dict) and isinstance(source.get("name"), str):
            return source["name"]
    return str(index)


def _render_path(loc: tuple[Any, ...], raw: Any) -> str:
    """``('sources', 0, 'mariadb', 'port')`` -> ``sources[erp].port`` (union tags dropped)."""
    parts: list[str] = []
    plain = _strip_tags(loc)
    for i, item in enumerate(plain):
        if isinstance(item, int):
            label = _source_label(raw, item) if plain[:i] == ("sources",) else str(item)
            parts.append(f"[{label}]")
        else:
            parts.append(f".{item}" if parts else str(item))
    return "".join(parts) or "(top level)"


def _strip_tags(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Drop the discriminator tags pydantic puts in union locations, giving the path in the YAML."""
    out: list[Any] = []
    for i, item in enumerate(loc):
        after_key = i >= 1 and (isinstance(loc[i - 1], int) or (i == 2 and loc[0] == "sinks"))
        if after_key and item in _TAGS:
            continue
        out.append(item)
    return tuple(out)


def _is_secret(loc: tuple[Any, ...]) -> bool:
    return any(isinstance(p, str) and any(w in p.lower() for w in _SECRET_WORDS) for p in loc)


def _describe(error: Any, raw: Any, from_env: set[tuple[Any, ...]]) -> tuple[tuple[Any, ...], str]:
    """One pydantic error -> (location, message) in the house shape, secrets and env values withheld."""
    loc = tuple(error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        return loc, "is not a known key (check its spelling and indentation)"
    if kind == "missing":
        return loc, "is required"
    if kind == "union_tag_invalid":
        tags = error.get("ctx", {}).get("expected_tags", "")
        return (*loc, "kind"), f"must be one of {tags}; got {error['ctx'].get('tag')!r}"
    if kind == "union_tag_not_found":
        return (*loc, "kind"), "is required (it selects the model)"
    if kind == "too_short":
        least = error["ctx"]["min_length"]
        message = f"must list at least {least} item{'s' if least > 1 else ''}; got {error['ctx']['actual_length']}"
        return loc, message
    if kind == "string_pattern_mismatch" and error["ctx"]["pattern"] == IDENTIFIER:
        message = "must be lower-case letters, digits and `_`, start with a letter, at most 31 long"
        if not _is_secret(loc):
            message += f"; got {error.get('input')!r}"
        return loc, message
    message = error["msg"]
    message = message.removeprefix("Value error, ")
    message = re.sub(r"^Input should be", "must be", message)
    message = re.sub(r"^String should", "must", message)
    value = error.get("input")
    input_path = _strip_tags(loc)
    secret = _is_secret(loc) or any(input_path[: len(p)] == p or p[: len(input_path)] == input_path for p in from_env)
    if not secret and isinstance(value, (str, int, float, bool)) and "; got" not in message:
        message += f"; got {value!r}"
    return loc, message


def load_pipeline(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> PipelineConfig:
    """Read, interpolate and validate a pipeline file; one `ConfigError` lists every problem found."""
    file = Path(path)
    shown = str(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"`pipeline file` must be readable; got {exc.strerror or exc}", source=shown) from exc
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}must be valid YAML: {problem}", source=shown) from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"(top level) must be a mapping of sections; got {type(raw).__name__}", source=shown)

    env_problems: list[tuple[tuple[Any, ...], str]] = []
    from_env: set[tuple[Any, ...]] = set()
    data = _interpolate(raw, (), os.environ if env is None else env, env_problems, from_env)

    found: list[tuple[tuple[Any, ...], str]] = list(env_problems)
    config: PipelineConfig | None = None
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        missing_env = {p for p, _ in env_problems}
        errors = exc.errors(include_url=False)
        parents = {tuple(e["loc"])[:n] for e in errors for n in range(len(e["loc"]))}
        for error in errors:
            if error["type"] == "too_short" and tuple(error["loc"]) in parents:
                continue  # pydantic's echo of failed items, already reported one by one
            loc, message = _describe(error, raw, from_env)
            plain = _strip_tags(loc)
            if any(plain[: len(p)] == p for p in missing_env):
                continue  # already reported as a missing variable
            found.append((loc, message))
    if found or config is None:
        problems = [f"{_render_path(loc, raw)}: {message}" for loc, message in found]
        raise ConfigError(problems, source=shown)
    return config
