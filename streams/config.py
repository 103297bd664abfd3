"""Config models of the streams stage: per-table transforms and the worker's settings.

`TableTransforms` is what one entry of the pipeline file's ``tables:`` section holds, keyed by the
table's qualified name (``database.table`` for MariaDB/MySQL, ``schema.table`` for PostgreSQL, as
`branchline.events.TableId.qualified` spells it). Everything is data: a row filter is
(column, operator, value) and is never evaluated as code.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

_MODEL = ConfigDict(frozen=True, extra="forbid")

ScalarValue = str | int | bool | Decimal | date | datetime | None
"""A literal in a filter or a constant column. No float: a float literal would compare inexactly
against DECIMAL columns."""


class HashMask(BaseModel):
    """Replace the value by the hex SHA-256 of salt + value: joins still work, the value is gone."""

    model_config = _MODEL

    method: Literal["sha256"] = "sha256"
    salt: SecretStr
    """Secret salt, so that short values (phone numbers, ids) cannot be found by brute force."""


class RedactMask(BaseModel):
    """Replace the value by NULL."""

    model_config = _MODEL

    method: Literal["redact"] = "redact"


class KeepLastMask(BaseModel):
    """Keep the last `keep` characters, replace the others by `fill` (e.g. IBANs, card numbers)."""

    model_config = _MODEL

    method: Literal["keep_last"] = "keep_last"
    keep: int = Field(ge=0)
    """How many trailing characters stay readable."""
    fill: str = Field(default="*", min_length=1, max_length=1)
    """The character that replaces each hidden character."""


Mask = Annotated[HashMask | RedactMask | KeepLastMask, Field(discriminator="method")]

FilterOperator = Literal["==", "!=", "<", "<=", ">", ">=", "in", "not_in", "is_null", "not_null"]


class RowFilter(BaseModel):
    """Keep only rows where `column` `op` `value` holds (a row moving out of the filter is deleted)."""

    model_config = _MODEL

    column: str
    """Source column name (before any rename)."""
    op: FilterOperator
    """Comparison; ``in``/``not_in`` take a list, ``is_null``/``not_null`` take no value."""
    value: ScalarValue | list[ScalarValue] = None
    """The literal to compare with; converted to the column's type at start-up."""

    @model_validator(mode="after")
    def _value_matches_operator(self) -> RowFilter:
        if self.op in ("in", "not_in") and not isinstance(self.value, list):
            raise ValueError(f"`value` must be a list for operator {self.op!r}; got {self.value!r}")
        if self.op in ("is_null", "not_null") and self.value is not None:
            raise ValueError(f"`value` must be absent for operator {self.op!r}; got {self.value!r}")
        if self.op not in ("in", "not_in", "is_null", "not_null") and (
            self.value is None or isinstance(self.value, list)
        ):
            raise ValueError(f"`value` must be one literal for operator {self.op!r}; got {self.value!r}")
        return self


CastTarget = Literal["string", "int64", "decimal", "float64", "boolean", "date", "timestamp", "json"]


class TableTransforms(BaseModel):
    """What to do with one source table on its way to the target. All column names are source names.

    Order of application: filter -> exclude/include -> mask -> cast -> rename -> constants.
    """

    model_config = _MODEL

    include: tuple[str, ...] | None = None
    """Only these columns (the primary key is always kept); None keeps all."""
    exclude: tuple[str, ...] = ()
    """Drop these columns; a primary-key column cannot be excluded."""
    rename: str | None = None
    """New name of the table in the target."""
    rename_columns: dict[str, str] = Field(default_factory=dict)
    """Source column name -> target column name."""
    mask: dict[str, Mask] = Field(default_factory=dict)
    """Source column name -> how to mask it."""
    filters: tuple[RowFilter, ...] = ()
    """Every filter must hold for a row to be replicated (AND)."""
    constants: dict[str, ScalarValue] = Field(default_factory=dict)
    """Target column name -> value added to every row. Strings may use ``{branch}``, ``{source}``,
    ``{database}``, ``{table}``."""
    casts: dict[str, CastTarget] = Field(default_factory=dict)
    """Source column name -> target type."""

    @model_validator(mode="after")
    def _consistent(self) -> TableTransforms:
        problems = []
        if self.include is not None and self.exclude:
            problems.append(f"`include` and `exclude` must not both be set; got exclude={list(self.exclude)!r}")
        targets = list(self.rename_columns.values())
        duplicated = sorted({name for name in targets if targets.count(name) > 1})
        if duplicated:
            problems.append(f"`rename_columns` must give distinct names; got {duplicated!r} twice")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class WorkerSettings(BaseModel):
    """How a Faust worker of the distributed runtime consumes, batches and fails."""

    model_config = _MODEL

    batch_size: int = Field(default=5000, ge=1)
    """Most events handed to the sink at once (`stream.take` n)."""
    batch_within_s: float = Field(default=1.0, gt=0)
    """Longest wait for a batch to fill before it is written anyway (`stream.take` within)."""
    on_bad_record: Literal["stop", "dlq"] = "stop"
    """``stop``: fail with table, key and position. ``dlq``: send it to `dlq_topic` and go on."""
    dlq_topic: str = "branchline.dlq"
    """Dead-letter topic; each record carries the error and the original payload."""
    check_topic_keys: bool = True
    """At start-up, refuse source topics whose records are not keyed by the primary key."""
    session_timeout_s: float = Field(default=30.0, gt=0)
    """How long the consumer group waits for a silent worker before its partitions move to the others."""
