"""Pure parts of the embedded runner: table filters from the pipeline file, progress arithmetic."""

from __future__ import annotations

import time

from branchline.runtime.runner import TableProgress, table_filter


def test_include_patterns_select_tables_with_wildcards():
    accept = table_filter(("erp.orders", "erp.order_*"), ())
    assert accept("erp", "orders") and accept("erp", "order_lines")
    assert not accept("erp", "customers") and not accept("other", "orders")


def test_exclude_patterns_drop_tables_and_keep_the_rest():
    accept = table_filter((), ("erp.audit_*",))
    assert accept("erp", "orders") and not accept("erp", "audit_log")


def test_no_lists_accept_everything():
    assert table_filter((), ())("any", "table")


def test_progress_rate_and_time_left():
    progress = TableProgress("erp:erp.orders", total=1000, rows=250)
    progress.started = time.monotonic() - 1.0
    assert 200 < progress.rate < 300
    assert progress.remaining_s is not None and 2.0 < progress.remaining_s < 4.0
    progress.done = True
    assert progress.remaining_s is None
