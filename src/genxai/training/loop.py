"""One training loop for every generative model: the method is a small step object.

    class AutoencoderStep(TrainStep):
        def build(self, loop):
            loop.add_model("net", net, torch.optim.Adam(net.parameters()), counts=True)
        def __call__(self, loop, batch):
            loss = F.mse_loss(loop.models["net"].module(batch), batch)
            loop.log_value("loss", loss)
            loop.optimize("net", loss)

    summary = Loop(AutoencoderStep(...), LoopConfig(run_dir="runs/ae", batch_size=32), dataset).fit()

The loop owns what every method needs and none should copy: Accelerate (CPU, one or many GPUs,
nodes), the resumable data order, optimiser steps with learning-rate warmup, clipping and EMA,
atomic checkpoints holding every weight, optimiser, RNG state and counter (so a resumed run equals
an uninterrupted one bit for bit on the CPU), SIGTERM/SIGINT save and stop, a NaN stop that never
saves over the last good checkpoint, ``metrics.csv`` + TensorBoard + ``evals.jsonl``, a progress
bar, and periodic events (sample grids, evaluations) counted in *units*: optimiser steps of the
model registered with ``counts=True`` (Processes for diffusion), so runs of different methods are
checkpointed and evaluated at the same points.

The step builds its models (:meth:`TrainStep.build`) and does one iteration
(:meth:`TrainStep.__call__`); everything it returns through the loop is logged and checkpointed.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from torch import nn
from torch.utils.data import DataLoader, Dataset

from genxai.config import config_to_dict, save_config
from genxai.core.checks import check_positive_int
from genxai.data.batches import ResumableBatches
from genxai.training import checkpoint
from genxai.training.ema import EMA
from genxai.training.logger import MetricsLogger
from genxai.training.step import Event, TrainStep

R = TypeVar("R")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the last good checkpoint was kept."""


@dataclass
class LoopConfig:
    """What the loop itself needs; intervals in units except ``log_every`` (iterations)."""

    run_dir: str | Path
    seed: int = 0
    batch_size: int = 64  # global batch, split over the processes
    log_every: int = 50
    checkpoint_every: int = 5000
    keep_checkpoints: int = 2
    num_workers: int = 0
    cpu: bool = False  # the CPU even where an accelerator is present
    progress: bool = True

    @classmethod
    def from_config(cls, cfg: Any) -> LoopConfig:
        """The loop settings of a genxai training config (``run_dir``, ``seed``, ``data.num_workers``
        and ``train.{batch_size, log_every, checkpoint_every, keep_checkpoints, cpu, progress}``)."""
        tr = cfg.train
        return cls(
            run_dir=cfg.run_dir,
            seed=cfg.seed,
            batch_size=tr.batch_size,
            log_every=tr.log_every,
            checkpoint_every=tr.checkpoint_every,
            keep_checkpoints=tr.keep_checkpoints,
            num_workers=cfg.data.num_workers,
            cpu=tr.cpu,
            progress=tr.progress,
        )

    def __post_init__(self) -> None:
        check_positive_int(self.batch_size, "batch_size")
        check_positive_int(self.log_every, "log_every")
        check_positive_int(self.checkpoint_every, "checkpoint_every")
        check_positive_int(self.keep_checkpoints, "keep_checkpoints")
        check_positive_int(self.num_workers, "num_workers", minimum=0)


@dataclass
class Tracked:
    """A model the loop trains and checkpoints, with its optimiser and options."""

    module: nn.Module
    optimizer: torch.optim.Optimizer | None
    ema: EMA | None
    grad_clip: float
    warmup: int
    base_lrs: list[float]
    counts: bool


class Loop:
    """Trains ``step`` on ``dataset``; resumes from the run folder's newest checkpoint.

    Args:
        step: the method (:class:`TrainStep`).
        config: run folder, seed, batch size, intervals (:class:`LoopConfig`).
        dataset: items accepted by ``step.collate``.
        resume: continue from the newest checkpoint in ``run_dir/checkpoints``; False with
            checkpoints present is an error (nothing is overwritten).
    """

    def __init__(self, step: TrainStep, config: LoopConfig, dataset: Dataset, *, resume: bool = True):
        self.step, self.config, self.dataset = step, config, dataset
        ddp = DistributedDataParallelKwargs(find_unused_parameters=step.find_unused_parameters)
        # Autocast is the step's (around its forwards), not Accelerate's global state, so runs with
        # different precisions can share a Python process. cpu=True also when no accelerator exists:
        # Accelerate then joins processes of `accelerate launch --multi_gpu` into a gloo group.
        cpu = config.cpu or not torch.accelerator.is_available()
        self.accelerator = acc = Accelerator(cpu=cpu, mixed_precision="no", kwargs_handlers=[ddp])
        self.device = acc.device
        self.rank, self.world = acc.process_index, acc.num_processes
        self.run_dir = Path(config.run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        if config.batch_size % self.world:
            raise ValueError(f"batch_size: {config.batch_size} is not divisible by {self.world} processes")
        self.batch_size = config.batch_size // self.world
        if len(dataset) < config.batch_size:
            raise ValueError(
                f"batch_size: the data set has {len(dataset)} images, fewer than one batch of "
                f"{config.batch_size}; lower the batch size or use more data"
            )

        self.models: dict[str, Tracked] = {}
        torch.manual_seed(config.seed)  # the same initial weights in every process
        step.build(self)
        if not any(t.counts for t in self.models.values()):
            raise ValueError("step: register one model with counts=True (its optimiser steps are the units)")
        torch.manual_seed(config.seed * 1_000_003 + self.rank)  # dropout: a stream of its own per process
        self.generator = torch.Generator(self.device).manual_seed(
            config.seed * 1_000_003 + 7919 * (self.rank + 1)
        )
        self.total_iterations = step.total_iterations
        self.total_units = step.total_units

        self.iteration = 0
        self.units = 0
        self.batches_seen = 0
        self.train_time = 0.0
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self._first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        self._sums: dict[str, tuple[torch.Tensor, int]] = {}
        self._signal: int | None = None
        self._batches: Iterator[Any] | None = None
        self.resumed_from = checkpoint.latest(self.checkpoint_dir) if resume else None
        if self.resumed_from is not None:
            self._load(self.resumed_from)
        elif checkpoint.latest(self.checkpoint_dir) is not None:
            raise ValueError(
                f"run: {self.run_dir} already holds checkpoints; resume it, or give the new run another name"
            )

    # -- what a step uses ------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def add_model(
        self,
        name: str,
        module: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        ema: EMA | None = None,
        grad_clip: float = 0.0,
        warmup: int = 0,
        counts: bool = False,
    ) -> nn.Module:
        """Train (with ``optimizer``) and checkpoint ``module``; returns it prepared for the device.

        ``ema``: an average updated after each of its optimiser steps. ``grad_clip`` > 0 clips the
        gradient norm; ``warmup`` > 0 ramps the learning rate linearly over that many units;
        ``counts``: its optimiser steps are the loop's units.
        """
        if name in self.models:
            raise ValueError(f"name: a model named {name!r} is already registered")
        if optimizer is not None:
            module, optimizer = self.accelerator.prepare(module, optimizer)
        else:
            module = module.to(self.device)
        if ema is not None:
            ema.to(self.device)
        lrs = [group["lr"] for group in optimizer.param_groups] if optimizer is not None else []
        self.models[name] = Tracked(module, optimizer, ema, grad_clip, warmup, lrs, counts)
        return module

    def unwrap(self, name: str) -> nn.Module:
        """The registered model without its distributed wrapper."""
        return self.accelerator.unwrap_model(self.models[name].module)

    def optimize(self, name: str, loss: torch.Tensor) -> None:
        """Backward ``loss`` and one optimiser step of model ``name`` (warmup, clipping, EMA)."""
        tracked = self.models[name]
        if tracked.optimizer is None:
            raise ValueError(f"name: model {name!r} was registered without an optimiser")
        if tracked.warmup:
            scale = min(1.0, (self.units + 1) / tracked.warmup)
            for group, base in zip(tracked.optimizer.param_groups, tracked.base_lrs):
                group["lr"] = base * scale
        self.accelerator.backward(loss)
        if tracked.grad_clip > 0:
            self.accelerator.clip_grad_norm_(tracked.module.parameters(), tracked.grad_clip)
        tracked.optimizer.step()
        tracked.optimizer.zero_grad(set_to_none=True)  # free the gradients before the next forward
        if tracked.ema is not None:
            tracked.ema.update(self.accelerator.unwrap_model(tracked.module))
        if tracked.counts:
            self.units += 1

    def log_value(self, name: str, value: torch.Tensor) -> None:
        """Add a scalar to the running mean logged as column ``name`` (NaN/inf is noticed)."""
        value = value.detach().float()
        bad = ~torch.isfinite(value)
        self._first_bad = torch.where(bad & (self._first_bad < 0), self.iteration, self._first_bad)
        self._nonfinite |= bad
        total, count = self._sums.get(name, (torch.zeros((), device=self.device), 0))
        self._sums[name] = (total + value, count + 1)

    def next_batch(self) -> Any:
        """This process's next batch, on the device (the data order resumes exactly)."""
        if self._batches is None:
            sampler = ResumableBatches(
                len(self.dataset), self.batch_size, self.config.seed, self.rank, self.world, self.batches_seen
            )
            loader = DataLoader(
                self.dataset,
                batch_sampler=sampler,
                num_workers=self.config.num_workers,
                collate_fn=self.step.collate,
                generator=torch.Generator().manual_seed(self.config.seed),  # keep the global RNG untouched
                pin_memory=self.device.type == "cuda",
                persistent_workers=self.config.num_workers > 0,
            )
            self._batches = iter(loader)
        batch = next(self._batches)
        self.batches_seen += 1
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=True)
        return type(batch)(b.to(self.device, non_blocking=True) for b in batch)

    def on_main(self, fn: Callable[[], R]) -> R | None:
        """Run ``fn`` on the main process only, with every tracked model in eval mode and the RNG
        forked (training state, modes and random streams are as before); the others wait."""
        result = None
        if self.is_main:
            modules = [t.module for t in self.models.values()]
            modes = [[m.training for m in module.modules()] for module in modules]
            devices = [self.device] if self.device.type == "cuda" else []
            try:
                for module in modules:
                    module.eval()
                with torch.random.fork_rng(devices=devices):
                    result = fn()
            finally:
                for module, mode in zip(modules, modes):
                    for m, training in zip(module.modules(), mode):
                        m.training = training
        self.accelerator.wait_for_everyone()
        return result

    def request_stop(self) -> None:
        """Stop after the current iteration with a checkpoint (what SIGTERM/SIGINT do)."""
        self._signal = signal.SIGTERM

    # -- the loop --------------------------------------------------------------------------------
    def fit(self, until: int | None = None) -> dict[str, Any]:
        """Train up to iteration ``until`` (default: the end of the run) and checkpoint.

        Returns a summary: ``status`` ("finished", "stopped" at ``until``, or "interrupted" by a
        signal), ``signal`` (its name, "SIGTERM" or "SIGINT", when interrupted; else None),
        ``iteration``, the units (``step.units``), ``checkpoint``, ``train_time_s``, ``evals``.
        """
        step, cfg = self.step, self.config
        end = self.total_iterations if until is None else min(until, self.total_iterations)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if step.config is not None:
                save_config(step.config, self.run_dir / "config.yaml")
        if self.iteration < end:
            self.on_main(lambda: step.before_fit(self))
        handlers = self._install_signal_handlers()
        columns = ("iteration", step.units, *step.columns, "lr", "train_time_s", f"{step.units}_per_s")
        logger = MetricsLogger(self.run_dir, columns, step.units, enabled=self.is_main)
        bar = self._progress_bar()
        status, saved_at = "finished", None
        try:
            while self.iteration < end:
                if self._stop_requested():
                    status = "interrupted"
                    break
                start, before = time.perf_counter(), self.units
                step(self, self.next_batch())
                self.iteration += 1
                self.train_time += time.perf_counter() - start
                bar.update(self.units - bar.n)
                bar.set_description(step.describe(self.iteration - 1), refresh=False)
                i = self.iteration
                if i % cfg.log_every == 0 or i == end:
                    self._log(logger, bar)
                if self._passed(before, cfg.checkpoint_every) or i == end:
                    saved_at = self.save()
                for event in step.events():
                    if self._passed(before, event.every) or (event.at_end and i == self.total_iterations):
                        self.run_event(event, logger)
            if status != "interrupted" and self.iteration < self.total_iterations:
                status = "stopped"
            last = checkpoint.latest(self.checkpoint_dir)
            if last is None or checkpoint.checkpoint_step(last) != self.iteration:
                saved_at = self.save()
            saved_at = saved_at or last
        finally:
            bar.close()
            logger.close()
            self._restore_signal_handlers(handlers)
        interrupted_by = signal.Signals(self._signal).name if status == "interrupted" else None
        return {
            "status": status,
            "signal": interrupted_by,
            "iteration": self.iteration,
            step.units: self.units,
            "checkpoint": str(saved_at) if saved_at else None,
            "train_time_s": self.train_time,
            "evals": logger.evals,
        }

    def run_event(self, event: Event, logger: MetricsLogger | None = None) -> dict[str, float] | None:
        """Run ``event`` now (main process); metrics it returns go to ``evals.jsonl``."""
        result = self.on_main(event.run)
        if result is not None and logger is not None:
            record = {
                "iteration": self.iteration,
                self.step.units: self.units,
                "train_time_s": round(self.train_time, 3),
                "metrics": result,
            }
            logger.log_eval(record)
        return result

    def _passed(self, before: int, every: int) -> bool:
        """Whether the last iteration passed a multiple of ``every`` units (0: never)."""
        return every > 0 and before // every != self.units // every

    def _progress_bar(self):
        from tqdm.auto import tqdm

        return tqdm(
            total=self.total_units,
            initial=self.units,
            unit=self.step.unit,
            disable=not (self.is_main and self.config.progress),
            dynamic_ncols=True,
            desc=self.step.describe(min(self.iteration, self.total_iterations - 1)),
        )

    def _log(self, logger: MetricsLogger, bar: Any) -> None:
        self.check_finite()
        values = {}
        for name, (total, count) in sorted(self._sums.items()):
            mean = total / count
            if self.world > 1:
                mean = self.accelerator.reduce(mean, "mean")
            values[name] = float(mean)
        self._sums.clear()
        counted = next(t for t in self.models.values() if t.counts)
        row = {
            "iteration": self.iteration,
            self.step.units: self.units,
            **self.step.log_fields(self.iteration - 1),
            "lr": counted.optimizer.param_groups[0]["lr"],
            "train_time_s": round(self.train_time, 3),
            f"{self.step.units}_per_s": round(self.units / max(self.train_time, 1e-9), 3),
            **values,
        }
        logger.log(row)
        bar.set_postfix({k: f"{v:.4f}" for k, v in values.items()}, refresh=False)

    # -- checks and signals ----------------------------------------------------------------------
    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` if any logged value since the start was NaN or infinite."""
        bad = self._nonfinite
        if self.world > 1:
            bad = self.accelerator.reduce(bad.float(), "max") > 0
        if bool(bad):
            first = int(self._first_bad)
            last = checkpoint.latest(self.checkpoint_dir)
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
            raise NonFiniteLossError(
                f"training stopped: the loss became NaN or infinite at iteration {first if first >= 0 else '?'} "
                f"(first noticed at iteration {self.iteration}); nothing was saved after it and {kept}. "
                "Try a lower learning rate, gradient clipping, or full precision."
            )

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, self._on_signal)
        return previous

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signal = signum

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _stop_requested(self) -> bool:
        """Whether any process got a signal; every process then records it (the largest number)."""
        number = float(self._signal or 0)
        if self.world > 1:
            number = float(self.accelerator.reduce(torch.tensor(number, device=self.device), "max"))
        if number:
            self._signal = int(number)
        return number > 0

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self) -> Path:
        """Write a checkpoint of the current iteration atomically (after checking the loss)."""
        self.check_finite()
        acc = self.accelerator
        name = checkpoint.checkpoint_name(self.iteration)
        tmp = self.checkpoint_dir / f".tmp-{name}"
        if self.is_main:
            checkpoint.begin(self.checkpoint_dir, self.iteration)
        acc.wait_for_everyone()
        rng = {"global": checkpoint.rng_state(), "generator": self.generator.get_state()}
        checkpoint.write_state(tmp, f"rng-{self.rank}", rng)
        if self.is_main:
            for key, tracked in self.models.items():
                module = acc.unwrap_model(tracked.module)
                config = getattr(module, "config", None)
                config = config if isinstance(config, dict) else None
                checkpoint.write_weights(tmp, key, module.state_dict(), config)
                if tracked.ema is not None:
                    checkpoint.write_weights(tmp, f"{key}_ema", tracked.ema.state_dict(), config)
            state: dict[str, Any] = {
                "iteration": self.iteration,
                "units": self.units,
                "batches_seen": self.batches_seen,
                "train_time_s": self.train_time,
                "world_size": self.world,
                "optimizers": {k: t.optimizer.state_dict() for k, t in self.models.items() if t.optimizer},
                "ema_updates": {k: t.ema.num_updates for k, t in self.models.items() if t.ema},
                "config": config_to_dict(self.step.config) if self.step.config is not None else None,
                "step": self.step.state_dict(),
            }
            checkpoint.write_state(tmp, "trainer", state)
        acc.wait_for_everyone()
        if self.is_main:
            checkpoint.commit(tmp, keep=self.config.keep_checkpoints)
        acc.wait_for_everyone()
        return self.checkpoint_dir / name

    def _load(self, path: Path) -> None:
        state = checkpoint.read_state(path, "trainer")
        self._check_same_config(state.get("config"))
        for key, tracked in self.models.items():
            module = self.accelerator.unwrap_model(tracked.module)
            module.load_state_dict(checkpoint.read_weights(path, key, self.device))
            if tracked.optimizer is not None:
                tracked.optimizer.load_state_dict(state["optimizers"][key])
            if tracked.ema is not None:
                weights = checkpoint.read_weights(path, f"{key}_ema", self.device)
                tracked.ema.load_state_dict(weights, state["ema_updates"][key])
        self.step.load_state_dict(state["step"])
        self.iteration = int(state["iteration"])
        self.units = int(state["units"])
        self.batches_seen = int(state["batches_seen"])
        self.train_time = float(state["train_time_s"])
        rng_file = path / f"rng-{self.rank}.json"
        if state["world_size"] == self.world and rng_file.is_file():
            rng = checkpoint.read_state(path, f"rng-{self.rank}")
            checkpoint.set_rng_state(rng["global"])
            self.generator.set_state(rng["generator"])
        elif self.is_main:
            print(
                f"warning: resuming a {state['world_size']}-process run with {self.world} processes: "
                "the random streams restart, so the run will not equal an uninterrupted one"
            )

    def _check_same_config(self, saved: dict[str, Any] | None) -> None:
        """A run folder resumes only what it trained: every setting that changes training must match."""
        if saved is None or self.step.config is None:
            return
        now, then = _flatten(config_to_dict(self.step.config)), _flatten(saved)
        ignored = self.step.resume_ignores

        def kept(key: str) -> bool:
            return not any(key == p or key.startswith(p + ".") for p in ignored)

        changed = [k for k in sorted(set(now) | set(then)) if kept(k) and now.get(k) != then.get(k)]
        if changed:
            shown = ", ".join(f"{k} (run: {then.get(k)!r}, now: {now.get(k)!r})" for k in changed[:6])
            raise ValueError(
                f"run: {self.run_dir} was trained with other settings: {shown}; resume it with its own "
                "settings, or give this run another name (name=...) or out_dir"
            )


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
