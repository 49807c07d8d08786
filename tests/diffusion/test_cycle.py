"""CycleSchedule: phase A then phase B in every cycle; Processes add up to cycles * (a + 2b)."""

from __future__ import annotations

import pytest

from genxai.diffusion import CycleSchedule


def test_plan_counts():
    c = CycleSchedule()
    assert (c.phase_a, c.phase_b, c.cycles) == (20_000, 40_000, 5)
    assert c.processes_per_cycle == 100_000 and c.total_processes == 500_000
    assert c.total_iterations == 300_000
    assert c.phase(19_999) == "A" and c.phase(20_000) == "B" and c.phase(60_000) == "A"
    assert sum(1 if p.phase == "A" else 2 for p in c) == 500_000


def test_scaled_counts_yield_a_then_b_per_cycle():
    c = CycleSchedule(2, 4, 5)
    steps = list(c)
    assert len(steps) == len(c) == c.total_iterations == 30
    phases = "".join(p.phase for p in steps)
    assert phases == "AABBBB" * 5
    assert [p.cycle for p in steps] == [i // 6 for i in range(30)]
    assert [p.index for p in steps[:6]] == [0, 1, 0, 1, 2, 3]
    done = 0
    for p in steps:
        assert c.position(p.iteration) == p
        done += 1 if p.phase == "A" else 2
    assert done == c.total_processes == 5 * (2 + 2 * 4)


def test_a_cycle_without_phase_a_starts_in_b():
    assert CycleSchedule(0, 3, 1).phase(0) == "B"


def test_bad_counts_and_iterations():
    with pytest.raises(ValueError, match="phase_a"):
        CycleSchedule(-1, 2, 1)
    with pytest.raises(ValueError, match="cycles"):
        CycleSchedule(1, 2, 0)
    with pytest.raises(ValueError, match="iteration"):
        CycleSchedule(1, 2, 1).phase(3)
