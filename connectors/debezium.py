"""From a source in the pipeline file to the exact Debezium connector config, every setting chosen on
purpose. Pure functions: no network, so `branchline connectors plan` and the unit tests see exactly
what `apply` sends.

Each setting is a `Setting` with the reason it is there; `plan --why` prints the reasons. The source's
``debezium:`` mapping is applied last, so an operator can override any choice (and owns the result).

Names the other stages rely on:
- table topics: ``<branch>.<source>.<database|schema>.<table>`` (``topic.prefix`` = ``<branch>.<source>``)
- transaction metadata: ``<branch>.<source>.transaction``; schema changes (binlog): ``<branch>.<source>``
- heartbeats: ``__debezium-heartbeat.<branch>.<source>``
- snapshot notifications: ``__branchline-notifications.<branch>.<source>``
- Branchline's own signal/heartbeat tables live in the ``branchline`` database/schema; their topics
  (``<prefix>.branchline.*``) carry control rows, not data: consumers skip them (`is_control_topic`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from branchline.config import (
    CONTROL_NAMESPACE,
    BinlogSourceConfig,
    PipelineConfig,
    PostgresSourceConfig,
)
from branchline.config import (
    AnySource as Source,
)
from branchline.errors import ConfigError

MASK = "********"
"""What `plan` prints instead of a secret."""

SECRET_KEYS = ("database.password",)

CONNECTOR_CLASS = {
    "mariadb": "io.debezium.connector.mariadb.MariaDbConnector",
    "mysql": "io.debezium.connector.mysql.MySqlConnector",
    "postgres": "io.debezium.connector.postgresql.PostgresConnector",
}

UNAVAILABLE_VALUE = "__debezium_unavailable_value"
"""Debezium's stand-in for an unchanged TOASTed PostgreSQL value; decoders map it to `UNCHANGED`."""


@dataclass(frozen=True)
class Setting:
    key: str
    value: str
    why: str




def _regex(name: str) -> str:
    """A table name from the pipeline file as the anchored Java regex Debezium matches it with."""
    return name.replace(".", r"\.").replace("$", r"\$").replace("*", "[^.]*")


def heartbeat_topic(source: Source) -> str:
    return f"__debezium-heartbeat.{source.topic_prefix}"


def notification_topic(source: Source) -> str:
    return f"__branchline-notifications.{source.topic_prefix}"


def schema_history_topic(source: Source) -> str:
    return f"__branchline-schema-history.{source.topic_prefix}"


def transaction_topic(source: Source) -> str:
    return f"{source.topic_prefix}.transaction"


_CONTROL_TOPIC = re.compile(rf"^[^.]+\.[^.]+\.{CONTROL_NAMESPACE}\.[^.]+$")


def is_control_topic(topic: str) -> bool:
    """True for topics of Branchline's signal/heartbeat tables: control rows, never replicated."""
    return bool(_CONTROL_TOPIC.match(topic)) or topic.startswith(("__debezium-heartbeat.", "__branchline-"))


def heartbeat_query(source: Source) -> str:
    """The write Debezium runs every heartbeat; the same row `branchline.heartbeat` writes in the
    embedded runtime, so lag is measured alike on both paths."""
    from branchline.heartbeat import debezium_heartbeat_query

    namespace, table = source.heartbeat_table.split(".", 1)
    return debezium_heartbeat_query(source.kind, namespace, table)


def _common(source: Source, pipeline: PipelineConfig) -> list[Setting]:
    kafka = pipeline.kafka
    settings = [
        Setting("connector.class", CONNECTOR_CLASS[source.kind],
                "MariaDB gets Debezium's MariaDB connector: the MySQL one fails on MariaDB 10.11 "
                "(SHOW BINARY LOG STATUS)." if source.kind == "mariadb" else "The connector for this kind of source."),
        Setting("tasks.max", "1", "A Debezium source connector reads one log with one task; more tasks add nothing."),
        Setting("topic.prefix", source.topic_prefix,
                "`<branch>.<source>`: every topic carries the branch, so branches never share a topic."),
        Setting("database.hostname", source.host, "From the pipeline file."),
        Setting("database.port", str(source.port), "From the pipeline file."),
        Setting("database.user", source.user, "The replication user (see `branchline preflight --print-setup-sql`)."),
        Setting("database.password", source.password.get_secret_value(), "From the pipeline file (masked in plans)."),
        Setting("snapshot.mode", source.snapshot_mode, "From the pipeline file: `initial` copies existing rows once."),
        Setting("key.converter", "org.apache.kafka.connect.json.JsonConverter",
                "JSON keys; the key is the primary key (Debezium's default), so one row stays in one partition."),
        Setting("key.converter.schemas.enable", "true", "Keys carry their schema, so decoders know key types."),
        Setting("value.converter", "org.apache.kafka.connect.json.JsonConverter", "JSON envelopes, decoded with orjson."),
        Setting("value.converter.schemas.enable", "true",
                "Each envelope carries its schema: decoders need the logical types (Decimal, MicroTimestamp...)."),
        Setting("decimal.handling.mode", "precise",
                "DECIMAL/NUMERIC as exact decimals (unscaled bytes + scale), never doubles."),
        Setting("time.precision.mode", "adaptive_time_microseconds",
                "Keeps microseconds (the `connect` mode truncates to milliseconds) and sends TIME as microseconds, "
                "which also holds MySQL TIME values that are negative or above 24 h."),
        Setting("binary.handling.mode", "bytes", "Binary columns as bytes (base64 in JSON), decoded losslessly."),
        Setting("tombstones.on.delete", "true",
                "A null-value record after each delete, so compacted topics can drop the key."),
        Setting("skipped.operations", "none",
                "Debezium skips truncates by default (`t`); Branchline replicates them."),
        Setting("provide.transaction.metadata", "true",
                f"BEGIN/END events on `{transaction_topic(source)}` and a transaction block in each envelope, "
                "so sinks can tell transaction boundaries."),
        Setting("heartbeat.interval.ms", str(source.heartbeat_interval_ms),
                "Heartbeats commit offsets while captured tables are idle, so a restart does not replay or "
                "re-read old log."),
        Setting("topic.heartbeat.prefix", "__debezium-heartbeat", f"Heartbeats go to `{heartbeat_topic(source)}`."),
        Setting("signal.enabled.channels", "source",
                "Signals (incremental snapshots) are rows inserted into the signal table, read from the log."),
        Setting("signal.data.collection", source.signal_table,
                "The signal table `branchline snapshot` writes to; created by the setup SQL."),
        Setting("notification.enabled.channels", "sink",
                f"Incremental-snapshot progress is published to `{notification_topic(source)}`; "
                "`branchline connectors status` reads it."),
        Setting("notification.sink.topic.name", notification_topic(source), "See notification.enabled.channels."),
        Setting("column.propagate.source.type", ".*",
                "Each field's schema carries the source type, length and scale, so sinks create exact types."),
        Setting("poll.interval.ms", "100",
                "Debezium's default 500 ms wait between polls of its queue adds latency whenever changes trickle "
                "in (measured on the stack: median commit-to-Kafka 300 ms on MariaDB and 800 ms on PostgreSQL "
                "at 500 ms, 102 ms on both at 100 ms); polling an empty queue costs nothing measurable."),
        Setting("event.processing.failure.handling.mode", "fail",
                "A change that cannot be processed stops the connector; nothing is skipped silently."),
    ]
    if kafka is not None:
        settings += [
            Setting("topic.creation.default.replication.factor", str(kafka.replication_factor),
                    "Topics the connector creates get the file's replication factor."),
            Setting("topic.creation.default.partitions", str(kafka.partitions),
                    "Partitions per table topic; keys are primary keys, so a row's changes stay ordered."),
        ]
    return settings


def _binlog(source: BinlogSourceConfig, pipeline: PipelineConfig) -> list[Setting]:
    kafka = pipeline.kafka
    if kafka is None:
        raise ConfigError("`kafka` must be set for a binlog source (Debezium keeps its schema history in Kafka); "
                          "got nothing")
    control_dbs = [source.signal_table.split(".", 1)[0], source.heartbeat_table.split(".", 1)[0]]
    databases = list(dict.fromkeys((*source.databases, *control_dbs)))
    control_db = ", ".join(dict.fromkeys(control_dbs))
    settings = [
        Setting("database.server.id", str(source.server_id),
                "The replica id the connector presents; must be unique among the server's replicas."),
        Setting("database.include.list", ",".join(databases),
                f"The file's databases, plus `{control_db}` for the signal and heartbeat tables (Debezium reads "
                "signals from the log; heartbeat rows carry lag)."),
    ]
    if source.include:
        tables = [*map(_regex, source.include), _regex(source.signal_table), _regex(source.heartbeat_table)]
        settings.append(Setting("table.include.list", ",".join(tables),
                                "The file's tables, plus the signal and heartbeat tables."))
    if source.exclude:
        settings.append(Setting("table.exclude.list", ",".join(map(_regex, source.exclude)), "From the pipeline file."))
    settings += [
        Setting("bigint.unsigned.handling.mode", "precise",
                "BIGINT UNSIGNED as exact decimals; the default `long` corrupts values above 2^63-1."),
        Setting("include.schema.changes", "true",
                f"DDL events on `{source.topic_prefix}`, so the streams stage sees schema changes in order."),
        Setting("schema.history.internal.kafka.bootstrap.servers", kafka.bootstrap_servers,
                "Binlog connectors must remember every table's schema at each binlog position."),
        Setting("schema.history.internal.kafka.topic", schema_history_topic(source),
                "One schema-history topic per connector (never shared), named after the branch and source."),
        Setting("snapshot.locking.mode", "minimal",
                "Holds the global read lock only while reading schemas, not while copying rows."),
        Setting("heartbeat.action.query", heartbeat_query(source),
                "A heartbeat row every interval: its change flows through the pipeline and moves the lag "
                "watermark of the whole source even while the captured tables are idle."),
    ]
    return settings


def _postgres(source: PostgresSourceConfig, pipeline: PipelineConfig) -> list[Setting]:
    control_schema = source.heartbeat_table.split(".", 1)[0]
    signal_schema = source.signal_table.split(".", 1)[0]
    schemas = list(dict.fromkeys((*source.schemas, control_schema, signal_schema)))
    settings = [
        Setting("database.dbname", source.database, "A slot belongs to one database."),
        Setting("plugin.name", "pgoutput", "PostgreSQL's built-in logical decoding plugin: nothing to install."),
        Setting("slot.name", source.slot, "`branchline_<branch>_<source>` unless set: one slot per connector."),
        Setting("slot.drop.on.stop", "false", "The slot keeps our place across restarts; dropping it loses changes."),
        Setting("publication.name", source.publication, "`branchline_<branch>_<source>` unless set."),
        Setting("publication.autocreate.mode", "filtered",
                "The publication lists only the captured tables (plus the signal and heartbeat tables), "
                "not every table of the database."),
        Setting("schema.include.list", ",".join(schemas),
                f"The file's schemas, plus `{control_schema}` for the heartbeat and signal tables."),
    ]
    if source.include:
        tables = [*map(_regex, source.include), _regex(source.signal_table), _regex(source.heartbeat_table)]
        settings.append(Setting("table.include.list", ",".join(tables),
                                "The file's tables, plus the signal and heartbeat tables (they must be published)."))
    if source.exclude:
        settings.append(Setting("table.exclude.list", ",".join(map(_regex, source.exclude)), "From the pipeline file."))
    settings += [
        Setting("heartbeat.action.query", heartbeat_query(source),
                "A write in this database every heartbeat, so the slot advances (and WAL is freed) even "
                "while the captured tables are idle."),
        Setting("interval.handling.mode", "string",
                "INTERVAL as ISO 8601 text: exact months and days (the numeric mode approximates a month)."),
        Setting("hstore.handling.mode", "json", "hstore as a JSON object, not a Connect map."),
        Setting("unavailable.value.placeholder", UNAVAILABLE_VALUE,
                "The marker for an unchanged TOASTed value; decoders keep the target's value."),
    ]
    return settings


def settings_for(source: Source, pipeline: PipelineConfig) -> list[Setting]:
    """Every property of one source's connector, with the reason for each, overrides applied last."""
    settings = _common(source, pipeline)
    settings += _binlog(source, pipeline) if isinstance(source, BinlogSourceConfig) else _postgres(source, pipeline)
    by_key = {s.key: s for s in settings}
    for key, value in source.debezium.items():
        by_key[key] = Setting(key, value, "Override from the pipeline file's `debezium:` mapping.")
    return list(by_key.values())


def connector_config(source: Source, pipeline: PipelineConfig) -> dict[str, str]:
    """The config map `PUT /connectors/<name>/config` receives (with the real password)."""
    return {s.key: s.value for s in settings_for(source, pipeline)}


def masked(config: dict[str, str]) -> dict[str, str]:
    """The same map with secrets replaced, for printing."""
    return {k: (MASK if k in SECRET_KEYS or "password" in k else v) for k, v in config.items()}


def plan(pipeline: PipelineConfig, only: str | None = None) -> dict[str, dict[str, str]]:
    """Connector name -> config for every source (or one), secrets unmasked."""
    sources = [pipeline.source(only)] if only else list(pipeline.sources)
    return {source.connector_name: connector_config(source, pipeline) for source in sources}
