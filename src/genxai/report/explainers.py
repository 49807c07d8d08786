"""Figures of the generative explainers (GANMEX baselines, diffeomorphic counterfactuals) and of
the example-based explanations: PNGs drawn with matplotlib's object API (no pyplot state)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure


def _image(t: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> an array imshow draws (grey for one channel)."""
    a = t.detach().float().clamp(0, 1).cpu()
    return a[0].numpy() if a.shape[0] == 1 else a.permute(1, 2, 0).numpy()


def _show(ax: Any, t: torch.Tensor, title: str = "") -> None:
    a = _image(t)
    ax.imshow(a, cmap="gray" if a.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def _heat(ax: Any, m: torch.Tensor, title: str = "") -> None:
    a = m.detach().float().sum(0).cpu().numpy()
    bound = float(np.abs(a).max()) or 1.0
    ax.imshow(a, cmap="bwr", vmin=-bound, vmax=bound, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def baseline_figure(
    path: str | Path,
    x: torch.Tensor,
    baselines: Mapping[str, torch.Tensor],
    maps: Mapping[tuple[str, str], torch.Tensor],
    method: str,
    *,
    rows: int = 6,
) -> Path:
    """Per image (rows): the image, then each baseline and the map ``method`` gives with it
    (red: evidence for the class, blue: against)."""
    n = min(rows, len(x))
    names = list(baselines)
    cols = 1 + 2 * len(names)
    fig = Figure(figsize=(1.1 * cols, 1.2 * n))
    axes = fig.subplots(n, cols, squeeze=False)
    for i in range(n):
        _show(axes[i][0], x[i], "image" if i == 0 else "")
        for j, name in enumerate(names):
            _show(axes[i][1 + 2 * j], baselines[name][i], name if i == 0 else "")
            _heat(axes[i][2 + 2 * j], maps[(method, name)][i], "its map" if i == 0 else "")
    fig.suptitle(f"baselines and {method} maps (red: for the class, blue: against)", fontsize=8)
    return _save(fig, path)


def counterfactual_figure(
    path: str | Path, x: torch.Tensor, results: Mapping[str, Any], targets: Sequence[str], *, columns: int = 8
) -> Path:
    """Columns: images; rows: the original, then per method its counterfactual (titled with the
    target probability and bits per dimension) and the change from the original."""
    n = min(columns, len(x))
    rows = 1 + 2 * len(results)
    fig = Figure(figsize=(1.3 * n, 1.35 * rows))
    axes = fig.subplots(rows, n, squeeze=False)
    for i in range(n):
        _show(axes[0][i], x[i], f"to {targets[i]}")
        for k, cf in enumerate(results.values()):
            bpd = "" if cf.bits_per_dim is None else f" {float(cf.bits_per_dim[i]):.2f}bpd"
            _show(axes[1 + 2 * k][i], cf.images[i], f"p={float(cf.probability[i]):.2f}{bpd}")
            _heat(axes[2 + 2 * k][i], cf.images[i] - x[i], "change" if i == 0 else "")
        if i == 0:
            axes[0][0].set_ylabel("original", fontsize=7)
            for k, name in enumerate(results):
                axes[1 + 2 * k][0].set_ylabel(name, fontsize=7)
    return _save(fig, path)


def likelihood_figure(path: str | Path, values: Mapping[str, torch.Tensor]) -> Path:
    """Histograms of bits per dimension (lower: more likely under the flow), one per group."""
    fig = Figure(figsize=(4.5, 3))
    ax = fig.subplots()
    for name, v in values.items():
        ax.hist(v.detach().float().cpu().numpy(), bins=20, alpha=0.5, label=name)
    ax.set_xlabel("bits per dimension under the flow")
    ax.set_ylabel("images")
    ax.legend(fontsize=7)
    return _save(fig, path)


# --- example-based, concept and influence explanations ----------------------------------------


def strip_figure(
    path: str | Path,
    queries: torch.Tensor,
    strips: Mapping[str, torch.Tensor],
    captions: Mapping[str, Sequence[Sequence[str]]] | None = None,
    query_titles: Sequence[str] | None = None,
) -> Path:
    """Image strips: per query (rows) the query image, then each named strip's k images
    (``strips[name]``: (Q, k, C, H, W) in [0, 1]) with their captions (``captions[name][q][j]``)."""
    q = len(queries)
    names = list(strips)
    widths = [strips[n].shape[1] for n in names]
    cols = 1 + sum(widths)
    fig = Figure(figsize=(1.05 * cols + 0.2, 1.45 * q + 0.4))
    axes = fig.subplots(q, cols, squeeze=False)
    for i in range(q):
        _show(axes[i][0], queries[i], query_titles[i] if query_titles else "query")
        col = 1
        for name, k in zip(names, widths):
            for j in range(k):
                text = captions[name][i][j] if captions and name in captions else ""
                title = f"{name}\n{text}" if j == 0 and i == 0 else text
                _show(axes[i][col], strips[name][i, j], title)
                col += 1
    return _save(fig, path)


def gallery_figure(
    path: str | Path, images: torch.Tensor, captions: Sequence[str], *, title: str = "", columns: int = 8
) -> Path:
    """A titled gallery of images (N, C, H, W) in [0, 1], ``columns`` per row, one caption each."""
    n = max(1, len(images))
    rows = -(-n // columns)
    cols = min(columns, n)
    fig = Figure(figsize=(1.0 * cols + 0.2, 1.15 * rows + 0.4))
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k < len(images):
            _show(ax, images[k], captions[k] if k < len(captions) else "")
        else:
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def tcav_figure(path: str | Path, records: Sequence[Mapping[str, Any]], *, title: str = "") -> Path:
    """TCAV score per concept (bars, +- std over random sets) beside the random CAVs' mean;
    significant concepts are marked with a star."""
    fig = Figure(figsize=(1.2 + 0.9 * len(records), 3))
    ax = fig.subplots()
    names = [r["concept"] for r in records]
    pos = np.arange(len(records))
    ax.bar(
        pos - 0.2, [r["tcav"] for r in records], 0.4, yerr=[r["tcav_std"] for r in records], label="concept"
    )
    ax.bar(
        pos + 0.2,
        [r["random_tcav"] for r in records],
        0.4,
        yerr=[r.get("random_tcav_std", 0.0) for r in records],
        color="grey",
        label="random CAVs",
    )
    for p, r in zip(pos, records):
        if r["significant"]:
            ax.text(p - 0.2, min(1.02, r["tcav"] + r["tcav_std"] + 0.02), "*", ha="center", fontsize=12)
    ax.set_xticks(pos, names, fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("TCAV score")
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)
