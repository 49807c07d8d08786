"""Does D's saliency point at a generator's flaws? The method's premise, tested on planted artifacts.

    result = artifact_localization(d, real_images, corruption="noise", patch=4)
    result["energy"]   # share of D's fake-saliency energy inside the corrupted square (Loc)

The XAI-guided method assumes that D's saliency marks the pixels that make an image fake. Here
the flaw is known: a square of each real image is corrupted (``noise``: Gaussian noise,
``blur``: a box blur, ``colour``: the square's colours inverted, ``flat``: the square filled with
its mean colour), D judges the corrupted images as XAI-guided training does (its fake-score
saliency, :func:`genxai.diffusion.guidance.saliency`), and the localisation metrics of
:mod:`genxai.evaluation.localization` say how much of that saliency lies on the corruption:
the energy share (Loc) and the pointing game. ``chance`` is the square's share of the image,
what a map spread evenly would score.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genxai.core.checks import check_choice, check_images, check_positive_int
from genxai.diffusion.discriminator import call_discriminator
from genxai.diffusion.guidance import saliency
from genxai.evaluation.localization import localization_energy, pointing_game

CORRUPTIONS = ("noise", "blur", "colour", "flat")


def corrupt_squares(
    images: torch.Tensor, *, corruption: str = "noise", patch: int = 4, strength: float = 0.5, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt one random ``patch`` x ``patch`` square per image in [-1, 1]; returns (images, masks).

    Square positions and noise come from a generator seeded with ``seed`` (the same images give
    the same artifacts). ``strength``: the noise's standard deviation.
    """
    check_choice(corruption, "corruption", CORRUPTIONS)
    n, _, h, w = images.shape
    check_positive_int(patch, "patch")
    if patch >= min(h, w):
        raise ValueError(f"patch: expected a square smaller than the images ({h}x{w}), got {patch}")
    g = torch.Generator().manual_seed(seed)
    top = torch.randint(0, h - patch + 1, (n,), generator=g)
    left = torch.randint(0, w - patch + 1, (n,), generator=g)
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    masks = (
        (rows >= top.view(n, 1, 1))
        & (rows < (top + patch).view(n, 1, 1))
        & (cols >= left.view(n, 1, 1))
        & (cols < (left + patch).view(n, 1, 1))
    ).unsqueeze(1)
    masks = masks.to(images.device)
    if corruption == "noise":
        noise = torch.randn(images.shape, generator=g).to(images.device)
        bad = images + strength * noise
    elif corruption == "blur":
        bad = F.avg_pool2d(F.pad(images, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    elif corruption == "colour":
        bad = -images
    else:
        area = masks.float().sum(dim=(2, 3), keepdim=True)
        mean = (images * masks).sum(dim=(2, 3), keepdim=True) / area
        bad = mean.expand_as(images)
    out = torch.where(masks, bad, images).clamp(-1, 1)
    return out, masks


def artifact_localization(
    discriminator: nn.Module,
    images: torch.Tensor,
    *,
    corruption: str = "noise",
    patch: int = 4,
    strength: float = 0.5,
    t: int = 0,
    method: str = "saliency",
    seed: int = 0,
    **method_options: Any,
) -> dict[str, Any]:
    """D's fake-saliency on real ``images`` (in [-1, 1]) with one corrupted square each.

    Returns the mean energy share in the square (Loc), the pointing-game accuracy, the chance
    level (the square's area share), how much D's fake score rose through the corruption, and
    the maps and masks for figures.
    """
    images = check_images(images, "images")
    corrupted, masks = corrupt_squares(
        images, corruption=corruption, patch=patch, strength=strength, seed=seed
    )
    maps = saliency(discriminator, corrupted, t, method, **method_options)
    with torch.no_grad():
        times = torch.full((len(images),), t, device=images.device, dtype=torch.long)
        clean = call_discriminator(discriminator, images, times).float().view(-1)
        bad = call_discriminator(discriminator, corrupted, times).float().view(-1)
    return {
        "corruption": corruption,
        "patch": patch,
        "energy": float(localization_energy(maps, masks).mean),
        "pointing": float(pointing_game(maps, masks).mean),
        "chance": patch * patch / (images.shape[-2] * images.shape[-1]),
        "fake_score_rise": float((clean - bad).mean()),  # D's logit is high for real: a drop = more fake
        "images": corrupted,
        "maps": maps,
        "masks": masks,
    }
