"""Garbage-collector settings for the long-running pipeline processes.

Why: a worker or `branchline run` allocates a few hundred container objects per change (parsed
JSON, row dicts, events) that almost all die young, and keeps a large set of long-lived objects
(imported modules, the app, plans, the dedupe store). With CPython's default thresholds
(700, 10, 10) the collector ran every few dozen events and a full collection walked all the
long-lived objects: measured with ``python -m branchline.streams.bench``, that was about a quarter of
the decode/transform/dedupe cost, and half of the embedded runtime's spool decode. Freezing what start-up built moves it out of the collector's sight, and a larger
first threshold lets a batch finish before the young generation is scanned. Reference cycles are
rare on the data path, so the memory they may hold until the next collection stays small.
"""

from __future__ import annotations

import gc

THRESHOLDS = (100_000, 50, 1000)
"""Young-generation allocations before a collection, and how many of each generation's collections
trigger the next one."""


def tune_for_throughput() -> None:
    """Collect once, freeze the survivors (start-up state), and raise the thresholds. Call it after
    start-up, before the first batch; calling it again freezes what has been built since."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
