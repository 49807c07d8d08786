"""Any diffusers ``UNet2DModel`` as genxai's denoiser, with the saliency attention maps hooked in.

    model = DiffusersUNet.wrap(unet2d, attention_maps="hierarchical")   # unet2d: a UNet2DModel
    eps = model(x_t, t, saliency=S)                                     # our UNet's call signature

The diffusers module is used as it is, never rebuilt as a copy of its architecture: the maps enter
the output of every ResNet block of its down, mid and up blocks through the core's hooks
(:class:`genxai.core.hooks.Trace` edits, removed after each forward), as ``h <- h * (1 + g_l *
A_l)`` with a per-channel gate ``g_l`` per resolution level that starts at 0 (so the untrained
guided model equals the diffusers model exactly) and the maps ``A_l`` of our UNet
(:func:`genxai.diffusion.unet.attention_pyramid`: ``same`` or ``hierarchical``).

``config`` holds the UNet2DModel config and the map settings, so a checkpoint rebuilds the module
with :func:`genxai.training.checkpoint.load_module` without the folder it was fine-tuned from.
"""

from __future__ import annotations

from contextlib import ExitStack
from functools import partial
from typing import Any

import torch
from torch import nn

from genxai.core.checks import check_choice, check_positive_int
from genxai.core.hooks import Trace
from genxai.diffusion.schedule import as_timesteps
from genxai.diffusion.unet import ATTENTION_MAPS, MapPyramid, attention_pyramid, inject


class MissingDiffusers(ImportError, ValueError):
    """diffusers is needed and not installed (a ValueError too, so the CLI prints one line)."""


def import_diffusers() -> Any:
    """The diffusers package, or :class:`MissingDiffusers` saying what needs it and how to get it."""
    try:
        import diffusers
    except ImportError:
        raise MissingDiffusers(
            "diffusers: this model is used as a diffusers module (it does not convert to genxai's "
            "UNet), which needs diffusers: pip install diffusers"
        ) from None
    return diffusers


def plain_config(config: Any) -> dict[str, Any]:
    """A diffusers config as plain JSON values (tuples as lists), without its ``_`` bookkeeping keys."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items() if not k.startswith("_")
    }


class DiffusersUNet(nn.Module):
    """A diffusers ``UNet2DModel`` called as ``model(x_t, t, saliency=None) -> eps``.

    Args:
        unet_config: the UNet2DModel config (its ``config.json`` values); the module is built
            from it (diffusers needed) unless ``unet`` is given.
        attention_maps: ``"none"``, ``"same"`` or ``"hierarchical"`` (as :class:`~genxai.diffusion.UNet`).
        map_channels: width of the hierarchical variant's map encoder.
        unet: an existing UNet2DModel to wrap (its weights are kept).
    """

    def __init__(
        self,
        unet_config: dict[str, Any],
        attention_maps: str = "none",
        map_channels: int = 16,
        *,
        unet: nn.Module | None = None,
    ) -> None:
        super().__init__()
        check_choice(attention_maps, "attention_maps", ATTENTION_MAPS)
        check_positive_int(map_channels, "map_channels")
        unet_config = plain_config(unet_config)
        if unet is None:
            unet = import_diffusers().UNet2DModel.from_config(unet_config)
        self.unet = unet
        self.config = {
            "unet_config": unet_config,
            "attention_maps": attention_maps,
            "map_channels": map_channels,
        }
        self.attention_maps = attention_maps
        size = unet_config.get("sample_size")
        self.image_size = size[0] if isinstance(size, (list, tuple)) else size
        self.level_channels = tuple(unet_config["block_out_channels"])
        levels = len(self.level_channels)
        self.levels = tuple(self.image_size // 2**level for level in range(levels)) if self.image_size else ()
        # The ResNet blocks whose outputs take the maps, and the level (resolution) of each.
        self.sites: dict[str, int] = {}
        for i, block in enumerate(unet.down_blocks):
            self.sites.update({f"down_blocks.{i}.resnets.{j}": i for j in range(len(block.resnets))})
        if unet.mid_block is not None:
            self.sites.update(
                {f"mid_block.resnets.{j}": levels - 1 for j in range(len(unet.mid_block.resnets))}
            )
        for i, block in enumerate(unet.up_blocks):
            self.sites.update(
                {f"up_blocks.{i}.resnets.{j}": levels - 1 - i for j in range(len(block.resnets))}
            )
        if attention_maps != "none":
            self.gates = nn.ParameterList(nn.Parameter(torch.zeros(c)) for c in self.level_channels)
        self.map_pyramid = MapPyramid(levels, map_channels) if attention_maps == "hierarchical" else None

    @classmethod
    def wrap(cls, unet: nn.Module, attention_maps: str = "none", map_channels: int = 16) -> DiffusersUNet:
        """Wrap an existing UNet2DModel (weights kept)."""
        return cls(unet.config, attention_maps, map_channels, unet=unet)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def attention_pyramid(self, saliency: torch.Tensor | None, x: torch.Tensor) -> list[torch.Tensor]:
        """The maps ``A_l`` of every level, as our UNet makes them."""
        return attention_pyramid(saliency, x, len(self.level_channels), self.map_pyramid)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | int, saliency: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict the noise in ``x`` (N, C, H, W) at timesteps ``t`` ((N,) or a scalar); ``saliency``
        as our UNet (ignored when ``attention_maps="none"``)."""
        if x.ndim != 4:
            raise ValueError(f"x: expected shape (N, C, H, W), got {tuple(x.shape)}")
        t = as_timesteps(t, x.shape[0], x.device)
        if self.attention_maps == "none":
            return self.unet(x, t, return_dict=False)[0]
        maps = self.attention_pyramid(saliency, x)
        with ExitStack() as hooks:
            for name, level in self.sites.items():
                # A Trace rooted at the block itself: no search of the whole model on every forward.
                block = self.unet.get_submodule(name)
                edit = partial(_inject_level, gate=self.gates[level], a=maps[level])
                hooks.enter_context(Trace(block, block, retain_output=False, edit_output=edit))
            return self.unet(x, t, return_dict=False)[0]


def _inject_level(h: torch.Tensor, name: str, *, gate: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return inject(h, gate, a)
