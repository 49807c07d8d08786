"""Charts of an ablation over seeds: each label's mean curve with its standard-error band.

    paths = seed_curves(root, results)  # {"curve_<metric>_processes": path, "curve_<metric>_cost": path}

One line per label (variant or weighting): the mean over seeds of a metric at each evaluation,
shaded +- one standard error, against Processes and against cost (Processes x the label's
seconds per Process measured side by side, ``results["costs"]``), with the equal-cost budget
marked. Per-run charts (sample grids, saliency maps) stay in :mod:`genxai.report.plots`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

CURVE_METRICS = ("FID", "KID", "precision", "recall", "valid")
"""Metrics (by the start of their name) that get a curve figure, when the results have them."""


def plot_sample_saliency(label: str, snapshots: list[str], path: str | Path, rows: int = 4) -> Path | None:
    """D's fake-score saliency on the run's own samples at up to ``rows`` points in training
    (rows: Processes; each sample above its map). None when the snapshots hold no samples."""
    from genxai.report.plots import load_snapshot

    picks = [s for s in snapshots if "samples_saliency" in load_snapshot(s)[0]]
    if not picks:
        return None
    if len(picks) > rows:
        picks = [picks[round(i * (len(picks) - 1) / (rows - 1))] for i in range(rows)]
    first, _ = load_snapshot(picks[0])
    n = min(6, len(first["samples"]))
    fig = Figure(figsize=(1.5 * n, 3.1 * len(picks)))
    axes = fig.subplots(2 * len(picks), n, squeeze=False)
    for r, snapshot in enumerate(picks):
        tensors, meta = load_snapshot(snapshot)
        for i in range(n):
            image = ((tensors["samples"][i].permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1)
            axes[2 * r][i].imshow(image.squeeze(), cmap="gray" if image.shape[-1] == 1 else None)
            shown = axes[2 * r + 1][i].imshow(tensors["samples_saliency"][i, 0].numpy(), cmap="inferno")
            fig.colorbar(shown, ax=axes[2 * r + 1][i], fraction=0.046)
            for ax in (axes[2 * r][i], axes[2 * r + 1][i]):
                ax.axis("off")
        axes[2 * r][0].set_title(f"{meta.get('processes', '?')} Processes", fontsize=8, loc="left")
    fig.suptitle(f"{label}: D's fake-score saliency on its samples over training", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.split(" (")[0].lower()).strip("_")


def label_curves(results: dict[str, Any], metric: str, axis: str) -> dict[str, tuple[np.ndarray, ...]]:
    """Label -> (x, mean, s.e.) over the seeds that have the point; ``axis`` is processes or cost."""
    costs = results.get("costs", {})
    points: dict[str, dict[float, list[float]]] = {}
    for run in results["runs"].values():
        label = run.get("label", run["variant"])
        if axis == "cost" and label not in costs:
            continue
        for record in run["evals"]:
            value = record["metrics"].get(metric)
            if value is None or not math.isfinite(value):
                continue
            x = record["processes"] * (costs[label] if axis == "cost" else 1)
            points.setdefault(label, {}).setdefault(x, []).append(value)
    out = {}
    for label, by_x in points.items():
        xs = sorted(by_x)
        means = np.array([np.mean(by_x[x]) for x in xs])
        ses = np.array(
            [np.std(by_x[x], ddof=1) / math.sqrt(len(by_x[x])) if len(by_x[x]) > 1 else 0.0 for x in xs]
        )
        out[label] = (np.array(xs), means, ses)
    return out


def plot_seed_curves(results: dict[str, Any], metric: str, axis: str, path: str | Path) -> Path | None:
    """One metric against Processes (``axis="processes"``) or cost (``"cost"``); None if no data."""
    curves = label_curves(results, metric, axis)
    if not curves:
        return None
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for label, (xs, means, ses) in curves.items():
        marker = "*" if len(xs) == 1 else "o"  # a single point: a sampler evaluated at the end (DG)
        line = ax.plot(xs, means, marker=marker, markersize=4 if len(xs) > 1 else 10, label=label)[0]
        ax.fill_between(xs, means - ses, means + ses, color=line.get_color(), alpha=0.2, linewidth=0)
    budget = results.get("equal_cost", {}).get("cost_s")
    if axis == "cost" and budget:
        ax.axvline(budget, color="grey", linestyle="--", linewidth=1, label="equal-cost budget")
    seeds = len(results.get("seeds", [])) or 1
    ax.set_xlabel("Processes" if axis == "processes" else "cost (s: Processes x measured s/Process)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric.split(' (')[0]}: mean +- s.e. over {seeds} seed(s)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def seed_curves(root: str | Path, results: dict[str, Any]) -> dict[str, str]:
    """Curve figures of the headline metrics into ``root``: {figure name: path relative to root}."""
    root = Path(root)
    out = {}
    for metric in results.get("metrics", []):
        if not metric.startswith(CURVE_METRICS) or "std" in metric or "real images" in metric:
            continue
        for axis in ("processes", "cost"):
            name = f"curve_{_slug(metric)}_{axis}"
            path = plot_seed_curves(results, metric, axis, root / f"{name}.png")
            if path is not None:
                out[name] = os.path.relpath(path, root)
    return out
