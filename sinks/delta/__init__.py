"""Delta Lake sink (delta-rs): position-guarded MERGE into Delta tables, committed on an interval."""
