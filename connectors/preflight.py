"""Preflight: is each source database ready for change-data capture? For DBAs.

Every check connects as the source's configured (replication) user, so the grants checked are the
grants the connector will have. Each `Check` says PASS, WARN or FAIL, what it saw, and the exact SQL
or server setting that fixes it. Checks never change the server.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal

from branchline.config import AnySource as Source
from branchline.config import BinlogSourceConfig, PipelineConfig, PostgresSourceConfig
from branchline.connectors.setup_sql import setup_statements

Status = Literal["PASS", "WARN", "FAIL"]

EXIT_CODES = {"PASS": 0, "WARN": 1, "FAIL": 2}


@dataclass(frozen=True)
class Check:
    source: str
    check: str
    status: Status
    saw: str
    """What the server reported."""
    fix: str | None = None
    """The exact SQL or server setting that fixes a WARN/FAIL."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def exit_code(checks: Iterable[Check]) -> int:
    """0 when everything passes, 1 when something warns, 2 when something fails."""
    return max((EXIT_CODES[c.status] for c in checks), default=0)


def _matches(pattern: str, name: str) -> bool:
    return re.fullmatch(re.escape(pattern).replace(r"\*", "[^.]*"), name) is not None


def captured(source: Source, tables: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (namespace, table) pairs of `tables` the source captures, by its include/exclude lists."""
    out = []
    for namespace, table in tables:
        name = f"{namespace}.{table}"
        if namespace not in source.namespaces:
            continue
        if source.include and not any(_matches(p, name) for p in source.include):
            continue
        if any(_matches(p, name) for p in source.exclude):
            continue
        out.append((namespace, table))
    return out


def run(pipeline: PipelineConfig, only: str | None = None) -> list[Check]:
    """Every check of every source (or one)."""
    sources = [pipeline.source(only)] if only else list(pipeline.sources)
    checks: list[Check] = []
    for source in sources:
        if isinstance(source, PostgresSourceConfig):
            checks += PostgresPreflight(source).run()
        else:
            checks += BinlogPreflight(source).run()
    return checks


# ---------------------------------------------------------------------------------------- MariaDB/MySQL

_GRANT = re.compile(r"^GRANT (.+?) ON (\S+) TO ", re.IGNORECASE)
_NON_TRANSACTIONAL = ("MyISAM", "Aria", "MEMORY", "CSV", "ARCHIVE", "MRG_MyISAM", "MERGE", "BLACKHOLE")


def _split_privileges(text: str) -> list[str]:
    """'SELECT, INSERT (a, b), RELOAD' -> ['SELECT', 'INSERT', 'RELOAD'] (column lists dropped)."""
    depth, current, out = 0, "", []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            out.append(current)
            current = ""
            continue
        if depth == 0 and char not in "()":
            current += char
    out.append(current)
    return [re.sub(r"\s+", " ", p).strip().upper() for p in out if p.strip()]


def parse_grants(lines: Iterable[str]) -> dict[str, set[str]]:
    """SHOW GRANTS lines -> scope (`*.*`, `erp.*`, `branchline.debezium_signal`) -> privileges."""
    scopes: dict[str, set[str]] = {}
    for line in lines:
        match = _GRANT.match(line.strip())
        if not match:
            continue
        privileges, scope = match.groups()
        scope = scope.replace("`", "")
        scopes.setdefault(scope, set()).update(_split_privileges(privileges))
    return scopes


def _has(scopes: dict[str, set[str]], privilege: str, *candidates: str) -> bool:
    aliases = {privilege}
    if privilege == "REPLICATION CLIENT":
        aliases |= {"BINLOG MONITOR"}
    if privilege == "BINLOG MONITOR":
        aliases |= {"REPLICATION CLIENT"}
    for scope in ("*.*", *candidates):
        granted = scopes.get(scope, set())
        if granted & aliases or "ALL PRIVILEGES" in granted or "ALL" in granted:
            return True
    return False


class _Preflight:
    """Collects one source's checks; a PASS never carries a fix."""

    def __init__(self, source: BinlogSourceConfig | PostgresSourceConfig) -> None:
        self.source = source
        self.checks: list[Check] = []

    def add(self, check: str, status: Status, saw: str, fix: str | None = None) -> None:
        self.checks.append(Check(self.source.name, check, status, saw, fix if status != "PASS" else None))


class BinlogPreflight(_Preflight):
    """Checks for a MariaDB or MySQL source."""

    source: BinlogSourceConfig

    def run(self) -> list[Check]:
        import pymysql

        s = self.source
        try:
            conn = pymysql.connect(host=s.host, port=s.port, user=s.user, password=s.password.get_secret_value(),
                                   connect_timeout=10, charset="utf8mb4")
        except pymysql.err.MySQLError as exc:
            self.add("connect", "FAIL", f"cannot connect to {s.host}:{s.port} as {s.user}: {exc.args[-1]}",
                     "Check host, port, user and password in the pipeline file; create the user with "
                     "`branchline preflight --print-setup-sql`.")
            return self.checks
        try:
            with conn.cursor() as cursor:
                self._checks(cursor)
        finally:
            conn.close()
        return self.checks

    def _var(self, cursor: Any, name: str) -> str | None:
        cursor.execute("SHOW GLOBAL VARIABLES LIKE %s", (name,))
        row = cursor.fetchone()
        return None if row is None else str(row[1])

    def _checks(self, cursor: Any) -> None:
        s = self.source
        cursor.execute("SELECT VERSION()")
        version = str(cursor.fetchone()[0])
        is_mariadb = "mariadb" in version.lower()
        if is_mariadb and s.kind == "mysql":
            self.add("server", "FAIL", f"MariaDB {version} but `kind: mysql`",
                     "Set `kind: mariadb` for this source (Debezium's MySQL connector fails on MariaDB 10.11).")
        elif not is_mariadb and s.kind == "mariadb":
            self.add("server", "FAIL", f"MySQL {version} but `kind: mariadb`", "Set `kind: mysql` for this source.")
        else:
            self.add("server", "PASS", f"{'MariaDB' if is_mariadb else 'MySQL'} {version}")

        log_bin = self._var(cursor, "log_bin")
        self.add("log_bin", "PASS" if log_bin == "ON" else "FAIL", f"log_bin={log_bin}",
                 "In the server config ([mysqld]): log_bin=mysql-bin, then restart the server.")

        fmt = self._var(cursor, "binlog_format")
        self.add("binlog_format", "PASS" if fmt == "ROW" else "FAIL", f"binlog_format={fmt}",
                 "SET GLOBAL binlog_format = 'ROW'; and binlog_format=ROW in [mysqld] "
                 "(sessions opened before keep the old format: restart the applications or the server).")

        image = self._var(cursor, "binlog_row_image")
        self.add("binlog_row_image", "PASS" if image == "FULL" else "FAIL", f"binlog_row_image={image}",
                 "SET GLOBAL binlog_row_image = 'FULL'; and binlog_row_image=FULL in [mysqld].")

        metadata = self._var(cursor, "binlog_row_metadata")
        if metadata is None:
            self.add("binlog_row_metadata", "WARN", "binlog_row_metadata is not available on this server",
                     "Upgrade to MariaDB >= 10.5 or MySQL >= 8.0 for column names in the binlog "
                     "(the embedded runtime needs them; Debezium does not).")
        else:
            self.add("binlog_row_metadata", "PASS" if metadata == "FULL" else "WARN", f"binlog_row_metadata={metadata}",
                     "SET GLOBAL binlog_row_metadata = 'FULL'; and binlog_row_metadata=FULL in [mysqld] "
                     "(binlog readers otherwise see UNKNOWN_COLn instead of column names).")

        self._retention(cursor)

        server_id = int(self._var(cursor, "server_id") or 0)
        if server_id == 0:
            self.add("server_id", "FAIL", "server_id=0 (binary logging for replication needs a non-zero id)",
                     "server_id=1 (any id unique in the topology) in [mysqld], then restart.")
        elif server_id == s.server_id:
            self.add("server_id", "FAIL", f"the server's server_id and the connector's are both {server_id}",
                     f"Set `server_id:` of source `{s.name}` in the pipeline file to another value.")
        else:
            self.add("server_id", "PASS", f"server_id={server_id}; connector server_id={s.server_id}")

        self._gtid(cursor, is_mariadb)
        self._grants(cursor, is_mariadb)
        self._tables(cursor)
        self._time_zone(cursor)

    def _retention(self, cursor: Any) -> None:
        s = self.source
        seconds = self._var(cursor, "binlog_expire_logs_seconds")
        days = self._var(cursor, "expire_logs_days")
        retention_s: float | None = None
        if seconds not in (None, "0"):
            retention_s = float(seconds)  # type: ignore[arg-type]
        elif days not in (None, "0", "0.000000"):
            retention_s = float(days) * 86400  # type: ignore[arg-type]
        saw = f"binlog_expire_logs_seconds={seconds}, expire_logs_days={days}"
        need = s.min_log_retention_hours * 3600
        fix = (f"SET GLOBAL binlog_expire_logs_seconds = {need}; and binlog_expire_logs_seconds={need} in [mysqld] "
               f"(or lower `min_log_retention_hours` of source `{s.name}`)")
        if retention_s is None:
            self.add("binlog_retention", "PASS", saw + " (binlogs never expire; watch the disk)")
        elif retention_s < need:
            self.add("binlog_retention", "FAIL",
                     saw + f": binlogs kept {retention_s / 3600:g} h < the required {s.min_log_retention_hours} h "
                     "(an outage longer than that forces a re-snapshot)", fix)
        else:
            self.add("binlog_retention", "PASS", saw + f": {retention_s / 3600:g} h >= {s.min_log_retention_hours} h")

    def _gtid(self, cursor: Any, is_mariadb: bool) -> None:
        if is_mariadb:
            pos = self._var(cursor, "gtid_binlog_pos") or ""
            strict = self._var(cursor, "gtid_strict_mode")
            saw = f"gtid_binlog_pos={pos or '(empty)'}, gtid_strict_mode={strict}"
            if strict != "ON":
                self.add("gtid", "WARN", saw, "SET GLOBAL gtid_strict_mode = ON; and gtid_strict_mode=ON in [mysqld] "
                         "(keeps GTID order consistent, which resuming by GTID relies on).")
            else:
                self.add("gtid", "PASS", saw)
            return
        mode = self._var(cursor, "gtid_mode")
        consistency = self._var(cursor, "enforce_gtid_consistency")
        saw = f"gtid_mode={mode}, enforce_gtid_consistency={consistency}"
        if mode == "ON" and consistency == "ON":
            self.add("gtid", "PASS", saw)
        else:
            self.add("gtid", "WARN" if not self.source.gtid else "FAIL", saw,
                     "SET GLOBAL enforce_gtid_consistency = ON; then step gtid_mode through OFF_PERMISSIVE, "
                     "ON_PERMISSIVE, ON (SET GLOBAL gtid_mode = ...), and persist both in [mysqld].")

    def _grants(self, cursor: Any, is_mariadb: bool) -> None:
        s = self.source
        cursor.execute("SHOW GRANTS FOR CURRENT_USER()")
        scopes = parse_grants(row[0] for row in cursor.fetchall())
        cursor.execute("SELECT CURRENT_USER()")
        host = str(cursor.fetchone()[0]).rpartition("@")[2] or "%"
        user = f"'{s.user}'@'{host}'"
        missing_global = [p for p in ("RELOAD", "SHOW DATABASES", "REPLICATION SLAVE", "REPLICATION CLIENT")
                          if not _has(scopes, p)]
        missing_db = {db: [p for p in ("SELECT", "LOCK TABLES") if not _has(scopes, p, f"{db}.*")]
                      for db in s.databases}
        fixes = []
        if missing_global:
            shown = ["BINLOG MONITOR" if p == "REPLICATION CLIENT" and is_mariadb else p for p in missing_global]
            fixes.append(f"GRANT {', '.join(shown)} ON *.* TO {user};")
        for db, privileges in missing_db.items():
            if privileges:
                fixes.append(f"GRANT {', '.join(privileges)} ON `{db}`.* TO {user};")
        have = "; ".join(f"{scope}: {', '.join(sorted(p))}" for scope, p in sorted(scopes.items()))
        if fixes:
            missing = missing_global + [f"{p} on {db}" for db, ps in missing_db.items() for p in ps]
            self.add("grants", "FAIL", f"user {s.user} lacks {', '.join(missing)} (has {have or 'nothing'})",
                     " ".join(fixes))
        else:
            self.add("grants", "PASS", f"user {s.user} has {have}")

        for table, needed in ((s.signal_table, ("INSERT",)), (s.heartbeat_table, ("INSERT", "UPDATE"))):
            db, name = table.split(".", 1)
            cursor.execute("SELECT COUNT(*) FROM information_schema.tables WHERE table_schema=%s AND table_name=%s",
                           (db, name))
            exists = cursor.fetchone()[0] > 0
            lacking = [p for p in needed if not _has(scopes, p, f"{db}.*", f"{db}.{name}")]
            check = "signal_table" if table == s.signal_table else "heartbeat_table"
            setup = [st + ";" for st in setup_statements(s, user_host=host)
                     if f"`{name}`" in st or st.startswith(f"CREATE DATABASE IF NOT EXISTS `{db}`")]
            if not exists or lacking:
                saw = f"{table} {'exists' if exists else 'is missing (or not visible to ' + s.user + ')'}"
                if lacking:
                    saw += f"; {s.user} lacks {', '.join(lacking)} on it"
                self.add(check, "FAIL", saw, " ".join(setup))
            else:
                self.add(check, "PASS", f"{table} exists; {s.user} may {', '.join(needed)}")

    def _tables(self, cursor: Any) -> None:
        s = self.source
        marks = ", ".join(["%s"] * len(s.databases))
        cursor.execute(
            f"SELECT t.table_schema, t.table_name, t.engine, "
            # information_schema.table_constraints hides rows from users with only SELECT on MariaDB;
            # statistics does not
            f"  (SELECT COUNT(*) FROM information_schema.statistics c WHERE c.table_schema = t.table_schema "
            f"     AND c.table_name = t.table_name AND c.index_name = 'PRIMARY') "
            f"FROM information_schema.tables t WHERE t.table_type = 'BASE TABLE' AND t.table_schema IN ({marks}) "
            f"ORDER BY 1, 2", tuple(s.databases))
        rows = cursor.fetchall()
        wanted = set(captured(s, ((r[0], r[1]) for r in rows)))
        rows = [r for r in rows if (r[0], r[1]) in wanted]
        if not rows:
            self.add("tables", "WARN", f"no captured tables visible in {', '.join(s.databases)} to {s.user}",
                     f"Check `databases`/`include` of source `{s.name}` and the user's SELECT grants.")
            return
        self.add("tables", "PASS", f"{len(rows)} captured tables in {', '.join(s.databases)}")
        engines = [(db, t, e) for db, t, e, _ in rows if e in _NON_TRANSACTIONAL]
        if engines:
            self.add("engines", "WARN",
                     "non-transactional tables (a snapshot of them is not consistent, a failed statement may "
                     "half-apply): " + ", ".join(f"{db}.{t} ({e})" for db, t, e in engines),
                     " ".join(f"ALTER TABLE `{db}`.`{t}` ENGINE=InnoDB;" for db, t, _ in engines))
        else:
            self.add("engines", "PASS", "every captured table is transactional (InnoDB)")
        keyless = [(db, t) for db, t, _, pk in rows if not pk]
        if keyless:
            fixes = []
            for db, t in keyless:
                cursor.execute(
                    "SELECT index_name, GROUP_CONCAT(column_name ORDER BY seq_in_index) FROM information_schema.statistics "
                    "WHERE table_schema=%s AND table_name=%s AND non_unique=0 GROUP BY index_name "
                    "ORDER BY index_name", (db, t))
                unique = cursor.fetchone()
                columns = unique[1] if unique else "<key columns>"
                fixes.append(f"ALTER TABLE `{db}`.`{t}` ADD PRIMARY KEY ({columns});")
            self.add("primary_keys", "WARN",
                     "tables without a primary key (their Kafka key is null, so one row's changes may reorder, "
                     "and incremental snapshots skip them): " + ", ".join(f"{db}.{t}" for db, t in keyless),
                     " ".join(fixes) + " Or set Debezium `message.key.columns` in the source's `debezium:` mapping.")
        else:
            self.add("primary_keys", "PASS", "every captured table has a primary key")

    def _time_zone(self, cursor: Any) -> None:
        cursor.execute("SELECT @@global.time_zone, @@system_time_zone, TIMESTAMPDIFF(SECOND, UTC_TIMESTAMP(), NOW())")
        zone, system, offset = cursor.fetchone()
        saw = f"time_zone={zone}, system_time_zone={system}, offset from UTC {int(offset)} s"
        if zone in ("+00:00", "UTC") or (zone == "SYSTEM" and int(offset) == 0):
            self.add("time_zone", "PASS", saw)
        else:
            self.add("time_zone", "WARN", saw + " (DATETIME values are local wall-clock times; TIMESTAMP columns "
                     "convert through this zone, and a DST change makes an hour of DATETIMEs ambiguous)",
                     "SET GLOBAL time_zone = '+00:00'; and default_time_zone='+00:00' in [mysqld], or add "
                     f"`database.connectionTimeZone: {zone if zone != 'SYSTEM' else system}` to the source's "
                     "`debezium:` mapping.")


# ------------------------------------------------------------------------------------------- PostgreSQL


class PostgresPreflight(_Preflight):
    """Checks for a PostgreSQL source."""

    source: PostgresSourceConfig

    def run(self) -> list[Check]:
        import psycopg

        s = self.source
        try:
            conn = psycopg.connect(host=s.host, port=s.port, user=s.user, dbname=s.database, connect_timeout=10,
                                   password=s.password.get_secret_value() or None, autocommit=True)
        except psycopg.Error as exc:
            self.add("connect", "FAIL", f"cannot connect to {s.host}:{s.port}/{s.database} as {s.user}: "
                     f"{str(exc).strip().splitlines()[-1]}",
                     "Check host, port, database, user and password; allow the client in pg_hba.conf; create the "
                     "user with `branchline preflight --print-setup-sql`.")
            return self.checks
        with conn:
            self._checks(conn)
        return self.checks

    def _setting(self, conn: Any, name: str) -> str:
        return str(conn.execute("SELECT current_setting(%s)", (name,)).fetchone()[0])

    def _checks(self, conn: Any) -> None:
        version = self._setting(conn, "server_version")
        major = int(self._setting(conn, "server_version_num")) // 10000
        self.add("server", "PASS" if major >= 10 else "FAIL", f"PostgreSQL {version}",
                 "Upgrade to PostgreSQL 10 or later (pgoutput).")

        wal_level = self._setting(conn, "wal_level")
        self.add("wal_level", "PASS" if wal_level == "logical" else "FAIL", f"wal_level={wal_level}",
                 "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL.")

        self._slots_and_senders(conn)
        self._role(conn)
        self._replication_connection()
        tables = self._tables(conn)
        self._publication(conn, tables)
        self._control_tables(conn)
        self._wal_retained(conn)

    def _slots_and_senders(self, conn: Any) -> None:
        s = self.source
        max_slots = int(self._setting(conn, "max_replication_slots"))
        slots = conn.execute("SELECT slot_name, plugin, database FROM pg_replication_slots").fetchall()
        ours = [r for r in slots if r[0] == s.slot]
        free = max_slots - len(slots)
        saw = f"max_replication_slots={max_slots}, in use {len(slots)}"
        if ours:
            slot, plugin, database = ours[0]
            if plugin != "pgoutput" or database != s.database:
                self.add("replication_slots", "FAIL",
                         saw + f"; slot {slot} exists with plugin {plugin} on database {database}",
                         f"SELECT pg_drop_replication_slot('{slot}'); (or choose another `slot:` for source `{s.name}`)")
            else:
                self.add("replication_slots", "PASS", saw + f"; slot {s.slot} exists (pgoutput)")
        elif free < 1:
            self.add("replication_slots", "FAIL", saw + ", none free",
                     f"ALTER SYSTEM SET max_replication_slots = {max_slots + 4}; then restart PostgreSQL "
                     "(or drop an unused slot: SELECT pg_drop_replication_slot('<name>');).")
        else:
            self.add("replication_slots", "PASS", saw + f", {free} free (the connector creates {s.slot})")

        max_senders = int(self._setting(conn, "max_wal_senders"))
        used = conn.execute("SELECT count(*) FROM pg_stat_replication").fetchone()[0]
        active_ours = conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s AND active",
                                   (s.slot,)).fetchone()[0]
        free_senders = max_senders - used
        saw = f"max_wal_senders={max_senders}, in use {used}"
        if free_senders < 1 and not active_ours:
            self.add("wal_senders", "FAIL", saw + ", none free",
                     f"ALTER SYSTEM SET max_wal_senders = {max_senders + 4}; then restart PostgreSQL.")
        else:
            self.add("wal_senders", "PASS", saw + f", {free_senders} free")

    def _role(self, conn: Any) -> None:
        s = self.source
        row = conn.execute("SELECT rolreplication, rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
        replication, superuser = row
        if superuser:
            self.add("replication_role", "WARN", f"{s.user} is a superuser",
                     "Use a least-privilege user with REPLICATION instead (`branchline preflight "
                     "--print-setup-sql`); superusers can do anything to the source.")
        elif replication:
            self.add("replication_role", "PASS", f"{s.user} has REPLICATION")
        else:
            self.add("replication_role", "FAIL", f"{s.user} has neither REPLICATION nor SUPERUSER",
                     f'ALTER ROLE "{s.user}" WITH REPLICATION;')

    def _replication_connection(self) -> None:
        """Open a logical-replication (walsender) connection as the connector will, and IDENTIFY_SYSTEM:
        proves pg_hba.conf, the role and a free WAL sender together."""
        import psycopg

        s = self.source
        try:
            with psycopg.connect(host=s.host, port=s.port, user=s.user, dbname=s.database, connect_timeout=10,
                                 password=s.password.get_secret_value() or None, replication="database",
                                 autocommit=True) as conn:
                result = conn.pgconn.exec_(b"IDENTIFY_SYSTEM")
                if result.status != psycopg.pq.ExecStatus.TUPLES_OK:
                    raise psycopg.OperationalError((result.error_message or b"").decode(errors="replace").strip())
                xlogpos = (result.get_value(0, 2) or b"").decode()
        except psycopg.Error as exc:
            self.add("replication_connection", "FAIL",
                     f"a replication connection as {s.user} was refused: {str(exc).strip().splitlines()[-1]}",
                     f"Give {s.user} REPLICATION, allow it in pg_hba.conf for database {s.database} (e.g. "
                     f"`host {s.database} {s.user} <connector-host>/32 scram-sha-256`), keep a WAL sender free; "
                     "then SELECT pg_reload_conf();")
            return
        self.add("replication_connection", "PASS", f"walsender connection as {s.user} works (IDENTIFY_SYSTEM at "
                 f"{xlogpos})")

    def _tables(self, conn: Any) -> list[tuple[str, str]]:
        """Captured tables; checks SELECT, primary keys and REPLICA IDENTITY."""
        s = self.source
        rows = conn.execute(
            "SELECT n.nspname, c.relname, c.relreplident, "
            "  EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conrelid = c.oid AND k.contype = 'p'), "
            "  has_table_privilege(c.oid, 'SELECT') "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p') AND n.nspname = ANY(%s) ORDER BY 1, 2", (list(s.schemas),)).fetchall()
        wanted = set(captured(s, ((r[0], r[1]) for r in rows)))
        rows = [r for r in rows if (r[0], r[1]) in wanted]
        if not rows:
            self.add("tables", "WARN", f"no captured tables in schemas {', '.join(s.schemas)}",
                     f"Check `schemas`/`include` of source `{s.name}`.")
            return []
        unreadable = [f"{n}.{t}" for n, t, _, _, can in rows if not can]
        if unreadable:
            self.add("select_grants", "FAIL", f"{s.user} cannot SELECT from " + ", ".join(unreadable),
                     " ".join(f'GRANT SELECT ON "{n}"."{t}" TO "{s.user}";'
                              for n, t, _, _, can in rows if not can))
        else:
            self.add("select_grants", "PASS", f"{s.user} can SELECT all {len(rows)} captured tables")

        blocking = [(n, t) for n, t, ident, pk, _ in rows if not pk and ident in ("d", "n")]
        full = [(n, t) for n, t, ident, pk, _ in rows if not pk and ident in ("f", "i")]
        if blocking:
            self.add("primary_keys", "FAIL",
                     "tables without a primary key and without a usable REPLICA IDENTITY (once published, UPDATE "
                     "and DELETE on them fail on the source): " + ", ".join(f"{n}.{t}" for n, t in blocking),
                     " ".join(f'ALTER TABLE "{n}"."{t}" REPLICA IDENTITY FULL;' for n, t in blocking)
                     + " (better: add a primary key)")
        elif full:
            self.add("primary_keys", "WARN",
                     "tables without a primary key (REPLICA IDENTITY FULL/INDEX; their Kafka key is null): "
                     + ", ".join(f"{n}.{t}" for n, t in full),
                     " ".join(f'ALTER TABLE "{n}"."{t}" ADD PRIMARY KEY (<key columns>);' for n, t in full))
        else:
            self.add("primary_keys", "PASS", "every captured table has a primary key")
        default = [f"{n}.{t}" for n, t, ident, pk, _ in rows if pk and ident == "d"]
        full_pk = [f"{n}.{t}" for n, t, ident, pk, _ in rows if pk and ident == "f"]
        self.add("replica_identity", "PASS",
                 f"DEFAULT (key only in before images; unchanged TOASTed values not sent): {len(default)} tables"
                 + (f"; FULL: {', '.join(full_pk)}" if full_pk else ""))
        return [(n, t) for n, t, *_ in rows]

    def _publication(self, conn: Any, tables: list[tuple[str, str]]) -> None:
        s = self.source
        control = [tuple(s.signal_table.split(".", 1)), tuple(s.heartbeat_table.split(".", 1))]
        wanted = {f"{n}.{t}" for n, t in (*tables, *control)}
        row = conn.execute("SELECT puballtables, pubinsert AND pubupdate AND pubdelete AND pubtruncate "
                           "FROM pg_publication WHERE pubname = %s", (s.publication,)).fetchone()
        if row is None:
            can = conn.execute(
                "SELECT rolsuper OR NOT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "  WHERE n.nspname || '.' || c.relname = ANY(%s) AND NOT pg_has_role(c.relowner, 'USAGE')) "
                "FROM pg_roles WHERE rolname = current_user", (sorted(wanted),)).fetchone()[0]
            create = (f'CREATE PUBLICATION "{s.publication}" FOR TABLE '
                      + ", ".join(f'"{w.split(".")[0]}"."{w.split(".")[1]}"' for w in sorted(wanted)) + ";")
            if can:
                self.add("publication", "PASS", f"publication {s.publication} does not exist yet; the connector "
                         "creates it (filtered to the captured tables)")
            else:
                self.add("publication", "FAIL", f"publication {s.publication} does not exist and {s.user} does not "
                         "own the captured tables, so the connector cannot create it", create)
            return
        all_tables, all_ops = row
        published = {f"{n}.{t}" for n, t in conn.execute(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s", (s.publication,))}
        missing = sorted(wanted - published)
        extra = sorted(published - wanted)
        if missing:
            self.add("publication", "FAIL", f"publication {s.publication} lacks {', '.join(missing)}",
                     f'ALTER PUBLICATION "{s.publication}" ADD TABLE '
                     + ", ".join(f'"{m.split(".")[0]}"."{m.split(".")[1]}"' for m in missing) + ";")
        elif not all_ops:
            self.add("publication", "FAIL", f"publication {s.publication} does not publish every operation",
                     f"ALTER PUBLICATION \"{s.publication}\" SET (publish = 'insert, update, delete, truncate');")
        elif all_tables or extra:
            saw = "FOR ALL TABLES" if all_tables else "also " + ", ".join(extra)
            self.add("publication", "WARN", f"publication {s.publication} covers the captured tables and {saw} "
                     "(changes of other tables are decoded and sent for nothing)",
                     f'DROP PUBLICATION "{s.publication}"; (the connector recreates it filtered)' if all_tables else
                     f'ALTER PUBLICATION "{s.publication}" DROP TABLE '
                     + ", ".join(f'"{e.split(".")[0]}"."{e.split(".")[1]}"' for e in extra) + ";")
        else:
            self.add("publication", "PASS", f"publication {s.publication} covers exactly the {len(wanted)} "
                     "captured and control tables")

    def _control_tables(self, conn: Any) -> None:
        s = self.source
        for table, needed in ((s.signal_table, ("INSERT",)), (s.heartbeat_table, ("INSERT", "UPDATE"))):
            check = "signal_table" if table == s.signal_table else "heartbeat_table"
            exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()[0]
            schema, name = table.split(".", 1)
            setup = " ".join(st + ";" for st in setup_statements(s)
                             if f'"{name}"' in st or st.startswith(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
            if not exists:
                self.add(check, "FAIL", f"{table} is missing", setup)
                continue
            lacking = [p for p in needed
                       if not conn.execute("SELECT has_table_privilege(%s, %s)", (table, p)).fetchone()[0]]
            if lacking:
                self.add(check, "FAIL", f"{s.user} lacks {', '.join(lacking)} on {table}", setup)
            else:
                self.add(check, "PASS", f"{table} exists; {s.user} may {', '.join(needed)}")

    def _wal_retained(self, conn: Any) -> None:
        s = self.source
        keep = self._setting(conn, "max_slot_wal_keep_size")
        rows = conn.execute(
            "SELECT slot_name, active, wal_status, "
            "  pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint "
            "FROM pg_replication_slots WHERE slot_type = 'logical' OR restart_lsn IS NOT NULL ORDER BY 4 DESC NULLS LAST"
        ).fetchall()
        listing = ", ".join(f"{name} ({'active' if active else 'inactive'}, {_size(retained)} retained, {status})"
                            for name, active, status, retained in rows) or "no slots"
        lost = [name for name, _, status, _ in rows if status == "lost"]
        stale = [(name, retained) for name, active, _, retained in rows
                 if not active and name != s.slot and (retained or 0) > 1 << 30]
        if lost:
            self.add("wal_retained", "FAIL", f"slots whose WAL was removed: {', '.join(lost)}; {listing}",
                     " ".join(f"SELECT pg_drop_replication_slot('{n}');" for n in lost)
                     + " (the connector of a lost slot must re-snapshot)")
        elif stale:
            self.add("wal_retained", "WARN", f"inactive slots hold WAL: {listing}",
                     " ".join(f"SELECT pg_drop_replication_slot('{n}');" for n, _ in stale)
                     + " (only if nothing will resume from them)")
        else:
            self.add("wal_retained", "PASS", listing)
        if keep == "-1":
            self.add("max_slot_wal_keep_size", "WARN",
                     "max_slot_wal_keep_size=-1: a stalled slot keeps WAL without limit and can fill the disk",
                     f"ALTER SYSTEM SET max_slot_wal_keep_size = '<WAL of {s.min_log_retention_hours} h, e.g. 50GB>'; "
                     "SELECT pg_reload_conf();")
        else:
            self.add("max_slot_wal_keep_size", "PASS",
                     f"max_slot_wal_keep_size={keep}: slots further behind are invalidated (then re-snapshot); "
                     f"make it hold at least {s.min_log_retention_hours} h of WAL")


def _size(value: int | None) -> str:
    if value is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value = value / 1024  # type: ignore[assignment]
    return str(value)
