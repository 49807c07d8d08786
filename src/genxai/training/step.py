"""What a method brings to the training loop: a :class:`TrainStep` and its periodic :class:`Event` s."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from genxai.data.batches import collate_images

# Settings of genxai's training configs that a resumed run may change: where things are, how often
# it reports, how it samples and evaluates (a step's ``resume_ignores`` starts from these).
BOOKKEEPING = (
    "name",
    "out_dir",
    "data.root",
    "data.num_workers",
    "train.cpu",
    "train.progress",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.sample_every",
    "train.eval_every",
    "sample",
    "eval",
    "ablation",
)

if TYPE_CHECKING:
    from genxai.training.loop import Loop


@dataclass
class Event:
    """Something the main process does every ``every`` units (0: never) and/or at the end.

    ``run`` returns metrics to log in ``evals.jsonl`` or None. It runs with every tracked model in
    eval mode and the RNG forked, so it never changes what is trained.
    """

    name: str
    every: int
    run: Callable[[], dict[str, float] | None]
    at_end: bool = False


class TrainStep(ABC):
    """One method's part of training: its models, one iteration, its events.

    Class attributes: ``unit``/``units`` name what the loop counts (optimiser steps of the model
    added with ``counts=True``); ``columns`` are the values the step logs (``metrics.csv``);
    ``config`` (a dataclass) is saved as ``config.yaml`` and in every checkpoint, and a resumed run
    must match it except for the dotted keys in ``resume_ignores``.
    """

    unit: str = "step"
    units: str = "steps"
    columns: tuple[str, ...] = ()
    find_unused_parameters: bool = False
    config: Any = None
    resume_ignores: tuple[str, ...] = ()

    @abstractmethod
    def build(self, loop: Loop) -> None:
        """Create the models (seeded by the loop) and register them with :meth:`Loop.add_model`."""

    @property
    @abstractmethod
    def total_iterations(self) -> int:
        """Iterations of the whole run."""

    @property
    def total_units(self) -> int:
        """Units of the whole run (default: one per iteration)."""
        return self.total_iterations

    @abstractmethod
    def __call__(self, loop: Loop, batch: Any) -> None:
        """One iteration on ``batch`` (this process's share, on the device)."""

    def collate(self, items: list[Any]) -> Any:
        """A batch from data set items (default: their images stacked)."""
        return collate_images(items)

    def describe(self, iteration: int) -> str:
        """The progress bar's label at ``iteration``."""
        return ""

    def log_fields(self, iteration: int) -> dict[str, Any]:
        """Extra values of the ``metrics.csv`` row after ``iteration`` (e.g. the phase)."""
        return {}

    def before_fit(self, loop: Loop) -> None:
        """Main process, before the first iteration: fail early on what would fail later."""
        return None

    def events(self) -> list[Event]:
        """The periodic events (sample grids, evaluations)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """Extra state to checkpoint (JSON-able values and tensors)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        return None
