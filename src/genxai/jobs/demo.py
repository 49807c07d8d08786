"""The demo: the XAI-guided diffusion job at toy scale, then every explanation method on a classifier.

    run_demo("runs/demo")      # what ``make demo`` runs: a few minutes on two CPU cores

Steps, each writing into ``out``: (1) the main job: the shipped ``demo`` diffusion config trained
as the plain DDPM baseline and as the XAI-guided ``noise+hierarchical`` variant on the same budget
and seeds (``out/diffusion``: checkpoints, samples, FID, saliency and noise-weight maps); (2) train
:class:`SmallResNet` on procedurally generated shapes and save it to ``out/model``; (3) explain
held-out images with every method in the registry (the expensive ones with smaller sample counts,
listed in ``DEMO_OPTIONS``), scoring faithfulness and, since the shapes come with object masks,
localisation; (4) write ``metrics.json``/``.csv``, the overlays and ``report.html`` with both parts
and a grid of the real training images (:func:`write_demo_report`, also what ``genxai report``
runs on a demo folder). With ``progress`` each step is said on stderr as it starts.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from genxai.core.checks import check_positive_int
from genxai.data.shapes import ShapesDataset
from genxai.diffusion.config import load_experiment
from genxai.jobs.diffusion import ablation_sections, run_diffusion_demo
from genxai.jobs.explain import Explainer, build_methods, explain_sections, resolve_methods, write_metrics
from genxai.models.classifier import save_classifier, train_classifier
from genxai.report.figures import real_images_figure
from genxai.report.html import Picture, Section, build_report

DEMO_OPTIONS: dict[str, dict[str, Any]] = {
    "rise": {"masks": 500, "batch_size": 250},
    "scorecam": {"batch_size": 256},
    "occlusion": {"window": 8, "stride": 4, "batch_size": 256},
    "lime": {"samples": 128, "segments": 25, "batch_size": 256},
    "kernelshap": {"samples": 128, "segments": 25, "batch_size": 256},
    "smoothgrad": {"samples": 16},
    "integratedgradients": {"steps": 24},
    "classmodel": {"steps": 60, "normalize_grad": True, "lr": 0.05},
}
"""Smaller sample counts for the slow methods so the demo stays a few minutes on a CPU."""


def run_demo(
    out: str | Path = "runs/demo",
    *,
    size: int = 32,
    train_images: int = 2400,
    epochs: int = 3,
    curve_steps: int = 16,
    explain_images: int = 12,
    methods: Sequence[str] = ("all",),
    seed: int = 0,
    device: str = "cpu",
    sections: Sequence[Section] = (),
    progress: bool = True,
    diffusion: bool = True,
    diffusion_variants: Sequence[str] = ("baseline", "noise+hierarchical"),
    diffusion_overrides: Sequence[str] = (),
) -> Path:
    """Train, explain and report on the shapes data; returns the path of ``out/report.html``.

    Args:
        out: run folder.
        size: image side in pixels.
        train_images: shapes generated for training (a tenth more are held out for accuracy).
        epochs: training epochs.
        explain_images: held-out images explained.
        methods: method names, or ``("all",)`` for every registered method.
        curve_steps: steps of the deletion and insertion curves.
        sections: extra report sections, placed after the explanation sections.
        diffusion: run the diffusion part first (the project's main job).
        diffusion_variants, diffusion_overrides: its variants and dotted overrides of the demo config.
    """
    names = resolve_methods(list(methods))  # an unknown name fails before any training
    check_positive_int(explain_images, "explain_images")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} was asked for but no CUDA GPU is available (use cpu)")
    strict = "all" not in [m.lower() for m in methods]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = _Narrator(progress, steps=4 if diffusion else 3)
    started = time.perf_counter()
    diffusion_sections: list[Section] = []
    if diffusion:
        overrides = [f"train.cpu={device == 'cpu'}", *diffusion_overrides]
        results = _diffusion_part(out / "diffusion", diffusion_variants, overrides, say)
        diffusion_sections = ablation_sections(out / "diffusion", results)
    diffused_at = time.perf_counter()
    torch.manual_seed(seed)
    dev = torch.device(device)

    say.step(
        f"training the classifier to explain: SmallResNet, {epochs} epochs on {train_images} shapes images "
        f"of {size} px -> {out / 'model'}"
    )
    train = ShapesDataset(train_images, size, seed)
    test = ShapesDataset(max(explain_images, train_images // 10), size, seed, train=False)
    trained = train_classifier(train, epochs, test=test, seed=seed, device=dev)
    model = trained.model.eval()
    save_classifier(model, out / "model", accuracy=trained.accuracy)
    trained_at = time.perf_counter()
    say(f"held-out accuracy {100 * trained.accuracy:.1f}% ({trained_at - diffused_at:.0f} s)")

    built, skipped = build_methods(model, names, options=DEMO_OPTIONS, strict=strict)
    say.step(
        f"explaining {explain_images} held-out images with {len(built)} method{'s' * (len(built) != 1)} "
        f"({', '.join(built)}) and "
        "scoring them with every faithfulness and localisation metric"
    )
    explainer = Explainer(model, built, out, curve_steps=curve_steps, strict=strict, skipped=skipped)
    images, labels, masks = (torch.stack(t) for t in zip(*[_item(test[i]) for i in range(explain_images)]))
    ids = [f"{i:03d}_{test.classes[int(labels[i])]}" for i in range(explain_images)]
    batch = 16
    batches = [
        (ids[s : s + batch], images[s : s + batch], masks[s : s + batch], labels[s : s + batch])
        for s in range(0, explain_images, batch)
    ]
    rows = explainer.run(batches, total=explain_images, device=dev, progress=progress)
    write_metrics(out, rows, [n for n in names if n not in explainer.skipped], explainer.skipped)
    explained_at = time.perf_counter()
    say(f"metrics in {out / 'metrics.csv'} ({explained_at - trained_at:.0f} s)")
    for name, reason in explainer.skipped.items():
        say(f"skipped {name}: {reason}")

    timing = {
        "diffusion_s": diffused_at - started,
        "train_s": trained_at - diffused_at,
        "explain_s": explained_at - trained_at,
    }
    notes = (
        f"SmallResNet trained for {epochs} epochs on {train_images} shapes images of {size} x {size} px "
        f"({', '.join(test.classes)}); held-out accuracy {100 * trained.accuracy:.1f}% on {len(test)} "
        f"images; loss per epoch {', '.join(f'{x:.3f}' for x in trained.losses)}.\n"
        f"Training took {timing['train_s']:.0f} s and explaining {timing['explain_s']:.0f} s on {device}."
    )
    config = {
        "job": "demo",
        "notes": notes,
        "model": str(out / "model"),
        "layer": model.default_layer,
        "class_names": test.classes,
        "accuracy": trained.accuracy,
        "data": {"name": "shapes", "size": size, "train_images": train_images},
        "train": {"epochs": epochs, "seed": seed, "device": device},
        "explain_images": explain_images,
        "curve_steps": curve_steps,
        "methods": names,
        "method_options": {k: v for k, v in DEMO_OPTIONS.items() if k in names},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "timing.json").write_text(json.dumps(timing, indent=2))
    say.step("writing the report")
    real_images_figure(train, out / REAL_IMAGES, count=32)
    report = write_demo_report(out, sections, diffusion_sections=diffusion_sections)
    say(f"done in {(time.perf_counter() - started) / 60:.1f} min; open {report}")
    return report


class _Narrator:
    """Says what the demo does, step by step, on stderr (above any progress bar); silent when off."""

    def __init__(self, on: bool, steps: int):
        self.on, self.steps, self.done = on, steps, 0

    def __call__(self, text: str) -> None:
        if self.on:
            tqdm.write(f"      {text}", file=sys.stderr)

    def step(self, text: str) -> None:
        self.done += 1
        if self.on:
            tqdm.write(f"[{self.done}/{self.steps}] {text}", file=sys.stderr)


def _diffusion_part(
    root: Path, variants: Sequence[str], overrides: Sequence[str], say: _Narrator
) -> dict[str, Any]:
    """The diffusion part (:func:`run_diffusion_demo`), said before it starts and after it ends."""
    cfg = load_experiment("demo", list(overrides))
    e, cycle = cfg.eval, cfg.cycle
    processes = cycle.cycles * (cycle.phase_a + 2 * cycle.phase_b)
    say.step(
        f"XAI-guided diffusion on the bundled {cfg.data.image_size}-px shapes -> {root}: training "
        f"{' then '.join(variants)} (one progress bar each), {processes} Processes each at batch "
        f"{cfg.train.batch_size}, same seeds"
    )
    if e.num_samples:
        say(
            f"each run computes FID on {e.num_samples} samples against {e.real_images or 'all'} real images "
            f"every {cfg.train.eval_every} Processes and at the end (its bar pauses while it samples); then "
            "the figures, and D's saliency on fresh samples of each final model"
        )
    started = time.perf_counter()
    results = run_diffusion_demo(root, variants=variants, overrides=overrides, say=say)
    if results.get("interrupted"):
        say("interrupted: the current run saved a checkpoint; rerun the demo to resume")
    fid_name = results.get("fid_name")
    for label, run in results.get("runs", {}).items():
        final = run.get("final", {}).get(fid_name) if fid_name else None
        shown = f", {fid_name} {final:.2f}" if final is not None else ""
        say(f"{label}: {run.get('processes', '?')} Processes in {run.get('train_time_s', 0):.0f} s{shown}")
    say(f"diffusion part done in {time.perf_counter() - started:.0f} s")
    return results


REAL_IMAGES = "real_images.png"
"""The grid of the classifier's real training images in the demo folder."""


def is_demo(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` is a folder written by :func:`run_demo`."""
    config = Path(run_dir) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("job") == "demo"


def write_demo_report(
    out: str | Path,
    extra: Sequence[Section] = (),
    *,
    diffusion_sections: Sequence[Section] | None = None,
    embed: bool = False,
) -> Path:
    """``out/report.html`` of a demo folder, both parts: the diffusion ablation (read from
    ``out/diffusion`` unless given), the classifier's real training images, the explanations and
    ``extra`` sections. ``genxai report`` on a demo folder rebuilds it this way."""
    out = Path(out)
    if diffusion_sections is None:
        diffusion = out / "diffusion"
        diffusion_sections = ablation_sections(diffusion) if (diffusion / "results.json").is_file() else []
    config = json.loads((out / "config.json").read_text()) if (out / "config.json").is_file() else {}
    data = config.get("data", {})
    real = []
    if (out / REAL_IMAGES).is_file():
        count = data.get("train_images", 32)
        caption = (
            f"real training images of {data.get('size', '?')} px, the first {min(32, count)} of {count} "
            f"({', '.join(config.get('class_names', []))})"
        )
        real = [
            Section("The classifier's training data (real images)", images=[Picture(REAL_IMAGES, caption)])
        ]
    sections = [*diffusion_sections, *real, *explain_sections(out), *extra]
    return build_report(out, sections, title="genxai demo", embed=embed)


def _item(item: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    image, label, mask = item
    return image, torch.tensor(label), mask
