"""Training XAI-guided diffusion: the seed's cycle of Process1 / Process2 with a discriminator D.

    cfg = load_experiment("configs/demo.yaml", ["variant=noise+same"])
    summary = Trainer(cfg).fit()

The method is :class:`GuidedDiffusionStep`, one step object on the project's training loop
(:class:`genxai.training.Loop`: Accelerate, EMA, atomic checkpoints with exact resume, SIGTERM
save, NaN stop, logs, progress bar). One iteration, by phase (see
:class:`genxai.diffusion.cycle.CycleSchedule`):

- ``baseline``: one Process1 (plain DDPM); it runs as many iterations as the guided variants run
  Processes, so every variant makes the same number of UNet optimiser steps.
- phase A: Process1, then one D update (:func:`genxai.diffusion.discriminator.d_loss`): real x0
  against the detached estimate x0_hat of the same batch, only estimates from
  t <= ``cfg.saliency_max_t`` counting as fakes, non-saturating loss.
- phase B (D frozen): Process1, then Process2 on the same images: S = saliency of D's fake
  score on Process1's x0_hat, w = noise_weight(S), eps' = w * eps with a fresh t and eps,
  target eps'. Images whose x0_hat came from t above the cutoff get S = 1 (so w = 1). Attention
  variants give the UNet S in Process2 and all-ones (None) in Process1.

Sampling stays isotropic (w = 1): the model is trained by Process1 throughout, so the ordinary
DDPM/DDIM samplers from N(0, I) remain valid; ``guidance.anneal`` additionally anneals w -> 1 as
t -> T in Process2 so the training prior stays N(0, I).

Run folder: ``config.yaml``, ``metrics.csv``, ``evals.jsonl``, ``tb/``, ``checkpoints/``,
``samples/`` (grids), ``snapshots/`` (x0, x0_hat, saliency, w and per-level attention maps of a
fixed batch over training).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision.utils import save_image

from genxai.data.batches import image_of
from genxai.data.config import check_images_match
from genxai.diffusion.config import (
    ExperimentConfig,
    build_dataset,
    build_discriminator,
    build_schedule,
    build_unet,
)
from genxai.diffusion.cycle import CycleSchedule
from genxai.diffusion.discriminator import d_loss
from genxai.diffusion.guidance import anneal_weight, noise_weight, saliency
from genxai.diffusion.interop import diffusers_unet
from genxai.diffusion.pipeline import sample_run
from genxai.evaluation.fid import FID, reference_fid
from genxai.training import EMA, Event, Loop, LoopConfig, NonFiniteLossError, TrainStep
from genxai.training.step import BOOKKEEPING

PHASE_LABELS = {"P": "Process1", "A": "Process1+D", "B": "Process1+Process2"}

__all__ = ["PHASE_LABELS", "GuidedDiffusionStep", "NonFiniteLossError", "Trainer"]


class GuidedDiffusionStep(TrainStep):
    """The XAI-guided DDPM as a :class:`~genxai.training.TrainStep` (any variant, baselines too)."""

    unit = "Process"
    units = "processes"
    columns = ("cycle", "phase", "loss_p1", "loss_p2", "loss_d")
    resume_ignores = BOOKKEEPING

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = self.config = copy.deepcopy(cfg)
        self.find_unused_parameters = cfg.attention_maps != "none"
        self.cycle = CycleSchedule(cfg.cycle.phase_a, cfg.cycle.phase_b, cfg.cycle.cycles)
        self.discriminator: nn.Module | None = None
        self._fid: FID | None = None
        # Runs saved before these model keys existed lack them: at their defaults they resume.
        m, new = cfg.model, {"downsample_padding": 1, "norm_eps": 1e-5, "diffusers": None}
        self.resume_ignores = BOOKKEEPING + tuple(f"model.{k}" for k, v in new.items() if getattr(m, k) == v)

    # -- the plan --------------------------------------------------------------------------------
    @property
    def total_iterations(self) -> int:
        """The cycle's iterations, or for the baseline one per Process of the cycle."""
        return self.cycle.total_iterations if self.cfg.guided else self.cycle.total_processes

    @property
    def total_units(self) -> int:
        return self.cycle.total_processes

    def phase(self, iteration: int) -> str:
        """``"P"`` (baseline: Process1 only), ``"A"`` or ``"B"``."""
        return self.cycle.phase(iteration) if self.cfg.guided else "P"

    def cycle_index(self, iteration: int) -> int:
        if self.cfg.guided:
            return self.cycle.position(iteration).cycle
        return min(iteration // self.cycle.processes_per_cycle, self.cycle.cycles - 1)

    def describe(self, iteration: int) -> str:
        return f"cycle {self.cycle_index(iteration) + 1}/{self.cycle.cycles} {PHASE_LABELS[self.phase(iteration)]}"

    def log_fields(self, iteration: int) -> dict[str, Any]:
        return {"cycle": self.cycle_index(iteration), "phase": PHASE_LABELS[self.phase(iteration)]}

    # -- models ----------------------------------------------------------------------------------
    def build(self, loop: Loop) -> None:
        cfg, tr = self.cfg, self.cfg.train
        self.loop = loop
        self.image_shape = check_images_match(cfg.data, loop.dataset)

        if cfg.model.diffusers:  # fine-tune a diffusers UNet2DModel, the maps hooked into its blocks
            unet = diffusers_unet(cfg, cfg.data.channels)
        else:
            unet = build_unet(cfg, cfg.data.channels)
        self.ema = EMA(unet, tr.ema_decay, warmup=tr.ema_warmup)
        optimizer = torch.optim.Adam(unet.parameters(), lr=tr.lr)
        self.unet = loop.add_model(
            "unet", unet, optimizer, ema=self.ema, grad_clip=tr.grad_clip, warmup=tr.warmup, counts=True
        )
        if cfg.guided:
            d = cfg.discriminator
            disc = build_discriminator(cfg, cfg.data.channels)
            d_optimizer = torch.optim.Adam(disc.parameters(), lr=d.lr, betas=(d.beta1, d.beta2))
            self.discriminator = loop.add_model("discriminator", disc, d_optimizer)
            self._check_saliency(disc)
        self.schedule = build_schedule(cfg).to(loop.device)

    def _check_saliency(self, disc: nn.Module) -> None:
        """The configured saliency method and layer work on this D (now, not at phase B)."""
        g, device = self.cfg.guidance, self.loop.device
        x = torch.zeros(1, *self.image_shape, device=device)
        t = torch.zeros(1, dtype=torch.long, device=device)
        was_training = disc.training
        disc.eval()  # no power iteration of a spectral-norm D
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                saliency(disc, x, t, g.saliency_method, **g.saliency_options)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"guidance: {g.saliency_method!r} cannot explain this discriminator: {err}"
            ) from None
        finally:
            disc.train(was_training)

    def unwrapped_discriminator(self) -> nn.Module | None:
        return self.loop.unwrap("discriminator") if self.discriminator is not None else None

    # -- one iteration ---------------------------------------------------------------------------
    def __call__(self, loop: Loop, batch: torch.Tensor) -> None:
        x0 = batch.float() * 2 - 1
        if self.cfg.data.random_flip:
            flip = torch.rand(x0.shape[0], device=loop.device, generator=loop.generator) < 0.5
            x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
        phase = self.phase(loop.iteration)
        loss, t, x0_hat = self.process(x0)
        loop.log_value("loss_p1", loss)
        if phase == "A":
            loop.log_value("loss_d", self.discriminator_step(x0, x0_hat, t))
        elif phase == "B":
            s, w = self.saliency_and_weight(x0_hat, t)
            maps = s if self.cfg.attention_maps != "none" else None
            loss2, _, _ = self.process(x0, weight=w, saliency_map=maps)
            loop.log_value("loss_p2", loss2)

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
        cfg, loop = self.cfg, self.loop
        t = self.schedule.sample_timesteps(x0.shape[0], device=loop.device, generator=loop.generator)
        eps = torch.randn(x0.shape, device=loop.device, generator=loop.generator)
        if weight is not None:
            if cfg.guidance.anneal:
                g = cfg.guidance
                weight = anneal_weight(weight, t, cfg.schedule.num_timesteps, w_min=g.w_min, w_max=g.w_max)
            eps = weight * eps
        x_t = self.schedule.q_sample(x0, t, eps)
        tr = cfg.train
        with torch.autocast(loop.device.type, dtype=torch.bfloat16, enabled=tr.mixed_precision == "bf16"):
            pred = self.unet(x_t, t, saliency=saliency_map).float()
        per_image = (pred - eps).square().mean(dim=(1, 2, 3))
        weights = self.schedule.loss_weight(
            t, tr.loss_weighting, gamma=tr.snr_gamma, p2_k=tr.p2_k, p2_gamma=tr.p2_gamma
        )
        loss = (per_image * weights).mean()
        loop.optimize("unet", loss)
        x0_hat = self.schedule.predict_x0(x_t, t, pred.detach()).clamp(-1, 1)
        return loss, t, x0_hat

    def informative(self, t: torch.Tensor) -> torch.Tensor:
        """Estimates that train D and get saliency: t <= ``cfg.saliency_max_t``."""
        return t <= self.cfg.saliency_max_t

    def discriminator_step(self, x0: torch.Tensor, x0_hat: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One update of D by its own loss: real x0 against the informative estimates x0_hat."""
        d = self.cfg.discriminator
        loss = d_loss(
            self.discriminator,
            x0,
            x0_hat,
            t if d.time_aware else None,
            fake_mask=self.informative(t),
            r1_weight=d.r1_weight,
        )
        self.loop.optimize("discriminator", loss)
        return loss

    def saliency_and_weight(self, x0_hat: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """S (N, 1, H, W) of D's fake score on x0_hat (1 where t is above the cutoff) and w = noise_weight(S)."""
        g = self.cfg.guidance
        disc = self.unwrapped_discriminator()
        was_training = disc.training
        disc.eval()
        try:
            with torch.enable_grad():
                s = saliency(disc, x0_hat, t, g.saliency_method, **g.saliency_options).detach().float()
        finally:
            disc.train(was_training)
        s = torch.where(self.informative(t).view(-1, 1, 1, 1), s, torch.ones_like(s))
        w = noise_weight(s, gamma=g.gamma, blur_sigma=g.blur_sigma, w_min=g.w_min, w_max=g.w_max)
        return s, w

    # -- events: snapshots and evaluation --------------------------------------------------------
    def events(self) -> list[Event]:
        tr = self.cfg.train
        events = [Event("snapshot", tr.sample_every, self.snapshot)]
        if self.cfg.eval.num_samples:
            events.append(Event("eval", tr.eval_every, self.evaluate, at_end=True))
        return events

    def before_fit(self, loop: Loop) -> None:
        if self.cfg.eval.num_samples:
            self.reference()  # missing FID weights fail now, not after hours of training

    def _samples(self, num_images: int, *, seed: int, batch_size: int):
        return sample_run(
            self.cfg,
            self.ema.module,
            self.schedule,
            self.unwrapped_discriminator(),
            num_images=num_images,
            seed=seed,
            batch_size=batch_size,
        )

    def snapshot(self, count: int = 8) -> None:
        """Save a sample grid and, for guided variants, x0 / x0_hat / S / w / per-level attention
        maps of a fixed batch at a fixed t (run through :meth:`Loop.on_main`)."""
        from safetensors.torch import save_file

        cfg, loop, ema = self.cfg, self.loop, self.ema.module
        tag = f"iter_{loop.iteration:08d}"
        count_grid = min(64, max(cfg.sample.num_images, 1))
        grid = next(self._samples(count_grid, seed=cfg.seed, batch_size=count_grid))
        (loop.run_dir / "samples").mkdir(parents=True, exist_ok=True)
        save_image(grid, loop.run_dir / "samples" / f"{tag}.png", nrow=int(math.sqrt(grid.shape[0]) + 0.5))
        if self.discriminator is None:
            return
        n = min(count, len(loop.dataset))
        x0 = torch.stack([image_of(loop.dataset[k]) for k in range(n)]).to(loop.device).float() * 2 - 1
        generator = torch.Generator(loop.device).manual_seed(cfg.seed + 1)
        t = torch.full((n,), (cfg.saliency_max_t + 1) // 2, device=loop.device, dtype=torch.long)
        eps = torch.randn(x0.shape, device=loop.device, generator=generator)
        x_t = self.schedule.q_sample(x0, t, eps)
        with torch.no_grad():
            x0_hat = self.schedule.predict_x0(x_t, t, ema(x_t, t).float()).clamp(-1, 1)
        s, w = self.saliency_and_weight(x0_hat, t)
        tensors = {"x0": x0, "x0_hat": x0_hat, "saliency": s, "weight": w, "t": t}
        # Where D sees "fake" in the run's own samples at this point (clean images: t = 0).
        shown = grid[:count].to(loop.device) * 2 - 1
        zero = torch.zeros(len(shown), device=loop.device, dtype=torch.long)
        tensors["samples"], tensors["samples_saliency"] = shown, self.saliency_and_weight(shown, zero)[0]
        if ema.attention_maps != "none":
            with torch.no_grad():
                for level, a in enumerate(ema.attention_pyramid(s, x0)):
                    tensors[f"attention_level{level}"] = a.expand(n, -1, -1, -1)
        folder = loop.run_dir / "snapshots"
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"iteration": str(loop.iteration), "processes": str(loop.units), "variant": cfg.variant}
        save_file(
            {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()},
            folder / f"{tag}.safetensors",
            metadata=meta,
        )

    def reference(self) -> FID:
        """The FID metric holding the real images' statistics (computed once)."""
        if self._fid is None:
            self._fid = reference_fid(self.cfg, self.loop.dataset, self.loop.device, self.loop.run_dir)
        return self._fid

    def evaluate(self) -> dict[str, float]:
        """FID (and IS where available) of ``eval.num_samples`` EMA samples against the data."""
        e = self.cfg.eval
        fid = self.reference()
        fid.reset_fake()
        for batch in self._samples(e.num_samples, seed=self.cfg.seed + 12345, batch_size=e.batch_size):
            fid.update(batch, real=False)
        return fid.compute()


class Trainer(Loop):
    """Trains one variant of an :class:`ExperimentConfig`: the training loop with a
    :class:`GuidedDiffusionStep`; resumes from the run folder's newest checkpoint.

    Args:
        cfg: the experiment (``cfg.run_dir`` is the run folder).
        dataset: a data set of images in [0, 1] (items ``(image, label[, mask])``); default: the
            configured one from :func:`genxai.data.get_dataset`.
        resume: continue from the newest checkpoint in the run folder when there is one.
    """

    def __init__(self, cfg: ExperimentConfig, *, dataset: Dataset | None = None, resume: bool = True):
        step = GuidedDiffusionStep(cfg)
        config = LoopConfig.from_config(cfg)
        super().__init__(step, config, dataset if dataset is not None else build_dataset(cfg), resume=resume)

    @property
    def cfg(self) -> ExperimentConfig:
        return self.step.cfg

    @property
    def unet(self) -> nn.Module:
        return self.step.unet

    @property
    def discriminator(self) -> nn.Module | None:
        return self.step.discriminator

    def snapshot(self) -> None:
        """Sample grid and saliency snapshot now (main process)."""
        self.on_main(self.step.snapshot)

    def evaluate(self) -> dict[str, float] | None:
        """FID now (main process; None on the others)."""
        return self.on_main(self.step.evaluate)
