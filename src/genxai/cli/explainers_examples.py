"""Commands: examples, tcav, influence (explanations by training examples, concepts, influence).

    genxai examples --model runs/cls --data shapes --layer layer3 --out runs/examples
    genxai tcav --model runs/cls --data shapes --layer layer2 --target circle \\
        --concept texture:stripes --concept texture:checker --out runs/tcav
    genxai influence --run runs/infl --data shapes --train --method tracin --out runs/infl/report

Bad input (an unknown class, an empty concept set, a run with one checkpoint for TracIn, an
unknown layer) prints one ``error:`` line and exits with code 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from genxai.cli.app import USER_ERRORS, app, fail, warnings_as_lines

DEVICES = ("auto", "cpu", "cuda")
Device = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
Model = Annotated[
    str, typer.Option("--model", "-m", help="Classifier: a genxai checkpoint folder or a name.")
]
Data = Annotated[str, typer.Option("--data", help="Data set: shapes, digits, folder, cifar10, ...")]
Root = Annotated[Path | None, typer.Option("--root", help="Folder of the data set (folder, cifar).")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Folder for results.json, figures, report.html.")]
Layer = Annotated[str, typer.Option("--layer", "-l", help="Layer whose features/activations are used.")]


def _device(name: str) -> str:
    from genxai.core.checks import check_choice

    check_choice(name, "--device", DEVICES)
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _dataset(name: str, root: Path | None, size: int | None, train: bool, n: int, **kwargs):
    from genxai.data import get_dataset

    if name == "shapes":
        kwargs["n"] = n
    return get_dataset(name, root, size, train=train, **kwargs)


def _model(spec: str, device: str):
    from genxai.models.classifier import input_size, load_model

    model = load_model(spec).to(device).eval()
    return model, input_size(model, 32)


@app.command("examples")
def examples(
    model: Model,
    layer: Layer,
    out: Out,
    data: Data = "shapes",
    root: Root = None,
    n: Annotated[int, typer.Option("--n", help="Training images searched.")] = 1000,
    queries: Annotated[int, typer.Option("--queries", help="Test images explained.")] = 6,
    k: Annotated[int, typer.Option("--k", help="Neighbours shown per image.")] = 5,
    target: Annotated[
        str | None, typer.Option("--target", help="Counterfactual class (name or index; default: any other).")
    ] = None,
    prototypes: Annotated[int, typer.Option("--prototypes", help="MMD-critic prototypes.")] = 8,
    criticisms: Annotated[int, typer.Option("--criticisms", help="MMD-critic criticisms.")] = 4,
    logdet: Annotated[
        bool, typer.Option("--logdet/--plain-witness", help="Criticisms with the log-det regulariser.")
    ] = True,
    pool: Annotated[str, typer.Option("--pool", help="mean or flatten the layer's maps.")] = "mean",
    metric: Annotated[str, typer.Option("--metric", help="euclidean or cosine.")] = "euclidean",
    device: Device = "auto",
) -> None:
    """Nearest training images (factual, counterfactual) in a layer's features; MMD-critic."""
    try:
        from genxai.core.checks import check_positive_int
        from genxai.jobs.examples import run_examples

        check_positive_int(n, "--n")
        net, size = _model(model, _device(device))
        train = _dataset(data, root, size, True, n)
        test = _dataset(data, root, size, False, queries)
        with warnings_as_lines():
            results = run_examples(
                net, train, test, out, layer=layer, n=n, queries=queries, k=k, target=target,
                prototypes=prototypes, criticisms=criticisms, regularizer="logdet" if logdet else None,
                pool=pool, metric=metric,
            )  # fmt: skip
    except USER_ERRORS as err:
        raise fail(err) from None
    typer.echo(f"wrote {Path(out) / 'report.html'}")
    typer.echo(json.dumps({"out": str(out), "prototype_classes": results["prototype_classes"]}))


@app.command("tcav")
def tcav(
    model: Model,
    layer: Layer,
    out: Out,
    target: Annotated[str, typer.Option("--target", "-t", help="Class explained (name or index).")],
    concept: Annotated[
        list[str],
        typer.Option(
            "--concept",
            "-c",
            help="A concept set: texture:NAME, background:NAME (shapes), class:NAME or a folder.",
        ),
    ],
    data: Data = "shapes",
    root: Root = None,
    images: Annotated[int, typer.Option("--images", help="Images of the target class explained.")] = 50,
    set_size: Annotated[int, typer.Option("--set-size", help="Images per concept and random set.")] = 30,
    random_count: Annotated[int, typer.Option("--random-sets", help="Random sets (>= 2).")] = 10,
    alpha: Annotated[float, typer.Option("--alpha", help="Test level before Bonferroni.")] = 0.05,
    pool_size: Annotated[int, typer.Option("--pool", help="Data images concepts are drawn from.")] = 2000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random sets.")] = 0,
    device: Device = "auto",
) -> None:
    """TCAV scores of concepts for a class, tested against random concepts."""
    try:
        from genxai.core.checks import check_positive_int
        from genxai.jobs.examples import (
            class_index,
            class_names,
            concept_images,
            load_images,
            random_sets,
            run_tcav,
        )

        check_positive_int(set_size, "--set-size")
        check_positive_int(images, "--images")
        if not concept:
            raise ValueError("--concept: give at least one concept set")
        net, size = _model(model, _device(device))
        pool = _dataset(
            data, root, size, True, pool_size, **({"attributes": True} if data == "shapes" else {})
        )
        names = class_names(net, pool)
        index = class_index(target, names, "--target")
        test = _dataset(data, root, size, False, max(pool_size, images * max(1, len(names))))
        x, y = load_images(test, len(test))
        x = x[y == index][:images]
        if len(x) == 0:
            raise ValueError(f"--target: no test images of class {target!r}")
        channels = x.shape[1]
        concepts = dict(
            concept_images(spec, pool, set_size, size=size, channels=channels) for spec in concept
        )
        randoms = random_sets(pool, random_count, set_size, seed)
        results = run_tcav(
            net, x, out, layer=layer, target=index, target_name=names[index] if names else str(index),
            concepts=concepts, random_sets=randoms, alpha=alpha,
        )  # fmt: skip
    except USER_ERRORS as err:
        raise fail(err) from None
    for r in results["concepts"]:
        flag = "significant" if r["significant"] else "not significant"
        typer.echo(
            f"{r['concept']}: TCAV {r['tcav']:.2f} (random {r['random_tcav']:.2f}), p={r['p_value']:.3g}, {flag}"
        )
    typer.echo(f"wrote {Path(out) / 'report.html'}")


@app.command("influence")
def influence(
    run: Annotated[Path, typer.Option("--run", "-r", help="Classifier run folder (its loop checkpoints).")],
    out: Out,
    data: Data = "shapes",
    root: Root = None,
    method: Annotated[str, typer.Option("--method", help="tracin, exact or lissa.")] = "tracin",
    train: Annotated[
        bool,
        typer.Option("--train/--no-train", help="Train the run first (resumes; keeps every checkpoint)."),
    ] = False,
    iterations: Annotated[int, typer.Option("--iterations", help="Training steps (with --train).")] = 300,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", help="Steps between checkpoints.")
    ] = 50,
    size: Annotated[int | None, typer.Option("--size", help="Image side (default: the data set's).")] = None,
    n: Annotated[int, typer.Option("--n", help="Training images (the run trains on these).")] = 600,
    queries: Annotated[int, typer.Option("--queries", help="Test images explained.")] = 4,
    top: Annotated[int, typer.Option("--top", help="Helpful and harmful images shown per test image.")] = 6,
    params: Annotated[
        list[str] | None,
        typer.Option("--params", help="Parameter name prefixes (default: all; exact/lissa: fc)."),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per vmap call.")] = 128,
    normalize: Annotated[
        bool,
        typer.Option(
            "--normalize/--raw", help="TracIn with gradient cosines (default: the paper's dot products)."
        ),
    ] = False,
    device: Device = "auto",
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bar.")] = True,
) -> None:
    """The training images that most helped and hurt test predictions (TracIn, influence functions)."""
    try:
        from genxai.core.checks import check_positive_int
        from genxai.explainers.influence import ClassifierRunConfig
        from genxai.jobs.examples import run_influence, train_run

        check_positive_int(n, "--n")
        dev = _device(device)
        train_set = _dataset(data, root, size, True, n)
        test_set = _dataset(data, root, size, False, queries)
        if train:
            image = train_set[0][0]
            classes = len(getattr(train_set, "classes", None) or []) or 10
            cfg = ClassifierRunConfig(
                classes=classes,
                channels=image.shape[0],
                image_size=image.shape[-1],
                iterations=iterations,
                class_names=[str(c) for c in getattr(train_set, "classes", None) or []],
            )
            train_run(
                run, train_set, cfg, checkpoint_every=checkpoint_every, cpu=dev == "cpu", progress=progress
            )
        results = run_influence(
            run, train_set, test_set, out, method=method, n=n, queries=queries, top=top, params=params,
            batch_size=batch_size, normalize=normalize, device=dev, progress=progress,
        )  # fmt: skip
    except USER_ERRORS as err:
        raise fail(err) from None
    typer.echo(f"wrote {Path(out) / 'report.html'}")
    typer.echo(json.dumps({"out": str(out), "method": method, "checkpoints": len(results["checkpoints"])}))
