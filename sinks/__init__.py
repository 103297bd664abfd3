"""Sinks: idempotent writers into the cloud store. The contract is in `branchline.sinks.contract`."""
