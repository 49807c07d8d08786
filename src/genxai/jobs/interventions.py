"""Interventions and artifact correction as jobs: edit a trained generator's units, report the effect.

    run_intervention("runs/gan", "blocks.2", [3, 7], "runs/ablate", segmenter="runs/seg")
    run_repair("runs/gan", ["blocks.1", "blocks.2"], "runs/repair", units_per_layer=4, fid_samples=1000)

:func:`run_intervention` ablates (or inserts k into) units of one layer and writes the same
samples before and after, and with a segmenter the ACE of the unit set on every concept.
:func:`run_repair` is Tousi et al.'s artifact correction: an artifact classifier (given, or trained
on the run's real images against its samples), each layer's most defective units ablated in turn,
the artifact score and FID before and after. Every input is checked before the long work.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import nn

from genxai.core.checks import check_choice, check_positive_int
from genxai.core.modes import evaluation_mode
from genxai.dissection.artifact_classifier import (
    ArtifactConfig,
    load_artifact_classifier,
    train_artifact_classifier,
)
from genxai.dissection.artifact_units import artifact_units
from genxai.dissection.artifacts import correct_artifacts, fid_before_after
from genxai.dissection.dissect import SeededLatents
from genxai.dissection.effects import intervention_effect, layer_width
from genxai.dissection.interventions import ablate, concept_mask_fn, resolve_units, unit_means
from genxai.evaluation.fid import FEATURE_KINDS, FID, reference_fid, reference_statistics
from genxai.jobs import dissection as loaders  # load_gan, load_segmenter: one place to load (and patch)
from genxai.report.dissection import plot_before_after, plot_concept_effects
from genxai.report.html import Picture, Section, Table, build_report

MODES = ("ablate", "insert")
METHODS = ("tousi", "dissection")  # artifact units by the classifier's Grad-CAM, or by FID of top samples


def load_gan_config(run_dir: str | Path) -> Any:
    """The run's config (``config.yaml``), or None when the folder has none."""
    from genxai.gan.config import load_gan_config as load

    path = Path(run_dir) / "config.yaml"
    return load(path) if path.is_file() else None


def real_images(cfg: Any) -> Any:
    """The run's training images (the real side of the classifier and of FID)."""
    from genxai.gan.config import build_dataset

    return build_dataset(cfg)


def _latents(generator: nn.Module, seed: int, start: int, stop: int, device: Any) -> torch.Tensor:
    fn = getattr(generator, "latents", None)
    if not callable(fn):
        raise ValueError(f"generator: {type(generator).__name__} has no latents(n, generator=...) method")
    return SeededLatents(fn, seed, device).rows(start, stop)


def _device(module: nn.Module) -> torch.device:
    return next(iter(module.parameters()), torch.zeros(0)).device


# --- interventions ------------------------------------------------------------------------------


def run_intervention(
    generator: nn.Module | str | Path,
    layer: str,
    units: list[int],
    out: str | Path,
    *,
    mode: str = "ablate",
    value: float | None = None,
    value_concept: str | None = None,
    location: tuple[int, int, int, int] | None = None,
    segmenter: Any = None,
    num_samples: int = 64,
    show: int = 8,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Set ``units`` of ``layer`` to 0 (``ablate``) or to k (``insert``: ``value``, or each unit's
    mean activation where ``value_concept`` is in the image) over ``num_samples`` seeded samples
    (the samples of ``genxai dissect`` with the same seed); write ``before_after.png`` (the first
    ``show``), with a segmenter ``ace.png``, ``intervention.json`` and ``report.html``."""
    check_choice(mode, "mode", MODES)
    check_positive_int(num_samples, "n")
    check_positive_int(show, "show")
    check_positive_int(batch_size, "batch_size")
    check_positive_int(seed, "seed", minimum=0)
    if mode == "ablate" and (value is not None or value_concept is not None):
        raise ValueError("value: an ablation sets the units to 0; --value and --value-concept are for insert")
    if mode == "insert" and (value is None) == (value_concept is None):
        raise ValueError(
            "value: insert needs exactly one of --value K or --value-concept NAME (k = unit means)"
        )
    if value_concept is not None and segmenter is None:
        raise ValueError("value_concept: needs a segmenter (--segmenter) to find where the concept is")
    source = {}
    if isinstance(segmenter, (str, Path)):
        source["segmenter"] = str(segmenter)
        segmenter = loaders.load_segmenter(segmenter, device)
    if isinstance(generator, (str, Path)):
        source["generator"] = str(generator)
        generator = loaders.load_gan(generator, device)
    z = _latents(generator, seed, 0, num_samples, _device(generator))
    index = resolve_units(units, layer_width(generator, layer, z), layer)
    k: Any = 0.0 if mode == "ablate" else value
    if value_concept is not None:  # the segmenter reads images in [0, 1], the generator's range mapped
        low, high = getattr(generator, "value_range", (-1.0, 1.0))
        masks_of = concept_mask_fn(segmenter, value_concept)

        def concept_masks(images: torch.Tensor) -> torch.Tensor:
            return masks_of(((images.float() - low) / (high - low)).clamp(0, 1))

        k = unit_means(generator, layer, z, concept_masks, batch_size=batch_size)[index]
    effect = intervention_effect(
        generator,
        layer,
        index,
        z,
        value=k,
        location=location,
        segmenter=segmenter,
        keep=show,
        batch_size=batch_size,
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    what = f"{mode} units {effect.units} of {effect.layer}"
    figures = {
        "before_after": plot_before_after(effect.before, effect.after, out / "before_after.png", title=what)
    }
    if effect.ace:
        figures["ace"] = plot_concept_effects(effect.ace, out / "ace.png", title=f"ACE per concept: {what}")
    results = {
        **effect.summary(),
        "mode": mode,
        "value_concept": value_concept,
        "location": list(location) if location is not None else None,
        "seed": seed,
        "meta": source,
        "figures": {name: str(path.relative_to(out)) for name, path in figures.items()},
    }
    (out / "intervention.json").write_text(json.dumps(results, indent=2))
    build_report(out, intervention_sections(out, results), title=f"genxai intervene: {effect.layer}")
    return results


def intervention_sections(out: str | Path, results: dict[str, Any]) -> list[Section]:
    """Report sections of ``intervention.json``: what was set, the images before/after, the ACE table."""
    out = Path(out)
    figures = {k: (out / v).resolve() for k, v in results["figures"].items()}
    value = (
        "0"
        if results["mode"] == "ablate"
        else (
            f"each unit's mean activation where {results['value_concept']!r} is"
            if results["value_concept"]
            else str(results["value"])
        )
    )
    where = f" inside the box {results['location']} (layer pixels)" if results["location"] else " everywhere"
    text = (
        f"Units {results['units']} of {results['layer']} set to {value}{where}, on {results['num_samples']} "
        f"seeded samples (seed {results['seed']}); mean absolute pixel change {results['pixel_change']:.4f}. "
        "The ACE of a concept is the mean change of its pixel fraction (segmenter masks) with the edit."
    )
    sections = [
        Section(f"Intervention: {results['mode']}", text=text, images=[Picture(figures["before_after"])])
    ]
    if results["concepts"]:
        rows = sorted(results["concepts"], key=lambda r: r["ace"])
        sections.append(
            Section(
                "Average causal effect per concept",
                images=[Picture(figures["ace"])] if "ace" in figures else [],
                table=Table.from_records(rows),
            )
        )
    return sections


# --- artifact correction ------------------------------------------------------------------------


def fid_reference(
    cfg: Any, dataset: Any, device: Any, cache_dir: Path, *, features: str, inception: str | None, real: int
) -> FID:
    """FID statistics of the run's real images, with the features chosen (``auto``: Inception when
    found, else the offline classifier features, trained once and cached in ``cache_dir``)."""
    cfg.eval.features = features
    if inception is not None:
        cfg.eval.inception = str(inception)
    return reference_fid(cfg, dataset, device, cache_dir, real_images=real)


def run_repair(
    generator: nn.Module | str | Path,
    layers: list[str],
    out: str | Path,
    *,
    units_per_layer: int | list[int] = 4,
    method: str = "tousi",
    top: int = 50,
    classifier: nn.Module | str | Path | None = None,
    classifier_iterations: int = 300,
    classifier_width: int = 32,
    num_samples: int = 500,
    eval_samples: int | None = None,
    fid_samples: int = 0,
    features: str = "auto",
    inception: str | Path | None = None,
    real: int = 0,
    show: int = 8,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Artifact correction of a generator (a module, or a ``genxai train-gan`` run folder).

    The artifact classifier is ``classifier`` (a module, or a folder of
    ``artifact_classifier.safetensors``), else trained (``classifier_iterations`` steps,
    ``classifier_width`` channels) in ``out/classifier`` on the run's real images against its samples. :func:`~genxai.dissection.artifacts.correct_artifacts` scores
    ``num_samples`` samples per layer and ablates each layer's ``units_per_layer`` worst units;
    the artifact score is measured on ``eval_samples`` held-out samples, FID (``fid_samples`` > 0)
    on samples of seed + 1 against ``real`` real images (0: all). ``method="dissection"``: GAN
    Dissection's variant instead, no classifier: each layer's units whose ``top`` top-activating
    samples (among ``num_samples``) have the worst FID against the real images are ablated
    (:func:`~genxai.dissection.artifact_units.artifact_units`). Writes ``repair.json``,
    ``before_after.png`` and ``report.html``.
    """
    check_choice(method, "method", METHODS)
    check_positive_int(top, "top", minimum=2)
    check_positive_int(num_samples, "n")
    check_positive_int(fid_samples, "fid_samples", minimum=0)
    check_positive_int(classifier_iterations, "classifier_iterations")
    check_positive_int(classifier_width, "classifier_width")
    check_positive_int(show, "show")
    check_positive_int(batch_size, "batch_size")
    check_positive_int(seed, "seed", minimum=0)
    check_positive_int(real, "real_images", minimum=0)
    check_choice(features, "features", FEATURE_KINDS)
    if inception is not None and not Path(inception).is_file():
        raise FileNotFoundError(f"inception: file not found: {inception}")
    if not layers or len(set(layers)) != len(layers):
        raise ValueError(f"layers: expected distinct layer names, got {layers}")
    counts = [units_per_layer] * len(layers) if isinstance(units_per_layer, int) else list(units_per_layer)
    if len(counts) != len(layers):
        raise ValueError(
            f"units_per_layer: expected one number or one per layer ({len(layers)}), got {counts}"
        )
    source, cfg, run = {}, None, None
    if isinstance(classifier, (str, Path)):
        source["classifier"] = str(classifier)
        classifier = load_artifact_classifier(classifier, device)
    if isinstance(generator, (str, Path)):
        run = Path(generator)
        source["generator"] = str(run)
        generator = loaders.load_gan(run, device)
        cfg = load_gan_config(run)
    z = _latents(generator, seed, 0, 1, _device(generator))
    for layer, count in zip(layers, counts):
        check_positive_int(count, "units_per_layer")
        width = layer_width(generator, layer, z)
        if count > width:
            raise ValueError(
                f"units_per_layer: {count} is more than the {width} units of {layer!r} (0..{width - 1})"
            )
    dissection = method == "dissection"
    if dissection and top > num_samples:
        raise ValueError(f"top: {top} top samples per unit need --n >= {top}, got {num_samples}")
    needs_data = (classifier is None and not dissection) or fid_samples > 0 or dissection
    if needs_data and cfg is None:
        raise ValueError(
            "generator: training the artifact classifier, FID and the dissection method need the run's "
            f"real images, and {run or 'a module'} has no config.yaml; pass --classifier and --fid-samples 0"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = real_images(cfg) if needs_data else None
    reference = None
    if fid_samples > 0 or dissection:  # before any training: a missing Inception fails now
        reference = fid_reference(
            cfg, dataset, device, run, features=features, inception=inception, real=real
        )
    if dissection:
        return _repair_by_dissection(
            generator, layers, counts, out, reference, dataset, fid_samples=fid_samples, top=top,
            num_samples=num_samples, real=real, show=show, batch_size=batch_size, seed=seed,
            source=source, progress=progress,
        )  # fmt: skip
    if classifier is None:
        cpu = torch.device(device).type == "cpu"
        config = ArtifactConfig(iterations=classifier_iterations, width=classifier_width, seed=seed)
        classifier = train_artifact_classifier(
            generator, dataset, out / "classifier", config, cpu=cpu, progress=progress
        )
        source["classifier"] = str(out / "classifier")
    eval_samples = num_samples if eval_samples is None else eval_samples
    fix = correct_artifacts(
        generator, layers, classifier, units_per_layer=counts, num_samples=num_samples,
        eval_samples=eval_samples, batch_size=batch_size, seed=seed,
    )  # fmt: skip
    fix.close()
    before, after = _before_after(generator, fix.units, seed, num_samples, show)
    fid = {}
    if reference is not None:
        fid = fid_before_after(
            generator, fix, reference, num_samples=fid_samples, batch_size=batch_size, seed=seed + 1
        )
    figure = plot_before_after(
        before, after, out / "before_after.png", title=f"artifact units ablated: {fix.units}"
    )
    summary = fix.summary()
    return _write_repair(out, {**summary, "method": method}, layers, counts, figure, fid, source, **{
        "num_samples": num_samples, "eval_samples": eval_samples, "fid_samples": fid_samples, "seed": seed,
    })  # fmt: skip


def _before_after(
    generator: nn.Module, units: dict[str, list[int]], seed: int, start: int, show: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out samples ``start .. start + show - 1`` in [0, 1] without and with the ablations."""
    held_out = _latents(generator, seed, start, start + show, _device(generator))
    low, high = getattr(generator, "value_range", (-1.0, 1.0))
    with torch.no_grad(), evaluation_mode(generator):
        before = ((generator(held_out).float() - low) / (high - low)).clamp(0, 1).cpu()
        with ExitStack() as stack:
            for layer, chosen in units.items():
                stack.enter_context(ablate(generator, layer, chosen))
            after = ((generator(held_out).float() - low) / (high - low)).clamp(0, 1).cpu()
    return before, after


def _repair_by_dissection(
    generator, layers, counts, out, reference, dataset, *, fid_samples, top, num_samples, real, show,
    batch_size, seed, source, progress,
) -> dict[str, Any]:  # fmt: skip
    """GAN Dissection's artifact units: per layer the worst by the FID of their top samples, ablated."""
    scorer = reference_statistics(reference.extractor, dataset, count=real, batch_size=batch_size)
    units, scores = artifact_units(
        generator, layers, scorer, units_per_layer=counts, num_samples=num_samples, top=top,
        batch_size=batch_size, seed=seed, progress=progress,
    )  # fmt: skip
    before, after = _before_after(generator, units, seed, num_samples, show)
    fid = {}
    if fid_samples > 0:
        fid = fid_before_after(
            generator, units, reference, num_samples=fid_samples, batch_size=batch_size, seed=seed + 1
        )
    figure = plot_before_after(
        before, after, out / "before_after.png", title=f"artifact units ablated: {units}"
    )
    steps = [
        {"layer": s.layer, "units": units[s.layer], "scores": s.fids.tolist(), "artifact_before": None,
         "artifact_after": None}
        for s in scores
    ]  # fmt: skip
    summary = {
        "method": "dissection",
        "artifact_before": None,
        "artifact_after": None,
        "units": units,
        "steps": steps,
    }
    return _write_repair(out, summary, layers, counts, figure, fid, source, **{
        "num_samples": num_samples, "eval_samples": 0, "fid_samples": fid_samples, "seed": seed, "top": top,
    })  # fmt: skip


def _write_repair(out, summary, layers, counts, figure, fid, source, **settings) -> dict[str, Any]:
    results = {
        **summary,
        "layers": layers,
        "units_per_layer": counts,
        **settings,
        "fid": fid,
        "table": _repair_table(summary, fid),
        "meta": source,
        "figures": {"before_after": str(figure.relative_to(out))},
    }
    (out / "repair.json").write_text(json.dumps(results, indent=2))
    build_report(out, repair_sections(out, results), title="genxai repair: artifact correction")
    return results


def _repair_table(summary: dict[str, Any], fid: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    rows = []
    for phase, score in (("before", summary["artifact_before"]), ("after", summary["artifact_after"])):
        scored = {"artifact score": score} if score is not None else {}
        rows.append({"phase": phase, **scored, **fid.get(phase, {})})
    return rows


def repair_sections(out: str | Path, results: dict[str, Any]) -> list[Section]:
    """Report sections of ``repair.json``: the table, the ablated units per layer, the images."""
    out = Path(out)
    fid_text = (
        f" FID on {results['fid_samples']} samples of seed {results['seed'] + 1} against the real images."
        if results["fid"]
        else " FID was not measured (--fid-samples 0)."
    )
    if results.get("method") == "dissection":
        text = (
            "GAN Dissection's artifact units (Bau et al., 2019): per layer, each unit's score is the FID of "
            f"its {results['top']} top-activating samples among {results['num_samples']} against the real "
            "images; the worst units are ablated (every layer scored on the unedited generator)." + fid_text
        )
    else:
        text = (
            "Artifact correction (Tousi et al., 2021): per layer in order, each unit's defective score is "
            "the mean IoU of its thresholded map with the artifact classifier's Grad-CAM mask over the "
            f"flagged samples among {results['num_samples']}; the worst units are ablated and the next layer "
            "is scored on the corrected generator. Artifact score: the classifier's mean artifact "
            f"probability on {results['eval_samples']} held-out samples." + fid_text
        )
    steps = [
        {
            "layer": s["layer"],
            "units ablated": ", ".join(map(str, s["units"])) or "none (nothing flagged)",
            "artifact before": s["artifact_before"],
            "artifact after": s["artifact_after"],
            "top score": max(s["scores"]) if s["scores"] else None,
        }
        for s in results["steps"]
    ]
    image = Picture(
        (out / results["figures"]["before_after"]).resolve(), "held-out samples, before and after"
    )
    return [
        Section("Artifact correction", text=text, table=Table.from_records(results["table"])),
        Section("Units ablated per layer", table=Table.from_records(steps)),
        Section("Before and after", images=[image]),
    ]


__all__ = [
    "fid_reference",
    "intervention_sections",
    "load_gan_config",
    "real_images",
    "repair_sections",
    "run_intervention",
    "run_repair",
]
