"""Typed configs of an XAI-guided diffusion experiment (YAML + dotted ``key=value`` overrides),
and the builders that turn a config into data, networks and a noise schedule.

    cfg = load_experiment("configs/demo.yaml", ["train.batch_size=16", "variant=noise+same"])
    unet, schedule = build_unet(cfg, channels=3), build_schedule(cfg)

Every value has a default here, so a YAML file states only what differs; an unknown key (a typo),
a value of the wrong type or out of range fails at load time with the key's name, before any
long work starts. The resolved config is written to each run folder as ``config.yaml`` and
reloads with :func:`load_experiment`. Allowed choices come from the modules that implement them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from genxai.config import load_config, save_config
from genxai.core.checks import check_choice, check_in_range, check_positive_int
from genxai.data.config import DataConfig, validate_data
from genxai.data.config import build_dataset as build_data
from genxai.diffusion.discriminator import Discriminator
from genxai.diffusion.sampling import SAMPLERS
from genxai.diffusion.schedule import BETA_SCHEDULES, LOSS_WEIGHTS, NoiseSchedule
from genxai.diffusion.unet import TIME_EMBEDDINGS, UNet
from genxai.evaluation.fid import EvalConfig, validate_eval

VARIANTS = ("baseline", "noise", "noise+same", "noise+hierarchical")
ABLATION_BASELINES = ("min_snr", "p2")  # loss weightings of the baseline an ablation can add
VARIANT_MAPS = {  # which UNet attention maps (unet.ATTENTION_MAPS) each variant trains
    "baseline": "none",
    "noise": "none",
    "noise+same": "same",
    "noise+hierarchical": "hierarchical",
}


@dataclass
class ScheduleConfig:
    """The forward process q(x_t | x0) (DDPM: linear betas 1e-4..0.02 over T = 1000)."""

    num_timesteps: int = 1000
    beta_schedule: str = "linear"  # one of schedule.BETA_SCHEDULES
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
    downsample_padding: int = 1  # 1 symmetric; 0 right/bottom only (TF SAME, the DDPM conversions)
    norm_eps: float = 1e-5  # GroupNorm eps (the DDPM conversions: 1e-6)
    # A local diffusers UNet2DModel / DDPMPipeline folder to fine-tune instead of building a UNet:
    # the architecture (and the keys above) then come from its config.json.
    diffusers: str | None = None


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

    @property
    def saliency_options(self) -> dict[str, Any]:
        """Options of the saliency method beyond its name (D's layer for layer methods)."""
        return {"layer": self.saliency_layer} if self.saliency_layer else {}


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
class AblationConfig:
    """``genxai ablate``: which runs, over how many paired seeds (seed, seed + 1, ...).

    Every variant trains once per seed; a seed gives all variants the same initial weights, data
    order and evaluation noise, so their differences are paired. ``baselines`` adds the free
    loss weightings (min_snr, p2); ``dg`` adds the Discriminator Guidance sampler on the baseline
    (a time-aware D trained on the finished baseline's samples, then used at sampling time).
    """

    seeds: int = 1
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    baselines: list[str] = field(default_factory=lambda: ["min_snr"])
    dg: bool = False
    dg_weight: float = 1.0
    dg_iterations: int = 500
    dg_fakes: int = 1024
    measure_costs: bool = True  # time each label's Process side by side after training (equal cost)


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
    ablation: AblationConfig = field(default_factory=AblationConfig)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    @property
    def attention_maps(self) -> str:
        return VARIANT_MAPS[self.variant]

    @property
    def guided(self) -> bool:
        """True for the XAI-guided variants (D, saliency, Process2)."""
        return self.variant != "baseline"

    @property
    def saliency_max_t(self) -> int:
        """The largest t whose estimate x0_hat trains D and gets a saliency map: t < t_max * T.

        Training (D's fakes, Process2's saliency) and sampling (``sample_saliency_every``) use the
        same cutoff, also for a time-aware D; set ``discriminator.t_max: 1.0`` to use every t.
        """
        return max(1, round(self.discriminator.t_max * self.schedule.num_timesteps)) - 1


def _positive(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}: expected a number > 0, got {value!r}")


def _int_list(values: Any, name: str, *, empty: bool = False) -> None:
    if not empty and not values:
        raise ValueError(f"{name}: expected a non-empty list of integers >= 1, got {values!r}")
    for value in values:
        check_positive_int(value, f"{name}[]")


def validate(cfg: ExperimentConfig) -> None:
    """Reject every value no run can use, naming the key (data-dependent checks: the trainer)."""
    from genxai.attribution import METHODS

    check_choice(cfg.variant, "variant", VARIANTS)
    check_positive_int(cfg.seed, "seed", minimum=0)
    d = cfg.data
    validate_data(d)

    s = cfg.schedule
    check_positive_int(s.num_timesteps, "schedule.num_timesteps", minimum=2)
    check_choice(s.beta_schedule, "schedule.beta_schedule", BETA_SCHEDULES)
    check_in_range(s.beta_start, "schedule.beta_start", 0.0, 1.0, closed=False)
    check_in_range(s.beta_end, "schedule.beta_end", s.beta_start, 1.0, closed=False)

    m = cfg.model
    check_positive_int(m.base_channels, "model.base_channels")
    _int_list(m.channel_mults, "model.channel_mults")
    check_positive_int(m.num_res_blocks, "model.num_res_blocks")
    _int_list(m.attention_resolutions, "model.attention_resolutions", empty=True)
    check_in_range(m.dropout, "model.dropout", 0.0, 1.0)
    check_choice(m.time_embedding, "model.time_embedding", TIME_EMBEDDINGS)
    check_choice(m.downsample_padding, "model.downsample_padding", (0, 1))
    check_in_range(m.norm_eps, "model.norm_eps", 0.0, 1.0, closed=False)
    if m.diffusers is not None and (not isinstance(m.diffusers, str) or not m.diffusers.strip()):
        raise ValueError(
            f"model.diffusers: expected the path of a diffusers model folder, got {m.diffusers!r}"
        )
    factor = 2 ** (len(m.channel_mults) - 1)
    if m.diffusers is None and d.image_size % factor:
        raise ValueError(
            f"data.image_size: {d.image_size} is not divisible by {factor}, the UNet's downsampling over "
            f"{len(m.channel_mults)} levels (model.channel_mults)"
        )

    disc = cfg.discriminator
    check_positive_int(disc.base_channels, "discriminator.base_channels")
    if not 0.0 < disc.t_max <= 1.0:
        raise ValueError(f"discriminator.t_max: expected a fraction of T in (0, 1], got {disc.t_max!r}")
    _positive(disc.lr, "discriminator.lr")
    check_in_range(disc.beta1, "discriminator.beta1", 0.0, 1.0)
    check_in_range(disc.beta2, "discriminator.beta2", 0.0, 1.0)
    check_in_range(disc.r1_weight, "discriminator.r1_weight", 0.0, float("inf"))

    g = cfg.guidance
    check_choice(g.saliency_method, "guidance.saliency_method", METHODS.names())
    if getattr(METHODS.get(g.saliency_method), "output", "map") != "map":
        raise ValueError(
            f"guidance.saliency_method: {g.saliency_method!r} makes images, not saliency maps; "
            "pick a map method such as 'saliency', 'gradcam' or 'lrp'"
        )
    check_in_range(g.gamma, "guidance.gamma", 0.0, float("inf"))
    check_in_range(g.blur_sigma, "guidance.blur_sigma", 0.0, float("inf"))
    check_in_range(g.w_min, "guidance.w_min", 0.0, 1.0)
    check_in_range(g.w_max, "guidance.w_max", 1.0, float("inf"))
    check_positive_int(g.sample_saliency_every, "guidance.sample_saliency_every", minimum=0)

    c = cfg.cycle
    for key in ("phase_a", "phase_b"):
        check_positive_int(getattr(c, key), f"cycle.{key}", minimum=0)
    check_positive_int(c.cycles, "cycle.cycles")
    if c.phase_a + c.phase_b == 0:
        raise ValueError("cycle: phase_a + phase_b must be > 0")

    t = cfg.train
    _positive(t.lr, "train.lr")
    check_positive_int(t.warmup, "train.warmup", minimum=0)
    check_positive_int(t.batch_size, "train.batch_size")
    check_in_range(t.grad_clip, "train.grad_clip", 0.0, float("inf"))
    check_in_range(t.ema_decay, "train.ema_decay", 0.0, 1.0)
    check_choice(t.mixed_precision, "train.mixed_precision", ("no", "bf16"))
    check_choice(t.loss_weighting, "train.loss_weighting", LOSS_WEIGHTS)
    _positive(t.snr_gamma, "train.snr_gamma")
    _positive(t.p2_k, "train.p2_k")
    check_in_range(t.p2_gamma, "train.p2_gamma", 0.0, float("inf"))
    for key in ("log_every", "checkpoint_every", "keep_checkpoints"):
        check_positive_int(getattr(t, key), f"train.{key}")
    for key in ("sample_every", "eval_every"):
        check_positive_int(getattr(t, key), f"train.{key}", minimum=0)

    smp = cfg.sample
    check_choice(smp.sampler, "sample.sampler", SAMPLERS)
    check_positive_int(smp.steps, "sample.steps")
    if smp.steps > s.num_timesteps:
        raise ValueError(
            f"sample.steps: expected at most schedule.num_timesteps={s.num_timesteps}, got {smp.steps}"
        )
    check_in_range(smp.eta, "sample.eta", 0.0, float("inf"))
    check_positive_int(smp.num_images, "sample.num_images")
    check_positive_int(smp.batch_size, "sample.batch_size")
    check_in_range(smp.guidance_weight, "sample.guidance_weight", float("-inf"), float("inf"))

    validate_eval(cfg.eval)

    a = cfg.ablation
    check_positive_int(a.seeds, "ablation.seeds")
    for v in a.variants:
        check_choice(v, "ablation.variants[]", VARIANTS)
    for b in a.baselines:
        check_choice(b, "ablation.baselines[]", ABLATION_BASELINES)
    if not a.variants and not a.baselines:
        raise ValueError("ablation: nothing to run (ablation.variants and ablation.baselines are empty)")
    if a.dg and "baseline" not in a.variants:
        raise ValueError(
            "ablation.dg: the Discriminator Guidance sampler runs on the baseline; add it to ablation.variants"
        )
    check_in_range(a.dg_weight, "ablation.dg_weight", 0.0, float("inf"))
    check_positive_int(a.dg_iterations, "ablation.dg_iterations")
    check_positive_int(a.dg_fakes, "ablation.dg_fakes", minimum=2)


# -- builders ---------------------------------------------------------------------------------------
def build_dataset(cfg: ExperimentConfig, train: bool = True) -> Dataset:
    """The configured data set (images in [0, 1]); see :func:`genxai.data.config.build_dataset`."""
    return build_data(cfg.data, cfg.seed, train)


def build_unet(cfg: ExperimentConfig, channels: int) -> UNet:
    """The noise-prediction UNet of ``cfg.model`` with the variant's attention maps."""
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
        downsample_padding=m.downsample_padding,
        norm_eps=m.norm_eps,
    )


def build_discriminator(cfg: ExperimentConfig, channels: int) -> Discriminator:
    """D of ``cfg.discriminator``."""
    d = cfg.discriminator
    return Discriminator(
        cfg.data.image_size,
        in_channels=channels,
        base_channels=d.base_channels,
        time_aware=d.time_aware,
        num_timesteps=cfg.schedule.num_timesteps,
        spectral_norm=d.spectral_norm,
    )


def build_schedule(cfg: ExperimentConfig) -> NoiseSchedule:
    """The forward process of ``cfg.schedule``."""
    return NoiseSchedule(**asdict(cfg.schedule))


def load_experiment(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The experiment config from defaults, then the YAML at ``path``, then dotted ``overrides``."""
    return load_config(ExperimentConfig, path, overrides)


def save_experiment(cfg: ExperimentConfig, path: str | Path) -> Path:
    """Write the resolved config (reloadable with :func:`load_experiment`)."""
    return save_config(cfg, path)
