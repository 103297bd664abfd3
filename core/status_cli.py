"""`branchline status FILE`: one screen for the DBA — sources, connectors, lag per table, last error, spool.

What it reads, so each line can be trusted for what it is:

- sources: asked directly now (a connection, the slot row or the binlog list), with the file's credentials;
- connectors and tasks: Kafka Connect's REST API now, when the file has a ``connect:`` section;
- lag per table, spool, last error: the running runtime's ``/status.json`` (the ``metrics:`` host and
  port of the file, or ``--url``); when no runtime answers, the screen says so instead of guessing.

Exit code 0 when everything answers and nothing failed, 1 otherwise, so scripts can use it.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import httpx
from branchline.monitoring import poll_binlog, poll_connect, poll_postgres_slot


def _source_status(source: Any, runtime_sources: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": source.name, "branch": source.branch, "kind": source.kind,
                             "address": f"{source.host}:{source.port}", "up": False, "error": None}
    seen = runtime_sources.get(f"{source.branch}/{source.name}", {})
    entry["capture_lag_s"] = seen.get("capture_lag_s")
    entry["clock_skew_s"] = seen.get("clock_skew_s")
    try:
        if source.kind == "postgres":
            slot = poll_postgres_slot(source)
            entry["slot"] = slot if slot is not None else {"slot": source.slot, "missing": True}
        else:
            reader_file = (seen.get("binlog") or {}).get("reader_file")
            entry["binlog"] = poll_binlog(source, reader_file=reader_file)
        entry["up"] = True
    except Exception as exc:  # noqa: BLE001 - a down source is a status line, not a crash
        entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    return entry


def _connectors_status(pipeline: Any) -> dict[str, Any] | None:
    if pipeline.connect is None:
        return None
    names = [s.connector_name for s in pipeline.sources]
    try:
        statuses = poll_connect(pipeline.connect.url, None, timeout_s=min(pipeline.connect.timeout_s, 10))
    except Exception as exc:  # noqa: BLE001
        return {"url": pipeline.connect.url, "error": f"{type(exc).__name__}: {exc}"[:300], "connectors": []}
    connectors = []
    for name in names:
        status = statuses.get(name, {}).get("status", {})
        state = status.get("connector", {}).get("state", "UNASSIGNED") if name in statuses else "MISSING"
        tasks = [{"id": t.get("id"), "state": t.get("state"), "worker": t.get("worker_id"),
                  "trace": (t.get("trace") or "").splitlines()[0] if t.get("trace") else None}
                 for t in status.get("tasks", [])]
        connectors.append({"name": name, "state": state, "tasks": tasks})
    return {"url": pipeline.connect.url, "error": None, "connectors": connectors}


def _runtime_status(url: str) -> dict[str, Any]:
    try:
        response = httpx.get(f"{url.rstrip('/')}/status.json", timeout=5)
        response.raise_for_status()
        return {"url": url, "reachable": True, "error": None, **response.json()}
    except (httpx.HTTPError, ValueError) as exc:
        return {"url": url, "reachable": False, "error": f"{type(exc).__name__}: {exc}"[:300]}


def collect_status(pipeline: Any, runtime_url: str | None = None) -> dict[str, Any]:
    """Everything the status screen shows, as JSON-ready data (also the `--json` output)."""
    config = pipeline.metrics
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    runtime = _runtime_status(runtime_url or f"http://{host}:{config.port}")
    runtime_sources = {f"{s['branch']}/{s['source']}": s for s in runtime.get("sources", [])}
    sources = [_source_status(source, runtime_sources) for source in pipeline.sources]
    connect = _connectors_status(pipeline)
    errors = runtime.get("errors", [])
    failed_connectors = [c["name"] for c in (connect or {}).get("connectors", [])
                         if c["state"] != "RUNNING" or any(t["state"] != "RUNNING" for t in c["tasks"])]
    problems = [f"source {s['branch']}/{s['name']} is down: {s['error']}" for s in sources if not s["up"]]
    problems += [f"connector {name} is not RUNNING" for name in failed_connectors]
    if connect is not None and connect["error"]:
        problems.append(f"Kafka Connect at {connect['url']} does not answer: {connect['error']}")
    if not runtime["reachable"]:
        problems.append(f"no runtime answers at {runtime['url']} (is `branchline run` or `worker` running?)")
    return {
        "pipeline": pipeline.name,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "healthy": not problems,
        "problems": problems,
        "sources": sources,
        "connect": connect,
        "runtime": {"url": runtime["url"], "reachable": runtime["reachable"], "error": runtime["error"]},
        "tables": runtime.get("tables", []),
        "spools": runtime.get("spools", []),
        "kafka_consumer_lag": runtime.get("kafka_consumer_lag", []),
        "last_error": errors[0] if errors else None,
    }


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def render(report: dict[str, Any]) -> None:
    """The one screen, with rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    mark = "[green]healthy[/]" if report["healthy"] else "[red]needs attention[/]"
    console.print(f"[bold]Branchline[/] pipeline [bold]{report['pipeline']}[/] at {report['at']}: {mark}")
    for problem in report["problems"]:
        console.print(f"  [red]-[/] {problem}")

    sources = Table(title="Sources", title_justify="left", expand=True)
    for column in ("source", "kind", "address", "health", "log", "capture lag", "clock skew"):
        sources.add_column(column)
    for s in report["sources"]:
        health = "[green]up[/]" if s["up"] else f"[red]down[/] {s['error']}"
        if "slot" in s:
            slot = s["slot"]
            log = (f"slot {slot.get('slot')} missing" if slot.get("missing") else
                   f"slot {slot['slot']} {'active' if slot['active'] else 'inactive'}, "
                   f"retains {_bytes(slot['retained_bytes'])}"
                   + (f", headroom {_bytes(slot['safe_wal_bytes'])}" if slot.get("safe_wal_bytes") is not None else ""))
        elif "binlog" in s:
            binlog = s["binlog"]
            behind = binlog["files_behind"]
            log = (f"head {binlog['head_file']}, {binlog['files']} files"
                   + (f", {behind} behind" if behind is not None else "")
                   + (f", kept {_duration(binlog['retention_s'])}" if binlog["retention_s"] else ", kept forever"))
        else:
            log = "-"
        skew = s.get("clock_skew_s")
        sources.add_row(f"{s['branch']}/{s['name']}", s["kind"], s["address"], health, log,
                        _duration(s.get("capture_lag_s")), "-" if skew is None else f"{skew:+.3f} s")
    console.print(sources)

    connect = report["connect"]
    if connect is not None:
        connectors = Table(title=f"Connectors ({connect['url']})", title_justify="left", expand=True)
        for column in ("connector", "state", "tasks"):
            connectors.add_column(column)
        if connect["error"]:
            connectors.add_row("-", f"[red]unreachable[/] {connect['error']}", "")
        for c in connect["connectors"]:
            color = "green" if c["state"] == "RUNNING" else "red"
            tasks = ", ".join(f"{t['id']}: {t['state']}" + (f" ({t['trace']})" if t["trace"] else "")
                              for t in c["tasks"]) or "-"
            connectors.add_row(c["name"], f"[{color}]{c['state']}[/]", tasks)
        console.print(connectors)

    runtime = report["runtime"]
    if not runtime["reachable"]:
        console.print(f"[yellow]Runtime at {runtime['url']} does not answer[/]: lag, spool and errors unknown.")
        return
    tables = Table(title="Lag per table", title_justify="left", expand=True)
    for column in ("table", "sink", "replication lag", "rows written"):
        tables.add_column(column)
    for t in sorted(report["tables"], key=lambda t: -(t["replication_lag_s"] or 0)):
        lag = t["replication_lag_s"]
        color = "green" if lag is not None and lag < 60 else "yellow" if lag is not None and lag < 300 else "red"
        tables.add_row(f"{t['branch']}/{t['source']} {t['table']}", t["sink"], f"[{color}]{_duration(lag)}[/]",
                       "-" if t["rows_written"] is None else f"{t['rows_written']:.0f}")
    console.print(tables)
    for entry in report["kafka_consumer_lag"]:
        console.print(f"Kafka consumer lag {entry['group']} {entry['topic']}: {entry['lag']:.0f} messages")
    for spool in report["spools"]:
        used, limit = spool["bytes"] or 0, spool["limit_bytes"] or 0
        share = f" ({used / limit:.0%})" if limit else ""
        console.print(f"Spool {spool['spool']}: {_bytes(used)} of {_bytes(limit)}{share}, "
                      f"oldest change {_duration(spool['oldest_age_s'])} old")
    last = report["last_error"]
    if last:
        ago = _duration(time.time() - last["at"])
        console.print(f"Last error ({ago} ago, {last['component']} {last['name']}, {last['kind']}): {last['message']}")
    else:
        console.print("Last error: none")


@click.command("status")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the same report as JSON.")
@click.option("--url", "runtime_url", default=None,
              help="Base URL of the running runtime (default: the file's `metrics:` host and port).")
@click.pass_context
def status(ctx: click.Context, file: Path, as_json: bool, runtime_url: str | None) -> None:
    """One screen for the DBA: sources and their health, connectors and tasks, lag per table, last error,
    spool. Exit code 1 when something needs attention."""
    from branchline.config import load_pipeline

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the screen
    report = collect_status(load_pipeline(file), runtime_url)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        render(report)
    ctx.exit(0 if report["healthy"] else 1)
