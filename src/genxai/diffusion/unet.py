"""The DDPM noise-prediction UNet (Ho et al., 2020), with optional saliency attention maps.

    unet = UNet.ddpm_cifar10()                          # 35.7M parameters, the paper's CIFAR-10 net
    eps = unet(x_t, t)                                  # baseline
    unet = UNet(32, attention_maps="hierarchical")
    eps = unet(x_t, t, saliency=S)                      # S: (N, 1, H, W) map of D's "fake" evidence

Architecture as the paper's: ResNet blocks (GroupNorm, SiLU, the time embedding added in every
block, dropout), single-head self-attention at the configured resolutions, strided-conv
downsampling, nearest + conv upsampling, skip connections; the last conv of each residual branch
and the output conv start at zero (the paper's 1e-10 init scale).

Saliency attention maps (the plan's "add XAI info to noise"): the map is normalised to mean 1 per
image (so an all-ones or any constant map is the uninformative one, and ``saliency=None`` equals
it) and enters every ResNet block of level ``l`` as ``h <- h * (1 + g_l * A_l)``, with a learned
per-channel gate ``g_l`` that starts at 0 (the untrained model equals the baseline exactly).
``"same"``: ``A_l`` is the map area-averaged to level l's resolution. ``"hierarchical"``: a small
conv encoder builds a feature pyramid of the map and each level adds its own learned map (a
zero-initialised head) to the averaged one, so level l gets a map of its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from genxai.core.checks import check_choice, check_in_range, check_positive_int
from genxai.diffusion.schedule import as_timesteps

TIME_EMBEDDINGS = ("sinusoidal", "fourier", "random_fourier")
ATTENTION_MAPS = ("none", "same", "hierarchical")


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``module`` (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _groups(channels: int, groups: int) -> int:
    return math.gcd(channels, groups)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The transformer position encoding of the (N,) timesteps, as DDPM: ``[sin(t f), cos(t f)]``."""
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000) / (half - 1))
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([args.sin(), args.cos()], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class FourierEmbedding(nn.Module):
    """Random or learned Fourier features of ``t / T`` (lucidrains' RandomOrLearnedSinusoidalPosEmb).

    Output ``[x, sin(2 pi x w), cos(2 pi x w)]`` of size ``dim + 1`` with ``w ~ N(0, I)``,
    learned unless ``random``.
    """

    def __init__(self, dim: int, num_timesteps: int, random: bool = False) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"dim: the Fourier embedding needs an even size, got {dim}")
        self.weights = nn.Parameter(torch.randn(dim // 2), requires_grad=not random)
        self.num_timesteps = num_timesteps

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        x = t.float()[:, None] / self.num_timesteps
        freqs = x * self.weights[None] * (2 * math.pi)
        return torch.cat([x, freqs.sin(), freqs.cos()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + time embedding, GroupNorm-SiLU-dropout-conv, + (1x1) skip."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_dim: int,
        dropout: float,
        groups: int,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_channels, groups), in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, out_channels)
        self.norm2 = nn.GroupNorm(_groups(out_channels, groups), out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """``temb``: the time embedding after its SiLU, (N, temb_dim)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(temb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Residual self-attention over the H*W positions (DDPM: one head), via scaled_dot_product_attention."""

    def __init__(self, channels: int, heads: int, groups: int, eps: float = 1e-5) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention_heads: {heads} does not divide {channels} channels")
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(channels, groups), channels, eps=eps)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = _zero(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (N, HW, C)
        q, k, v = self.qkv(tokens).view(n, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, HW, d)
        out = self.proj(out.transpose(1, 2).reshape(n, h * w, c))
        return x + out.transpose(1, 2).reshape(n, c, h, w)


class Downsample(nn.Module):
    """A stride-2 3x3 conv. ``padding=1``: symmetric; ``padding=0``: one row/column of zeros on the
    right and bottom only (TF's "SAME" for even sizes), as the DDPM paper's original TF code."""

    def __init__(self, channels: int, padding: int = 1) -> None:
        super().__init__()
        self.pad_right = padding == 0
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_right:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """The ResNet blocks (each optionally followed by attention) and the resampling of one resolution."""

    def __init__(self, blocks: list[ResBlock], attention: list[nn.Module], resample: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attention = nn.ModuleList(attention)
        self.resample = resample


class MapPyramid(nn.Module):
    """The hierarchical variant's maps: one per level, the area-averaged map plus a learned term.

    A conv encoder (stem, then one stride-2 conv per level) gives features at every level's
    resolution; a zero-initialised 3x3 head per level turns them into that level's correction.
    """

    def __init__(self, levels: int, channels: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.down = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, stride=2, padding=1) for _ in range(levels - 1)
        )
        self.heads = nn.ModuleList(_zero(nn.Conv2d(channels, 1, 3, padding=1)) for _ in range(levels))

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """``maps``: the averaged pyramid (level 0 first) -> the learned pyramid."""
        features = F.silu(self.stem(maps[0]))
        out = []
        for level, (base, head) in enumerate(zip(maps, self.heads)):
            if level:
                features = F.silu(self.down[level - 1](features))
            out.append(base + head(features))
        return out


def attention_pyramid(
    saliency: torch.Tensor | None, x: torch.Tensor, levels: int, map_pyramid: MapPyramid | None = None
) -> list[torch.Tensor]:
    """The maps ``A_l`` of ``levels`` levels (each (N or 1, 1, h_l, w_l)) from a saliency map: mean 1
    per image, area-averaged per halving, plus the learned corrections of ``map_pyramid`` (if any).
    Shared by our UNet and the hooked diffusers UNet (:mod:`genxai.diffusion.interop`)."""
    if saliency is None:
        if map_pyramid is None:
            return [x.new_ones(())] * levels
        saliency = x.new_ones(1, 1, *x.shape[-2:])
    if not isinstance(saliency, torch.Tensor) or saliency.ndim != 4 or saliency.shape[1] != 1:
        got = tuple(saliency.shape) if isinstance(saliency, torch.Tensor) else type(saliency).__name__
        raise ValueError(f"saliency: expected a (N, 1, H, W) map or None, got {got}")
    if saliency.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"saliency: expected {x.shape[0]} maps (or 1), got {saliency.shape[0]}")
    a = saliency.to(x.dtype)
    if a.shape[-2:] != x.shape[-2:]:
        a = F.interpolate(a, size=x.shape[-2:], mode="bilinear", align_corners=False)
    mean = a.mean(dim=(2, 3), keepdim=True)
    a = torch.where(mean > 0, a / mean.clamp_min(torch.finfo(a.dtype).tiny), torch.ones_like(a))
    maps = [a]
    for _ in range(levels - 1):
        maps.append(F.avg_pool2d(maps[-1], 2))
    return map_pyramid(maps) if map_pyramid is not None else maps


def inject(h: torch.Tensor, gate: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``h * (1 + gate * A)`` for a (C,) gate and a level's map: exactly ``h`` while the gate is 0."""
    # Cast the factor, not h: under bf16 autocast an fp32 product would keep fp32 copies for backward.
    return h * (1 + gate.view(1, -1, 1, 1) * a).to(h.dtype)


class UNet(nn.Module):
    """DDPM's noise-prediction network ``eps_theta(x_t, t)``, optionally conditioned on a saliency map.

    Args:
        image_size: H = W of the inputs (other sizes divisible by ``2 ** (levels - 1)`` work too).
        in_channels: image channels (the output has as many).
        base_channels: channels of level 0; level l has ``base_channels * channel_mults[l]``.
        channel_mults: one multiplier per resolution level.
        num_res_blocks: ResNet blocks per level on the way down (one more on the way up).
        attention_resolutions: resolutions (in pixels) that get self-attention after each block.
        dropout: dropout inside the ResNet blocks (DDPM CIFAR-10: 0.1).
        time_embedding: ``"sinusoidal"`` (DDPM), ``"fourier"`` (learned) or ``"random_fourier"``.
        attention_maps: ``"none"``, ``"same"`` or ``"hierarchical"`` (see the module docstring).
        attention_heads: heads of self-attention (DDPM: 1).
        norm_groups: GroupNorm groups (DDPM: 32; fewer when a width is not divisible).
        num_timesteps: T, to scale t for the Fourier embeddings.
        fourier_dim: size of the Fourier features.
        map_channels: width of the hierarchical variant's map encoder.
        downsample_padding: 1 pads the stride-2 convs symmetrically; 0 pads right/bottom only, as
            the DDPM paper's TF code and its diffusers conversions (``downsample_padding=0``).
        norm_eps: eps of every GroupNorm (the DDPM conversions: 1e-6).
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        base_channels: int = 128,
        channel_mults: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        time_embedding: str = "sinusoidal",
        attention_maps: str = "none",
        *,
        attention_heads: int = 1,
        norm_groups: int = 32,
        num_timesteps: int = 1000,
        fourier_dim: int = 16,
        map_channels: int = 16,
        downsample_padding: int = 1,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        check_positive_int(image_size, "image_size")
        check_positive_int(in_channels, "in_channels")
        check_positive_int(base_channels, "base_channels")
        check_positive_int(num_res_blocks, "num_res_blocks")
        check_in_range(dropout, "dropout", 0.0, 1.0)
        check_choice(time_embedding, "time_embedding", TIME_EMBEDDINGS)
        check_choice(attention_maps, "attention_maps", ATTENTION_MAPS)
        if downsample_padding not in (0, 1) or isinstance(downsample_padding, bool):
            raise ValueError(f"downsample_padding: expected 0 or 1, got {downsample_padding!r}")
        check_in_range(norm_eps, "norm_eps", 0.0, 1.0, closed=False)
        channel_mults = tuple(channel_mults)
        if not channel_mults or any(
            isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in channel_mults
        ):
            raise ValueError(f"channel_mults: expected positive integers, got {channel_mults!r}")
        if image_size % 2 ** (len(channel_mults) - 1):
            raise ValueError(
                f"image_size: {image_size} is not divisible by 2 ** {len(channel_mults) - 1} "
                f"(one halving per level of channel_mults={channel_mults})"
            )
        self.config = {
            "image_size": image_size,
            "in_channels": in_channels,
            "base_channels": base_channels,
            "channel_mults": list(channel_mults),
            "num_res_blocks": num_res_blocks,
            "attention_resolutions": list(attention_resolutions),
            "dropout": dropout,
            "time_embedding": time_embedding,
            "attention_maps": attention_maps,
            "attention_heads": attention_heads,
            "norm_groups": norm_groups,
            "num_timesteps": num_timesteps,
            "fourier_dim": fourier_dim,
            "map_channels": map_channels,
            "downsample_padding": downsample_padding,
            "norm_eps": norm_eps,
        }
        self.image_size = image_size
        self.attention_maps = attention_maps
        self.levels = tuple(image_size // 2**level for level in range(len(channel_mults)))
        self.level_channels = tuple(base_channels * m for m in channel_mults)

        temb_dim = 4 * base_channels
        if time_embedding == "sinusoidal":
            self.time_features = None
            features = base_channels
        else:
            self.time_features = FourierEmbedding(
                fourier_dim, num_timesteps, random=time_embedding == "random_fourier"
            )
            features = fourier_dim + 1
        self.base_channels = base_channels
        self.time_mlp = nn.Sequential(nn.Linear(features, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))

        def attention(channels: int, resolution: int) -> nn.Module:
            if resolution in attention_resolutions:
                return SelfAttention(channels, attention_heads, norm_groups, norm_eps)
            return nn.Identity()

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        skips, ch = [base_channels], base_channels
        self.down = nn.ModuleList()
        for level, out in enumerate(self.level_channels):
            res = self.levels[level]
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, out, temb_dim, dropout, norm_groups, norm_eps))
                attns.append(attention(out, res))
                ch = out
                skips.append(ch)
            last = level == len(channel_mults) - 1
            self.down.append(
                Level(blocks, attns, nn.Identity() if last else Downsample(ch, downsample_padding))
            )
            if not last:
                skips.append(ch)
        self.mid = Level(
            [
                ResBlock(ch, ch, temb_dim, dropout, norm_groups, norm_eps),
                ResBlock(ch, ch, temb_dim, dropout, norm_groups, norm_eps),
            ],
            [SelfAttention(ch, attention_heads, norm_groups, norm_eps), nn.Identity()],
            nn.Identity(),
        )
        self.up = nn.ModuleList()
        for level in reversed(range(len(channel_mults))):
            out, res = self.level_channels[level], self.levels[level]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(ch + skips.pop(), out, temb_dim, dropout, norm_groups, norm_eps))
                attns.append(attention(out, res))
                ch = out
            self.up.append(Level(blocks, attns, Upsample(ch) if level else nn.Identity()))
        self.norm_out = nn.GroupNorm(_groups(ch, norm_groups), ch, eps=norm_eps)
        self.conv_out = _zero(nn.Conv2d(ch, in_channels, 3, padding=1))

        if attention_maps != "none":
            self.gates = nn.ParameterList(nn.Parameter(torch.zeros(c)) for c in self.level_channels)
        self.map_pyramid = (
            MapPyramid(len(self.levels), map_channels) if attention_maps == "hierarchical" else None
        )

    # -- constructors and helpers ----------------------------------------------------------------
    @classmethod
    def ddpm_cifar10(cls, **overrides) -> UNet:
        """The DDPM paper's CIFAR-10 network: ch 128, mults (1, 2, 2, 2), attention at 16x16, dropout 0.1."""
        args = {
            "image_size": 32,
            "base_channels": 128,
            "channel_mults": (1, 2, 2, 2),
            "num_res_blocks": 2,
            "attention_resolutions": (16,),
            "dropout": 0.1,
        }
        return cls(**{**args, **overrides})

    @classmethod
    def ddpm_celebahq256(cls, **overrides) -> UNet:
        """The DDPM paper's 256x256 (CelebA-HQ, LSUN) network: mults (1, 1, 2, 2, 4, 4), attention at 16."""
        args = {
            "image_size": 256,
            "base_channels": 128,
            "channel_mults": (1, 1, 2, 2, 4, 4),
            "num_res_blocks": 2,
            "attention_resolutions": (16,),
            "dropout": 0.0,
        }
        return cls(**{**args, **overrides})

    def num_parameters(self, trainable_only: bool = False) -> int:
        return count_parameters(self, trainable_only)

    # -- forward ---------------------------------------------------------------------------------
    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """(N,) timesteps -> the embedding every block receives (after its SiLU)."""
        if self.time_features is None:
            features = sinusoidal_embedding(t, self.base_channels)
        else:
            features = self.time_features(t)
        return F.silu(self.time_mlp(features))

    def attention_pyramid(self, saliency: torch.Tensor | None, x: torch.Tensor) -> list[torch.Tensor]:
        """The maps ``A_l`` of every level (each (N or 1, 1, h_l, w_l)), from the saliency map."""
        return attention_pyramid(saliency, x, len(self.levels), self.map_pyramid)

    def _inject(self, h: torch.Tensor, maps: list[torch.Tensor] | None, level: int) -> torch.Tensor:
        return h if maps is None else inject(h, self.gates[level], maps[level])

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | int, saliency: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict the noise in ``x`` (N, C, H, W) at timesteps ``t`` ((N,) or a scalar).

        ``saliency``: (N, 1, H, W) (or (1, 1, H, W)) map, None meaning all-ones; ignored when
        ``attention_maps="none"``.
        """
        if x.ndim != 4:
            raise ValueError(f"x: expected shape (N, C, H, W), got {tuple(x.shape)}")
        factor = 2 ** (len(self.levels) - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"x: height and width must be divisible by {factor}, got {tuple(x.shape[-2:])}")
        temb = self.time_embedding(as_timesteps(t, x.shape[0], x.device))
        maps = None if self.attention_maps == "none" else self.attention_pyramid(saliency, x)

        h = self.conv_in(x)
        skips = [h]
        for level, stage in enumerate(self.down):
            for block, attn in zip(stage.blocks, stage.attention):
                h = attn(self._inject(block(h, temb), maps, level))
                skips.append(h)
            if not isinstance(stage.resample, nn.Identity):
                h = stage.resample(h)
                skips.append(h)
        last = len(self.levels) - 1
        for block, attn in zip(self.mid.blocks, self.mid.attention):
            h = attn(self._inject(block(h, temb), maps, last))
        for stage, level in zip(self.up, reversed(range(len(self.levels)))):
            for block, attn in zip(stage.blocks, stage.attention):
                h = attn(self._inject(block(torch.cat([h, skips.pop()], dim=1), temb), maps, level))
            h = stage.resample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
