"""The embedded runtime: `branchline run` captures, spools and writes in one process, without Kafka."""
