"""The plan's ablation as an experiment: every variant, paired over seeds, at equal Processes and cost.

    results = run_ablation(load_experiment("configs/demo.yaml", ["ablation.seeds=3"]))

Trains each label of ``cfg.ablation`` (the variants ``baseline``, ``noise``, ``noise+same``,
``noise+hierarchical``, the loss-weighting baselines ``baseline+min_snr`` / ``baseline+p2``, and
with ``ablation.dg`` the Discriminator Guidance sampler on the baseline, ``baseline+dg``) once per
seed ``seed, seed + 1, ...``. A seed gives every label the same initial UNet weights, data order
and evaluation noise, so differences between labels are paired seed by seed. All runs share one
FID feature extractor. Runs go seed by seed, so an interrupted experiment holds complete seeds.

Resumable and incremental: finished runs are skipped, a half-finished run resumes from its
checkpoint, and ``results.json`` / ``results.csv`` are rewritten after every finished run:

- per run: its evaluations (every metric against Processes and training time), speed, grids;
- ``statistics``: per final metric, each label's mean and standard error over seeds, and the paired
  difference to ``baseline`` and to ``baseline+min_snr`` (mean, s.e., 95% paired bootstrap CI,
  paired t-test p-value), from :mod:`genxai.evaluation.paired`;
- ``costs`` and ``equal_cost``: seconds per Process of each label measured side by side in one
  process (:func:`measure_costs`: immune to a machine whose load changes between runs), and every
  metric interpolated along each run's curve at the cost of the cheapest label's full budget.

This module computes and draws nothing: figures come from :mod:`genxai.report`.
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from genxai.config import config_to_dict
from genxai.diffusion.config import ExperimentConfig, build_dataset, save_experiment, validate
from genxai.diffusion.trainer import GuidedDiffusionStep, Trainer
from genxai.evaluation.fid import find_inception
from genxai.evaluation.paired import compare, summarize
from genxai.training import checkpoint

BASELINES = ("min_snr", "p2")
REFERENCES = ("baseline", "baseline+min_snr")  # what every label is compared with
DG_LABEL = "baseline+dg"
TIMING_KEYS = ("train_time_s", "processes_per_s", "wall_time_s")  # differ between identical runs


@dataclass
class AblationRun:
    """One training run of the ablation: a label (variant or weighting) at one seed."""

    label: str
    seed: int
    cfg: ExperimentConfig
    single_seed: bool

    @property
    def id(self) -> str:
        return self.label if self.single_seed else f"{self.label}-seed{self.seed}"


def ablation_runs(
    cfg: ExperimentConfig,
    variants: Sequence[str] | None = None,
    baselines: Sequence[str] | None = None,
    root: str | Path | None = None,
    seeds: int | None = None,
) -> list[AblationRun]:
    """The runs, seed-major; configs identical but for variant / loss weighting and seed.

    ``variants``, ``baselines`` and ``seeds`` default to ``cfg.ablation``'s. One seed: runs in
    ``root/<label>``; several: ``root/<label>/seed<k>``.
    """
    a = copy.deepcopy(cfg.ablation)
    a.variants = list(a.variants if variants is None else variants)
    a.baselines = list(a.baselines if baselines is None else baselines)
    a.seeds = a.seeds if seeds is None else seeds
    probe = copy.deepcopy(cfg)
    probe.ablation = a
    validate(probe)  # the choices given here, as the config's own
    root = Path(root) if root is not None else cfg.run_dir
    base = copy.deepcopy(cfg)
    base.ablation = a
    uses_classifier = base.eval.features == "classifier" or (
        base.eval.features == "auto" and find_inception(base.eval.inception) is None
    )
    if uses_classifier and base.eval.classifier is None:
        base.eval.classifier = str(root / "fid_classifier.safetensors")  # one feature extractor for all
    labels = [(v, v, "none") for v in a.variants] + [("baseline", f"baseline+{w}", w) for w in a.baselines]
    runs = []
    for seed in range(cfg.seed, cfg.seed + a.seeds):
        for variant, label, weighting in labels:
            run = copy.deepcopy(base)
            run.variant, run.seed = variant, seed
            run.train.loss_weighting = weighting if weighting != "none" else cfg.train.loss_weighting
            if a.seeds == 1:
                run.out_dir, run.name = str(root), label
            else:
                run.out_dir, run.name = str(root / label), f"seed{seed}"
            runs.append(AblationRun(label, seed, run, a.seeds == 1))
    return runs


def is_finished(cfg: ExperimentConfig) -> bool:
    last = checkpoint.latest(cfg.run_dir / "checkpoints")
    return last is not None and checkpoint.checkpoint_step(last) >= GuidedDiffusionStep(cfg).total_iterations


def run_ablation(
    cfg: ExperimentConfig,
    *,
    variants: Sequence[str] | None = None,
    baselines: Sequence[str] | None = None,
    seeds: int | None = None,
    out_dir: str | Path | None = None,
    dataset: Dataset | None = None,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train every run (resuming unfinished ones), rewriting the results after each.

    ``say``: called with a line before each run and each extra measurement (the CLI and the demo
    print them), so that long silent stretches are announced.

    A run stopped by SIGTERM/SIGINT ends the ablation (its checkpoint is saved): the results then
    cover the finished runs and say ``"interrupted": true`` with the ``"signal"``; calling again resumes.
    """
    if cfg.eval.num_samples <= 0:
        raise ValueError("eval.num_samples: the ablation compares sample quality; set eval.num_samples > 0")
    root = Path(out_dir) if out_dir is not None else cfg.run_dir
    runs = ablation_runs(cfg, variants, baselines, root, seeds)
    root.mkdir(parents=True, exist_ok=True)
    resolved = copy.deepcopy(cfg)
    resolved.ablation = runs[0].cfg.ablation  # the variants, baselines and seeds as run
    save_experiment(resolved, root / "ablation.yaml")
    dataset = dataset if dataset is not None else build_dataset(cfg)
    dg = runs[0].cfg.ablation.dg
    say = say or (lambda text: None)
    _ensure_features(runs[0].cfg, dataset, root)
    for index, run in enumerate(runs, 1):
        with claim(run.cfg.run_dir.parent / f".{run.cfg.name}.lock") as mine:
            if not mine:  # another `genxai ablate` on this folder is training it
                say(f"run {index}/{len(runs)} {run.id}: trained by another worker")
                continue
            if not is_finished(run.cfg):
                say(f"run {index}/{len(runs)}: training {run.id} -> {run.cfg.run_dir}")
                summary = Trainer(run.cfg, dataset=dataset).fit()
                if summary["status"] == "interrupted":
                    return {**write_results(root, runs), "interrupted": True, "signal": summary.get("signal")}
            if dg and run.label == "baseline":
                from genxai.diffusion.dg import evaluate_dg

                say(f"Discriminator Guidance on {run.id}: training its time-aware D, then sampling")
                evaluate_dg(run.cfg, dataset)
        write_results(root, runs)
    if runs[0].cfg.ablation.measure_costs and all(is_finished(r.cfg) for r in runs):
        with claim(root / ".costs.lock") as mine:
            if mine and not (root / "costs.json").is_file():
                # after training, all labels in turn: the costs are a measurement of their own
                say("measuring each label's seconds per Process side by side (for the equal-cost comparison)")
                costs = measure_costs([r for r in runs if r.seed == runs[0].seed], dataset)
                _atomic_write(root / "costs.json", json.dumps(costs, indent=2))
    return write_results(root, runs)


@contextmanager
def claim(lock: Path) -> Iterator[bool]:
    """Hold ``lock`` while the block runs: True when this process got it, False when a live process
    holds it (several ``genxai ablate`` on one folder share its runs). A lock left by a dead
    process (SIGKILL) is taken over."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            owner = int(lock.read_text() or 0)
        except (OSError, ValueError):
            owner = 0
        if owner and owner != os.getpid() and _alive(owner):
            yield False
            return
        fd = os.open(lock, os.O_CREAT | os.O_TRUNC | os.O_WRONLY)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        yield True
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ensure_features(cfg: ExperimentConfig, dataset: Dataset, root: Path) -> None:
    """Train the shared offline FID classifier once, before any run (and before a parallel worker)."""
    e = cfg.eval
    if e.classifier is None or Path(e.classifier).is_file():
        return
    from genxai.evaluation.fid import select_features

    while True:
        with claim(root / ".fid_classifier.lock") as mine:
            if mine:
                if not Path(e.classifier).is_file():
                    select_features(
                        "classifier",
                        classifier=e.classifier,
                        dataset=dataset,
                        dataset_name=cfg.data.name,
                        seed=cfg.seed,
                    )
                return
        time.sleep(1.0)  # another worker is training it


# -- what the runs say ----------------------------------------------------------------------------
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
        "seed": cfg.seed,
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


def _finished_summaries(runs: Sequence[AblationRun]) -> dict[str, dict[str, Any]]:
    """Run id -> summary (with ``label``) of every finished run, DG evaluations included."""
    from genxai.diffusion.dg import dg_summary

    out: dict[str, dict[str, Any]] = {}
    for run in runs:
        if not is_finished(run.cfg):
            continue
        out[run.id] = {"label": run.label, **summarize_run(run.cfg)}
        if run.label == "baseline" and run.cfg.ablation.dg:
            dg = dg_summary(run.cfg, out[run.id])
            if dg is not None:
                dg_id = DG_LABEL if run.single_seed else f"{DG_LABEL}-seed{run.seed}"
                out[dg_id] = {**dg, "label": DG_LABEL}
    return out


def per_seed(summaries: dict[str, dict[str, Any]], metric: str) -> dict[str, dict[int, float]]:
    """Label -> seed -> final value of ``metric`` (finite values only)."""
    out: dict[str, dict[int, float]] = {}
    for s in summaries.values():
        value = s["final"].get(metric)
        if value is not None and math.isfinite(value):
            out.setdefault(s["label"], {})[s["seed"]] = float(value)
    return out


def statistics(per_label: dict[str, dict[int, float]]) -> dict[str, Any]:
    """Mean ± s.e. per label and paired differences to each reference label present."""
    out: dict[str, Any] = {
        "summary": {label: summarize(list(v.values())).as_dict() for label, v in per_label.items()}
    }
    for ref in REFERENCES:
        if ref in per_label:
            out[f"vs {ref}"] = {k: d.as_dict() for k, d in compare(per_label, ref).items()}
    return out


def interpolate(points: Sequence[tuple[float, float]], x: float) -> float:
    """Linear interpolation of a curve given as sorted (x, y) points; NaN outside its range."""
    if not points or x < points[0][0] or x > points[-1][0]:
        return math.nan
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def equal_cost(
    summaries: dict[str, dict[str, Any]], metrics: Sequence[str], costs: dict[str, float]
) -> dict[str, Any]:
    """Every metric at the same cost for every run: Processes x the label's seconds per Process,
    interpolated along each run's curve at the cost of the cheapest label's full budget."""
    curves = {
        rid: s
        for rid, s in summaries.items()
        if s["label"] in costs and s["evals"] and s["label"] != DG_LABEL
    }
    if not curves:
        return {}
    budget = min(costs[s["label"]] * s["evals"][-1]["processes"] for s in curves.values())
    out: dict[str, Any] = {"cost_s": budget, "metrics": {}}
    for metric in metrics:
        per_label: dict[str, dict[int, float]] = {}
        for s in curves.values():
            points = [
                (costs[s["label"]] * e["processes"], e["metrics"][metric])
                for e in s["evals"]
                if metric in e["metrics"]
            ]
            value = interpolate(sorted(points), budget)
            if math.isfinite(value):
                per_label.setdefault(s["label"], {})[s["seed"]] = value
        if per_label:
            out["metrics"][metric] = statistics(per_label)
    return out


def write_results(root: str | Path, runs: Sequence[AblationRun]) -> dict[str, Any]:
    """``results.json`` and ``results.csv`` for the finished ``runs`` (rewritten as runs finish)."""
    root = Path(root)
    summaries = _finished_summaries(runs)
    metric_names = sorted({name for s in summaries.values() for name in s["final"]})
    fid_name = next((n for n in metric_names if n.startswith("FID")), None)
    first = runs[0].cfg
    costs_file = root / "costs.json"
    costs = json.loads(costs_file.read_text()) if costs_file.is_file() else {}
    results = {
        "fid_name": fid_name,
        "metrics": metric_names,
        "labels": list(dict.fromkeys([r.label for r in runs] + [s["label"] for s in summaries.values()])),
        "seeds": sorted({r.seed for r in runs}),
        "budget": {
            "processes": GuidedDiffusionStep(first).total_units,
            "batch_size": first.train.batch_size,
            "seed": first.seed,
            "seeds": first.ablation.seeds,
            "cycle": config_to_dict(first)["cycle"],
        },
        "discriminator": discriminator_setup(first),
        "sampling": (
            f"{first.sample.sampler} ({first.sample.steps} steps) from N(0, I) with EMA weights; isotropic noise "
            "(w = 1) at sampling time"
        ),
        "runs": summaries,
        "finished": len(summaries),
        "planned": len(runs) + (first.ablation.seeds if first.ablation.dg else 0),
        "statistics": {m: statistics(per_seed(summaries, m)) for m in metric_names},
        "costs": costs,
        "equal_cost": equal_cost(summaries, metric_names, costs) if costs else {},
        "interrupted": False,
    }
    _atomic_write(root / "results.json", json.dumps(results, indent=2))
    rows = [
        ["run", "label", "seed", "variant", "loss_weighting", "processes", "train_time_s", "metric", "value"]
    ]
    for rid, s in summaries.items():
        for record in s["evals"]:
            for name, value in record["metrics"].items():
                rows.append(
                    [
                        rid,
                        s["label"],
                        s["seed"],
                        s["variant"],
                        s["loss_weighting"],
                        record["processes"],
                        record["train_time_s"],
                        name,
                        value,
                    ]
                )
    with tempfile.NamedTemporaryFile("w", dir=root, delete=False, newline="", suffix=".tmp") as f:
        csv.writer(f).writerows(rows)
    Path(f.name).replace(root / "results.csv")
    return results


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# -- cost per Process, measured side by side --------------------------------------------------------
def measure_costs(runs: Sequence[AblationRun], dataset: Dataset, *, repeats: int = 5) -> dict[str, float]:
    """Seconds per Process of each label's training iterations, timed in turn in one process.

    Each label's Trainer (fresh weights: speed does not depend on them) runs its phase-A and
    phase-B iterations on one real batch: one warm-up call, then ``repeats`` rounds of every label
    in turn; the median per phase, weighted by the cycle's mix of phases, per Process.
    """
    from genxai.data.batches import image_batches

    calls: dict[str, tuple[Any, Any, float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
        for run in runs:
            cfg = copy.deepcopy(run.cfg)
            cfg.out_dir, cfg.name = tmp, run.label.replace("+", "_")
            cfg.train.progress = False
            trainer = Trainer(cfg, dataset=dataset, resume=False)
            x0 = next(image_batches(dataset, cfg.train.batch_size, cfg.train.batch_size)).float()
            x0 = x0.to(trainer.device) * 2 - 1
            calls[run.label] = (*_phase_calls(trainer, x0), cfg.guided, cfg.cycle)
        times: dict[str, list[list[float]]] = {label: [[], []] for label in calls}
        for round_index in range(repeats + 1):
            for label, (a, b, _, _) in calls.items():
                for i, fn in enumerate((a, b)):
                    start = time.perf_counter()
                    fn()
                    if round_index:  # the first round warms up
                        times[label][i].append(time.perf_counter() - start)
    costs = {}
    for label, (_, _, guided, cycle) in calls.items():
        t_a, t_b = (float(torch.tensor(t).median()) for t in times[label])
        n_a, n_b = cycle.phase_a, cycle.phase_b
        costs[label] = (n_a * t_a + n_b * t_b) / (n_a + (2 * n_b if guided else n_b))
    return costs


def _phase_calls(trainer: Trainer, x0: torch.Tensor) -> tuple[Any, Any]:
    """One phase-A and one phase-B iteration of ``trainer``'s step on ``x0`` (as ``GuidedDiffusionStep``)."""
    step = trainer.step
    if not trainer.cfg.guided:

        def plain() -> None:
            step.process(x0)

        return plain, plain

    def phase_a() -> None:
        _, t, x0_hat = step.process(x0)
        step.discriminator_step(x0, x0_hat, t)

    def phase_b() -> None:
        _, t, x0_hat = step.process(x0)
        s, w = step.saliency_and_weight(x0_hat, t)
        step.process(x0, weight=w, saliency_map=s if trainer.cfg.attention_maps != "none" else None)

    return phase_a, phase_b
