"""Figures of a GAN dissection, drawn from what :func:`genxai.dissection.dissect` computed.

    plot_concept_counts(result.concept_counts, "counts.png", groups=result.concept_groups)
    plot_unit_iou(result.unit_iou, [result.concepts[c] for c in result.unit_concept], 0.04, "iou.png")
    plot_unit_gallery(tiles["images"], tiles["masks"], labels, "gallery.png")  # tiles: dissection.gallery

The bar chart is GAN Dissection's summary (interpretable units per concept, coloured by the
concept's kind); the gallery shows each unit's top samples with the region where the unit passes
its threshold (the rest dimmed, the border outlined), as in the paper's unit figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from genxai.report.figures import colorize, grid, to_rgb
from genxai.report.plots import _save

GROUP_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


def plot_concept_counts(
    counts: dict[str, int],
    path: str | Path,
    *,
    groups: dict[str, str] | None = None,
    title: str = "Interpretable units per concept",
) -> Path:
    """Bars of interpretable units per concept (concepts with none left out), most first, coloured
    by ``groups`` (concept -> kind) when given."""
    shown = sorted(((c, n) for c, n in counts.items() if n > 0), key=lambda item: -item[1])
    fig = Figure(figsize=(max(5.5, 0.55 * len(shown) + 1.5), 3.6))
    ax = fig.subplots()
    if not shown:
        ax.text(0.5, 0.5, "no interpretable units", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
    else:
        kinds = list(dict.fromkeys((groups or {}).get(c, "") for c, _ in shown))
        colour = {k: GROUP_COLOURS[i % len(GROUP_COLOURS)] for i, k in enumerate(kinds)}
        bars = ax.bar(
            range(len(shown)),
            [n for _, n in shown],
            color=[colour[(groups or {}).get(c, "")] for c, _ in shown],
        )
        ax.set_xticks(range(len(shown)), [c for c, _ in shown], rotation=45, ha="right")
        ax.bar_label(bars, fontsize=8)
        if groups:
            handles = [Patch(color=colour[k], label=k or "other") for k in kinds]
            ax.legend(handles=handles, fontsize=8, frameon=False)
    ax.set_ylabel("units")
    ax.set_title(title, fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, path, dpi=120)


def plot_unit_iou(
    iou: torch.Tensor,
    concepts: Sequence[str],
    bar: float,
    path: str | Path,
    *,
    interpretable: torch.Tensor | None = None,
) -> Path:
    """Every unit's IoU with its best concept, sorted, with the IoU bar; ``interpretable`` (U,)
    bool marks the units that pass every bar (the others are drawn grey)."""
    values = iou.detach().float().cpu()
    order = values.argsort(descending=True)
    good = (
        interpretable.cpu()[order] if interpretable is not None else torch.ones(len(order), dtype=torch.bool)
    )
    ranks = torch.arange(len(order))
    fig = Figure(figsize=(6, 3.4))
    ax = fig.subplots()
    ax.plot(ranks.numpy(), values[order].numpy(), color="#bbbbbb", linewidth=1)
    size = 12 if len(order) <= 64 else 4
    ax.scatter(
        ranks[good].numpy(),
        values[order][good].numpy(),
        s=size,
        color=GROUP_COLOURS[0],
        label="interpretable",
    )
    ax.scatter(
        ranks[~good].numpy(), values[order][~good].numpy(), s=size, color="#999999", label="not interpretable"
    )
    ax.axhline(bar, color="#c44e52", linestyle="--", linewidth=1, label=f"IoU bar {bar:g}")
    for rank, unit in enumerate(order[:5].tolist()):
        ax.annotate(
            f"{unit}: {concepts[unit]}",
            (rank, float(values[unit])),
            fontsize=7,
            xytext=(4, 2),
            textcoords="offset points",
        )
    ax.set_xlabel("units, by IoU")
    ax.set_ylabel("IoU (best concept)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, path, dpi=120)


def highlight(images: torch.Tensor, masks: torch.Tensor, *, dim: float = 0.3) -> torch.Tensor:
    """(N, C, H, W) images in [0, 1] with the region outside ``masks`` (N, 1, H, W) dimmed and
    the mask's border drawn in yellow."""
    images = to_rgb(images.float())
    mask = masks.float()
    inner = -F.max_pool2d(-mask, 3, stride=1, padding=1)  # erosion
    border = (mask - inner).clamp(0, 1)
    dimmed = images * (dim + (1 - dim) * mask)
    yellow = torch.tensor([1.0, 0.85, 0.0], device=images.device).view(1, 3, 1, 1)
    return torch.where(border > 0, yellow, dimmed)


def plot_unit_gallery(
    images: torch.Tensor, masks: torch.Tensor, labels: Sequence[str], path: str | Path, *, scale: int = 3
) -> Path:
    """One row per unit: its top samples (K, S, C, H, W) in [0, 1] with the thresholded unit
    region ``masks`` (K, S, 1, H, W) highlighted; ``labels`` name the rows."""
    if images.ndim != 5 or masks.shape[:2] != images.shape[:2] or len(labels) != images.shape[0]:
        raise ValueError(
            f"images, masks, labels: expected (K, S, C, H, W), (K, S, 1, H, W) and K labels, got "
            f"{tuple(images.shape)}, {tuple(masks.shape)}, {len(labels)}"
        )
    k, s = images.shape[:2]
    tiles = highlight(images.flatten(0, 1).cpu(), masks.flatten(0, 1).cpu())
    tiles = F.interpolate(tiles, scale_factor=scale, mode="nearest") if scale > 1 else tiles
    fig = Figure(figsize=(1.1 * s + 2.2, 1.15 * k + 0.3))
    axes = fig.subplots(k, 1, squeeze=False)[:, 0]
    for row, (ax, label) in enumerate(zip(axes, labels)):
        strip = grid(tiles[row * s : (row + 1) * s][None])
        ax.imshow(strip.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
        for spine in ax.spines.values():
            spine.set_visible(False)
    return _save(fig, path, dpi=110)


def plot_segmenter_iou(
    iou: dict[str, float], path: str | Path, *, title: str = "Segmenter IoU per concept"
) -> Path:
    """Bars of a segmenter's held-out IoU per concept, with their mean."""
    names = list(iou)
    values = [iou[n] for n in names]
    fig = Figure(figsize=(max(4.0, 0.5 * len(names) + 1.5), 3.4))
    ax = fig.subplots()
    bars = ax.bar(range(len(names)), values, color=GROUP_COLOURS[0])
    ax.bar_label(bars, fmt="%.2f", fontsize=7)
    present = [v for v in values if not math.isnan(v)]
    mean = sum(present) / max(len(present), 1)
    ax.axhline(mean, color="#c44e52", linestyle="--", linewidth=1, label=f"mIoU {mean:.3f}")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("IoU")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, path, dpi=120)


def plot_before_after(
    before: torch.Tensor, after: torch.Tensor, path: str | Path, *, title: str = "", scale: int = 3
) -> Path:
    """Three rows of the same samples: ``before`` and ``after`` an edit (N, C, H, W) in [0, 1] and
    the per-pixel change (the largest absolute difference over channels, one scale for all)."""
    if before.shape != after.shape or before.ndim != 4 or before.shape[0] == 0:
        raise ValueError(
            f"before, after: expected two (N, C, H, W) batches of the same shape, got "
            f"{tuple(before.shape)} and {tuple(after.shape)}"
        )
    change = (after.float() - before.float()).abs().amax(1, keepdim=True)
    change = colorize(change / change.max().clamp_min(1e-8), "magma")
    tiles = torch.stack([to_rgb(before.float().cpu()), to_rgb(after.float().cpu()), change.cpu()])
    tiles = F.interpolate(tiles.flatten(0, 1), scale_factor=scale, mode="nearest") if scale > 1 else tiles
    image = grid(tiles.view(3, before.shape[0], 3, *tiles.shape[-2:]))
    fig = Figure(figsize=(min(1.0 * before.shape[0] + 1.2, 14), 3.6))
    ax = fig.subplots()
    ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    rows = image.shape[1] / 3
    ax.set_yticks([rows * (i + 0.5) for i in range(3)], ["before", "after", "|change|"], fontsize=8)
    ax.set_title(title, fontsize=9)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return _save(fig, path, dpi=110)


def plot_concept_effects(
    ace: dict[str, float], path: str | Path, *, title: str = "Average causal effect per concept"
) -> Path:
    """Horizontal bars of an intervention's ACE per concept (change of the concept's pixel fraction)."""
    names = sorted(ace, key=lambda c: ace[c])
    values = [ace[c] for c in names]
    fig = Figure(figsize=(5.5, 0.3 * len(names) + 1.2))
    ax = fig.subplots()
    colours = [GROUP_COLOURS[3] if v < 0 else GROUP_COLOURS[0] for v in values]
    ax.barh(range(len(names)), values, color=colours)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.axvline(0, color="#555555", linewidth=0.8)
    ax.set_xlabel("ACE (change of the pixel fraction)")
    ax.set_title(title, fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, path, dpi=120)


def plot_concept_emergence(
    timesteps: Sequence[int],
    best_iou: torch.Tensor,
    concepts: Sequence[str],
    path: str | Path,
    *,
    ace: torch.Tensor | None = None,
    iou_bar: float | None = None,
    title: str = "Concept emergence over the sampling steps",
) -> Path:
    """IoU of the best unit per concept against t (T, C), sampling's order left to right (t falls);
    with ``ace`` (T, C; NaN where not measured) a second panel of the ACE of ablating those units at t."""
    iou = best_iou.detach().float().cpu()
    panels = 2 if ace is not None else 1
    fig = Figure(figsize=(6.0 * panels, 3.6))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    steps = list(range(len(timesteps)))
    for j, concept in enumerate(concepts):
        colour = GROUP_COLOURS[j % len(GROUP_COLOURS)]
        style = "-" if j < len(GROUP_COLOURS) else "--"
        axes[0].plot(steps, iou[:, j].numpy(), style, marker="o", markersize=3, color=colour, label=concept)
        if ace is not None and not bool(torch.isnan(ace[:, j]).all()):
            axes[1].plot(
                steps, ace[:, j].float().cpu().numpy(), style, marker="o", markersize=3, color=colour
            )
    if iou_bar is not None:
        axes[0].axhline(iou_bar, color="#999999", linestyle=":", linewidth=1)
    axes[0].set_ylabel("IoU of the best unit")
    axes[0].set_title(title, fontsize=9)
    axes[0].legend(fontsize=7, frameon=False, ncol=2)
    if ace is not None:
        axes[1].axhline(0, color="#555555", linewidth=0.8)
        axes[1].set_ylabel("ACE of ablating them at t")
        axes[1].set_title("Ablating the best units at one step", fontsize=9)
    for ax in axes:
        ax.set_xticks(steps, [str(t) for t in timesteps], fontsize=8)
        ax.set_xlabel("timestep t (sampling runs left to right)")
        ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, path, dpi=120)


__all__ = [
    "highlight",
    "plot_before_after",
    "plot_concept_counts",
    "plot_concept_effects",
    "plot_concept_emergence",
    "plot_segmenter_iou",
    "plot_unit_gallery",
    "plot_unit_iou",
]
