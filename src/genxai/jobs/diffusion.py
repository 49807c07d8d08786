"""XAI-guided diffusion as a job: run the ablation and turn its results into report sections.

    sections = ablation_sections("runs/demo-ablation")       # after `genxai ablate`
    write_ablation_report("runs/demo-ablation")              # -> runs/demo-ablation/report.html

The ablation itself (training every variant on the same budget, FID) lives in
:mod:`genxai.diffusion.ablation`; this module reads its ``results.json``, has
:mod:`genxai.report.plots` draw the figures from it (recorded under ``figures`` in
``results.json``) and lays the numbers and figures out for people to look at.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from genxai.diffusion.ablation import run_ablation
from genxai.diffusion.config import build_dataset, load_experiment
from genxai.jobs.premise import premise_experiment, premise_sections
from genxai.report.ablation import plot_sample_saliency, seed_curves
from genxai.report.figures import grid, overlay, real_images_figure, save_png, to_rgb
from genxai.report.html import LOAD_NOTE, MINMAX, Colorbar, Picture, Section, Table, build_report
from genxai.report.plots import ablation_figures, file_label

IN_FIGURE = Colorbar(in_figure=True, label="each map panel has its own scale")
SALIENCY_BAR = Colorbar("inferno", "0 (least)", "1 (most)", f"D's fake-score saliency, {MINMAX}")
"""Colour bars of the ablation's map figures: matplotlib charts draw their own; overlays get one."""


def load_results(root: str | Path) -> dict[str, Any]:
    """The ``results.json`` of an ablation folder, with a clear error when there is none."""
    path = Path(root) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"run_dir: {root} has no results.json; is it the folder of `genxai ablate`?")
    return json.loads(path.read_text())


def draw_ablation_figures(root: str | Path, results: dict[str, Any] | None = None) -> dict[str, Any]:
    """Draw an ablation's figures into ``root`` and record them in its ``results.json``.

    ``results`` defaults to ``root/results.json``; returns them with ``figures`` (figure name ->
    path relative to ``root``). Results without finished runs are returned unchanged.
    """
    root = Path(root)
    results = results if results is not None else load_results(root)
    if not results.get("runs"):
        return results
    first_seed = results.get("seeds", [None])[0]
    per_run = {  # per-run charts (grids, maps) for one seed: the others look alike
        rid: run for rid, run in results["runs"].items() if run.get("seed", first_seed) == first_seed
    }
    figures = ablation_figures(root, {**results, "runs": per_run})
    for rid, run in per_run.items():
        drawn = plot_sample_saliency(rid, run["snapshots"], root / f"sample_saliency_{file_label(rid)}.png")
        if drawn is not None:
            figures[f"sample_saliency_{rid}"] = os.path.relpath(drawn, root)
    if len(results.get("seeds", [])) > 1 or results.get("costs"):
        figures |= seed_curves(root, results)
    results = {**results, "figures": figures}
    (root / "results.json").write_text(json.dumps(results, indent=2))
    return results


def results_table(results: dict[str, Any]) -> Table:
    """One row per run: its setup, speed and final metrics."""
    records = []
    for label, run in results["runs"].items():
        record = {
            "run": label,
            "seed": run.get("seed"),
            "variant": run["variant"],
            "loss weighting": run["loss_weighting"],
            "Processes": run["processes"],
            "training time (s)": run["train_time_s"],
            "Processes/s": run["processes_per_s"],
        }
        record.update(run["final"])
        records.append(record)
    return Table.from_records(records, notes={"training time (s)": LOAD_NOTE, "Processes/s": LOAD_NOTE})


def _cell(summary: dict[str, float] | None) -> str:
    if not summary:
        return "-"
    se = summary["se"]
    return f"{summary['mean']:.4g}" + (f" +- {se:.2g}" if se == se else "")


def _difference(d: dict[str, float] | None) -> str:
    if not d:
        return "-"
    return f"{d['mean']:+.3g} [{d['ci_low']:+.3g}, {d['ci_high']:+.3g}] p={d['p_value']:.2g}"


def statistics_table(stats: dict[str, Any], labels: Sequence[str]) -> Table:
    """Per label of one metric: mean +- s.e. over seeds and the paired differences to the references."""
    refs = [key for key in stats if key.startswith("vs ")]
    records = []
    for label in labels:
        if label not in stats["summary"]:
            continue
        record = {
            "run": label,
            "seeds": stats["summary"][label]["n"],
            "mean +- s.e.": _cell(stats["summary"][label]),
        }
        for ref in refs:
            record[f"difference {ref}"] = _difference(stats[ref].get(label))
        records.append(record)
    note = "paired over seeds: mean [95% bootstrap CI] and the paired t-test's p-value"
    return Table.from_records(records, notes={f"difference {ref}": note for ref in refs})


def results_markdown(results: dict[str, Any]) -> str:
    """The statistics tables as Markdown (``results.md`` beside ``results.json``): per headline metric,
    final and at equal cost, mean +- s.e. per label and the paired differences."""
    labels = results.get("labels") or sorted({r.get("label", r["variant"]) for r in results["runs"].values()})
    parts = [
        f"{results.get('finished', len(results['runs']))} of {results.get('planned', '?')} runs finished; "
        f"seeds {results.get('seeds')}; {results['budget']['processes']} Processes per run.",
        "Differences: variant - reference, paired by seed: mean [95% bootstrap CI] p = paired t-test.",
    ]
    blocks = [("final", results.get("statistics", {}))]
    if results.get("equal_cost", {}).get("metrics"):
        cost = results["equal_cost"]["cost_s"]
        blocks.append((f"at equal cost ({cost:.0f} s)", results["equal_cost"]["metrics"]))
    for when, per_metric in blocks:
        for metric, stats in per_metric.items():
            if not _headline(metric) or not stats.get("summary"):
                continue
            table = statistics_table(stats, labels)
            rows = [[str(v) for v in row] for row in table.rows]
            parts.append(
                "\n".join(
                    [
                        f"**{metric}, {when}**\n",
                        "| " + " | ".join(table.columns) + " |",
                        "|" + " --- |" * len(table.columns),
                        *("| " + " | ".join(row) + " |" for row in rows),
                    ]
                )
            )
    return "\n\n".join(parts) + "\n"


def _headline(metric: str) -> bool:
    """The metrics the statistics tables show (all of them are in results.json)."""
    return metric.startswith(("FID", "KID (", "precision", "recall", "valid"))


def statistics_sections(results: dict[str, Any]) -> list[Section]:
    """The tables over seeds: final metrics, and every metric at equal cost."""
    labels = results.get("labels") or sorted({r.get("label", r["variant"]) for r in results["runs"].values()})
    seeds = len(results.get("seeds", [])) or 1
    sections = []
    for metric, stats in results.get("statistics", {}).items():
        if stats.get("summary") and seeds > 1 and _headline(metric):
            sections.append(
                Section(f"{metric}: final, over {seeds} seeds", table=statistics_table(stats, labels))
            )
    at_cost = results.get("equal_cost", {})
    costs = results.get("costs", {})
    if costs:
        text = (
            "Seconds per Process, each label's training iterations timed in turn in one process: "
            + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in costs.items())
        )
        if at_cost:
            text += (
                f". At equal cost every run is read off its curve at {at_cost['cost_s']:.1f} s, the "
                "cheapest label's full budget (guided runs pay for D and the saliency)."
            )
        sections.append(Section("Cost", text=text))
        for metric, stats in at_cost.get("metrics", {}).items():
            if _headline(metric) and (seeds > 1 or len(stats.get("summary", {})) > 1):
                sections.append(Section(f"{metric}: at equal cost", table=statistics_table(stats, labels)))
    return sections


def ablation_sections(root: str | Path, results: dict[str, Any] | None = None) -> list[Section]:
    """Report sections of an ablation: table, FID curves, samples, saliency/noise maps, attention."""
    root = Path(root)
    results = results if results is not None else load_results(root)
    figures = {key: (root / path).resolve() for key, path in results.get("figures", {}).items()}
    fid_name = results.get("fid_name") or "FID"
    budget = results["budget"]
    notes = [
        f"Every run: {budget['processes']} Processes at batch {budget['batch_size']}, seed {budget['seed']}, "
        f"cycle {budget['cycle']}.",
        f"Discriminator: {results['discriminator']}.",
        f"Sampling: {results['sampling']}.",
    ]
    if "offline" in fid_name:
        notes.append(
            f"{fid_name} uses a classifier trained on the bundled data as feature extractor: it ranks runs "
            "on this data but is not comparable to published (Inception) FIDs."
        )
    if results.get("interrupted"):
        notes.append("The ablation was interrupted: only finished runs are shown; run it again to resume.")
    sections = [
        Section("XAI-guided diffusion: ablation", text="\n".join(notes), table=results_table(results))
    ]
    sections += statistics_sections(results)
    seed_figures = [Picture(path) for key, path in figures.items() if key.startswith("curve_")]
    if seed_figures:
        sections.append(Section("Metrics during training, over seeds", images=seed_figures))
    curves = [
        Picture(figures[k], caption)
        for k, caption in (
            ("fid_vs_processes", f"{fid_name} against Processes"),
            ("fid_vs_time", f"{fid_name} against training time"),
        )
        if k in figures
    ]
    if curves:
        sections.append(Section(f"{fid_name} during training", images=curves))
    if "samples" in figures:
        real = root / "real_images.png"
        pictures = [Picture(figures["samples"])]
        if real.is_file():
            pictures.append(Picture(real.resolve(), "real training images, for comparison"))
        sections.append(Section("Samples (EMA weights, final checkpoint)", images=pictures))
    maps = [
        Picture(path, key.removeprefix("maps_"), IN_FIGURE)
        for key, path in figures.items()
        if key.startswith("maps_")
    ]
    if maps:
        sections.append(
            Section(
                "What the discriminator calls fake, and the noise weight it gives",
                text="Per row, a point in training: the real x0, the model's estimate x0_hat, D's saliency S "
                "(|d fake score / d x0_hat|) and the noise weight w of Process2 (mean(w^2) = 1).",
                images=maps,
            )
        )
    on_samples = [
        Picture(path, key.removeprefix("sample_saliency_"), IN_FIGURE)
        for key, path in figures.items()
        if key.startswith("sample_saliency_")
    ]
    if on_samples:
        sections.append(
            Section(
                "Where D sees 'fake' in the run's samples, over training",
                text="Per row pair, a point in training: the run's samples, then D's fake-score saliency on them.",
                images=on_samples,
            )
        )
    attention = [
        Picture(path, key.removeprefix("attention_"), IN_FIGURE)
        for key, path in figures.items()
        if key.startswith("attention_")
    ]
    if attention:
        sections.append(Section("Attention maps per UNet level", images=attention))
    judged = sorted(root.glob("fake_saliency_*.png"))
    if judged:
        sections.append(
            Section(
                "Where the trained discriminator sees 'fake' in final samples",
                text="Rows alternate: samples of the run's final EMA model, then D's fake-score saliency over them.",
                images=[
                    Picture(p.resolve(), p.stem.removeprefix("fake_saliency_"), SALIENCY_BAR) for p in judged
                ],
            )
        )
    sections += premise_sections(root)
    config_file = root / "ablation.yaml"
    if config_file.is_file():
        from omegaconf import OmegaConf

        sections.append(
            Section("Ablation config", config=OmegaConf.to_container(OmegaConf.load(config_file)))
        )
    return sections


def fake_saliency_figure(
    discriminator: nn.Module,
    images: torch.Tensor,
    path: str | Path,
    *,
    method: str = "saliency",
    columns: int = 8,
    **method_kwargs: Any,
) -> Path:
    """Where D sees "fake" in generated ``images`` (in [-1, 1]): rows of sample / saliency overlay.

    The saliency is D's fake-score attribution (``genxai.diffusion.guidance.saliency``), the same
    map Process2 turns into noise weights during training.
    """
    from genxai.diffusion.guidance import saliency

    images = images[: 4 * columns]
    device = next(discriminator.parameters()).device
    # Final samples are clean images: a time-aware D judges them at t = 0.
    maps = saliency(discriminator, images.to(device), 0, method, **method_kwargs).cpu()
    pictures = to_rgb(((images.float().cpu() + 1) / 2).clamp(0, 1))
    overlays = overlay(pictures, maps, cmap="inferno")
    n = len(pictures) - len(pictures) % columns or len(pictures)
    cols = min(columns, n)
    rows = [torch.stack([pictures[i : i + cols], overlays[i : i + cols]]) for i in range(0, n, cols)]
    tiles = torch.cat(rows)  # (2 * row count, cols, 3, H, W): each sample row, then its saliency row
    return save_png(grid(tiles), path, min_size=256)


def explain_final_samples(root: str | Path, results: dict[str, Any], *, num_images: int = 16) -> list[Path]:
    """For every run with a discriminator: fresh samples of its final EMA model and where its D
    sees "fake" in them, as ``root/fake_saliency_<run>.png``."""
    from genxai.diffusion.pipeline import load_run, sample_run

    written = []
    first_seed = results.get("seeds", [None])[0]
    for label, run in results["runs"].items():
        if "dg" in run or run.get("seed", first_seed) != first_seed:  # a sampler, or another seed
            continue
        loaded = load_run(run["run_dir"])
        if loaded.discriminator is None:
            continue
        cfg = loaded.cfg
        images = next(
            sample_run(
                cfg,
                loaded.unet,
                loaded.schedule,
                loaded.discriminator,
                num_images=num_images,
                seed=cfg.seed,
                batch_size=num_images,
            )
        )
        name = file_label(label)
        written.append(
            fake_saliency_figure(
                loaded.discriminator,
                images * 2 - 1,
                Path(root) / f"fake_saliency_{name}.png",
                method=cfg.guidance.saliency_method,
                **cfg.guidance.saliency_options,
            )
        )
    return written


def real_images_grid(root: str | Path) -> Path | None:
    """``root/real_images.png``: training images of the ablation's data, to set beside samples."""
    config_file = Path(root) / "ablation.yaml"
    if not config_file.is_file():
        return None
    cfg = load_experiment(config_file)
    return real_images_figure(build_dataset(cfg), Path(root) / "real_images.png", count=32)


def write_ablation_report(root: str | Path, *, embed: bool = False) -> Path:
    """``root/report.html`` for an ablation folder: its figures drawn from ``results.json``, D's
    saliency on fresh final samples included."""
    results = draw_ablation_figures(root)
    if results.get("runs"):
        (Path(root) / "results.md").write_text(results_markdown(results))
    explain_final_samples(root, results)
    real_images_grid(root)
    if results.get("runs") and not (Path(root) / "premise.json").is_file():
        premise_experiment(root)
    return build_report(
        root, ablation_sections(root), title=f"genxai ablation: {Path(root).resolve().name}", embed=embed
    )


def run_diffusion_demo(
    out: str | Path,
    *,
    config: str | Path = "demo",
    variants: Sequence[str] = ("baseline", "noise+hierarchical"),
    overrides: Sequence[str] = (),
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The demo's diffusion part: the shipped demo config's variants, trained side by side in ``out``,
    with the ablation's figures; ``say`` announces each run."""
    cfg = load_experiment(config, list(overrides))
    results = draw_ablation_figures(
        out, run_ablation(cfg, variants=variants, baselines=(), seeds=1, out_dir=Path(out), say=say)
    )
    explain_final_samples(out, results)
    return results
