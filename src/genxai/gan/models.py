"""A DCGAN generator and discriminator (Radford et al., 2016), small enough to train on a CPU and
named so that a layer can be picked for dissection.

    g = Generator(latent_dim=64, image_size=32, base_channels=32)
    z = g.latents(16, generator=torch.Generator().manual_seed(0))   # (16, 64) ~ N(0, I)
    images = g(z)                                                    # (16, 3, 32, 32) in [-1, 1]
    d = Discriminator(image_size=32, spectral_norm=True)
    logits = d(images)                                               # (16, 1), high = real

Generator layers: ``blocks.0`` maps z to 4x4 features; each further ``blocks.i`` doubles the
resolution (``blocks.i.conv`` ConvTranspose2d, ``blocks.i.norm`` BatchNorm2d, ``blocks.i.act``
ReLU); ``to_rgb`` makes the image (ConvTranspose2d + tanh). Both networks keep their constructor
arguments in ``self.config`` so checkpoints rebuild them (:func:`genxai.training.checkpoint.load_module`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from genxai.core.checks import check_positive_int

LATENT_CHUNK = 256
"""Latents are drawn in chunks of this many rows, so ``latents(n)`` is a prefix of ``latents(m)``
(m > n) from the same seed, whatever the batch size samples are generated with."""


def _check_image_size(image_size: int, name: str = "image_size") -> int:
    check_positive_int(image_size, name, minimum=8)
    if image_size & (image_size - 1):
        raise ValueError(f"{name}: expected a power of 2 >= 8 (8, 16, 32, 64, ...), got {image_size}")
    return image_size


def _dcgan_init(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights ~ N(0, 0.02), BatchNorm scales ~ N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class GBlock(nn.Sequential):
    """ConvTranspose2d -> BatchNorm2d -> ReLU, children named ``conv``, ``norm``, ``act``."""

    def __init__(self, in_channels: int, out_channels: int, *, first: bool) -> None:
        stride, padding = (1, 0) if first else (2, 1)  # 1x1 -> 4x4, else doubles the side
        super().__init__(
            OrderedDict(
                conv=nn.ConvTranspose2d(in_channels, out_channels, 4, stride, padding, bias=False),
                norm=nn.BatchNorm2d(out_channels),
                act=nn.ReLU(),  # not in place: a traced block output stays what the block computed
            )
        )


class ToRGB(nn.Sequential):
    """The last layer: ConvTranspose2d to the image channels (doubling the side), then tanh."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__(OrderedDict(conv=nn.ConvTranspose2d(in_channels, channels, 4, 2, 1), act=nn.Tanh()))


class Generator(nn.Module):
    """DCGAN generator: latents z (N, latent_dim) -> images (N, channels, image_size, image_size) in [-1, 1].

    Args:
        latent_dim: size of z (drawn from N(0, I), see :meth:`latents`).
        image_size: output side, a power of 2 >= 8; ``log2(image_size) - 2`` blocks.
        channels: image channels.
        base_channels: width of the last block; each earlier block is twice as wide, up to
            ``max_channels``.
        max_channels: width cap.
    """

    def __init__(
        self,
        latent_dim: int = 64,
        image_size: int = 32,
        channels: int = 3,
        base_channels: int = 64,
        max_channels: int = 512,
    ) -> None:
        super().__init__()
        check_positive_int(latent_dim, "latent_dim")
        _check_image_size(image_size)
        check_positive_int(channels, "channels")
        check_positive_int(base_channels, "base_channels")
        check_positive_int(max_channels, "max_channels")
        self.config = {
            "latent_dim": latent_dim,
            "image_size": image_size,
            "channels": channels,
            "base_channels": base_channels,
            "max_channels": max_channels,
        }
        self.latent_dim, self.image_size, self.channels = latent_dim, image_size, channels
        count = image_size.bit_length() - 3  # 4x4 after blocks.0, doubled by each further block and to_rgb
        widths = [min(base_channels * 2 ** (count - 1 - i), max_channels) for i in range(count)]
        blocks, previous = [], latent_dim
        for i, width in enumerate(widths):
            blocks.append(GBlock(previous, width, first=i == 0))
            previous = width
        self.blocks = nn.Sequential(*blocks)
        self.to_rgb = ToRGB(previous, channels)
        _dcgan_init(self)

    @property
    def layer_names(self) -> list[str]:
        """The layers to pick for dissection, coarse to fine: ``blocks.0`` ... ``blocks.k``, ``to_rgb``."""
        return [f"blocks.{i}" for i in range(len(self.blocks))] + ["to_rgb"]

    def latents(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """z ~ N(0, I) of shape (n, latent_dim) on ``device`` (default: the model's).

        Drawn on ``generator``'s device (the global CPU RNG when None) in chunks of
        :data:`LATENT_CHUNK` rows, so the same seed gives the same first rows whatever ``n`` is.
        """
        check_positive_int(n, "n")
        source = generator.device if generator is not None else torch.device("cpu")
        chunks = -(-n // LATENT_CHUNK)
        z = torch.cat(
            [
                torch.randn(LATENT_CHUNK, self.latent_dim, generator=generator, device=source)
                for _ in range(chunks)
            ]
        )[:n]
        return z.to(device if device is not None else self.device)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from latents (N, latent_dim) (or (N, latent_dim, 1, 1))."""
        if z.ndim == 4 and z.shape[2:] == (1, 1):
            z = z.flatten(1)
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z: expected shape (N, {self.latent_dim}), got {tuple(z.shape)}")
        return self.to_rgb(self.blocks(z[:, :, None, None]))


class DBlock(nn.Sequential):
    """Conv2d (4x4, stride 2) -> LeakyReLU(0.2) in place, children named ``conv``, ``act``."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__(OrderedDict(conv=conv, act=nn.LeakyReLU(0.2, inplace=True)))


class Discriminator(nn.Module):
    """DCGAN discriminator: images (N, channels, image_size, image_size) in [-1, 1] -> logits (N, 1).

    Stride-2 4x4 convs halve the side down to 4x4 (``blocks.0`` ... ``blocks.k``, LeakyReLU(0.2)
    in place, no batch norm, so each image's logit depends only on that image), then ``head``, a
    4x4 conv to one logit.

    Args:
        image_size: input side, a power of 2 >= 8.
        channels: image channels.
        base_channels: width of the first block; doubled by each further block up to ``max_channels``.
        spectral_norm: spectral normalisation of every conv (Miyato et al., 2018); its power
            iteration runs in training mode only.
        max_channels: width cap.
    """

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 3,
        base_channels: int = 64,
        spectral_norm: bool = False,
        max_channels: int = 512,
    ) -> None:
        super().__init__()
        _check_image_size(image_size)
        check_positive_int(channels, "channels")
        check_positive_int(base_channels, "base_channels")
        check_positive_int(max_channels, "max_channels")
        if not isinstance(spectral_norm, bool):
            raise ValueError(f"spectral_norm: expected true or false, got {spectral_norm!r}")
        self.config = {
            "image_size": image_size,
            "channels": channels,
            "base_channels": base_channels,
            "spectral_norm": spectral_norm,
            "max_channels": max_channels,
        }
        self.image_size, self.channels = image_size, channels
        blocks, previous, width, side = [], channels, base_channels, image_size
        while side > 4:
            blocks.append(DBlock(nn.Conv2d(previous, width, 4, 2, 1)))
            previous, width, side = width, min(2 * width, max_channels), side // 2
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(previous, 1, 4, 1, 0)
        _dcgan_init(self)  # before spectral norm, which makes `weight` a computed value
        if spectral_norm:
            for conv in [m for m in self.modules() if isinstance(m, nn.Conv2d)]:
                _spectral_norm(conv)

    @property
    def cam_layer(self) -> str:
        """Name of the last conv block: the usual ``layer`` for Grad-CAM on D."""
        return f"blocks.{len(self.blocks) - 1}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, 1)."""
        if x.ndim != 4 or x.shape[1:] != (self.channels, self.image_size, self.image_size):
            size = self.image_size
            raise ValueError(f"x: expected shape (N, {self.channels}, {size}, {size}), got {tuple(x.shape)}")
        return self.head(self.blocks(x)).flatten(1)
