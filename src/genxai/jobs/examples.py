"""Example-based, concept and influence explanations as jobs: compute, draw, write a report.

    run_examples(model, data, "runs/examples", layer="layer3")                      # neighbours, MMD-critic
    run_tcav(model, data, "runs/tcav", layer="layer2", target="circle", concepts={...})
    run_influence("runs/cls", data, "runs/influence", method="tracin")             # helped / hurt strips

:mod:`genxai.explainers` computes; :mod:`genxai.report.explainers` draws the image strips and
charts; each job writes ``results.json``, its PNGs and ``report.html`` (Section/Table/Picture).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from genxai.core.checks import check_positive_int
from genxai.explainers.examples import ExampleExplainer, mmd_critic, model_device
from genxai.explainers.influence import (
    ClassifierRunConfig,
    ClassifierStep,
    InfluenceFunction,
    load_run_classifier,
    resolve_checkpoints,
    top_examples,
    tracin,
)
from genxai.explainers.tcav import TCAV
from genxai.models.classifier import save_classifier
from genxai.report.explainers import gallery_figure, strip_figure, tcav_figure
from genxai.report.html import Picture, Section, Table, build_report


def load_images(dataset: Dataset, count: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, C, H, W) and labels (N,) of items ``start .. start + count`` of ``dataset``."""
    stop = min(len(dataset), start + count)
    if stop <= start:
        raise ValueError(f"n: the data set has {len(dataset)} images, none from index {start}")
    items = [dataset[i] for i in range(start, stop)]
    return torch.stack([it[0] for it in items]).float(), torch.tensor([int(it[1]) for it in items])


def class_names(model: nn.Module, dataset: Dataset | None = None) -> list[str]:
    """The class names of a genxai classifier's config, else the data set's, else the indices."""
    names = list(getattr(getattr(model, "config", None), "class_names", None) or [])
    return names or [str(c) for c in getattr(dataset, "classes", None) or []]


def class_index(name: str | int, names: list[str], what: str = "target") -> int:
    """A class given by name or index; an unknown one is an error naming ``what`` and the classes."""
    if isinstance(name, int) or (isinstance(name, str) and name.isdigit()):
        index = int(name)
        if names and not 0 <= index < len(names):
            raise ValueError(f"{what}: unknown class {name!r}; classes: {', '.join(names)}")
        return index
    if name not in names:
        raise ValueError(f"{what}: unknown class {name!r}; classes: {', '.join(names) or '(none named)'}")
    return names.index(name)


def _captions(
    labels: torch.Tensor, names: list[str], values: torch.Tensor | None = None, fmt: str = "{:.2f}"
):
    out = []
    for q in range(labels.shape[0]):
        row = []
        for j in range(labels.shape[1]):
            name = names[int(labels[q, j])] if names else str(int(labels[q, j]))
            row.append(name if values is None else f"{name}\n{fmt.format(float(values[q, j]))}")
        out.append(row)
    return out


def _write(out: Path, results: dict[str, Any], sections: list[Section], title: str) -> dict[str, Any]:
    (out / "results.json").write_text(json.dumps(results, indent=2))
    build_report(out, sections, title=title)
    return results


# --- nearest neighbours and MMD-critic ----------------------------------------------------------


def run_examples(
    model: nn.Module,
    train: Dataset,
    test: Dataset,
    out: str | Path,
    *,
    layer: str,
    n: int = 1000,
    queries: int = 6,
    k: int = 5,
    target: str | int | None = None,
    prototypes: int = 8,
    criticisms: int = 4,
    regularizer: str | None = "logdet",
    pool: str = "mean",
    metric: str = "euclidean",
    batch_size: int = 256,
) -> dict[str, Any]:
    """Factual and counterfactual neighbours of ``queries`` test images among ``n`` training images
    in ``layer``'s features, and MMD-critic prototypes and criticisms of those features."""
    check_positive_int(queries, "queries")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = class_names(model, train)
    target_index = None if target is None else class_index(target, names, "target")
    x, y = load_images(train, n)
    xq, yq = load_images(test, queries)
    explainer = ExampleExplainer(
        model, layer, x, y, classes=len(names) or None, pool=pool, metric=metric, batch_size=batch_size
    )
    fact = explainer.factual(xq, k)
    counter = explainer.counterfactual(xq, k, target=target_index)
    label = (lambda i: names[i]) if names else str
    titles = [f"{label(int(t))}\npred {label(int(p))}" for t, p in zip(yq, fact.predicted.cpu())]
    strips = {
        "nearest (same class)": x[fact.index.cpu()],
        "nearest other class" if target is None else f"nearest {label(target_index)}": x[counter.index.cpu()],
    }
    captions = dict(
        zip(
            strips,
            [
                _captions(fact.labels.cpu(), names, fact.distance.cpu()),
                _captions(counter.labels.cpu(), names, counter.distance.cpu()),
            ],
        )
    )
    figures = {"neighbours": strip_figure(out / "neighbours.png", xq, strips, captions, titles)}
    critic = mmd_critic(explainer.features, prototypes, criticisms, regularizer=regularizer)
    figures["prototypes"] = gallery_figure(
        out / "prototypes.png",
        x[critic.prototypes],
        [label(int(y[i])) for i in critic.prototypes],
        title=f"MMD-critic prototypes ({layer} features)",
    )
    if criticisms:
        figures["criticisms"] = gallery_figure(
            out / "criticisms.png",
            x[critic.criticisms],
            [f"{label(int(y[i]))}\nw={float(critic.witness[i]):+.3f}" for i in critic.criticisms],
            title="MMD-critic criticisms (witness w)",
        )
    results = {
        "layer": layer,
        "n": len(x),
        "k": k,
        "pool": pool,
        "metric": metric,
        "gamma": critic.gamma,
        "regularizer": regularizer,
        "queries": [
            {
                "label": label(int(yq[q])),
                "predicted": label(int(fact.predicted[q])),
                "factual": fact.index[q].tolist(),
                "counterfactual": counter.index[q].tolist(),
                "counterfactual_classes": [label(int(c)) for c in counter.labels[q]],
            }
            for q in range(len(xq))
        ],
        "prototypes": critic.prototypes.tolist(),
        "prototype_classes": [label(int(y[i])) for i in critic.prototypes],
        "criticisms": critic.criticisms.tolist(),
        "mmd_objective": critic.objective,
        "figures": {name: path.name for name, path in figures.items()},
    }
    text = (
        f"{len(xq)} test images and their {k} nearest training images (of {len(x)}) in the "
        f"{pool}-pooled features of {layer} ({metric} distance): of the predicted class (factual) and of "
        + ("any other class" if target is None else f"class {label(target_index)}")
        + " (counterfactual). Captions: class and distance."
    )
    counts: dict[str, int] = {}
    for c in results["prototype_classes"]:
        counts[c] = counts.get(c, 0) + 1
    sections = [
        Section("Example-based explanations", text=text, images=[Picture(figures["neighbours"].resolve())]),
        Section(
            "Prototypes and criticisms (MMD-critic)",
            text=f"{prototypes} prototypes chosen greedily for the MMD objective (RBF kernel, gamma "
            f"{critic.gamma:.3g}, median heuristic) and {len(critic.criticisms)} criticisms by the witness "
            f"function ({'with the log-determinant regulariser' if regularizer else 'plain'}).",
            images=[Picture(figures[f].resolve()) for f in ("prototypes", "criticisms") if f in figures],
            table=Table.from_records([{"class": c, "prototypes": v} for c, v in counts.items()]),
        ),
    ]
    return _write(out, results, sections, f"genxai examples: {layer}")


# --- TCAV ---------------------------------------------------------------------------------------


def run_tcav(
    model: nn.Module,
    images: torch.Tensor,
    out: str | Path,
    *,
    layer: str,
    target: int,
    target_name: str,
    concepts: dict[str, torch.Tensor],
    random_sets: list[torch.Tensor],
    alpha: float = 0.05,
    batch_size: int = 64,
) -> dict[str, Any]:
    """TCAV scores of each concept for class ``target`` on ``images``, tested against random sets."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tcav = TCAV(model, layer, random_sets, alpha=alpha, batch_size=batch_size)
    records = [r.record() for r in tcav.interpret(images, target, concepts)]
    figures = {"tcav": tcav_figure(out / "tcav.png", records, title=f"class {target_name}, layer {layer}")}
    for name, imgs in concepts.items():
        figures[f"concept_{name}"] = gallery_figure(
            out / f"concept_{_file(name)}.png", imgs[:8], [""] * min(8, len(imgs)), title=f"concept {name}"
        )
    results = {
        "layer": layer,
        "target": target_name,
        "images": len(images),
        "random_sets": len(random_sets),
        "alpha": alpha,
        "bonferroni_level": alpha / len(concepts),
        "concepts": records,
        "figures": {name: path.name for name, path in figures.items()},
    }
    text = (
        f"TCAV (Kim et al. 2018) for class {target_name} on {len(images)} images at {layer}: per concept, one "
        f"CAV against each of {len(random_sets)} random sets; the score is the fraction of images whose "
        "class logit rises along the CAV. Significant: a two-sided Welch t-test against random-vs-random "
        f"CAVs' scores, p < {alpha} / {len(concepts)} (Bonferroni)."
    )
    sections = [
        Section(
            "Concept explanations (TCAV)",
            text=text,
            table=Table.from_records(records),
            images=[Picture(p.resolve()) for p in figures.values()],
        )
    ]
    return _write(out, results, sections, f"genxai tcav: {target_name} at {layer}")


def concept_images(
    spec: str, pool: Dataset, count: int, *, size: int, channels: int = 3
) -> tuple[str, torch.Tensor]:
    """A concept set by ``spec``: ``texture:NAME`` or ``background:NAME`` (shapes with attributes),
    ``class:NAME`` (images of a class of ``pool``), or a folder of images; (name, images)."""
    key, _, value = spec.partition(":")
    if key in ("texture", "background", "class") and value:
        from genxai.data.shapes import BACKGROUNDS, TEXTURES

        if key == "class":
            names = [str(c) for c in getattr(pool, "classes", None) or []]
            wanted = class_index(value, names, "--concept")
        else:
            choices = list(TEXTURES if key == "texture" else BACKGROUNDS)
            if value not in choices:
                raise ValueError(f"--concept: unknown {key} {value!r}; expected one of {', '.join(choices)}")
            wanted = choices.index(value)
        picked = []
        for i in range(len(pool)):
            item = pool[i]
            if key != "class" and (len(item) < 4 or not isinstance(item[3], dict)):
                raise ValueError(f"--concept: {spec!r} needs the shapes data set (items with attributes)")
            if (int(item[1]) if key == "class" else item[3][key]) == wanted:
                picked.append(item[0])
            if len(picked) == count:
                break
        if not picked:
            raise ValueError(f"--concept: the concept set {spec!r} is empty (no such images in the data)")
        return spec, torch.stack(picked).float()
    folder = Path(spec)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"--concept: {spec!r} is neither a folder of images nor texture:/background:/class:NAME"
        )
    from genxai.data.folders import load_image
    from genxai.jobs.explain import list_images

    try:
        files = list_images(folder)[:count]
    except ValueError:
        raise ValueError(
            f"--concept: the concept set {spec!r} is empty (no image files in the folder)"
        ) from None
    return folder.name, torch.stack([load_image(f, size, channels) for f in files])


def random_sets(pool: Dataset, sets: int, size: int, seed: int = 0) -> list[torch.Tensor]:
    """``sets`` disjoint random image sets of ``size`` images from ``pool``."""
    if sets * size > len(pool):
        raise ValueError(
            f"--random-sets: {sets} sets of {size} images need {sets * size} images, the pool has {len(pool)}"
        )
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
    return [torch.stack([pool[i][0] for i in order[k * size : (k + 1) * size]]).float() for k in range(sets)]


def _file(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


# --- influence ----------------------------------------------------------------------------------


def train_run(
    run_dir: str | Path,
    dataset: Dataset,
    cfg: ClassifierRunConfig,
    *,
    batch_size: int = 32,
    checkpoint_every: int = 50,
    seed: int = 0,
    cpu: bool = False,
    progress: bool = True,
) -> dict:
    """Train a classifier on the training loop in ``run_dir`` (resumes), keeping every checkpoint."""
    from genxai.training import Loop, LoopConfig

    loop_cfg = LoopConfig(
        run_dir=run_dir,
        seed=seed,
        batch_size=batch_size,
        checkpoint_every=checkpoint_every,
        keep_checkpoints=10_000,
        log_every=10,
        cpu=cpu,
        progress=progress,
    )
    loop = Loop(ClassifierStep(cfg), loop_cfg, dataset)
    summary = loop.fit()
    (Path(run_dir) / "classifier.json").write_text(json.dumps(asdict(cfg)))
    if loop.is_main:  # the final weights also as a classifier folder, for --model of the other commands
        save_classifier(loop.unwrap("classifier").eval(), Path(run_dir) / "model")
    return summary


def run_config(run_dir: str | Path) -> ClassifierRunConfig:
    """The :class:`ClassifierRunConfig` of a run written by :func:`train_run`."""
    file = Path(run_dir) / "classifier.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"run: {run_dir} holds no classifier.json; train it with `genxai influence --train`"
        )
    return ClassifierRunConfig(**json.loads(file.read_text()))


def run_influence(
    run_dir: str | Path,
    train: Dataset,
    test: Dataset,
    out: str | Path,
    *,
    method: str = "tracin",
    n: int = 500,
    queries: int = 4,
    top: int = 6,
    params: list[str] | None = None,
    damping: float = 0.01,
    batch_size: int = 128,
    normalize: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """The training images that most helped and most hurt each of ``queries`` test predictions."""
    if method not in ("tracin", "exact", "lissa"):
        raise ValueError(f"method: expected tracin, exact or lissa, got {method!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = run_config(run_dir)
    paths = resolve_checkpoints(run_dir)
    model = load_run_classifier(paths[-1], cfg, device)
    names = [str(c) for c in getattr(train, "classes", None) or []]
    x, y = load_images(train, n)
    xq, yq = load_images(test, queries)
    if method == "tracin":
        scores = tracin(
            model,
            paths,
            x,
            y,
            xq,
            yq,
            params=params,
            batch_size=batch_size,
            normalize=normalize,
            progress=progress,
        )
        product = "cosines" if normalize else "dot products"
        how = f"TracInCP over {len(paths)} checkpoints (sum of lr x gradient {product})"
    else:
        fn = InfluenceFunction(
            model, x, y, params=params or ["fc"], damping=damping, method=method, batch_size=batch_size
        )
        scores = fn.scores(xq, yq)
        how = (
            f"influence functions ({method} inverse Hessian, parameters {params or ['fc']}, "
            f"damping {damping}) at the last checkpoint"
        )
    scores = scores.cpu()
    helped, hurt = top_examples(scores, top)
    with torch.no_grad():
        predicted = model(xq.to(model_device(model))).argmax(1).cpu()
    label = (lambda i: names[i]) if names else str
    strips = {"helped most": x[helped], "hurt most": x[hurt]}
    captions = {
        "helped most": _captions(y[helped], names, scores.gather(1, helped), "{:+.2g}"),
        "hurt most": _captions(y[hurt], names, scores.gather(1, hurt), "{:+.2g}"),
    }
    titles = [f"{label(int(t))}\npred {label(int(p))}" for t, p in zip(yq, predicted)]
    figure = strip_figure(out / "influence.png", xq, strips, captions, titles)
    results = {
        "method": method,
        "normalize": normalize,
        "run": str(run_dir),
        "checkpoints": [p.name for p in paths],
        "n": len(x),
        "queries": [
            {
                "label": label(int(yq[q])),
                "predicted": label(int(predicted[q])),
                "helped": helped[q].tolist(),
                "hurt": hurt[q].tolist(),
                "helped_scores": scores[q, helped[q]].tolist(),
                "hurt_scores": scores[q, hurt[q]].tolist(),
            }
            for q in range(len(xq))
        ],
        "figures": {"influence": figure.name},
    }
    text = (
        f"Which of {len(x)} training images most helped (positive: it lowered the test loss) and most hurt "
        f"each of {len(xq)} test predictions, by {how}. Captions: class and score."
    )
    sections = [Section("Influence", text=text, images=[Picture(figure.resolve())])]
    return _write(out, results, sections, f"genxai influence: {method}")
