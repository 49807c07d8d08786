"""The plan's ablation: every variant on the same data, Process budget and seeds.

    results = run_ablation(load_experiment("configs/demo.yaml"), baselines=("min_snr",))

Runs ``baseline``, ``noise``, ``noise+same`` and ``noise+hierarchical`` (and optionally the free
loss-weighting baselines ``baseline+min_snr`` / ``baseline+p2``) one after another, each in its
own folder under the ablation folder, all with the same seed, data order, Process budget and FID
features (one offline classifier shared by all runs, or the FID Inception). Then writes:

- ``results.json`` (figure paths relative to the ablation folder): per run its FID (and IS) at every evaluation against Processes and training
  time, Processes/s, the paths of its sample grids and snapshots; the D setup used (t_D cutoff or
  time-aware D); the figure files.
- ``results.csv``: one row per run, evaluation and metric.
- ``fid_vs_processes.png``, ``fid_vs_time.png``, ``samples.png`` (final grids side by side),
  ``maps_<run>.png`` (x0, x0_hat, saliency S and noise weight w of a fixed image over training)
  and ``attention_<run>.png`` (the per-level attention maps of the attention variants).

Interrupted ablations resume: finished runs are kept, the others continue from their checkpoints.
"""

from __future__ import annotations

import copy
import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from matplotlib.image import imread
from safetensors import safe_open
from torch.utils.data import Dataset

from genxai.config import config_to_dict
from genxai.diffusion import checkpoint
from genxai.diffusion.config import VARIANTS, ExperimentConfig, save_experiment
from genxai.diffusion.trainer import Trainer, build_dataset, total_iterations
from genxai.evaluation.fid import find_inception

BASELINES = ("min_snr", "p2")
SAFE = {"+": "_"}  # file names of runs: "noise+same" -> "noise_same"


def ablation_runs(
    cfg: ExperimentConfig,
    variants: Sequence[str] = VARIANTS,
    baselines: Sequence[str] = (),
    root: str | Path | None = None,
) -> dict[str, ExperimentConfig]:
    """One config per run label, identical but for the variant (or the loss weighting)."""
    root = Path(root) if root is not None else cfg.run_dir
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"variants: unknown variant {v!r}; expected some of {', '.join(VARIANTS)}")
    for b in baselines:
        if b not in BASELINES:
            raise ValueError(
                f"baselines: unknown loss weighting {b!r}; expected some of {', '.join(BASELINES)}"
            )
    if not variants and not baselines:
        raise ValueError("variants: nothing to run")
    base = copy.deepcopy(cfg)
    base.out_dir = str(root)
    uses_classifier = base.eval.features == "classifier" or (
        base.eval.features == "auto" and find_inception(base.eval.inception) is None
    )
    if uses_classifier and base.eval.classifier is None:
        base.eval.classifier = str(root / "fid_classifier.safetensors")  # one feature extractor for all
    runs: dict[str, ExperimentConfig] = {}
    for variant in variants:
        run = copy.deepcopy(base)
        run.variant, run.name = variant, variant
        runs[variant] = run
    for weighting in baselines:
        run = copy.deepcopy(base)
        run.variant, run.name = "baseline", f"baseline+{weighting}"
        run.train.loss_weighting = weighting
        runs[run.name] = run
    return runs


def is_finished(cfg: ExperimentConfig) -> bool:
    last = checkpoint.latest(cfg.run_dir / "checkpoints")
    return last is not None and checkpoint.checkpoint_step(last) >= total_iterations(cfg)


def run_ablation(
    cfg: ExperimentConfig,
    *,
    variants: Sequence[str] = VARIANTS,
    baselines: Sequence[str] = (),
    out_dir: str | Path | None = None,
    dataset: Dataset | None = None,
) -> dict[str, Any]:
    """Train every run (resuming unfinished ones), then write the results table and figures.

    A run stopped by SIGTERM/SIGINT ends the ablation (its checkpoint is saved): the results then
    cover the finished runs and say ``"interrupted": true``; calling again resumes.
    """
    if cfg.eval.num_samples <= 0:
        raise ValueError("eval.num_samples: the ablation compares FID; set eval.num_samples > 0")
    root = Path(out_dir) if out_dir is not None else cfg.run_dir
    runs = ablation_runs(cfg, variants, baselines, root)
    root.mkdir(parents=True, exist_ok=True)
    save_experiment(cfg, root / "ablation.yaml")
    dataset = dataset if dataset is not None else build_dataset(cfg)
    for run in runs.values():
        if not is_finished(run) and Trainer(run, dataset=dataset).fit()["status"] == "interrupted":
            finished = {label: r for label, r in runs.items() if is_finished(r)}
            return {**(write_results(root, finished) if finished else {}), "interrupted": True}
    return write_results(root, runs)


def summarize_run(cfg: ExperimentConfig) -> dict[str, Any]:
    """What a finished run folder says: evaluations, speed, sample grids and snapshots."""
    run_dir = cfg.run_dir
    evals = []
    if (run_dir / "evals.jsonl").is_file():
        evals = [
            json.loads(line) for line in (run_dir / "evals.jsonl").read_text().splitlines() if line.strip()
        ]
    rows = []
    if (run_dir / "metrics.csv").is_file():
        with open(run_dir / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    last = rows[-1] if rows else {}
    grids = sorted((run_dir / "samples").glob("iter_*.png")) if (run_dir / "samples").is_dir() else []
    snaps = (
        sorted((run_dir / "snapshots").glob("iter_*.safetensors")) if (run_dir / "snapshots").is_dir() else []
    )
    return {
        "variant": cfg.variant,
        "loss_weighting": cfg.train.loss_weighting,
        "run_dir": str(run_dir),
        "processes": int(last.get("processes", 0) or 0),
        "train_time_s": float(last.get("train_time_s", 0) or 0),
        "processes_per_s": float(last.get("processes_per_s", 0) or 0),
        "evals": evals,
        "final": evals[-1]["metrics"] if evals else {},
        "sample_grids": [str(p) for p in grids],
        "snapshots": [str(p) for p in snaps],
    }


def discriminator_setup(cfg: ExperimentConfig) -> str:
    """Which of the method's two D options the runs used."""
    d, T = cfg.discriminator, cfg.schedule.num_timesteps
    cutoff = max(1, round(d.t_max * T))
    if d.time_aware:
        return f"time-aware D (t as input), fakes from t < {cutoff} of T = {T}"
    return f"D without t, fakes and saliency only from estimates at t < {cutoff} of T = {T} (t_D cutoff)"


def write_results(root: str | Path, runs: dict[str, ExperimentConfig]) -> dict[str, Any]:
    """``results.json``, ``results.csv`` and the figures for finished ``runs``."""
    root = Path(root)
    summaries = {label: summarize_run(run) for label, run in runs.items()}
    metric_names = sorted({name for s in summaries.values() for name in s["final"]})
    fid_name = next((n for n in metric_names if n.startswith("FID")), None)
    first = next(iter(runs.values()))
    figures = {
        "fid_vs_processes": _plot_metric(root, summaries, fid_name, "processes", "Processes"),
        "fid_vs_time": _plot_metric(root, summaries, fid_name, "train_time_s", "training time (s)"),
        "samples": _plot_samples(root, summaries),
    }
    for label, summary in summaries.items():
        if summary["snapshots"]:
            figures[f"maps_{label}"] = _plot_maps(root, label, summary["snapshots"])
            figures[f"attention_{label}"] = _plot_attention(root, label, summary["snapshots"][-1])
    figures = {k: os.path.relpath(v, root) for k, v in figures.items() if v is not None}  # movable folder
    results = {
        "fid_name": fid_name,
        "metrics": metric_names,
        "budget": {
            "processes": first.cycle.cycles * (first.cycle.phase_a + 2 * first.cycle.phase_b),
            "batch_size": first.train.batch_size,
            "seed": first.seed,
            "cycle": config_to_dict(first)["cycle"],
        },
        "discriminator": discriminator_setup(first),
        "sampling": (
            f"{first.sample.sampler} ({first.sample.steps} steps) from N(0, I) with EMA weights; isotropic noise "
            "(w = 1) at sampling time"
        ),
        "runs": summaries,
        "figures": figures,
        "interrupted": False,
    }
    (root / "results.json").write_text(json.dumps(results, indent=2))
    with open(root / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["run", "variant", "loss_weighting", "iteration", "processes", "train_time_s", "metric", "value"]
        )
        for label, s in summaries.items():
            for record in s["evals"]:
                for name, value in record["metrics"].items():
                    writer.writerow(
                        [
                            label,
                            s["variant"],
                            s["loss_weighting"],
                            record["iteration"],
                            record["processes"],
                            record["train_time_s"],
                            name,
                            value,
                        ]
                    )
    return results


# -- figures ---------------------------------------------------------------------------------------
def _file(label: str) -> str:
    for old, new in SAFE.items():
        label = label.replace(old, new)
    return label


def _plot_metric(root: Path, summaries: dict, name: str | None, key: str, xlabel: str) -> str | None:
    if name is None:
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for label, s in summaries.items():
        points = [(r[key], r["metrics"][name]) for r in s["evals"] if name in r["metrics"]]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(name)
    ax.set_title(f"{name} against {xlabel}")
    ax.grid(alpha=0.3)
    ax.legend()
    path = root / f"fid_vs_{'processes' if key == 'processes' else 'time'}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return str(path)


def _plot_samples(root: Path, summaries: dict) -> str | None:
    grids = [(label, s["sample_grids"][-1]) for label, s in summaries.items() if s["sample_grids"]]
    if not grids:
        return None
    fig = Figure(figsize=(3.2 * len(grids), 3.6))
    axes = fig.subplots(1, len(grids), squeeze=False)
    for ax, (label, path) in zip(axes[0], grids):
        ax.imshow(imread(path))
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    path = root / "samples.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return str(path)


def _load_snapshot(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118


def _image(x: torch.Tensor):
    """(C, H, W) in [-1, 1] -> an array for imshow."""
    x = ((x.float() + 1) / 2).clamp(0, 1)
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


def _plot_maps(root: Path, label: str, snapshots: list[str], rows: int = 6) -> str:
    """x0, x0_hat, S and w of the first image of the fixed batch, at up to ``rows`` points in training."""
    picks = (
        snapshots
        if len(snapshots) <= rows
        else [snapshots[round(i * (len(snapshots) - 1) / (rows - 1))] for i in range(rows)]
    )
    fig = Figure(figsize=(8, 2.1 * len(picks)))
    axes = fig.subplots(len(picks), 4, squeeze=False)
    for row, path in zip(axes, picks):
        tensors, meta = _load_snapshot(path)
        panels = [
            (_image(tensors["x0"][0]), "x0", "gray"),
            (_image(tensors["x0_hat"][0]), f"x0_hat (t={int(tensors['t'][0])})", "gray"),
            (tensors["saliency"][0, 0].numpy(), "saliency S", "inferno"),
            (tensors["weight"][0, 0].numpy(), "noise weight w", "coolwarm"),
        ]
        for ax, (data, title, cmap) in zip(row, panels):
            image = ax.imshow(data, cmap=cmap if data.ndim == 2 else None)
            if title == "noise weight w":
                fig.colorbar(image, ax=ax, fraction=0.046)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        row[0].text(
            -0.3, 0.5, f"{meta.get('processes', '?')} P", transform=row[0].transAxes, rotation=90, va="center"
        )
    fig.suptitle(f"{label}: saliency and noise weight over training (rows: Processes done)", fontsize=9)
    path = root / f"maps_{_file(label)}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return str(path)


def _plot_attention(root: Path, label: str, snapshot: str, images: int = 3) -> str | None:
    tensors, meta = _load_snapshot(snapshot)
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
            axes[i][j].imshow(a.numpy(), cmap="viridis")
            axes[i][j].set_title(f"level {key[15:]} ({a.shape[-1]}px)", fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    fig.suptitle(
        f"{label}: attention maps per UNet level at {meta.get('processes', '?')} Processes", fontsize=9
    )
    path = root / f"attention_{_file(label)}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return str(path)
