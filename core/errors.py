"""The error tree, sorted by what the caller does next.

`ConfigError`, `SourceError`, `SinkError` and `InfraError` say where it went wrong; the `Retryable`
and `Fatal` markers say whether trying again can help. Each driver maps its own exceptions into
this tree in exactly one function, always with ``raise ... from exc``. Messages follow one shape:
"`<thing>` must <rule>; got <value!r>", and never contain a secret.
"""

from __future__ import annotations


class BranchlineError(Exception):
    """Base of every error Branchline raises on purpose."""


class Retryable:
    """Marker: the same call may succeed later (a dropped connection, a deadlock, a server restart)."""


class Fatal:
    """Marker: trying again cannot help; stop and tell the operator."""


class ConfigError(BranchlineError, Fatal):
    """The pipeline file or a setting is wrong. Carries every problem found, not only the first."""

    def __init__(self, problems: list[str] | str, source: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        where = f"{source}: " if source else ""
        if len(self.problems) == 1:
            message = where + self.problems[0]
        else:
            message = where + f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


class InfraError(BranchlineError, Fatal):
    """The local stack could not be installed or started. The message names the cause and the fix."""


class SourceError(BranchlineError):
    """Reading from a source database or from Kafka failed."""


class RetryableSourceError(SourceError, Retryable):
    """The source is unreachable for now."""


class FatalSourceError(SourceError, Fatal):
    """The source cannot be read as configured (missing grants, purged binlog, dropped slot...)."""


class SinkError(BranchlineError):
    """Writing into the target failed."""


class RetryableSinkError(SinkError, Retryable):
    """The target is unreachable or busy for now; the batch was not acknowledged."""


class FatalSinkError(SinkError, Fatal):
    """The target rejected the batch; the message names table, key and position."""


class BadRecordError(BranchlineError, Fatal):
    """An event could not be decoded or transformed; the message names table, key and position."""


def is_retryable(exc: BaseException) -> bool:
    """True when the error says that the same call may succeed later."""
    return isinstance(exc, Retryable)
