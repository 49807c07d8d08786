"""GAN Dissection as jobs: train the shapes segmenter, dissect a generator's layer (or a diffusion
UNet's block per timestep), report them.

    run_train_segmenter("runs/seg", SegmenterConfig(size=32))         # segmenter + report.html
    run_dissection("runs/gan", "blocks.2", "runs/seg", "runs/dissect", num_samples=1000)
    run_timestep_dissection("runs/demo/diffusion/baseline", "mid.blocks.0", "runs/seg", "runs/unet")

:mod:`genxai.dissection` computes (statistics, thresholds, IoU, top samples, gallery tensors);
this module loads the models, has :mod:`genxai.report.dissection` draw the figures (recorded
under ``figures`` in ``results.json``) and lays everything out as report sections.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from genxai.core.checks import check_in_range, check_positive_int
from genxai.dissection.dissect import Dissection, LatentsFn, dissect, gallery
from genxai.dissection.segmenter import SegmenterConfig, load_segmenter, train_segmenter
from genxai.dissection.timesteps import TimestepSampler, dissect_timesteps, timestep_ace
from genxai.report.dissection import (
    plot_concept_counts,
    plot_concept_emergence,
    plot_segmenter_iou,
    plot_unit_gallery,
    plot_unit_iou,
)
from genxai.report.html import Picture, Section, Table, build_report


def load_gan(run_dir: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The generator of a ``genxai train-gan`` run folder (its EMA weights), in eval mode."""
    from genxai.gan.pipeline import load_generator

    return load_generator(run_dir, device=device)


# --- the segmenter ------------------------------------------------------------------------------


def run_train_segmenter(
    out: str | Path, cfg: SegmenterConfig | None = None, *, cpu: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train the shapes segmenter in ``out`` and write its held-out IoU chart and ``report.html``."""
    cfg = cfg if cfg is not None else SegmenterConfig()
    summary = train_segmenter(out, cfg, cpu=cpu, progress=progress)
    if "evaluation" in summary:  # the main process
        build_report(
            out, segmenter_sections(out, summary), title=f"genxai segmenter: {Path(out).resolve().name}"
        )
    return summary


def segmenter_sections(out: str | Path, summary: dict[str, Any]) -> list[Section]:
    """The segmenter's held-out IoU per concept (chart and table) and its training config."""
    evaluation = summary["evaluation"]
    chart = plot_segmenter_iou(evaluation["iou"], Path(out) / "segmenter_iou.png")
    text = (
        f"mIoU {evaluation['miou']:.3f} on {evaluation['images']} held-out shapes images of "
        f"{evaluation['size']} x {evaluation['size']} px (IoU summed over all images, per concept; "
        f"texture concepts count object pixels only). Training: {summary['iteration']} iterations "
        f"in {summary['train_time_s']:.0f} s."
    )
    rows = Table.from_records([{"concept": c, "IoU": v} for c, v in evaluation["iou"].items()])
    return [
        Section("Shapes segmenter", text=text, images=[Picture(chart.resolve())], table=rows),
        Section("Segmenter config", config=summary.get("config")),
    ]


# --- dissection ---------------------------------------------------------------------------------


def run_dissection(
    generator: nn.Module | str | Path,
    layer: str,
    segmenter: Any,
    out: str | Path,
    *,
    num_samples: int = 1000,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device = "cpu",
    iou_bar: float = 0.04,
    iqr_bar: float = 0.01,
    top_k: int = 8,
    gallery_units: int = 12,
    gallery_count: int = 6,
    latents_fn: LatentsFn | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Dissect ``layer`` of ``generator`` (a module, or a GAN run folder) with ``segmenter`` (a
    segmenter, or a segmenter folder); write ``out/results.json``, ``dissection.safetensors``, the
    figures and ``report.html``. Returns the results (with ``figures``)."""
    check_positive_int(num_samples, "n")
    check_positive_int(batch_size, "batch_size")
    check_positive_int(gallery_units, "gallery_units", minimum=0)
    check_positive_int(gallery_count, "gallery_count")
    check_in_range(iou_bar, "iou_bar", 0.0, 1.0)
    source = {}
    if isinstance(segmenter, (str, Path)):
        source["segmenter"] = str(segmenter)
        segmenter = load_segmenter(segmenter, device)
    if isinstance(generator, (str, Path)):
        source["generator"] = str(generator)
        generator = load_gan(generator, device)
    result = dissect(
        generator,
        layer,
        segmenter,
        num_samples=num_samples,
        batch_size=batch_size,
        seed=seed,
        latents_fn=latents_fn,
        device=device,
        iou_bar=iou_bar,
        iqr_bar=iqr_bar,
        top_k=top_k,
        progress=progress,
    )
    result.meta.update(source)
    out = Path(out)
    result.save(out)
    figures = draw_dissection_figures(
        out, result, generator, latents_fn=latents_fn, units=gallery_units, count=gallery_count
    )
    results = {**result.summary(), "figures": figures}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    build_report(out, dissection_sections(out, results), title=f"genxai dissection: {result.layer}")
    return results


def draw_dissection_figures(
    out: str | Path,
    result: Dissection,
    generator: nn.Module | None = None,
    *,
    latents_fn: LatentsFn | None = None,
    units: int = 12,
    count: int = 6,
) -> dict[str, str]:
    """The bar chart of interpretable units per concept, the sorted unit IoUs and (with the
    generator) a gallery of the best units' top samples; {figure name: path relative to ``out``}."""
    out = Path(out)
    concept_of = [result.concepts[c] for c in result.unit_concept.tolist()]
    figures = {
        "concept_counts": plot_concept_counts(
            result.concept_counts,
            out / "concept_counts.png",
            groups=result.concept_groups,
            title=f"{result.layer}: interpretable units per concept ({len(result.interpretable)} of {result.units})",
        ),
        "unit_iou": plot_unit_iou(
            result.unit_iou,
            concept_of,
            result.iou_bar,
            out / "unit_iou.png",
            interpretable=result.interpretable_mask,
        ),
    }
    picks = result.interpretable[:units] or result.unit_iou.argsort(descending=True)[:units].tolist()
    if generator is not None and units > 0 and picks:
        count = min(count, result.top_samples.shape[1])
        tiles = gallery(generator, result.layer, result, picks, count=count, latents_fn=latents_fn)
        labels = [f"unit {u}\n{concept_of[u]}\nIoU {float(result.unit_iou[u]):.2f}" for u in picks]
        figures["gallery"] = plot_unit_gallery(tiles["images"], tiles["masks"], labels, out / "gallery.png")
    return {name: str(path.relative_to(out)) for name, path in figures.items()}


def dissection_sections(out: str | Path, results: dict[str, Any]) -> list[Section]:
    """Report sections of a dissection's ``results.json``: summary, counts, IoUs, gallery, top units."""
    out = Path(out)
    figures = {k: (out / v).resolve() for k, v in results.get("figures", {}).items()}
    records = results["unit_records"]
    good = [r for r in records if r["interpretable"]]
    text = (
        f"Layer {results['layer']}: {len(good)} of {results['units']} units are interpretable (IoU > "
        f"{results['iou_bar']} and IQR > {results['iqr_bar']} for their best concept) over "
        f"{results['num_samples']} generated images (seed {results['seed']}). Each unit's map is "
        "upsampled to the image; per concept its threshold maximises the information quality ratio "
        "I/H over quantile levels, and the unit's concept is the one with the highest IoU there."
    )
    counts = [
        {
            "concept": c,
            "kind": (results.get("concept_groups") or {}).get(c, ""),
            "units": n,
            "pixels (fraction)": results["concept_fraction"][c],
        }
        for c, n in results["concept_counts"].items()
    ]
    sections = [Section(f"GAN Dissection: {results['layer']}", text=text, table=Table.from_records(counts))]
    charts = [
        Picture(figures[k], caption)
        for k, caption in (
            ("concept_counts", "interpretable units per concept"),
            ("unit_iou", "IoU of every unit"),
        )
        if k in figures
    ]
    if charts:
        sections.append(Section("Units per concept", images=charts))
    if "gallery" in figures:
        sections.append(
            Section(
                "Unit gallery",
                text="Each row: a unit's top samples (by its maximum activation), the region where its "
                "upsampled map passes its threshold outlined, the rest dimmed.",
                images=[Picture(figures["gallery"])],
            )
        )
    top = sorted(good or records, key=lambda r: -r["iou"])[:30]
    keys = ("unit", "concept", "iou", "iqr", "threshold", "level", "interpretable")
    sections.append(Section("Top units", table=Table.from_records([{k: r[k] for k in keys} for r in top])))
    return sections


def write_dissection_report(out: str | Path) -> Path:
    """Rebuild ``out/report.html`` from a dissection folder's ``results.json``."""
    path = Path(out) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"out: {out} has no results.json; is it the folder of `genxai dissect`?")
    results = json.loads(path.read_text())
    return build_report(
        out, dissection_sections(out, results), title=f"genxai dissection: {results['layer']}"
    )


# --- the diffusion UNet, per timestep -----------------------------------------------------------


def diffusion_sampler(
    unet: nn.Module,
    schedule: Any,
    layer: str,
    image_shape: Sequence[int],
    *,
    steps: int = 20,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> TimestepSampler:
    """A :class:`~genxai.dissection.timesteps.TimestepSampler` of deterministic DDIM (``steps``
    steps, eta 0) over ``unet`` (ours or a diffusers ``UNet2DModel``) with t bound by
    :class:`~genxai.diffusion.guidance.TimeConditioned`."""
    from genxai.diffusion.guidance import TimeConditioned
    from genxai.diffusion.sampling import ddim_sample, ddim_timesteps

    visited = ddim_timesteps(schedule.num_timesteps, check_positive_int(steps, "steps"))

    def sample(model_fn: Any, x_T: torch.Tensor) -> torch.Tensor:
        return ddim_sample(model_fn, schedule, tuple(x_T.shape), steps=steps, x_T=x_T)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> Any:
        return TimeConditioned(unet, t)(x)

    return TimestepSampler(
        unet, layer, sample, visited, image_shape, denoise=denoise, seed=seed, device=device,
        description=f"the {steps}-step DDIM sampler",
    )  # fmt: skip


def load_diffusion(
    run_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Any, list[int]]:
    """The UNet (EMA weights), noise schedule and image shape (C, H, W) of a ``genxai train`` run."""
    from genxai.diffusion.pipeline import load_run

    run = load_run(run_dir, device=device)
    size = run.cfg.data.image_size
    return run.unet, run.schedule, [run.cfg.data.channels or 3, size, size]


def run_timestep_dissection(
    run: str | Path | tuple[nn.Module, Any, Sequence[int]],
    layer: str,
    segmenter: Any,
    out: str | Path,
    *,
    timesteps: Sequence[int] | None = None,
    steps: int = 20,
    num_samples: int = 200,
    batch_size: int = 32,
    seed: int = 0,
    ace_samples: int = 32,
    ace_units: int = 1,
    iou_bar: float = 0.04,
    iqr_bar: float = 0.01,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Dissect ``layer`` of a diffusion UNet at each of ``timesteps`` of DDIM sampling (``run``: a
    ``genxai train`` run folder, or ``(unet, schedule, image_shape)``) and, with ``ace_samples`` > 0,
    the ACE of ablating each concept's ``ace_units`` best units at each t. Writes ``results.json``,
    ``timesteps.safetensors``, ``emergence.png`` and ``report.html``."""
    check_positive_int(ace_samples, "ace_samples", minimum=0)
    check_positive_int(ace_units, "ace_units")
    source = {}
    if isinstance(segmenter, (str, Path)):
        source["segmenter"] = str(segmenter)
        segmenter = load_segmenter(segmenter, device)
    if isinstance(run, (str, Path)):
        source["run"] = str(run)
        run = load_diffusion(run, device)
    unet, schedule, shape = run
    sampler = diffusion_sampler(unet, schedule, layer, list(shape), steps=steps, seed=seed, device=device)
    sampler.check_timesteps(timesteps)
    result = dissect_timesteps(
        sampler, segmenter, timesteps=timesteps, num_samples=num_samples, batch_size=batch_size,
        iou_bar=iou_bar, iqr_bar=iqr_bar, progress=progress,
    )  # fmt: skip
    result.meta.update(source)
    ace = None
    if ace_samples > 0:
        ace = timestep_ace(
            sampler, segmenter, result, units=ace_units, num_samples=ace_samples, batch_size=batch_size,
            progress=progress,
        )  # fmt: skip
    out = Path(out)
    result.save(out)
    present = [j for j, f in enumerate(result.concept_fraction.tolist()) if f > 0]
    figure = plot_concept_emergence(
        result.timesteps,
        result.best_iou[:, present],
        [result.concepts[j] for j in present],
        out / "emergence.png",
        ace=ace.ace[:, present] if ace is not None else None,
        iou_bar=result.iou_bar,
        title=f"{result.layer}: best unit's IoU per concept over t",
    )
    results = {
        **result.summary(),
        "ace": ace.summary() if ace is not None else None,
        "figures": {"emergence": str(figure.relative_to(out))},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    build_report(out, timestep_sections(out, results), title=f"genxai dissect-unet: {result.layer}")
    return results


def timestep_sections(out: str | Path, results: dict[str, Any]) -> list[Section]:
    """Report sections of a timestep dissection: what was read, the emergence figure, a table per t."""
    ace = {(r["t"], r["concept"]): r for r in (results["ace"] or {}).get("ace", [])}
    text = (
        f"Block {results['layer']} ({results['units']} units) read at t = {results['timesteps']} while "
        f"{results['num_samples']} images were sampled with {results['sampler']} from seeded noise "
        f"(seed {results['seed']}); each unit's map at t is scored against the segmentation of the final "
        "sample (IQR-chosen threshold, IoU), as for a GAN layer. Left: the IoU of the best unit per "
        "concept at each t among those whose IQR passes the bar (when the block carries the concept). "
        + (
            f"Right: the ACE of ablating the concept's best unit(s) at that step only, on "
            f"{results['ace']['num_samples']} samples (whether the sample still depends on them then)."
            if results["ace"]
            else "ACE not measured (--ace-samples 0)."
        )
    )
    rows = []
    for record in results["per_timestep"]:
        for concept, fraction in results["concept_fraction"].items():
            if fraction <= 0:
                continue
            row = {
                "t": record["t"],
                "concept": concept,
                "best unit": record["best_unit"][concept],
                "IoU": record["best_iou"][concept],
                "interpretable units": record["concept_counts"][concept],
            }
            if (record["t"], concept) in ace:
                row["ACE"] = ace[(record["t"], concept)]["ace"]
            rows.append(row)
    picture = Picture((Path(out) / results["figures"]["emergence"]).resolve())
    return [
        Section(f"Dissection over timesteps: {results['layer']}", text=text, images=[picture]),
        Section("Per timestep and concept", table=Table.from_records(rows)),
    ]


__all__ = [
    "diffusion_sampler",
    "dissection_sections",
    "draw_dissection_figures",
    "load_diffusion",
    "load_gan",
    "run_dissection",
    "run_timestep_dissection",
    "run_train_segmenter",
    "segmenter_sections",
    "timestep_sections",
    "write_dissection_report",
]
