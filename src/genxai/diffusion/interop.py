"""genxai with diffusers: a local ``UNet2DModel`` / ``DDPMPipeline`` folder in, a trained run out.

    model = from_diffusers("ddpm-cifar10-32")          # a pipeline folder (model_index.json) or a UNet folder
    eps = model.unet(x_t, t)                            # our UNet when the config matches it, else the
    images = next(sample_run(model.cfg, model.unet, model.schedule, num_images=16,
                             sampler_options=model.sampler_options))    # diffusers module, hooked
    export_run("runs/demo", "exported/")                # DDPMPipeline.from_pretrained("exported/")

Loading reads ``config.json`` + the safetensors weights itself: where the config is DDPM's
architecture (``DownBlock2D``/``AttnDownBlock2D`` levels, one head size, sinusoidal time embedding
with ``flip_sin_to_cos=False, freq_shift=1``, SiLU, ...) the weights become our
:class:`~genxai.diffusion.UNet` (``downsample_padding`` and ``norm_eps`` carried over, so the DDPM
paper's conversions compute the same function), with no diffusers needed. Any other UNet2DModel
is used as it is (:class:`~genxai.diffusion.hooked.DiffusersUNet`, diffusers needed). The
scheduler config becomes a :class:`NoiseSchedule` and our samplers' settings; what we do not
implement (another scheduler class, betas, prediction type, variance) is an error naming it.

Exporting writes the folder without diffusers: ``model_index.json``, ``unet/config.json`` +
``unet/diffusion_pytorch_model.safetensors`` and ``scheduler/scheduler_config.json`` (a
``DDPMScheduler`` set as our DDPM sampler: ``variance_type="fixed_large"``, ``clip_sample``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from genxai.data.config import DataConfig
from genxai.diffusion.config import ExperimentConfig, ModelConfig, SampleConfig, ScheduleConfig
from genxai.diffusion.convert import (
    DOWN_BLOCKS,
    UNET2D_DEFAULTS,
    UP_BLOCKS,
    convert_state,
    diffusers_config,
    diffusers_state,
    unet_arguments,
    version,
)
from genxai.diffusion.hooked import DiffusersUNet, import_diffusers, plain_config
from genxai.diffusion.schedule import NoiseSchedule
from genxai.diffusion.unet import UNet

WEIGHTS = "diffusion_pytorch_model.safetensors"
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
BETA_SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}  # diffusers -> ours
VARIANCES = ("fixed_small", "fixed_large")
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class Imported(NamedTuple):
    """A diffusers model ready to sample and explain.

    ``unet``: our :class:`UNet` (``converted``) or the :class:`DiffusersUNet`; ``cfg``: an
    experiment config describing it (image size and channels, schedule, sampler) for
    :func:`~genxai.diffusion.pipeline.sample_run`; ``sampler_options``: the scheduler's variance and
    clipping for our samplers; ``notes``: what was assumed (e.g. no scheduler config found).
    """

    unet: nn.Module
    schedule: NoiseSchedule
    cfg: ExperimentConfig
    converted: bool
    sampler_options: dict[str, Any]
    folder: Path
    notes: tuple[str, ...]


# -- reading a folder --------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path.name}: not valid JSON ({path}): {err}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path.name}: expected a JSON object in {path}")
    return value


def locate(folder: str | Path) -> tuple[Path, Path | None]:
    """The UNet folder and the scheduler config (or None) of a pipeline folder or a UNet folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"diffusers: no such folder: {folder}")
    if (folder / "model_index.json").is_file():
        index = _read_json(folder / "model_index.json")
        unet = index.get("unet")
        if not (isinstance(unet, list) and len(unet) == 2):
            raise ValueError(
                f"diffusers: {folder / 'model_index.json'} names no unet component; genxai loads "
                f"unconditional UNet2DModel pipelines (DDPMPipeline, DDIMPipeline), this is a "
                f"{index.get('_class_name', 'pipeline')!r}"
            )
        scheduler = folder / "scheduler" / "scheduler_config.json"
        return folder / "unet", scheduler if scheduler.is_file() else None
    if (folder / "config.json").is_file():
        scheduler = folder / "scheduler_config.json"
        return folder, scheduler if scheduler.is_file() else None
    raise ValueError(
        f"diffusers: {folder} is not a diffusers model folder (no model_index.json of a pipeline, "
        "no config.json of a UNet2DModel)"
    )


def read_unet_config(unet_dir: Path) -> dict[str, Any]:
    """``config.json`` of a UNet2DModel with the defaults filled in, checked: another model class,
    a block type a UNet2DModel does not build without text conditioning, or a sample size the
    levels cannot halve is a ValueError naming the key."""
    path = unet_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"diffusers: no config.json in {unet_dir}")
    raw = _read_json(path)
    name = raw.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise ValueError(
            f"_class_name: {name!r} ({path}) is not supported; genxai loads unconditional "
            "UNet2DModel denoisers"
        )
    config = {**UNET2D_DEFAULTS, **{k: v for k, v in raw.items() if not k.startswith("_")}}
    # Keys of another diffusers version: the model is then left to diffusers, never converted.
    config["_unknown"] = sorted(k for k in raw if not k.startswith("_") and k not in UNET2D_DEFAULTS)
    for key, known in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        names = [n[7:] if n.startswith("UNetRes") else n for n in config[key]]  # diffusers' old names
        for block in names:
            if block not in known:
                raise ValueError(
                    f"{key}: {block!r} is not supported ({path}); genxai runs unconditional "
                    f"UNet2DModel blocks: {', '.join(known)}"
                )
        config[key] = names
    channels = list(config["block_out_channels"])
    if not (len(channels) == len(config["down_block_types"]) == len(config["up_block_types"])):
        raise ValueError(f"block_out_channels: expected one per down and up block type ({path})")
    config["block_out_channels"] = channels
    size = config["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"sample_size: genxai samples square images, got {size} ({path})")
        size = size[0]
    if size is not None:
        factor = 2 ** (len(channels) - 1)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % factor:
            raise ValueError(
                f"sample_size: {size!r} is not divisible by {factor}, the UNet's halvings over "
                f"{len(channels)} levels ({path})"
            )
    config["sample_size"] = size
    return config


def read_scheduler(path: Path | None) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """(NoiseSchedule arguments, our sampler, sampler options) of a scheduler config; DDPM's
    schedule (T = 1000, linear 1e-4..0.02) and DDPM sampling when there is none."""
    if path is None:
        return {}, "ddpm", {"variance": "fixed_small", "clip_denoised": True}
    raw = _read_json(path)
    name = raw.get("_class_name")
    if name not in SCHEDULERS:
        raise ValueError(
            f"scheduler: {name!r} ({path}) is not implemented in genxai; it samples with "
            f"{' and '.join(SCHEDULERS)} configs"
        )

    def get(key: str, default: Any) -> Any:
        return raw.get(key, default)

    def refuse(key: str, value: Any, expected: str) -> None:
        raise ValueError(
            f"scheduler {key}: {value!r} ({path}) is not implemented in genxai (expected {expected})"
        )

    if get("trained_betas", None) is not None:
        refuse("trained_betas", "a list", "null: betas from beta_schedule")
    beta = get("beta_schedule", "linear")
    if beta not in BETA_SCHEDULES:
        refuse("beta_schedule", beta, " or ".join(BETA_SCHEDULES))
    if get("prediction_type", "epsilon") != "epsilon":
        refuse("prediction_type", raw["prediction_type"], "'epsilon'")
    for key in ("thresholding", "rescale_betas_zero_snr"):
        if get(key, False):
            refuse(key, raw[key], "false")
    clip = bool(get("clip_sample", True))
    if clip and get("clip_sample_range", 1.0) != 1.0:
        refuse("clip_sample_range", raw["clip_sample_range"], "1.0")
    options: dict[str, Any] = {"clip_denoised": clip}
    if name == "DDPMScheduler":
        variance = get("variance_type", "fixed_small")
        if variance not in VARIANCES:
            refuse("variance_type", variance, " or ".join(VARIANCES))
        options["variance"] = variance
        sampler = "ddpm"
    else:
        spacing, offset = get("timestep_spacing", "leading"), get("steps_offset", 0)
        if spacing not in ("leading", "trailing") or (spacing == "leading" and offset != 0):
            refuse(
                "timestep_spacing",
                f"{spacing} (steps_offset {offset})",
                "'leading' with steps_offset 0, or 'trailing'",
            )
        if not get("set_alpha_to_one", True):
            refuse("set_alpha_to_one", False, "true")
        options["spacing"] = "uniform" if spacing == "leading" else "trailing"
        sampler = "ddim"
    schedule = {
        "num_timesteps": get("num_train_timesteps", 1000),
        "beta_schedule": BETA_SCHEDULES[beta],
        "beta_start": get("beta_start", 1e-4),
        "beta_end": get("beta_end", 0.02),
    }
    return schedule, sampler, options


def read_state(unet_dir: Path) -> dict[str, torch.Tensor]:
    """The UNet's weights (float32) from safetensors (one file, an fp16 variant, or shards), or
    from ``diffusion_pytorch_model.bin`` with ``torch.load(weights_only=True)``."""
    from safetensors.torch import load_file

    single, half = unet_dir / WEIGHTS, unet_dir / "diffusion_pytorch_model.fp16.safetensors"
    index = unet_dir / f"{WEIGHTS}.index.json"
    if single.is_file() or half.is_file():
        state = load_file(single if single.is_file() else half)
    elif index.is_file():
        state = {}
        for shard in sorted(set(_read_json(index).get("weight_map", {}).values())):
            state.update(load_file(unet_dir / shard))
    elif (unet_dir / "diffusion_pytorch_model.bin").is_file():
        state = torch.load(unet_dir / "diffusion_pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"diffusers: no {WEIGHTS} (or .bin) weights in {unet_dir}")
    out = {}
    for key, value in state.items():  # diffusers' pre-0.14 attention names, as its own loader renames them
        key = re.sub(
            r"(attentions\.\d+)\.(query|key|value|proj_attn)\.",
            lambda m: f"{m[1]}.{_OLD_ATTENTION[m[2]]}.",
            key,
        )
        out[key] = value.float() if value.is_floating_point() else value
    return out


# -- in ------------------------------------------------------------------------------------------------
def from_diffusers(
    folder: str | Path,
    *,
    convert: bool | None = None,
    image_size: int | None = None,
    attention_maps: str = "none",
    device: str | torch.device = "cpu",
) -> Imported:
    """A local diffusers pipeline or UNet folder as genxai's denoiser and :class:`NoiseSchedule`.

    Args:
        folder: a ``DDPMPipeline``/``DDIMPipeline`` folder (``model_index.json``, ``unet/``,
            ``scheduler/``) or a UNet2DModel folder (``config.json`` + weights).
        convert: True: our UNet or a ValueError saying why not; False: the diffusers module as it
            is; None (default): our UNet where the config matches it.
        image_size: the size the caller works at; a ValueError if the model's ``sample_size`` differs
            (needed when the config gives no sample size).
        attention_maps: hook saliency maps into the diffusers module (``convert=False`` only).
        device: where the model and schedule go (eval mode, frozen).
    """
    unet_dir, scheduler_path = locate(folder)
    config = read_unet_config(unet_dir)
    size = config["sample_size"]
    if image_size is not None and size is not None and image_size != size:
        raise ValueError(
            f"image_size: {image_size}, but the diffusers model's sample_size is {size} ({unet_dir})"
        )
    if size is None:
        if image_size is None:
            raise ValueError(f"sample_size: {unet_dir / 'config.json'} gives none; pass image_size")
        config["sample_size"] = size = image_size
    if attention_maps != "none" and convert:
        raise ValueError("attention_maps: maps are hooked into the diffusers module; use convert=False")
    schedule_args, sampler, options = read_scheduler(scheduler_path)
    notes = () if scheduler_path else ("no scheduler config: DDPM's linear schedule over T = 1000",)
    arguments, why = unet_arguments(config) if attention_maps == "none" else (None, "attention maps")
    if convert and arguments is None:
        raise ValueError(f"convert: the UNet2DModel at {unet_dir} does not match genxai's UNet: {why}")
    if arguments is not None and convert is not False:
        unet: nn.Module = UNet(**{**arguments, "num_timesteps": schedule_args.get("num_timesteps", 1000)})
        unet.load_state_dict(convert_state(unet, read_state(unet_dir)))
    else:
        diffusers = import_diffusers()
        module = diffusers.UNet2DModel.from_pretrained(unet_dir)
        if module.config.sample_size is None:
            module.register_to_config(sample_size=size)
        unet = DiffusersUNet.wrap(module, attention_maps)
    steps = min(SampleConfig.steps, schedule_args.get("num_timesteps", 1000))
    cfg = ExperimentConfig(
        name=Path(folder).name,
        data=DataConfig(image_size=size, channels=config["in_channels"]),
        schedule=ScheduleConfig(**schedule_args),
        model=_model_config(arguments, folder),
        sample=SampleConfig(sampler=sampler, steps=steps),
    )
    schedule = NoiseSchedule(**schedule_args).to(device)
    unet = unet.to(device).eval().requires_grad_(False)
    return Imported(
        unet, schedule, cfg, arguments is not None and convert is not False, options, Path(folder), notes
    )


def _model_config(arguments: dict[str, Any] | None, folder: str | Path) -> ModelConfig:
    """The model section describing an imported UNet (the architecture, where it is ours)."""
    if arguments is None:
        return ModelConfig(diffusers=str(folder))
    keys = ("base_channels", "channel_mults", "num_res_blocks", "attention_resolutions", "dropout")
    return ModelConfig(
        **{k: arguments[k] for k in keys},
        downsample_padding=arguments["downsample_padding"],
        norm_eps=arguments["norm_eps"],
        diffusers=str(folder),
    )


def diffusers_unet(cfg: ExperimentConfig, channels: int | None) -> DiffusersUNet:
    """The diffusers module of ``cfg.model.diffusers`` to fine-tune, hooked with the variant's maps;
    checked against the data (size, channels) and the schedule (when the folder has one)."""
    folder = cfg.model.diffusers
    try:
        unet_dir, scheduler_path = locate(folder)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"model.diffusers: {err}") from None
    config = read_unet_config(unet_dir)
    size = config["sample_size"]
    if size is not None and size != cfg.data.image_size:
        raise ValueError(
            f"data.image_size: {cfg.data.image_size}, but the diffusers model at {folder} has sample_size {size}"
        )
    if channels is not None and channels != config["in_channels"]:
        raise ValueError(
            f"data.channels: {channels}, but the diffusers model at {folder} takes {config['in_channels']}"
        )
    if scheduler_path is not None:
        theirs = read_scheduler(scheduler_path)[0]
        ours = {k: getattr(cfg.schedule, k) for k in theirs}
        for key in theirs:
            if theirs[key] != ours[key]:
                raise ValueError(
                    f"schedule.{key}: {ours[key]!r}, but the diffusers model at {folder} was trained "
                    f"with {theirs[key]!r} ({scheduler_path})"
                )
    module = import_diffusers().UNet2DModel.from_pretrained(unet_dir)
    if size is None:
        module.register_to_config(sample_size=cfg.data.image_size)
    return DiffusersUNet.wrap(module, cfg.attention_maps)


# -- out -----------------------------------------------------------------------------------------------
def scheduler_config(schedule: NoiseSchedule, variance: str = "fixed_large") -> dict[str, Any]:
    """A DDPMScheduler config that samples as our DDPM sampler with ``schedule``."""
    beta = {v: k for k, v in BETA_SCHEDULES.items()}[schedule.beta_schedule]
    return {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": version(),
        "num_train_timesteps": schedule.num_timesteps,
        "beta_start": schedule.beta_start,
        "beta_end": schedule.beta_end,
        "beta_schedule": beta,
        "trained_betas": None,
        "variance_type": variance,
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }


def write_pipeline(
    out: str | Path, unet_config: dict[str, Any], state: dict[str, torch.Tensor], schedule: NoiseSchedule
) -> Path:
    """A DDPMPipeline folder (``model_index.json``, ``unet/``, ``scheduler/``); no diffusers needed."""
    from safetensors.torch import save_file

    out = Path(out)
    if (out / "model_index.json").exists() or (out.exists() and any(out.iterdir())):
        raise FileExistsError(f"--out: {out} exists and is not empty; nothing is overwritten")
    (out / "unet").mkdir(parents=True, exist_ok=True)
    (out / "scheduler").mkdir(exist_ok=True)
    index = {
        "_class_name": "DDPMPipeline",
        "_diffusers_version": version(),
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "unet" / "config.json").write_text(json.dumps(unet_config, indent=2) + "\n")
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, out / "unet" / WEIGHTS, metadata={"format": "pt"})
    config = scheduler_config(schedule)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def export_run(
    run_dir: str | Path, out: str | Path, *, checkpoint_path: str | Path | None = None, use_ema: bool = True
) -> Path:
    """Write a trained run (EMA weights by default) as a DDPMPipeline folder at ``out``.

    ``DDPMPipeline.from_pretrained(out)(num_inference_steps=T, generator=...)`` then samples as our
    DDPM sampler with the same seed; ``DDIMPipeline.from_pretrained(out)(...,
    use_clipped_model_output=True)`` as our DDIM sampler.
    """
    from genxai.diffusion.pipeline import load_run

    run = load_run(run_dir, checkpoint_path=checkpoint_path, use_ema=use_ema)
    unet = run.unet
    if isinstance(unet, DiffusersUNet):
        if unet.attention_maps != "none":
            raise ValueError(
                f"attention_maps: the run's UNet takes {unet.attention_maps!r} saliency maps, which a "
                "diffusers UNet2DModel has no input for; export a baseline or noise run"
            )
        config = {
            "_class_name": "UNet2DModel",
            "_diffusers_version": version(),
            **plain_config(unet.unet.config),
        }
        state = unet.unet.state_dict()
    else:
        config, state = diffusers_config(unet), diffusers_state(unet)
    return write_pipeline(out, config, state, run.schedule)


__all__ = ["Imported", "diffusers_unet", "export_run", "from_diffusers", "write_pipeline"]
