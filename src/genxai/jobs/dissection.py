"""GAN Dissection as jobs: train the shapes segmenter, dissect a generator's layer, report both.

    run_train_segmenter("runs/seg", SegmenterConfig(size=32))         # segmenter + report.html
    run_dissection("runs/gan", "blocks.2", "runs/seg", "runs/dissect", num_samples=1000)

:mod:`genxai.dissection` computes (statistics, thresholds, IoU, top samples, gallery tensors);
this module loads the models, has :mod:`genxai.report.dissection` draw the figures (recorded
under ``figures`` in ``results.json``) and lays everything out as report sections.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from genxai.core.checks import check_in_range, check_positive_int
from genxai.dissection.dissect import Dissection, LatentsFn, dissect, gallery
from genxai.dissection.segmenter import SegmenterConfig, load_segmenter, train_segmenter
from genxai.report.dissection import plot_concept_counts, plot_segmenter_iou, plot_unit_gallery, plot_unit_iou
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


__all__ = [
    "dissection_sections",
    "draw_dissection_figures",
    "load_gan",
    "run_dissection",
    "run_train_segmenter",
    "segmenter_sections",
    "write_dissection_report",
]
