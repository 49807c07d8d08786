"""The jobs behind ``genxai ganmex`` and ``genxai counterfactual``: train (or resume) the generative
explainer on the project's training loop, explain held-out images, write tables, figures and an
HTML report section.

    run_ganmex("runs/ganmex", data="shapes", overrides=["train.iterations=2000"])
    run_counterfactual("runs/cf", data="digits", target="3")

Without ``classifier`` a small CNN is trained on the same data first and saved in
``OUT/classifier`` (reused by later runs in the same folder).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from genxai.attribution import IntegratedGradients, get
from genxai.config import config_to_dict, load_config, resolve_config_path, save_config
from genxai.data.config import DataConfig, build_dataset
from genxai.explainers.counterfactuals import compare_counterfactuals
from genxai.explainers.flows import FlowConfig, FlowTrainer, load_flow
from genxai.explainers.ganmex import (
    GANMEXConfig,
    GANMEXTrainer,
    check_baseline_methods,
    compare_baselines,
    frozen_classifier,
    ganmex_baseline,
    load_translator,
    runner_up,
    standard_baselines,
)
from genxai.models.classifier import evaluate_accuracy, save_classifier, train_classifier
from genxai.report.explainers import baseline_figure, counterfactual_figure, likelihood_figure
from genxai.report.html import Picture, Section, Table, build_report

SPLIT = ("shapes", "digits", "cifar10", "cifar100")  # data sets with a held-out split


def _device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device: {device} is not available on this machine; use cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"--device: expected auto, cpu or cuda[:N], got {device!r}")
    return device


def ensure_classifier(
    out: Path,
    data: DataConfig,
    seed: int,
    classifier: str | Path | None,
    *,
    epochs: int = 5,
    device: str = "cpu",
) -> Path:
    """The classifier folder to explain: ``classifier``, or ``OUT/classifier`` (trained on ``data``
    with :func:`train_classifier` when it is not there yet)."""
    if classifier is not None:
        if not (Path(classifier) / "config.json").is_file():
            raise FileNotFoundError(f"--classifier: no saved classifier (config.json) in {classifier}")
        return Path(classifier)
    folder = out / "classifier"
    if not (folder / "config.json").is_file():
        train = build_dataset(data, seed)
        test = build_dataset(data, seed, train=False) if data.name in SPLIT else None
        result = train_classifier(train, epochs, test=test, seed=seed, device=device)
        save_classifier(result.model.cpu(), folder, accuracy=result.accuracy)
    return folder


def _config(cls: type, config: str | Path | None, overrides: Sequence[str]) -> Any:
    path = resolve_config_path(config) if config is not None else None
    return load_config(cls, path, overrides)


def held_out(data: DataConfig, seed: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` images (and labels) from the held-out split (shapes, digits) or the data's end."""
    dataset: Dataset = build_dataset(data, seed, train=False)
    if len(dataset) < count:
        raise ValueError(f"--images: the held-out data has {len(dataset)} images, fewer than {count}")
    items = (
        [dataset[i] for i in range(len(dataset) - count, len(dataset))]
        if data.name == "folder"
        else [dataset[i] for i in range(count)]
    )
    return torch.stack([item[0] for item in items]).float(), torch.as_tensor([int(item[1]) for item in items])


def class_index(name: str | int, classes: int, names: Sequence[str]) -> int:
    """A class given by index or name, checked: an unknown one lists the classes."""
    text = str(name)
    if text in names:
        return list(names).index(text)
    if text.lstrip("-").isdigit() and 0 <= int(text) < classes:
        return int(text)
    shown = ", ".join(f"{i}={n}" for i, n in enumerate(names)) if names else f"0..{classes - 1}"
    raise ValueError(f"--target: unknown class {name!r}; the classifier's classes are {shown}")


def _write(out: Path, name: str, records: list[dict[str, Any]]) -> None:
    (out / f"{name}.json").write_text(json.dumps(records, indent=2))


def run_ganmex(
    out: str | Path,
    *,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    classifier: str | Path | None = None,
    images: int = 64,
    methods: Sequence[str] = ("integratedgradients",),
    curve_steps: int = 32,
    ig_steps: int = 32,
    device: str = "auto",
    classifier_epochs: int = 5,
    embed: bool = False,
) -> tuple[Path, list[dict[str, Any]]]:
    """Train/resume GANMEX's translator in ``OUT/translator``, then compare GANMEX, zero, blur and
    uniform baselines for ``methods`` on held-out images; writes ``baselines.json``, figures and
    ``OUT/report.html``. Returns the report path and the records."""
    check_baseline_methods(methods)  # before any training
    out = Path(out)
    dev = _device(device)
    cfg: GANMEXConfig = _config(GANMEXConfig, config, [f"out_dir={out}", "name=translator", *overrides])
    cfg.classifier = str(
        ensure_classifier(
            out,
            cfg.data,
            cfg.seed,
            classifier or cfg.classifier or None,
            epochs=classifier_epochs,
            device=dev,
        )
    )
    if dev == "cpu":
        cfg.train.cpu = True
    out.mkdir(parents=True, exist_ok=True)
    GANMEXTrainer(cfg).fit()
    model = frozen_classifier(cfg.classifier, dev)
    translator = load_translator(cfg.run_dir, dev)
    x = held_out(cfg.data, cfg.seed, images)[0].to(dev)
    with torch.no_grad():
        target = model(x).argmax(1)  # explain the prediction
    base = ganmex_baseline(translator, model, x, target)
    baselines = {"ganmex": base, **standard_baselines(x, seed=cfg.seed)}
    options = {m: {"steps": ig_steps} for m in methods if get(m) is IntegratedGradients}
    records, maps = compare_baselines(
        model, x, target, baselines, methods=methods, options=options, steps=curve_steps
    )
    with torch.no_grad():
        hit = (model(base).argmax(1) == runner_up(model, x, target)).float().mean()
    accuracy = evaluate_accuracy(model, build_dataset(cfg.data, cfg.seed, train=False), device=dev)
    _write(out, "baselines", records)
    figure = baseline_figure(out / "ganmex_baselines.png", x, baselines, maps, methods[0])
    text = (
        f"GANMEX translator trained {cfg.train.iterations} iterations on {cfg.data.name} "
        f"({cfg.data.image_size} px); classifier accuracy {accuracy:.3f} (held out). On {images} held-out "
        f"images the GANMEX baseline (the image translated to the runner-up class) is classified as "
        f"that class for {float(hit):.1%} of them. Deletion AUC: lower is better; insertion AUC: higher "
        "is better; Average Drop %: lower is better. Maps: attributions summed over colour channels."
    )
    section = Section(
        "GANMEX baselines",
        text=text,
        images=[Picture(figure.name, "image, baselines, attributions")],
        table=Table.from_records(records),
        config={"ganmex": config_to_dict(cfg)},
    )
    save_config(cfg, out / "ganmex.yaml")
    return build_report(out, [section], title="GANMEX baselines", embed=embed), records


def run_counterfactual(
    out: str | Path,
    *,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    classifier: str | Path | None = None,
    target: str | int | None = None,
    images: int = 16,
    threshold: float = 0.99,
    max_steps: int = 500,
    latent_lr: float = 0.05,
    pixel_lr: float = 0.01,
    device: str = "auto",
    classifier_epochs: int = 5,
    embed: bool = False,
) -> tuple[Path, list[dict[str, Any]]]:
    """Train/resume the RealNVP in ``OUT/flow``, then latent (diffeomorphic) and pixel-space
    counterfactuals of held-out images towards ``target`` (default: each image's runner-up class);
    writes ``counterfactuals.json``, a figure and ``OUT/report.html``."""
    out = Path(out)
    dev = _device(device)
    cfg: FlowConfig = _config(FlowConfig, config, [f"out_dir={out}", "name=flow", *overrides])
    folder = ensure_classifier(out, cfg.data, cfg.seed, classifier, epochs=classifier_epochs, device=dev)
    model = frozen_classifier(folder, dev)
    c = model.config
    x = held_out(cfg.data, cfg.seed, images)[0].to(dev)
    if (c.channels, c.image_size) != tuple(x.shape[1:3]):
        raise ValueError(
            f"--classifier: it takes {c.channels}x{c.image_size}px images, the data has "
            f"{x.shape[1]}x{x.shape[-1]}px (data.image_size, data.channels)"
        )
    goal = None if target is None else class_index(target, c.classes, c.class_names)
    if dev == "cpu":
        cfg.train.cpu = True
    out.mkdir(parents=True, exist_ok=True)
    FlowTrainer(cfg).fit()
    flow = load_flow(cfg.run_dir, dev)
    with torch.no_grad():
        predicted = model(x).argmax(1)
    goals = runner_up(model, x, predicted) if goal is None else torch.full_like(predicted, goal)
    keep = predicted != goals
    if not keep.any():
        raise ValueError(f"--target: every chosen image is already predicted as class {goal}")
    x, goals = x[keep], goals[keep]
    results, records = compare_counterfactuals(
        flow,
        model,
        x,
        goals,
        threshold=threshold,
        latent_lr=latent_lr,
        pixel_lr=pixel_lr,
        max_steps=max_steps,
    )
    _write(out, "counterfactuals", records)
    names = c.class_names or [str(i) for i in range(c.classes)]
    figure = counterfactual_figure(out / "counterfactuals.png", x, results, [names[int(g)] for g in goals])
    with torch.no_grad():
        bpd = {"original": flow.bits_per_dim(x), **{k: v.bits_per_dim for k, v in results.items()}}
    histogram = likelihood_figure(out / "counterfactual_likelihood.png", bpd)
    text = (
        f"RealNVP ({cfg.model.levels} levels) trained {cfg.train.iterations} iterations on {cfg.data.name}; "
        f"{len(x)} held-out images moved towards "
        f"{'each image' + chr(39) + 's runner-up class' if goal is None else 'class ' + names[goal]} until "
        f"p > {threshold} (at most {max_steps} Adam steps). Bits per dimension under the flow: lower "
        "means more likely, i.e. closer to the data manifold."
    )
    section = Section(
        "Diffeomorphic counterfactuals",
        text=text,
        images=[
            Picture(figure.name, "rows: original, then per method the counterfactual and its change"),
            Picture(histogram.name, "likelihood under the flow"),
        ],
        table=Table.from_records(records),
        config={"flow": config_to_dict(cfg)},
    )
    save_config(cfg, out / "flow.yaml")
    return build_report(out, [section], title="Diffeomorphic counterfactuals", embed=embed), records
