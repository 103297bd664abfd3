"""Capture: Debezium connector configs and the Kafka Connect client, the DBA preflight, and the
embedded runtime's binlog and logical-replication readers."""
