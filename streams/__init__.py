"""Streams: decode Debezium change events, transform rows, deduplicate on primary keys (pure
functions), and the Faust app that runs them over Kafka partitions."""
