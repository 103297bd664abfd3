"""The local stack: private MariaDB, PostgreSQL, Kafka (KRaft) and Kafka Connect with the Debezium
plugins, started as ordinary processes on 127.0.0.1; dashboards and alert rules."""
