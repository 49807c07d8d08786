"""The non-saturating GAN losses (Goodfellow et al., 2014) with the R1 penalty (Mescheder et al., 2018).

    d_out = discriminator_loss(d, real, fake, r1_weight=10.0)   # D: real -> 1, fake -> 0
    loss_g = generator_loss(d, fake)                           # G: make D call fakes real

Logits, not probabilities: ``softplus(-l) = -log sigmoid(l)`` is the numerically stable form.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class DiscriminatorLoss(NamedTuple):
    """D's loss (with the R1 term), the R1 penalty E ||grad_x D(real)||^2 (None without R1) and
    the detached real and fake logits (N,)."""

    loss: torch.Tensor
    r1: torch.Tensor | None
    real_logits: torch.Tensor
    fake_logits: torch.Tensor


def discriminator_loss(
    d: nn.Module, real: torch.Tensor, fake: torch.Tensor, *, r1_weight: float = 0.0
) -> DiscriminatorLoss:
    """``softplus(-D(real)) + softplus(D(fake))`` (batch means) ``+ r1_weight / 2 * E ||grad_x D(real)||^2``.

    Real and fake images go through D in one batch (one forward: one power iteration of a
    spectral-norm D); ``fake`` is detached, so only D learns from this loss.
    """
    if real.shape != fake.shape:
        raise ValueError(f"fake: expected the shape of real {tuple(real.shape)}, got {tuple(fake.shape)}")
    if r1_weight < 0:
        raise ValueError(f"r1_weight: expected a number >= 0, got {r1_weight!r}")
    n = real.shape[0]
    real = real.detach().requires_grad_(r1_weight > 0)
    logits = d(torch.cat([real, fake.detach()])).float().view(-1)
    real_logits, fake_logits = logits[:n], logits[n:]
    loss = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    r1 = None
    if r1_weight > 0:
        (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
        r1 = grad.square().flatten(1).sum(1).mean()
        loss = loss + r1_weight / 2 * r1
    return DiscriminatorLoss(loss, r1, real_logits.detach(), fake_logits.detach())


def generator_loss(d: nn.Module, fake: torch.Tensor) -> torch.Tensor:
    """The non-saturating G loss ``softplus(-D(fake))`` (batch mean): gradients reach G through
    ``fake``; freeze D's parameters around it so none accumulate in D."""
    return F.softplus(-d(fake).float().view(-1)).mean()
