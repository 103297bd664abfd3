"""The embedded bench's CPU of a window (`branchline.runtime.bench.CpuTimeline`): the CPU spent while the
end-to-end rate is measured, without start-up or the idle tail."""

from __future__ import annotations

from branchline.runtime.bench import CpuTimeline


def _timeline(readings: dict[int, list[tuple[float, float]]]) -> CpuTimeline:
    timeline = CpuTimeline()
    timeline.readings = readings
    return timeline


def test_a_window_counts_the_cpu_between_its_ends_read_straight_between_readings():
    timeline = _timeline({7: [(100.0, 1.0), (101.0, 2.0), (103.0, 2.5)]})
    # start-up before 100.5 (1.5 s of CPU at 100.5) and the tail after 102 (2.25 s) are left out
    assert timeline.between(100.5, 102.0) == {7: 0.75}
    assert timeline.first_to_last() == {7: 1.5}
    assert timeline.last() == {7: 2.5}


def test_a_process_seen_late_or_gone_early_counts_only_while_it_was_read():
    timeline = _timeline({1: [(105.0, 3.0), (106.0, 4.0)], 2: [(100.0, 0.0), (101.0, 1.0)]})
    assert timeline.between(100.0, 110.0) == {1: 1.0, 2: 1.0}
    assert timeline.between(102.0, 104.0) == {1: 0.0, 2: 0.0}
