"""The training cycle of XAI-guided diffusion: which phase an iteration belongs to.

One cycle is ``phase_a`` iterations of phase A (Process1 + a discriminator update: 1 Process each)
followed by ``phase_b`` iterations of phase B (Process1 and Process2 with D frozen: 2 Processes
each). The plan's cycle is 20,000 + 2 x 40,000 = 100,000 Processes, five cycles = 500,000 (the
DDPM paper's step budget). Every count is a setting (``cycle.*`` in the experiment config).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple


class Position(NamedTuple):
    """Where iteration ``iteration`` lies: cycle (0-based), phase ("A"|"B"), index within the phase."""

    iteration: int
    cycle: int
    phase: str
    index: int


def _count(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class CycleSchedule:
    """Phase A / phase B iteration counts per cycle and the number of cycles.

    Iterations are numbered 0 .. ``total_iterations - 1``; within a cycle phase A comes first.
    """

    phase_a: int = 20_000
    phase_b: int = 40_000
    cycles: int = 5

    def __post_init__(self) -> None:
        _count(self.phase_a, "phase_a", 0)
        _count(self.phase_b, "phase_b", 0)
        _count(self.cycles, "cycles", 1)
        if self.phase_a + self.phase_b == 0:
            raise ValueError("phase_a, phase_b: at least one phase needs iterations, got 0 and 0")

    @property
    def iterations_per_cycle(self) -> int:
        return self.phase_a + self.phase_b

    @property
    def processes_per_cycle(self) -> int:
        return self.phase_a + 2 * self.phase_b

    @property
    def total_iterations(self) -> int:
        return self.cycles * self.iterations_per_cycle

    @property
    def total_processes(self) -> int:
        return self.cycles * self.processes_per_cycle

    def _check(self, iteration: int) -> int:
        if isinstance(iteration, bool) or not isinstance(iteration, int):
            raise TypeError(f"iteration: expected an int, got {type(iteration).__name__}")
        if not 0 <= iteration < self.total_iterations:
            raise ValueError(f"iteration: expected 0 <= iteration < {self.total_iterations}, got {iteration}")
        return iteration

    def position(self, iteration: int) -> Position:
        """(iteration, cycle, phase, index in phase) of ``iteration``."""
        cycle, within = divmod(self._check(iteration), self.iterations_per_cycle)
        if within < self.phase_a:
            return Position(iteration, cycle, "A", within)
        return Position(iteration, cycle, "B", within - self.phase_a)

    def phase(self, iteration: int) -> str:
        """``"A"`` (Process1 + D update) or ``"B"`` (Process1 + Process2, D frozen)."""
        return self.position(iteration).phase

    def __iter__(self) -> Iterator[Position]:
        """Every iteration's :class:`Position`, in order."""
        for cycle in range(self.cycles):
            base = cycle * self.iterations_per_cycle
            for index in range(self.phase_a):
                yield Position(base + index, cycle, "A", index)
            for index in range(self.phase_b):
                yield Position(base + self.phase_a + index, cycle, "B", index)

    def __len__(self) -> int:
        return self.total_iterations
