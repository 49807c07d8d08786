"""A trained GAN run as a pipeline: load its generator (EMA weights by default) and sample it.

    g = load_generator("runs/gan-shapes", device="cuda")        # eval mode, frozen
    z = g.latents(16, generator=torch.Generator().manual_seed(0))
    for images in sample(g, 1000, seed=0, batch_size=250):     # (B, C, H, W) in [0, 1]
        ...

The networks are rebuilt from the constructor configs stored with their weights in the checkpoint,
so a run loads without its experiment config. :func:`sample` draws the latents of image ``i``
from the seed alone (a CPU generator, chunked as :meth:`Generator.latents` draws them): the same
seed gives the same images whatever the batch size or device, and they are the images of
``g(g.latents(n, generator=torch.Generator().manual_seed(seed)))``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from genxai.core.checks import check_positive_int
from genxai.gan.config import GANConfig, load_gan_config
from genxai.gan.models import LATENT_CHUNK, Discriminator, Generator
from genxai.training import checkpoint

GENERATOR, DISCRIMINATOR = "generator", "discriminator"
"""The names the trainer registers its models under (the EMA copy is ``generator_ema``)."""


class LoadedGAN(NamedTuple):
    """A trained run: its config (None without ``config.yaml``), G, D and the checkpoint read."""

    cfg: GANConfig | None
    generator: Generator
    discriminator: Discriminator
    checkpoint: Path


def find_checkpoint(run_dir: str | Path, checkpoint_path: str | Path | None = None) -> Path:
    """The checkpoint folder to load: ``checkpoint_path``, or the run's newest, or ``run_dir``
    itself when it is a checkpoint folder."""
    if checkpoint_path is not None:
        path = Path(checkpoint_path)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint: no checkpoint folder at {path}")
        return path
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run: no folder at {run_dir}")
    if (run_dir / f"{GENERATOR}.safetensors").is_file():
        return run_dir
    path = checkpoint.latest(run_dir / "checkpoints")
    if path is None:
        inside = sorted(p.parent.name for p in run_dir.glob("*/checkpoints"))
        hint = f"; the runs inside are: {', '.join(inside)} (pass one of them)" if inside else ""
        raise FileNotFoundError(f"run: no checkpoint in {run_dir / 'checkpoints'}{hint}")
    return path


def _frozen(module: nn.Module, device: str | torch.device) -> nn.Module:
    return module.to(device).eval().requires_grad_(False)


def load_generator(
    run_dir: str | Path,
    *,
    use_ema: bool = True,
    device: str | torch.device = "cpu",
    checkpoint_path: str | Path | None = None,
) -> Generator:
    """The run's generator (its EMA weights unless ``use_ema=False``), in eval mode and frozen."""
    path = find_checkpoint(run_dir, checkpoint_path)
    name = f"{GENERATOR}_ema" if use_ema else GENERATOR
    if not (path / f"{name}.safetensors").is_file():
        raise FileNotFoundError(
            f"checkpoint: no {name}.safetensors in {path}"
            + (" (the run kept no EMA; load it with use_ema=False / --no-ema)" if use_ema else "")
        )
    return _frozen(checkpoint.load_module(path, name, Generator), device)


def load_discriminator(
    run_dir: str | Path, *, device: str | torch.device = "cpu", checkpoint_path: str | Path | None = None
) -> Discriminator:
    """The run's discriminator, in eval mode and frozen (what it says about images can be explained)."""
    path = find_checkpoint(run_dir, checkpoint_path)
    return _frozen(checkpoint.load_module(path, DISCRIMINATOR, Discriminator), device)


def load_gan_run(
    run_dir: str | Path,
    *,
    use_ema: bool = True,
    device: str | torch.device = "cpu",
    checkpoint_path: str | Path | None = None,
) -> LoadedGAN:
    """G, D and (where the run folder has one) the config of a run, from one checkpoint."""
    path = find_checkpoint(run_dir, checkpoint_path)
    config_file = Path(run_dir) / "config.yaml"
    cfg = load_gan_config(config_file) if config_file.is_file() else None
    g = load_generator(run_dir, use_ema=use_ema, device=device, checkpoint_path=path)
    d = load_discriminator(run_dir, device=device, checkpoint_path=path)
    return LoadedGAN(cfg, g, d, path)


def latent_batches(
    generator: Generator, num_images: int, *, seed: int = 0, batch_size: int = 64
) -> Iterator[torch.Tensor]:
    """The latents of images ``0 .. num_images - 1`` of ``seed``, ``batch_size`` at a time, on the CPU."""
    check_positive_int(num_images, "num_images")
    check_positive_int(batch_size, "batch_size")
    check_positive_int(seed, "seed", minimum=0)
    rng = torch.Generator().manual_seed(seed)
    pending = torch.empty(0, generator.latent_dim)
    for start in range(0, num_images, batch_size):
        take = min(batch_size, num_images - start)
        while len(pending) < take:
            fresh = generator.latents(LATENT_CHUNK, generator=rng, device="cpu")
            pending = torch.cat([pending, fresh])
        z, pending = pending[:take], pending[take:]
        yield z


@torch.no_grad()
def sample(
    generator: Generator, num_images: int, *, seed: int = 0, batch_size: int = 64
) -> Iterator[torch.Tensor]:
    """Images in [0, 1] on the generator's device, ``batch_size`` at a time, from seeded latents.

    The generator runs in eval mode (BatchNorm with its running statistics, so an image does not
    depend on its batch); its mode is restored after each batch.
    """
    if not isinstance(generator, Generator):
        raise TypeError(f"generator: expected a genxai.gan.Generator, got {type(generator).__name__}")
    device = generator.device
    for z in latent_batches(generator, num_images, seed=seed, batch_size=batch_size):
        was_training = generator.training
        generator.eval()
        try:
            x = generator(z.to(device))
        finally:
            generator.train(was_training)
        yield ((x.float() + 1) / 2).clamp(0, 1)
