"""The plan's ablation: every variant on the same data, Process budget and seeds.

    results = run_ablation(load_experiment("configs/demo.yaml"), baselines=("min_snr",))

Runs ``baseline``, ``noise``, ``noise+same`` and ``noise+hierarchical`` (and optionally the free
loss-weighting baselines ``baseline+min_snr`` / ``baseline+p2``) one after another, each in its
own folder under the ablation folder, all with the same seed, data order, Process budget and FID
features (one offline classifier shared by all runs, or the FID Inception). Then writes:

- ``results.json``: per run its FID (and IS) at every evaluation against Processes and training
  time, Processes/s, the paths of its sample grids and snapshots; the D setup used (t_D cutoff or
  time-aware D).
- ``results.csv``: one row per run, evaluation and metric.

This module computes and draws nothing: the figures (FID curves, samples, saliency/noise-weight
and attention maps) are drawn from these results by :mod:`genxai.report.plots`, which
:mod:`genxai.jobs.diffusion` calls after the ablation.

Interrupted ablations resume: finished runs are kept, the others continue from their checkpoints.
"""

from __future__ import annotations

import copy
import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from genxai.config import config_to_dict
from genxai.diffusion.config import VARIANTS, ExperimentConfig, build_dataset, save_experiment
from genxai.diffusion.trainer import GuidedDiffusionStep, Trainer
from genxai.evaluation.fid import find_inception
from genxai.training import checkpoint

BASELINES = ("min_snr", "p2")


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
    return last is not None and checkpoint.checkpoint_step(last) >= GuidedDiffusionStep(cfg).total_iterations


def run_ablation(
    cfg: ExperimentConfig,
    *,
    variants: Sequence[str] = VARIANTS,
    baselines: Sequence[str] = (),
    out_dir: str | Path | None = None,
    dataset: Dataset | None = None,
) -> dict[str, Any]:
    """Train every run (resuming unfinished ones), then write the results table.

    A run stopped by SIGTERM/SIGINT ends the ablation (its checkpoint is saved): the results then
    cover the finished runs and say ``"interrupted": true`` with the ``"signal"``; calling again resumes.
    """
    if cfg.eval.num_samples <= 0:
        raise ValueError("eval.num_samples: the ablation compares FID; set eval.num_samples > 0")
    root = Path(out_dir) if out_dir is not None else cfg.run_dir
    runs = ablation_runs(cfg, variants, baselines, root)
    root.mkdir(parents=True, exist_ok=True)
    save_experiment(cfg, root / "ablation.yaml")
    dataset = dataset if dataset is not None else build_dataset(cfg)
    for run in runs.values():
        if is_finished(run):
            continue
        summary = Trainer(run, dataset=dataset).fit()
        if summary["status"] == "interrupted":
            finished = {label: r for label, r in runs.items() if is_finished(r)}
            partial = write_results(root, finished) if finished else {}
            return {**partial, "interrupted": True, "signal": summary.get("signal")}
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
    cutoff = cfg.saliency_max_t + 1
    if d.time_aware:
        return f"time-aware D (t as input), fakes and saliency from estimates at t < {cutoff} of T = {T}"
    return f"D without t, fakes and saliency only from estimates at t < {cutoff} of T = {T} (t_D cutoff)"


def write_results(root: str | Path, runs: dict[str, ExperimentConfig]) -> dict[str, Any]:
    """``results.json`` and ``results.csv`` for finished ``runs``."""
    root = Path(root)
    summaries = {label: summarize_run(run) for label, run in runs.items()}
    metric_names = sorted({name for s in summaries.values() for name in s["final"]})
    fid_name = next((n for n in metric_names if n.startswith("FID")), None)
    first = next(iter(runs.values()))
    results = {
        "fid_name": fid_name,
        "metrics": metric_names,
        "budget": {
            "processes": GuidedDiffusionStep(first).total_units,
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
