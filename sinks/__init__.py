"""Sinks: idempotent writers into the cloud store.

- `contract`  the `Sink` Protocol and `SinkCapabilities` (imports no implementation)
- `config`    the pipeline file's `sinks:` entries (`SinkConfig`, discriminated by ``kind``)
- `build`     the one place that builds a sink from its config
- `postgres/` COPY into a staging table, then one position-guarded upsert per batch
- `delta/`    position-guarded MERGE into Delta tables, committed on an interval; `branchline lake`
- `bench`     throughput figures beside a plain COPY (``python -m branchline.sinks.bench``)

Every sink keeps each row's source position (``_bl_position``) and never applies an older position over
a newer one, so replays, restarts and late redeliveries leave the target as the source history implies;
`tests/conformance` holds the suite each sink must pass.
"""
