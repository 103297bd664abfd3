"""PostgreSQL sink: COPY into staging, then one position-guarded set-based upsert per batch."""
