"""The discriminator D that tells real images from the diffusion model's denoised estimates.

    d = Discriminator(32, time_aware=True)
    logits = d(x0_hat, t)                      # (N, 1), high = real
    loss = d_loss(d, real, fake, t)            # non-saturating GAN loss, optional R1

A DCGAN-style conv net: a 3x3 stem, then stride-2 4x4 convs doubling the width down to 4x4, a
linear head; LeakyReLU(0.2) in place (the common GAN case our hooks are built for). The
time-aware variant (as in Discriminator Guidance, Kim et al. 2023) adds a per-channel embedding
of t after every conv, so D can judge an estimate against what is achievable at its noise level.
The blocks are named ``blocks.0``, ``blocks.1``, ...: pass one as ``layer`` to CAM methods.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from genxai.core.checks import check_positive_int
from genxai.diffusion.schedule import as_timesteps
from genxai.diffusion.unet import sinusoidal_embedding


class DBlock(nn.Module):
    """conv, + time embedding (time-aware D), LeakyReLU(0.2) in place."""

    def __init__(self, conv: nn.Conv2d, temb_dim: int | None) -> None:
        super().__init__()
        self.conv = conv
        self.temb_proj = nn.Linear(temb_dim, conv.out_channels) if temb_dim else None
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv(x)
        if self.temb_proj is not None:
            h = h + self.temb_proj(temb)[:, :, None, None]
        return self.act(h)


class Discriminator(nn.Module):
    """Real-vs-fake logits (N, 1) for (N, C, H, W) images in [-1, 1].

    Args:
        image_size: H = W of the inputs.
        in_channels: image channels.
        base_channels: width of the stem; doubled at each stride-2 block up to ``max_channels``.
        time_aware: take the timestep ``t`` of the estimate as a second input.
        num_timesteps: T (the range of t).
        spectral_norm: spectral normalisation of every conv and the head (Miyato et al., 2018).
            Its power iteration updates buffers in training mode, also during saliency passes;
            put D in eval mode where it must stay unchanged.
        max_channels: width cap.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int = 3,
        base_channels: int = 32,
        time_aware: bool = False,
        num_timesteps: int = 1000,
        *,
        spectral_norm: bool = False,
        max_channels: int = 256,
    ) -> None:
        super().__init__()
        check_positive_int(image_size, "image_size", minimum=4)
        check_positive_int(in_channels, "in_channels")
        check_positive_int(base_channels, "base_channels")
        check_positive_int(num_timesteps, "num_timesteps")
        self.config = {
            "image_size": image_size,
            "in_channels": in_channels,
            "base_channels": base_channels,
            "time_aware": time_aware,
            "num_timesteps": num_timesteps,
            "spectral_norm": spectral_norm,
            "max_channels": max_channels,
        }
        self.time_aware = bool(time_aware)
        self.num_timesteps = num_timesteps
        self.base_channels = base_channels
        norm = _spectral_norm if spectral_norm else (lambda m: m)
        temb_dim = 4 * base_channels if time_aware else None
        if time_aware:
            self.time_mlp = nn.Sequential(
                nn.Linear(base_channels, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim), nn.SiLU()
            )
        blocks = [DBlock(norm(nn.Conv2d(in_channels, base_channels, 3, padding=1)), temb_dim)]
        ch, res = base_channels, image_size
        while res > 4 and res % 2 == 0:
            out = min(2 * ch, max_channels)
            blocks.append(DBlock(norm(nn.Conv2d(ch, out, 4, stride=2, padding=1)), temb_dim))
            ch, res = out, res // 2
        self.blocks = nn.ModuleList(blocks)
        self.head = norm(nn.Linear(ch * res * res, 1))
        self.final_resolution = res

    @property
    def cam_layer(self) -> str:
        """Name of the last conv block: the usual ``layer`` for Grad-CAM on D."""
        return f"blocks.{len(self.blocks) - 1}"

    def forward(self, x: torch.Tensor, t: torch.Tensor | int | None = None) -> torch.Tensor:
        """Logits (N, 1); ``t`` ((N,) or a scalar) is required when time-aware, ignored otherwise."""
        temb = None
        if self.time_aware:
            if t is None:
                raise ValueError("t: this discriminator is time-aware; pass the timesteps of x (N,)")
            t = as_timesteps(t, x.shape[0], x.device)
            temb = self.time_mlp(sinusoidal_embedding(t, self.base_channels))
        h = x
        for block in self.blocks:
            h = block(h, temb)
        return self.head(h.flatten(1))


def call_discriminator(d: nn.Module, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
    """``d(x, t)`` for a time-aware discriminator (also inside a DDP wrapper), ``d(x)`` for any other."""
    if t is not None and getattr(getattr(d, "module", d), "time_aware", False):
        return d(x, t)
    return d(x)


def d_loss(
    d: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    t: torch.Tensor | None = None,
    *,
    fake_mask: torch.Tensor | None = None,
    r1_weight: float = 0.0,
    return_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Non-saturating GAN loss of D: ``softplus(-D(real)) + softplus(D(fake))``, batch means.

    Real and fake images go through D in one batch (one forward: one power iteration of a
    spectral-norm D). ``fake`` is detached (only D learns from this loss). ``t``: the timesteps
    of the pairs, given to a time-aware D for both halves. ``fake_mask`` (N,) bool: only these
    fakes count (the mean runs over them; XAI-guided training masks estimates from t above the
    cutoff). ``r1_weight``: add ``r1_weight / 2 * E ||grad_x D(real)||^2`` (Mescheder et al.,
    2018). ``return_logits``: also return the real and fake logits (detached).
    """
    if real.shape != fake.shape:
        raise ValueError(f"fake: expected the shape of real {tuple(real.shape)}, got {tuple(fake.shape)}")
    n = real.shape[0]
    real = real.detach().requires_grad_(r1_weight > 0)
    times = torch.cat([t, t]) if t is not None else None
    logits = call_discriminator(d, torch.cat([real, fake.detach()]), times).float().view(-1)
    real_logits, fake_logits = logits[:n], logits[n:]
    if fake_mask is None:
        fake_term = F.softplus(fake_logits).mean()
    else:
        mask = fake_mask.float().view(-1)
        fake_term = (F.softplus(fake_logits) * mask).sum() / mask.sum().clamp_min(1)
    loss = F.softplus(-real_logits).mean() + fake_term
    if r1_weight > 0:
        (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
        loss = loss + r1_weight / 2 * grad.square().flatten(1).sum(1).mean()
    if return_logits:
        return loss, real_logits.detach().view(-1, 1), fake_logits.detach().view(-1, 1)
    return loss
