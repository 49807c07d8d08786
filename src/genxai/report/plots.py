"""Matplotlib charts of a diffusion ablation, drawn from what the ablation wrote.

    results = json.loads((root / "results.json").read_text())
    figures = ablation_figures(root, results)   # {"fid_vs_processes": "fid_vs_processes.png", ...}

The ablation (:mod:`genxai.diffusion.ablation`) only computes: per run its evaluations, sample
grids and training snapshots. This module draws them: FID against Processes and against training
time, the final sample grids side by side, the saliency S and noise weight w of a fixed image over
training (``maps_<run>.png``) and the per-level attention maps of the attention variants
(``attention_<run>.png``). Every map panel has its own colour bar (report them with
``Colorbar(in_figure=True)``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.image import imread
from safetensors import safe_open

CURVES = {
    "processes": ("fid_vs_processes", "Processes"),
    "train_time_s": ("fid_vs_time", "training time (s)"),
}
"""Run-summary key of the x axis -> (figure name, axis label) of the metric curves."""


def file_label(label: str) -> str:
    """A run label as part of a file name: ``"noise+same"`` -> ``"noise_same"``."""
    return label.replace("+", "_")


def ablation_figures(root: str | Path, results: dict[str, Any]) -> dict[str, str]:
    """Draw every chart of an ablation into ``root``; returns {figure name: path relative to ``root``}.

    ``results`` is the ablation's ``results.json`` (its ``runs`` and ``fid_name``); figures with
    nothing to show (no evaluations, no snapshots, no attention maps) are left out.
    """
    root = Path(root)
    runs = results.get("runs", {})
    name = results.get("fid_name")
    figures: dict[str, Path | None] = {
        figure: plot_metric(runs, name, key, xlabel, root / f"{figure}.png")
        for key, (figure, xlabel) in CURVES.items()
    }
    figures["samples"] = plot_samples(runs, root / "samples.png")
    for label, run in runs.items():
        if run["snapshots"]:
            figures[f"maps_{label}"] = plot_maps(
                label, run["snapshots"], root / f"maps_{file_label(label)}.png"
            )
            figures[f"attention_{label}"] = plot_attention(
                label, run["snapshots"][-1], root / f"attention_{file_label(label)}.png"
            )
    return {k: os.path.relpath(v, root) for k, v in figures.items() if v is not None}  # movable folder


def plot_metric(
    runs: dict[str, dict[str, Any]], name: str | None, key: str, xlabel: str, path: str | Path
) -> Path | None:
    """Metric ``name`` of every run against its evaluations' ``key`` (``processes``, ``train_time_s``).

    ``None`` (nothing written) when ``name`` is ``None``.
    """
    if name is None:
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for label, run in runs.items():
        points = [(r[key], r["metrics"][name]) for r in run["evals"] if name in r["metrics"]]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(name)
    ax.set_title(f"{name} against {xlabel}")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return _save(fig, path, dpi=120)


def plot_samples(runs: dict[str, dict[str, Any]], path: str | Path) -> Path | None:
    """The last sample grid of every run side by side; ``None`` when no run has one."""
    grids = [(label, run["sample_grids"][-1]) for label, run in runs.items() if run["sample_grids"]]
    if not grids:
        return None
    fig = Figure(figsize=(3.2 * len(grids), 3.6))
    axes = fig.subplots(1, len(grids), squeeze=False)
    for ax, (label, grid_path) in zip(axes[0], grids):
        ax.imshow(imread(grid_path))
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    return _save(fig, path, dpi=120)


def plot_maps(label: str, snapshots: list[str], path: str | Path, rows: int = 6) -> Path:
    """x0, x0_hat, S and w of the first image of the fixed batch, at up to ``rows`` points in training."""
    picks = (
        snapshots
        if len(snapshots) <= rows
        else [snapshots[round(i * (len(snapshots) - 1) / (rows - 1))] for i in range(rows)]
    )
    fig = Figure(figsize=(8, 2.1 * len(picks)))
    axes = fig.subplots(len(picks), 4, squeeze=False)
    for row, snapshot in zip(axes, picks):
        tensors, meta = load_snapshot(snapshot)
        panels = [
            (_image(tensors["x0"][0]), "x0", "gray"),
            (_image(tensors["x0_hat"][0]), f"x0_hat (t={int(tensors['t'][0])})", "gray"),
            (tensors["saliency"][0, 0].numpy(), "saliency S", "inferno"),
            (tensors["weight"][0, 0].numpy(), "noise weight w", "coolwarm"),
        ]
        for ax, (data, title, cmap) in zip(row, panels):
            image = ax.imshow(data, cmap=cmap if data.ndim == 2 else None)
            if data.ndim == 2 and cmap != "gray":  # the maps: S and w each with its own scale
                fig.colorbar(image, ax=ax, fraction=0.046)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        row[0].text(
            -0.3, 0.5, f"{meta.get('processes', '?')} P", transform=row[0].transAxes, rotation=90, va="center"
        )
    fig.suptitle(f"{label}: saliency and noise weight over training (rows: Processes done)", fontsize=9)
    return _save(fig, path, dpi=110)


def plot_attention(label: str, snapshot: str, path: str | Path, images: int = 3) -> Path | None:
    """x0_hat and its attention map at every UNet level for up to ``images`` images of a snapshot.

    ``None`` (nothing written) when the snapshot has no attention maps (the non-attention variants).
    """
    tensors, meta = load_snapshot(snapshot)
    levels = sorted((k for k in tensors if k.startswith("attention_level")), key=lambda k: int(k[15:]))
    if not levels:
        return None
    n = min(images, tensors[levels[0]].shape[0])
    fig = Figure(figsize=(2.2 * (len(levels) + 1), 2.2 * n))
    axes = fig.subplots(n, len(levels) + 1, squeeze=False)
    for i in range(n):
        axes[i][0].imshow(_image(tensors["x0_hat"][i]), cmap="gray")
        axes[i][0].set_title("x0_hat", fontsize=8)
        for j, key in enumerate(levels, start=1):
            a = tensors[key][i, 0]
            fig.colorbar(axes[i][j].imshow(a.numpy(), cmap="viridis"), ax=axes[i][j], fraction=0.046)
            axes[i][j].set_title(f"level {key[15:]} ({a.shape[-1]}px)", fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    fig.suptitle(
        f"{label}: attention maps per UNet level at {meta.get('processes', '?')} Processes", fontsize=9
    )
    return _save(fig, path, dpi=110)


def load_snapshot(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a training snapshot (``snapshots/iter_*.safetensors``)."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118


def _image(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> an array for imshow."""
    x = ((x.float() + 1) / 2).clamp(0, 1)
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


def _save(fig: Figure, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path
