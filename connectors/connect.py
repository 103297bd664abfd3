"""A small client of the Kafka Connect REST API (the calls Branchline needs, nothing more).

Errors map into the tree in one place (`_raise_for`): an unreachable worker or a 5xx/409 (rebalance in
progress) is `ConnectUnavailable` (retryable); a rejected config is a `ConfigError` carrying Connect's
message; an unknown connector is `ConnectorNotFound`. Messages never contain the config, which holds
the password.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import quote

import httpx
from branchline.errors import ConfigError, FatalSourceError, RetryableSourceError

logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request drowns the command's output


class ConnectUnavailable(RetryableSourceError):
    """Kafka Connect did not answer, or answered that it is busy (rebalancing, starting)."""


class ConnectorNotFound(FatalSourceError):
    """No connector of that name exists on this Connect cluster."""


@dataclass(frozen=True)
class TaskState:
    id: int
    state: str
    worker_id: str
    trace: str | None = None


@dataclass(frozen=True)
class ConnectorState:
    name: str
    state: str
    """RUNNING, PAUSED, STOPPED, FAILED, UNASSIGNED, RESTARTING."""
    worker_id: str
    trace: str | None
    tasks: tuple[TaskState, ...] = field(default_factory=tuple)

    @property
    def healthy(self) -> bool:
        return self.state == "RUNNING" and bool(self.tasks) and all(t.state == "RUNNING" for t in self.tasks)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ConnectorState:
        connector = body.get("connector", {})
        tasks = tuple(
            TaskState(int(t.get("id", 0)), t.get("state", "?"), t.get("worker_id", ""), t.get("trace"))
            for t in body.get("tasks", [])
        )
        return cls(body.get("name", "?"), connector.get("state", "?"), connector.get("worker_id", ""),
                   connector.get("trace"), tasks)


class ConnectClient:
    """Synchronous Connect REST client; one instance per command."""

    def __init__(self, url: str, timeout_s: float = 30.0, retries: int = 5) -> None:
        self.url = url.rstrip("/")
        self._retries = retries
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s,
                                  headers={"Accept": "application/json", "Content-Type": "application/json"})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing

    def _request(self, method: str, path: str, json: Any = None, params: dict[str, str] | None = None) -> httpx.Response:
        """One call, retried (bounded, logged) while Connect is unreachable or rebalancing."""
        last: Exception | None = None
        for attempt in range(1, self._retries + 1):
            try:
                response = self._http.request(method, path, json=json, params=params)
            except httpx.TransportError as exc:
                last = ConnectUnavailable(f"`Kafka Connect` must answer at {self.url}; got {type(exc).__name__}: {exc}")
                last.__cause__ = exc
            else:
                if response.status_code == 409 or response.status_code >= 500:
                    last = ConnectUnavailable(
                        f"`Kafka Connect` must accept {method} {path}; got {response.status_code}: {_message(response)}"
                    )
                else:
                    return response
            if attempt < self._retries:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 5.0))
        assert last is not None
        raise last

    def _raise_for(self, response: httpx.Response, name: str | None = None) -> None:
        if response.status_code < 400:
            return
        message = _message(response)
        if response.status_code == 404 and name is not None:
            raise ConnectorNotFound(f"`connector` must exist on {self.url}; got no connector named {name!r}")
        if response.status_code == 400:
            raise ConfigError(f"Kafka Connect rejected the request for {name or 'connector'}: {message}")
        raise FatalSourceError(f"`Kafka Connect` must accept the request; got {response.status_code}: {message}")

    # -- calls

    def version(self) -> dict[str, Any]:
        response = self._request("GET", "/")
        self._raise_for(response)
        return dict(response.json())

    def plugins(self) -> list[str]:
        response = self._request("GET", "/connector-plugins")
        self._raise_for(response)
        return [p["class"] for p in response.json()]

    def connectors(self) -> list[str]:
        response = self._request("GET", "/connectors")
        self._raise_for(response)
        return sorted(response.json())

    def config(self, name: str) -> dict[str, str] | None:
        """The connector's stored config, or None when it does not exist."""
        response = self._request("GET", f"/connectors/{quote(name, safe='')}/config")
        if response.status_code == 404:
            return None
        self._raise_for(response, name)
        return dict(response.json())

    def put_config(self, name: str, config: dict[str, str]) -> bool:
        """Create or update; True when the connector was created."""
        response = self._request("PUT", f"/connectors/{quote(name, safe='')}/config", json=config)
        self._raise_for(response, name)
        return response.status_code == 201

    def validate(self, name: str, config: dict[str, str]) -> list[str]:
        """Connect's own validation of a config (Debezium also connects to the database): one line per
        field error, empty when valid."""
        connector_class = config["connector.class"]
        plugin = connector_class.rsplit(".", 1)[-1]
        response = self._request("PUT", f"/connector-plugins/{quote(plugin, safe='')}/config/validate",
                                 json={"name": name, **config})
        self._raise_for(response)
        problems = []
        for entry in response.json().get("configs", []):
            value = entry.get("value") or {}
            for error in value.get("errors", []):
                problems.append(f"{value.get('name')}: {error}")
        return problems

    def status(self, name: str) -> ConnectorState:
        response = self._request("GET", f"/connectors/{quote(name, safe='')}/status")
        self._raise_for(response, name)
        return ConnectorState.from_json(response.json())

    def offsets(self, name: str) -> list[dict[str, Any]]:
        """The connector's committed source offsets (Connect 3.6+): partition/offset pairs."""
        response = self._request("GET", f"/connectors/{quote(name, safe='')}/offsets")
        self._raise_for(response, name)
        return list(response.json().get("offsets", []))

    def pause(self, name: str) -> None:
        self._raise_for(self._request("PUT", f"/connectors/{quote(name, safe='')}/pause"), name)

    def resume(self, name: str) -> None:
        self._raise_for(self._request("PUT", f"/connectors/{quote(name, safe='')}/resume"), name)

    def stop(self, name: str) -> None:
        """Stop (Connect 3.5+): tasks shut down, config kept; required before offsets can be reset."""
        self._raise_for(self._request("PUT", f"/connectors/{quote(name, safe='')}/stop"), name)

    def reset_offsets(self, name: str) -> None:
        """Forget the connector's source offsets (Connect 3.6+; the connector must be STOPPED), so a
        connector created again under this name starts over with a snapshot."""
        self._raise_for(self._request("DELETE", f"/connectors/{quote(name, safe='')}/offsets"), name)

    def restart(self, name: str, include_tasks: bool = True, only_failed: bool = False) -> None:
        params = {"includeTasks": str(include_tasks).lower(), "onlyFailed": str(only_failed).lower()}
        self._raise_for(self._request("POST", f"/connectors/{quote(name, safe='')}/restart", params=params), name)

    def delete(self, name: str) -> bool:
        """Delete; False when there was nothing to delete."""
        response = self._request("DELETE", f"/connectors/{quote(name, safe='')}")
        if response.status_code == 404:
            return False
        self._raise_for(response, name)
        return True

    def wait_for(self, name: str, states: set[str], timeout_s: float = 60.0) -> ConnectorState:
        """Poll until the connector and all its tasks are in one of `states` (FAILED ends the wait)."""
        deadline = time.monotonic() + timeout_s
        state: ConnectorState | None = None
        while time.monotonic() < deadline:
            try:
                state = self.status(name)
            except ConnectorNotFound:
                state = None
            if state is not None:
                task_states = {t.state for t in state.tasks}
                if state.state in states and state.tasks and task_states <= states:
                    return state
                if "FAILED" in task_states or state.state == "FAILED":
                    return state
            time.sleep(0.5)
        raise ConnectUnavailable(
            f"`connector {name}` must reach {sorted(states)} within {timeout_s:.0f}s; "
            f"got {state.state if state else 'no status'}"
        )


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict) and "message" in body:
        return str(body["message"])[:2000]
    return str(body)[:500]
