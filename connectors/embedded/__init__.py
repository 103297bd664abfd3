"""Embedded capture readers: MariaDB/MySQL binlog and PostgreSQL pgoutput, in-process and without a JVM.

They emit the same `ChangeEvent` positions and values as the Debezium path, so both runtimes
produce the same target tables.
"""
