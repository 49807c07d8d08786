"""Our UNet <-> diffusers' UNet2DModel: which configs match, and the weights under each other's names.

    arguments, why = unet_arguments(config)          # our UNet's arguments, or None and the reason
    ours.load_state_dict(convert_state(ours, state))  # UNet2DModel weights -> ours
    config, state = diffusers_config(ours), diffusers_state(ours)   # ours -> a UNet2DModel folder

No diffusers is needed: the configs are plain dicts (``config.json``), the weights tensors.
Defaults are UNet2DModel's (diffusers 0.3x), for configs that omit a key.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from genxai.diffusion.unet import UNet

DIFFUSERS_VERSION = "0.30.0"  # written into exported configs when diffusers is not installed
# UNet2DModel's constructor defaults (diffusers 0.3x): what a config.json that omits a key means.
UNET2D_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896],
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}
# Blocks of an unconditional UNet2DModel (True: with self-attention). Ours: the first two of each.
DOWN_BLOCKS = {
    "DownBlock2D": False,
    "AttnDownBlock2D": True,
    "ResnetDownsampleBlock2D": False,
    "SkipDownBlock2D": False,
    "AttnSkipDownBlock2D": True,
}
UP_BLOCKS = {
    "UpBlock2D": False,
    "AttnUpBlock2D": True,
    "ResnetUpsampleBlock2D": False,
    "SkipUpBlock2D": False,
    "AttnSkipUpBlock2D": True,
}
_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "temb_proj": "time_emb_proj",
    "norm2": "norm2",
    "conv2": "conv2",
    "skip": "conv_shortcut",
}


# -- our UNet <-> UNet2DModel -------------------------------------------------------------------------
def unet_arguments(config: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """Our UNet's constructor arguments for a (filled-in) UNet2DModel config, or (None, why not)."""
    c = config
    if c.get("_unknown"):
        return None, f"config keys genxai does not know: {', '.join(c['_unknown'])}"
    same = {
        "time_embedding_type": "positional",
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "act_fn": "silu",
        "center_input_sample": False,
        "resnet_time_scale_shift": "default",
        "mid_block_type": "UNetMidBlock2D",
        "add_attention": True,
        "mid_block_scale_factor": 1,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "class_embed_type": None,
        "num_class_embeds": None,
    }
    for key, value in same.items():
        if c[key] != value:
            return None, f"{key}={c[key]!r} (genxai's UNet has {value!r})"
    channels = c["block_out_channels"]
    if c["time_embedding_dim"] not in (None, 4 * channels[0]):
        return None, f"time_embedding_dim={c['time_embedding_dim']} (ours: 4 x block_out_channels[0])"
    if c["attn_norm_num_groups"] not in (None, c["norm_num_groups"]):
        return None, "attn_norm_num_groups differs from norm_num_groups"
    if c["in_channels"] != c["out_channels"]:
        return None, "in_channels != out_channels"
    if c["downsample_padding"] not in (0, 1):
        return None, f"downsample_padding={c['downsample_padding']}"
    down, up = c["down_block_types"], c["up_block_types"]
    if any(b not in ("DownBlock2D", "AttnDownBlock2D") for b in down) or any(
        b not in ("UpBlock2D", "AttnUpBlock2D") for b in up
    ):
        return None, f"blocks {down} / {up} (ours: DownBlock2D/AttnDownBlock2D, UpBlock2D/AttnUpBlock2D)"
    attention = [DOWN_BLOCKS[b] for b in down]
    if [UP_BLOCKS[b] for b in reversed(up)] != attention:
        return None, "the up blocks' attention does not mirror the down blocks'"
    size = c["sample_size"]
    if size is None:
        return None, "no sample_size"
    heads = set()
    for level, ch in enumerate(channels):
        if attention[level]:
            heads.add(ch // (c["attention_head_dim"] or ch))
    heads.add(channels[-1] // (c["attention_head_dim"] or channels[-1]))  # the middle block's
    if len(heads) != 1:
        return None, f"attention_head_dim={c['attention_head_dim']} gives different head counts per level"
    base = channels[0]
    if any(ch % base for ch in channels):
        return None, f"block_out_channels {channels} are not multiples of the first"
    arguments = {
        "image_size": size,
        "in_channels": c["in_channels"],
        "base_channels": base,
        "channel_mults": [ch // base for ch in channels],
        "num_res_blocks": c["layers_per_block"],
        "attention_resolutions": [size // 2**level for level, a in enumerate(attention) if a],
        "dropout": float(c["dropout"]),
        "attention_heads": heads.pop(),
        "norm_groups": c["norm_num_groups"],
        "downsample_padding": c["downsample_padding"],
        "norm_eps": float(c["norm_eps"]),
    }
    if c["num_train_timesteps"] is not None:
        arguments["num_timesteps"] = c["num_train_timesteps"]
    return arguments, ""


def key_map(unet: UNet) -> dict[str, tuple[str, ...]]:
    """Each of our UNet's weights -> the UNet2DModel weights it is made of (qkv: q, k, v stacked)."""
    names: dict[str, tuple[str, ...]] = {}
    top = {
        "conv_in": "conv_in",
        "time_mlp.0": "time_embedding.linear_1",
        "time_mlp.2": "time_embedding.linear_2",
        "norm_out": "conv_norm_out",
        "conv_out": "conv_out",
    }
    for ours, theirs in top.items():
        for p in ("weight", "bias"):
            names[f"{ours}.{p}"] = (f"{theirs}.{p}",)

    def level(ours: str, theirs: str, stage: nn.Module, resampler: str) -> None:
        for j, (block, attention) in enumerate(zip(stage.blocks, stage.attention)):
            for a, b in _RESNET.items():
                if a != "skip" or not isinstance(block.skip, nn.Identity):
                    for p in ("weight", "bias"):
                        names[f"{ours}.blocks.{j}.{a}.{p}"] = (f"{theirs}.resnets.{j}.{b}.{p}",)
            if not isinstance(attention, nn.Identity):
                att = f"{theirs}.attentions.{j}"
                for p in ("weight", "bias"):
                    names[f"{ours}.attention.{j}.norm.{p}"] = (f"{att}.group_norm.{p}",)
                    names[f"{ours}.attention.{j}.qkv.{p}"] = tuple(f"{att}.to_{k}.{p}" for k in "qkv")
                    names[f"{ours}.attention.{j}.proj.{p}"] = (f"{att}.to_out.0.{p}",)
        if not isinstance(stage.resample, nn.Identity):
            for p in ("weight", "bias"):
                names[f"{ours}.resample.conv.{p}"] = (f"{theirs}.{resampler}.0.conv.{p}",)

    for i, stage in enumerate(unet.down):
        level(f"down.{i}", f"down_blocks.{i}", stage, "downsamplers")
    level("mid", "mid_block", unet.mid, "")
    for i, stage in enumerate(unet.up):
        level(f"up.{i}", f"up_blocks.{i}", stage, "upsamplers")
    return names


def convert_state(unet: UNet, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A UNet2DModel state dict as our UNet's (every weight used, none missing)."""
    out, used = {}, set()
    for ours, theirs in key_map(unet).items():
        missing = [k for k in theirs if k not in state]
        if missing:
            raise ValueError(f"diffusers: the weights lack {missing[0]!r}, which the config implies")
        out[ours] = torch.cat([state[k] for k in theirs]) if len(theirs) > 1 else state[theirs[0]]
        used.update(theirs)
    extra = sorted(set(state) - used)
    if extra:
        raise ValueError(f"diffusers: unexpected weight {extra[0]!r} for this config")
    return out


def diffusers_state(unet: UNet) -> dict[str, torch.Tensor]:
    """Our UNet's weights under UNet2DModel's names (qkv split into to_q, to_k, to_v)."""
    state = unet.state_dict()
    out = {}
    for ours, theirs in key_map(unet).items():
        parts = state[ours].chunk(len(theirs)) if len(theirs) > 1 else (state[ours],)
        out.update({k: v.detach().float().cpu().contiguous() for k, v in zip(theirs, parts)})
    return out


def diffusers_config(unet: UNet) -> dict[str, Any]:
    """The UNet2DModel config of our UNet; a ValueError names what a UNet2DModel cannot express."""
    c = unet.config
    if c["attention_maps"] != "none":
        raise ValueError(
            f"attention_maps: the UNet takes {c['attention_maps']!r} saliency maps, which a diffusers "
            "UNet2DModel has no input for; export a baseline or noise run"
        )
    if c["time_embedding"] != "sinusoidal":
        raise ValueError(
            f"time_embedding: {c['time_embedding']!r} has no UNet2DModel equivalent (sinusoidal has)"
        )
    groups, channels = c["norm_groups"], [c["base_channels"] * m for m in c["channel_mults"]]
    norms = [m for m in unet.modules() if isinstance(m, nn.GroupNorm)]
    if any(m.num_groups != groups for m in norms):
        raise ValueError(
            f"norm_groups: {groups} does not divide every width of the UNet, as a UNet2DModel needs"
        )
    attention = [size in c["attention_resolutions"] for size in unet.levels]
    heads = c["attention_heads"]
    dims = {ch // heads for ch, a in zip(channels, attention) if a} | {channels[-1] // heads}
    if len(dims) != 1:
        raise ValueError(f"attention_heads: {heads} heads give different head sizes per level {sorted(dims)}")
    return {
        "_class_name": "UNet2DModel",
        "_diffusers_version": version(),
        **UNET2D_DEFAULTS,
        "sample_size": c["image_size"],
        "in_channels": c["in_channels"],
        "out_channels": c["in_channels"],
        "freq_shift": 1,
        "flip_sin_to_cos": False,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "block_out_channels": channels,
        "layers_per_block": c["num_res_blocks"],
        "downsample_padding": c["downsample_padding"],
        "dropout": c["dropout"],
        "attention_head_dim": None if heads == 1 else dims.pop(),
        "norm_num_groups": groups,
        "norm_eps": c["norm_eps"],
    }


def version() -> str:
    try:
        import diffusers

        return diffusers.__version__
    except ImportError:
        return DIFFUSERS_VERSION
