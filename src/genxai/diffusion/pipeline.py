"""A trained run as a pipeline: load it and sample it the way it was trained.

    run = load_run("runs/demo/diffusion/noise+hierarchical", device="cuda")
    for images in sample_run(run.cfg, run.unet, run.schedule, run.discriminator, num_images=64):
        ...                                           # (B, C, H, W) in [0, 1]
    fid = genxai.evaluation.fid.reference_fid(run.cfg, build_dataset(run.cfg), "cuda", "runs/demo")

Training (snapshots and evaluations), ``genxai sample``, ``genxai fid`` and the jobs all sample
through :func:`sample_run`, so a run's sampler, its steps and its saliency-conditioned attention
maps (``guidance.sample_saliency_every``) are the same everywhere, and FID during training equals
``genxai fid`` for the same seed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from genxai.diffusion.config import (
    ExperimentConfig,
    build_discriminator,
    build_schedule,
    build_unet,
    load_experiment,
)
from genxai.diffusion.discriminator import Discriminator
from genxai.diffusion.hooked import DiffusersUNet
from genxai.diffusion.sampling import (
    SAMPLERS,
    GuidanceFn,
    ModelFn,
    SaliencyConditioned,
    ddim_sample,
    ddpm_sample,
)
from genxai.diffusion.schedule import NoiseSchedule
from genxai.diffusion.unet import UNet
from genxai.training import checkpoint


class LoadedRun(NamedTuple):
    """A trained run ready to sample: its config, UNet (EMA weights by default), D and schedule.

    ``unet``: our :class:`UNet`, or for a run that fine-tuned a diffusers model
    (``model.diffusers``) the hooked :class:`~genxai.diffusion.hooked.DiffusersUNet`.
    """

    cfg: ExperimentConfig
    unet: UNet | DiffusersUNet
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
    """A run's networks from its newest (or a given) checkpoint, in eval mode and frozen.

    The networks are rebuilt from the constructor configs stored with their weights; the run's
    ``config.yaml`` gives the schedule and the sampling settings.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        inside = sorted(p.parent.name for p in run_dir.glob("*/config.yaml"))
        hint = f"; the runs inside are: {', '.join(inside)} (pass one of them)" if inside else ""
        raise FileNotFoundError(
            f"run: no config.yaml in {run_dir} (not a run folder of `genxai train`){hint}"
        )
    cfg = load_experiment(run_dir / "config.yaml")
    path = Path(checkpoint_path) if checkpoint_path else checkpoint.latest(run_dir / "checkpoints")
    if path is not None and not path.is_dir():
        raise FileNotFoundError(f"checkpoint: no checkpoint folder at {path}")
    if path is None and not allow_untrained:
        raise FileNotFoundError(f"run: no checkpoint in {run_dir / 'checkpoints'}")
    channels = cfg.data.channels or 3
    if path is None:
        if cfg.model.diffusers:
            from genxai.diffusion.interop import diffusers_unet

            unet = diffusers_unet(cfg, channels)
        else:
            unet = build_unet(cfg, channels)
        disc = build_discriminator(cfg, channels) if cfg.guided else None
    else:
        cls = DiffusersUNet if cfg.model.diffusers else UNet
        unet = checkpoint.load_module(path, "unet_ema" if use_ema else "unet", cls)
        disc = checkpoint.load_module(path, "discriminator", Discriminator) if cfg.guided else None
    unet = unet.to(device).eval().requires_grad_(False)
    disc = disc.to(device).eval().requires_grad_(False) if disc is not None else None
    return LoadedRun(cfg, unet, disc, build_schedule(cfg).to(device), path)


def model_fn_for(
    cfg: ExperimentConfig,
    unet: nn.Module,
    schedule: NoiseSchedule,
    discriminator: nn.Module | None = None,
    *,
    saliency_every: int | None = None,
) -> ModelFn:
    """``model_fn(x_t, t) -> eps`` for the samplers, as the run samples.

    Attention variants get D's saliency of the current estimate every ``saliency_every`` steps
    (default ``guidance.sample_saliency_every``; estimates from t above ``cfg.saliency_max_t``
    give none, as in training) when D is given, otherwise the all-ones map (None).
    """
    every = cfg.guidance.sample_saliency_every if saliency_every is None else saliency_every
    if getattr(unet, "attention_maps", "none") == "none" or discriminator is None or every <= 0:
        return lambda x_t, t: unet(x_t, t)
    g = cfg.guidance
    return SaliencyConditioned(
        unet,
        discriminator,
        schedule,
        every=every,
        max_t=cfg.saliency_max_t,
        method=g.saliency_method,
        **g.saliency_options,
    )


@torch.no_grad()
def generate(
    model_fn: ModelFn,
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
    guidance: GuidanceFn | None = None,
    progress: bool = False,
    variance: str = "fixed_large",
    clip_denoised: bool = True,
    spacing: str = "uniform",
) -> Iterator[torch.Tensor]:
    """Images in [0, 1], ``batch_size`` at a time (never all held at once), from a seeded generator.

    ``variance`` (DDPM), ``clip_denoised`` and ``spacing`` (DDIM): as the samplers; an imported
    diffusers model passes its scheduler's (:attr:`genxai.diffusion.interop.Imported.sampler_options`).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {', '.join(SAMPLERS)}, got {sampler!r}")
    device = torch.device(device)
    generator = torch.Generator(device).manual_seed(seed)
    for start in range(0, num_images, batch_size):
        shape = (min(batch_size, num_images - start), *image_shape)
        if hasattr(model_fn, "reset"):  # a saliency-conditioned model_fn starts each batch afresh
            model_fn.reset()
        common = {
            "generator": generator,
            "device": device,
            "guidance": guidance,
            "progress": progress,
            "clip_denoised": clip_denoised,
        }
        if sampler == "ddpm":
            x = ddpm_sample(model_fn, schedule, shape, variance=variance, **common)
        else:
            x = ddim_sample(model_fn, schedule, shape, steps=steps, eta=eta, spacing=spacing, **common)
        yield ((x.float().clamp(-1, 1) + 1) / 2).clamp(0, 1)


def sample_run(
    cfg: ExperimentConfig,
    unet: nn.Module,
    schedule: NoiseSchedule,
    discriminator: nn.Module | None = None,
    *,
    num_images: int,
    seed: int = 0,
    batch_size: int | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    saliency_every: int | None = None,
    guidance: GuidanceFn | None = None,
    progress: bool = False,
    sampler_options: Mapping[str, Any] | None = None,
) -> Iterator[torch.Tensor]:
    """Images of a run in [0, 1], batch by batch, with its sampling settings (``cfg.sample``)
    unless given; ``guidance``: a sampler hook such as Discriminator Guidance;
    ``sampler_options``: ``variance``/``clip_denoised``/``spacing`` of :func:`generate`."""
    s = cfg.sample
    model_fn = model_fn_for(cfg, unet, schedule, discriminator, saliency_every=saliency_every)
    shape = (cfg.data.channels or 3, cfg.data.image_size, cfg.data.image_size)
    device = next(unet.parameters()).device
    return generate(
        model_fn,
        schedule,
        num_images,
        shape,
        batch_size=batch_size or s.batch_size,
        sampler=sampler or s.sampler,
        steps=steps or s.steps,
        eta=s.eta if eta is None else eta,
        seed=seed,
        device=device,
        guidance=guidance,
        progress=progress,
        **(sampler_options or {}),
    )
