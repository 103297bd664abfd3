"""The SQL a DBA runs once per source: a least-privilege replication user, Branchline's signal and
heartbeat tables, and (PostgreSQL) the publication. `branchline preflight --print-setup-sql` prints it.

Least privilege, per kind:
- MariaDB/MySQL: REPLICATION SLAVE (read the binlog), REPLICATION CLIENT (= BINLOG MONITOR on MariaDB
  10.5+: SHOW BINARY LOGS / MASTER STATUS), RELOAD (FLUSH for the snapshot's consistent point),
  SHOW DATABASES; SELECT and LOCK TABLES only on the captured databases; INSERT on the signal table and
  INSERT/UPDATE on the heartbeat table. No SUPER, no write on data.
- PostgreSQL: LOGIN REPLICATION (not superuser), CONNECT on the database, USAGE + SELECT on the captured
  schemas, write on the two control tables. The publication is created here by the DBA (owner of the
  tables), so the connector never needs to own them.

The password is never printed: the SQL carries a placeholder for the DBA to replace.
"""

from __future__ import annotations

from branchline.config import AnySource as Source
from branchline.config import BinlogSourceConfig, PostgresSourceConfig

PASSWORD_PLACEHOLDER = "<choose-a-password>"



def _q(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _pq(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def binlog_setup(source: BinlogSourceConfig, password: str = PASSWORD_PLACEHOLDER, user_host: str = "%") -> list[str]:
    user = f"'{source.user}'@'{user_host}'"
    mariadb = source.kind == "mariadb"
    client = "BINLOG MONITOR" if mariadb else "REPLICATION CLIENT"
    sig_db, sig_table = source.signal_table.split(".", 1)
    hb_db, hb_table = source.heartbeat_table.split(".", 1)
    statements = [
        f"CREATE USER IF NOT EXISTS {user} IDENTIFIED BY '{password}'",
        f"GRANT RELOAD, SHOW DATABASES, REPLICATION SLAVE, {client} ON *.* TO {user}",
    ]
    for database in source.databases:
        statements.append(f"GRANT SELECT, LOCK TABLES ON {_q(database)}.* TO {user}")
    for database in dict.fromkeys((sig_db, hb_db)):
        statements.append(f"CREATE DATABASE IF NOT EXISTS {_q(database)} CHARACTER SET utf8mb4")
    statements += [
        (f"CREATE TABLE IF NOT EXISTS {_q(sig_db)}.{_q(sig_table)} (id VARCHAR(64) NOT NULL PRIMARY KEY, "
        "type VARCHAR(32) NOT NULL, data VARCHAR(2048) NULL) ENGINE=InnoDB"),
        (f"CREATE TABLE IF NOT EXISTS {_q(hb_db)}.{_q(hb_table)} (id INT NOT NULL PRIMARY KEY, "
        "ts TIMESTAMP(6) NOT NULL) ENGINE=InnoDB"),
        f"GRANT SELECT, INSERT ON {_q(sig_db)}.{_q(sig_table)} TO {user}",
        f"GRANT SELECT, INSERT, UPDATE ON {_q(hb_db)}.{_q(hb_table)} TO {user}",
    ]
    return statements


def postgres_setup(source: PostgresSourceConfig, password: str = PASSWORD_PLACEHOLDER,
                   tables: list[str] | None = None) -> list[str]:
    """`tables`: the captured tables as `schema.table` for the publication; None = every table of the
    captured schemas at the time the SQL is run (`FOR TABLES IN SCHEMA` would need superuser)."""
    role = _pq(source.user)
    sig_schema, sig_table = source.signal_table.split(".", 1)
    hb_schema, hb_table = source.heartbeat_table.split(".", 1)
    statements = [
        (f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{source.user}') THEN "
        f"CREATE ROLE {role} WITH LOGIN REPLICATION PASSWORD '{password}'; END IF; END $$"),
        f"GRANT CONNECT ON DATABASE {_pq(source.database)} TO {role}",
    ]
    for schema in source.schemas:
        statements += [
            f"GRANT USAGE ON SCHEMA {_pq(schema)} TO {role}",
            f"GRANT SELECT ON ALL TABLES IN SCHEMA {_pq(schema)} TO {role}",
            f"ALTER DEFAULT PRIVILEGES IN SCHEMA {_pq(schema)} GRANT SELECT ON TABLES TO {role}",
        ]
    for schema in dict.fromkeys((sig_schema, hb_schema)):
        statements += [f"CREATE SCHEMA IF NOT EXISTS {_pq(schema)}", f"GRANT USAGE ON SCHEMA {_pq(schema)} TO {role}"]
    statements += [
        (f"CREATE TABLE IF NOT EXISTS {_pq(sig_schema)}.{_pq(sig_table)} (id varchar(64) PRIMARY KEY, "
        "type varchar(32) NOT NULL, data varchar(2048))"),
        f"CREATE TABLE IF NOT EXISTS {_pq(hb_schema)}.{_pq(hb_table)} (id integer PRIMARY KEY, ts timestamptz NOT NULL)",
        f"GRANT SELECT, INSERT ON {_pq(sig_schema)}.{_pq(sig_table)} TO {role}",
        f"GRANT SELECT, INSERT, UPDATE ON {_pq(hb_schema)}.{_pq(hb_table)} TO {role}",
    ]
    control = [source.signal_table, source.heartbeat_table]
    if tables is not None:
        listed = ", ".join(f"{_pq(t.split('.', 1)[0])}.{_pq(t.split('.', 1)[1])}" for t in [*tables, *control])
        statements.append(f"CREATE PUBLICATION {_pq(source.publication)} FOR TABLE {listed}")
    else:
        schemas = ", ".join(f"'{s}'" for s in source.schemas)
        excluded = ", ".join(f"'{t}'" for t in source.exclude) or "''"
        statements.append(
            "DO $$ DECLARE t text; BEGIN "
            f"SELECT string_agg(format('%I.%I', schemaname, tablename), ', ') INTO t FROM pg_tables "
            f"WHERE (schemaname IN ({schemas}) AND schemaname || '.' || tablename NOT IN ({excluded})) "
            f"OR schemaname || '.' || tablename IN ('{source.signal_table}', '{source.heartbeat_table}'); "
            f"EXECUTE format('CREATE PUBLICATION {_pq(source.publication)} FOR TABLE %s', t); END $$"
        )
    return statements


def setup_statements(source: Source, password: str = PASSWORD_PLACEHOLDER, user_host: str = "%",
                     publication: bool = True) -> list[str]:
    """All statements for one source. `publication=False` leaves the publication to the connector
    (possible when its user owns the tables or is a superuser)."""
    if isinstance(source, PostgresSourceConfig):
        tables = list(source.include) if source.include and not any("*" in t for t in source.include) else None
        statements = postgres_setup(source, password, tables)
        return statements if publication else [s for s in statements if "PUBLICATION" not in s]
    return binlog_setup(source, password, user_host)


def setup_script(source: Source) -> str:
    """The SQL as text for a DBA, with a header naming the source and server."""
    client = "psql" if isinstance(source, PostgresSourceConfig) else "mariadb/mysql"
    header = [
        f"-- Branchline setup for source `{source.name}` ({source.kind} at {source.host}:{source.port}).",
        f"-- Run as an administrator with {client}. Replace {PASSWORD_PLACEHOLDER} first.",
    ]
    if isinstance(source, PostgresSourceConfig):
        header.append(f"-- Connect to database {source.database!r} first (\\c {source.database}).")
    return "\n".join([*header, *(s + ";" for s in setup_statements(source))]) + "\n"


def run_setup(source: Source, admin_user: str, admin_password: str = "", user_host: str = "%") -> list[str]:
    """Run the setup SQL on the source as an administrator, with the user's password from the pipeline
    file. Idempotent: users, tables and grants are created if missing; an existing publication is left
    alone, and none is created when the configured user is a superuser (the connector manages it then).
    Returns the statements run, with the password masked."""
    password = source.password.get_secret_value()
    shown = lambda statement: statement.replace(f"'{password}'", "'********'") if password else statement
    done: list[str] = []
    if isinstance(source, PostgresSourceConfig):
        import psycopg

        with psycopg.connect(host=source.host, port=source.port, user=admin_user, password=admin_password or None,
                             dbname=source.database, connect_timeout=10, autocommit=True) as conn:
            row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (source.user,)).fetchone()
            superuser = bool(row and row[0])
            exists = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s",
                                  (source.publication,)).fetchone() is not None
            for statement in setup_statements(source, password.replace("'", "''"),
                                              publication=not (superuser or exists)):
                conn.execute(statement)  # type: ignore[arg-type]
                done.append(shown(statement))
        return done
    import pymysql

    conn = pymysql.connect(host=source.host, port=source.port, user=admin_user, password=admin_password,
                           connect_timeout=10, autocommit=True)
    try:
        with conn.cursor() as cursor:
            for statement in binlog_setup(source, password.replace("'", "''"), user_host):
                cursor.execute(statement)
                done.append(shown(statement))
    finally:
        conn.close()
    return done
