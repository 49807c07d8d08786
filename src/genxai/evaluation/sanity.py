"""Model-randomisation sanity check (Adebayo et al., 2018, "Sanity Checks for Saliency Maps").

A method whose maps barely change when the model's weights are re-drawn is not explaining the
model. Cascading randomisation re-initialises the parameterised layers one after another from the
output down (each step keeps the previous ones random); independent randomisation re-initialises
one layer at a time. After each step the maps are compared with the original ones by Spearman rank
correlation (of the maps and of their absolute values) and SSIM (of the min-max scaled maps).

Everything happens on a deep copy: the user's model is never modified.

    result = model_randomization(lambda m: Saliency(m), model, x, target=labels)
    for row in result.table():
        print(row["layer"], row["spearman_abs"], row["ssim"])
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchmetrics.functional.image import structural_similarity_index_measure

from genxai.core.checks import check_images
from genxai.core.engine import model_output
from genxai.core.hooks import get_module
from genxai.core.maps import minmax_normalize
from genxai.core.targets import as_target

MakeMethod = Callable[[nn.Module], Callable[..., torch.Tensor]]


@dataclass
class SanityResult:
    """Similarity of randomised-model maps to the original maps, one row per randomisation step.

    ``layers[k]`` is the layer re-initialised at step k (cascading: with all layers before it in
    the list). ``spearman``, ``spearman_abs`` and ``ssim`` are (steps, N); ``maps`` (steps, N, ...)
    only when asked for. A constant map has no rank correlation: NaN, left out of the means.
    """

    layers: list[str]
    spearman: torch.Tensor
    spearman_abs: torch.Tensor
    ssim: torch.Tensor
    original: torch.Tensor
    maps: torch.Tensor | None = None

    def table(self) -> list[dict[str, Any]]:
        """One dict per step: the layer and the mean of each similarity over images."""
        return [
            {
                "layer": layer,
                "spearman": float(self.spearman[k].nanmean()),
                "spearman_abs": float(self.spearman_abs[k].nanmean()),
                "ssim": float(self.ssim[k].nanmean()),
            }
            for k, layer in enumerate(self.layers)
        ]


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..D along the last dim of a (N, D) tensor, ties sharing their average rank (as SciPy)."""
    ordered, order = torch.sort(values, dim=1)
    n, d = values.shape
    positions = torch.arange(d, device=values.device, dtype=torch.float64).expand(n, d)
    change = ordered[:, 1:] != ordered[:, :-1]
    edge = torch.ones(n, 1, dtype=torch.bool, device=values.device)
    first = torch.cat([edge, change], dim=1)  # the first of a run of equal values
    last = torch.cat([change, edge], dim=1)  # the last of a run
    start = torch.where(first, positions, torch.zeros_like(positions)).cummax(dim=1).values
    end = torch.where(last, positions, torch.full_like(positions, d)).flip(1).cummin(dim=1).values.flip(1)
    return torch.empty_like(positions).scatter_(1, order, (start + end) / 2 + 1)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) Spearman rank correlation between the flattened maps ``a[i]`` and ``b[i]`` (NaN if constant)."""
    if a.shape != b.shape:
        raise ValueError(f"maps: expected equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    ra, rb = average_ranks(a.flatten(1)), average_ranks(b.flatten(1))
    ra, rb = ra - ra.mean(dim=1, keepdim=True), rb - rb.mean(dim=1, keepdim=True)
    return ((ra * rb).sum(dim=1) / (ra.norm(dim=1) * rb.norm(dim=1))).float()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) SSIM (Gaussian window 11, sigma 1.5) between per-image min-max scaled maps."""
    if a.ndim == 3:
        a, b = a.unsqueeze(1), b.unsqueeze(1)
    return structural_similarity_index_measure(
        minmax_normalize(a.float()), minmax_normalize(b.float()), data_range=1.0, reduction="none"
    ).float()


def parameterised_layers(model: nn.Module) -> list[str]:
    """Names of the modules that own parameters, from the output down (reverse definition order)."""
    names = [name for name, module in model.named_modules() if any(True for _ in module.parameters(False))]
    return names[::-1]


def reinitialise(module: nn.Module, seed: int) -> None:
    """Re-draw the parameters of ``module`` and its submodules, seeded, leaving the global RNG as it was.

    Each submodule owning parameters uses its ``reset_parameters`` (PyTorch's initialisation), or
    else draws them from N(0, their current std).
    """
    params = list(module.parameters())
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for sub in module.modules():
            own = list(sub.parameters(recurse=False))
            if not own:
                continue
            if callable(getattr(sub, "reset_parameters", None)):
                sub.reset_parameters()
                continue
            for param in own:
                std = float(param.float().std()) if param.numel() > 1 else 1.0
                param.normal_(0.0, std if std > 0 else 1.0)


def model_randomization(
    make_method: MakeMethod,
    model: nn.Module,
    x: torch.Tensor,
    target: Any = None,
    *,
    layers: Sequence[str] | None = None,
    cascading: bool = True,
    seed: int = 0,
    keep_maps: bool = False,
) -> SanityResult:
    """Adebayo et al.'s model-randomisation test of the method ``make_method(model)``.

    Args:
        make_method: builds the attribution method for a model, e.g. ``lambda m: GradCAM(m, "layer4")``.
        model: the trained model (left untouched; a deep copy is randomised).
        x: images (N, C, H, W).
        target: what to explain; bound on the original model (e.g. its predicted class), so every
            randomised model explains the same class.
        layers: dotted names to randomise, in order (default: every parameterised layer, output
            first); a block's name re-initialises all its layers at once.
        cascading: keep earlier layers randomised (True) or randomise one layer at a time (False).
        seed: seed of the re-initialisation.
        keep_maps: also return the maps of every step.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not callable(make_method):
        raise TypeError(f"make_method: expected a callable model -> attribution method, got {make_method!r}")
    x = check_images(x, "x")
    work = copy.deepcopy(model).eval()  # the copy in eval mode: no batch statistics, no dropout
    names = parameterised_layers(work) if layers is None else list(layers)
    if not names:
        raise ValueError("layers: the model has no parameterised layers to randomise")
    modules = [get_module(work, name) for name in names]
    bound = as_target(target).bind(model_output(work, x))
    original = make_method(work)(x, target=bound).detach().float()

    similarity: dict[str, list[torch.Tensor]] = {"spearman": [], "spearman_abs": [], "ssim": []}
    kept = []
    for step, module in enumerate(modules):
        saved = None if cascading else copy.deepcopy(module.state_dict())
        reinitialise(module, seed + step)
        maps = make_method(work)(x, target=bound).detach().float()
        if saved is not None:
            module.load_state_dict(saved)
        similarity["spearman"].append(spearman(original, maps))
        similarity["spearman_abs"].append(spearman(original.abs(), maps.abs()))
        similarity["ssim"].append(ssim(original, maps))
        if keep_maps:
            kept.append(maps)
    return SanityResult(
        layers=names,
        original=original,
        maps=torch.stack(kept) if keep_maps else None,
        **{key: torch.stack(values) for key, values in similarity.items()},
    )


__all__ = ["SanityResult", "model_randomization", "parameterised_layers", "spearman", "ssim"]
