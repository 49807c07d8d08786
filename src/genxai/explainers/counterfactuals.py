"""Diffeomorphic counterfactuals (Dombrowski et al., 2021) and their pixel-space twins.

    flow, clf = load_flow("runs/flow"), frozen_classifier("runs/clf")
    cf = latent_counterfactual(flow, clf, x, target=3)        # Adam steps on z = flow.encode(x)
    adv = pixel_counterfactual(clf, x, target=3)              # the same steps on the pixels
    table = compare_counterfactuals(flow, clf, x, target=3)   # success, confidence, steps, bpd

Both search the same objective, the cross-entropy of the classifier towards ``target``, with Adam,
batched over the images; an image stops (its iterate is frozen) as soon as the target probability
passes ``threshold`` (0.99, as the paper). In the latent the result is ``flow.decode(z)``, a point
the flow maps from its Gaussian, which stays on the data manifold; pixel steps make an adversarial
example that leaves it. The flow's likelihood (bits per dimension, lower = more likely) measures that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genxai.core.checks import check_in_range, check_positive_int
from genxai.core.modes import evaluation_mode
from genxai.explainers.flows import RealNVP


@dataclass
class Counterfactual:
    """Images (N, C, H, W) in [0, 1], the target probability (N,), the steps taken (N,), whether
    the threshold was passed (N,) and the flow's bits per dimension (N,) when a flow was given."""

    images: torch.Tensor
    probability: torch.Tensor
    steps: torch.Tensor
    success: torch.Tensor
    bits_per_dim: torch.Tensor | None = None


def target_classes(model: nn.Module, x: torch.Tensor, target: Any) -> torch.Tensor:
    """``target`` (an int or (N,) classes) as a (N,) tensor, checked against the model's classes."""
    with torch.no_grad():
        classes = model(x[:1]).shape[1]
    t = torch.as_tensor(target, device=x.device).long()
    t = t.expand(x.shape[0]).clone() if t.ndim == 0 else t
    if t.shape != (x.shape[0],):
        raise ValueError(f"target: expected an int or {x.shape[0]} classes, got shape {tuple(t.shape)}")
    if int(t.min()) < 0 or int(t.max()) >= classes:
        raise ValueError(
            f"target: the classifier has classes 0..{classes - 1}, got {sorted(set(t.tolist()))}"
        )
    return t


def _search(
    decode,
    start: torch.Tensor,
    model: nn.Module,
    target: torch.Tensor,
    threshold: float,
    lr: float,
    max_steps: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adam on ``start`` towards ``target``; each row stops once its probability passes ``threshold``."""
    v = start.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=lr)
    steps = torch.zeros(len(v), dtype=torch.long, device=v.device)
    active = torch.ones(len(v), dtype=torch.bool, device=v.device)
    best = v.detach().clone()
    for _ in range(max_steps + 1):
        logits = model(decode(v)).float()
        prob = logits.softmax(1).gather(1, target[:, None]).squeeze(1).detach()
        done = prob > threshold
        best = torch.where((active & done).view(-1, *[1] * (v.ndim - 1)), v.detach(), best)
        active = active & ~done
        if not active.any() or int(steps.max()) >= max_steps:
            break
        loss = F.cross_entropy(logits, target, reduction="none")
        optimizer.zero_grad(set_to_none=True)
        (loss * active).sum().backward()
        v.grad *= active.view(-1, *[1] * (v.ndim - 1))  # finished rows keep their value (Adam moves 0)
        frozen = v.detach().clone()
        optimizer.step()
        with torch.no_grad():
            v.copy_(torch.where(active.view(-1, *[1] * (v.ndim - 1)), v, frozen))
        steps += active.long()
    best = torch.where(active.view(-1, *[1] * (v.ndim - 1)), v.detach(), best)
    with torch.no_grad():
        images = decode(best).clamp(0, 1)
        prob = model(images).float().softmax(1).gather(1, target[:, None]).squeeze(1)
    return images, prob, steps


def _check(x: torch.Tensor, threshold: float, lr: float, max_steps: int) -> None:
    if x.ndim != 4:
        raise ValueError(f"x: expected images (N, C, H, W), got shape {tuple(x.shape)}")
    check_in_range(threshold, "threshold", 0.0, 1.0)
    check_positive_int(max_steps, "max_steps")
    if not lr > 0:
        raise ValueError(f"lr: expected a step size > 0, got {lr!r}")


def _batched(fn, x: torch.Tensor, target: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    check_positive_int(batch_size, "batch_size")
    return [fn(x[i : i + batch_size], target[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def _bpd(flow: RealNVP | None, images: torch.Tensor) -> torch.Tensor | None:
    if flow is None:
        return None
    with torch.no_grad():
        return flow.bits_per_dim(images.clamp(0, 1))


def latent_counterfactual(
    flow: RealNVP,
    model: nn.Module,
    x: torch.Tensor,
    target: Any,
    *,
    threshold: float = 0.99,
    lr: float = 0.05,
    max_steps: int = 500,
    batch_size: int = 64,
) -> Counterfactual:
    """Gradient steps in the flow's latent ``z = flow.encode(x)`` until ``p(target | decode(z))``
    passes ``threshold`` (per image; at most ``max_steps``)."""
    _check(x, threshold, lr, max_steps)
    flow.check_images(x)
    target = target_classes(model, x, target)
    with evaluation_mode(model), evaluation_mode(flow):

        def one(xb: torch.Tensor, tb: torch.Tensor):
            with torch.no_grad():
                z = flow.encode(xb)
            return _search(lambda v: flow.decode(v).clamp(0, 1), z, model, tb, threshold, lr, max_steps)

        parts = _batched(one, x, target, batch_size)
        images, prob, steps = (torch.cat(p) for p in zip(*parts))
        return Counterfactual(images, prob, steps, prob > threshold, _bpd(flow, images))


def pixel_counterfactual(
    model: nn.Module,
    x: torch.Tensor,
    target: Any,
    *,
    flow: RealNVP | None = None,
    threshold: float = 0.99,
    lr: float = 0.01,
    max_steps: int = 500,
    batch_size: int = 64,
) -> Counterfactual:
    """The same search on the pixels (clipped to [0, 1]): an adversarial counterfactual. ``flow``
    only scores the result (bits per dimension)."""
    _check(x, threshold, lr, max_steps)
    target = target_classes(model, x, target)
    with evaluation_mode(model):
        parts = _batched(
            lambda xb, tb: _search(lambda v: v.clamp(0, 1), xb, model, tb, threshold, lr, max_steps),
            x,
            target,
            batch_size,
        )
        images, prob, steps = (torch.cat(p) for p in zip(*parts))
    if flow is not None:
        flow.check_images(x)
        with evaluation_mode(flow):
            return Counterfactual(images, prob, steps, prob > threshold, _bpd(flow, images))
    return Counterfactual(images, prob, steps, prob > threshold)


def compare_counterfactuals(
    flow: RealNVP,
    model: nn.Module,
    x: torch.Tensor,
    target: Any,
    *,
    threshold: float = 0.99,
    latent_lr: float = 0.05,
    pixel_lr: float = 0.01,
    max_steps: int = 500,
    batch_size: int = 64,
) -> tuple[dict[str, Counterfactual], list[dict[str, float]]]:
    """Latent and pixel counterfactuals of the same images, and one summary record per method:
    success rate, mean target probability, mean steps, mean bits per dimension under the flow,
    mean L2 distance to the input; the originals' bits per dimension as a reference row."""
    options = {"threshold": threshold, "max_steps": max_steps, "batch_size": batch_size}
    results = {
        "latent (flow)": latent_counterfactual(flow, model, x, target, lr=latent_lr, **options),
        "pixel (adversarial)": pixel_counterfactual(model, x, target, flow=flow, lr=pixel_lr, **options),
    }
    t = target_classes(model, x, target)
    with torch.no_grad(), evaluation_mode(model), evaluation_mode(flow):
        original = {
            "method": "original images",
            "success_rate": float(
                (model(x).softmax(1).gather(1, t[:, None]).squeeze(1) > threshold).float().mean()
            ),
            "probability": float(model(x).softmax(1).gather(1, t[:, None]).mean()),
            "steps": 0.0,
            "bits_per_dim": float(flow.bits_per_dim(x).mean()),
            "l2_to_input": 0.0,
        }
    records = [original]
    for name, cf in results.items():
        records.append(
            {
                "method": name,
                "success_rate": float(cf.success.float().mean()),
                "probability": float(cf.probability.mean()),
                "steps": float(cf.steps.float().mean()),
                "bits_per_dim": float(cf.bits_per_dim.mean()),
                "l2_to_input": float((cf.images - x).flatten(1).norm(dim=1).mean()),
            }
        )
    return results, records
