"""Typed config of a GAN run (YAML + dotted ``key=value`` overrides) and the builders that turn it
into data and networks.

    cfg = load_gan_config("gan-shapes", ["train.iterations=500", "name=short"])
    g, d = build_generator(cfg, channels=3), build_discriminator(cfg, channels=3)

Every value has a default, so a YAML file states only what differs; an unknown key, a value of the
wrong type or out of range fails at load time naming the key, before any training starts. The
resolved config is saved in the run folder as ``config.yaml`` and reloads with :func:`load_gan_config`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from genxai.config import load_config, save_config
from genxai.core.checks import check_in_range, check_positive_int
from genxai.data.config import DataConfig, validate_data
from genxai.data.config import build_dataset as build_data
from genxai.evaluation.fid import EvalConfig, validate_eval
from genxai.gan.models import Discriminator, Generator


@dataclass
class ModelConfig:
    """The DCGAN pair: G's widths grow towards z, D's towards its head."""

    latent_dim: int = 64
    g_channels: int = 64  # width of G's last block (earlier blocks double it)
    d_channels: int = 64  # width of D's first block (later blocks double it)
    max_channels: int = 512
    spectral_norm: bool = False  # spectral normalisation of D's convs


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping; one iteration is one D step then one G step, and the
    ``*_every`` intervals count G steps (``log_every`` counts iterations, the same here)."""

    iterations: int = 5000
    batch_size: int = 64  # global batch (split over processes)
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])  # Adam's, for G and D (DCGAN)
    ema_decay: float = 0.999  # EMA of G's weights (samples and load_generator use it)
    ema_warmup: bool = True  # decay min(ema_decay, (1 + n) / (10 + n)): useful for short runs
    r1_weight: float = 0.0  # R1 penalty r1_weight / 2 * E ||grad D(real)||^2 (0: off)
    grad_clip: float = 0.0  # 0 disables clipping
    cpu: bool = False  # train on the CPU even when a GPU is present
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    sample_every: int = 0  # sample grid of fixed latents (0: only at the end)
    eval_every: int = 0  # FID (0: only at the end when eval.num_samples > 0)
    progress: bool = True


@dataclass
class SampleConfig:
    """How the sample grids and ``genxai sample-gan`` generate images."""

    num_images: int = 64
    batch_size: int = 64
    use_ema: bool = True


@dataclass
class GANConfig:
    """One GAN run: data, networks, optimisation, sampling and evaluation."""

    name: str = "gan"
    out_dir: str = "runs"
    seed: int = 0
    data: DataConfig = field(default_factory=lambda: DataConfig(image_size=32))
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


def _positive(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}: expected a number > 0, got {value!r}")


def validate(cfg: GANConfig) -> None:
    """Reject every value no run can use, naming the key (data-dependent checks: the trainer)."""

    if not cfg.name:
        raise ValueError("name: expected a non-empty run name (the run folder is out_dir/name)")
    check_positive_int(cfg.seed, "seed", minimum=0)
    d = cfg.data
    validate_data(d, min_size=8)
    if d.image_size & (d.image_size - 1):
        raise ValueError(f"data.image_size: expected a power of 2 >= 8 (16, 32, 64, ...), got {d.image_size}")

    m = cfg.model
    for key in ("latent_dim", "g_channels", "d_channels", "max_channels"):
        check_positive_int(getattr(m, key), f"model.{key}")

    t = cfg.train
    check_positive_int(t.iterations, "train.iterations")
    check_positive_int(t.batch_size, "train.batch_size")
    _positive(t.lr_g, "train.lr_g")
    _positive(t.lr_d, "train.lr_d")
    if len(t.betas) != 2:
        raise ValueError(f"train.betas: expected two numbers [beta1, beta2], got {t.betas!r}")
    for i, beta in enumerate(t.betas):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"train.betas[{i}]: expected a number in [0, 1), got {beta!r}")
    check_in_range(t.ema_decay, "train.ema_decay", 0.0, 1.0)
    check_in_range(t.r1_weight, "train.r1_weight", 0.0, float("inf"))
    check_in_range(t.grad_clip, "train.grad_clip", 0.0, float("inf"))
    for key in ("log_every", "checkpoint_every", "keep_checkpoints"):
        check_positive_int(getattr(t, key), f"train.{key}")
    for key in ("sample_every", "eval_every"):
        check_positive_int(getattr(t, key), f"train.{key}", minimum=0)

    s = cfg.sample
    check_positive_int(s.num_images, "sample.num_images")
    check_positive_int(s.batch_size, "sample.batch_size")

    validate_eval(cfg.eval)


# -- builders ---------------------------------------------------------------------------------------
def build_dataset(cfg: GANConfig, train: bool = True) -> Dataset:
    """The configured data set (images in [0, 1]); see :func:`genxai.data.config.build_dataset`."""
    return build_data(cfg.data, cfg.seed, train)


def build_generator(cfg: GANConfig, channels: int | None = None) -> Generator:
    """G of ``cfg.model`` for images of ``cfg.data.image_size`` (``channels``: default the config's, else 3)."""
    m = cfg.model
    return Generator(
        latent_dim=m.latent_dim,
        image_size=cfg.data.image_size,
        channels=channels or cfg.data.channels or 3,
        base_channels=m.g_channels,
        max_channels=m.max_channels,
    )


def build_discriminator(cfg: GANConfig, channels: int | None = None) -> Discriminator:
    """D of ``cfg.model`` for images of ``cfg.data.image_size``."""
    m = cfg.model
    return Discriminator(
        image_size=cfg.data.image_size,
        channels=channels or cfg.data.channels or 3,
        base_channels=m.d_channels,
        spectral_norm=m.spectral_norm,
        max_channels=m.max_channels,
    )


def load_gan_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> GANConfig:
    """The GAN config from defaults, then the YAML at ``path`` (or a shipped name such as
    ``"gan-shapes"``), then dotted ``overrides``."""
    return load_config(GANConfig, path, overrides)


def save_gan_config(cfg: GANConfig, path: str | Path) -> Path:
    """Write the resolved config (reloadable with :func:`load_gan_config`)."""
    return save_config(cfg, path)
