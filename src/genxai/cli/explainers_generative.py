"""Commands: ganmex, counterfactual (generative models that explain a classifier).

    genxai ganmex --out runs/ganmex-shapes train.iterations=2000
    genxai counterfactual --out runs/cf-digits data.name=digits --target 3

Both train (or resume) their generative model on the project's training loop in OUT, explain
held-out images and write OUT/report.html. Trailing ``key=value`` overrides set the training config
(GANMEXConfig / FlowConfig: ``data.*``, ``model.*``, ``train.*``). Without ``--classifier`` a small
CNN is trained on the same data first (OUT/classifier). Bad input: one ``error:`` line, exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from genxai.cli.app import USER_ERRORS, app, fail

Overrides = Annotated[
    list[str] | None,
    typer.Argument(
        help="Dotted key=value overrides of the training config, e.g. data.name=digits train.iterations=500."
    ),
]
ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML of the training config.")]
ClassifierOption = Annotated[
    Path | None,
    typer.Option(
        "--classifier", help="Saved genxai classifier folder (default: train one into OUT/classifier)."
    ),
]
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
EmbedOption = Annotated[bool, typer.Option("--embed/--link", help="Inline the report's images.")]


@app.command("ganmex")
def ganmex(
    overrides: Overrides = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder.")] = Path("runs/ganmex"),
    config: ConfigOption = None,
    classifier: ClassifierOption = None,
    images: Annotated[int, typer.Option("--images", help="Held-out images to explain.")] = 64,
    method: Annotated[
        list[str] | None,
        typer.Option(
            "--method", help="Attribution method with a baseline (repeat) (default: integratedgradients)."
        ),
    ] = None,
    curve_steps: Annotated[
        int, typer.Option("--curve-steps", help="Steps of the deletion/insertion curves.")
    ] = 32,
    ig_steps: Annotated[
        int, typer.Option("--ig-steps", help="Integration steps of Integrated Gradients.")
    ] = 32,
    device: DeviceOption = "auto",
    embed: EmbedOption = False,
) -> None:
    """GANMEX baselines: train a class translator against the classifier, then compare it as the
    baseline of Integrated Gradients (and --method) with zero, blur and uniform baselines."""
    from genxai.core.checks import check_positive_int
    from genxai.jobs.counterfactual import run_ganmex

    try:
        check_positive_int(images, "--images")
        check_positive_int(curve_steps, "--curve-steps")
        check_positive_int(ig_steps, "--ig-steps")
        path, records = run_ganmex(
            out,
            config=config,
            overrides=overrides or [],
            classifier=classifier,
            images=images,
            methods=method or ["integratedgradients"],
            curve_steps=curve_steps,
            ig_steps=ig_steps,
            device=device,
            embed=embed,
        )
    except USER_ERRORS as err:
        raise fail(err) from None
    for record in records:
        typer.echo(json.dumps(record))
    typer.echo(f"wrote {path}")


@app.command("counterfactual")
def counterfactual(
    overrides: Overrides = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder.")] = Path("runs/counterfactual"),
    config: ConfigOption = None,
    classifier: ClassifierOption = None,
    target: Annotated[
        str | None,
        typer.Option("--target", help="Target class, by index or name (default: each image's runner-up)."),
    ] = None,
    images: Annotated[int, typer.Option("--images", help="Held-out images to move.")] = 16,
    threshold: Annotated[float, typer.Option("--threshold", help="Stop once p(target) passes it.")] = 0.99,
    max_steps: Annotated[int, typer.Option("--max-steps", help="Most Adam steps per image.")] = 500,
    latent_lr: Annotated[float, typer.Option("--latent-lr", help="Step size in the flow's latent.")] = 0.05,
    pixel_lr: Annotated[
        float, typer.Option("--pixel-lr", help="Step size of the pixel-space search.")
    ] = 0.01,
    device: DeviceOption = "auto",
    embed: EmbedOption = False,
) -> None:
    """Diffeomorphic counterfactuals: train a RealNVP on the data, step in its latent until the
    classifier says the target class, and compare with pixel-space adversarial counterfactuals."""
    from genxai.core.checks import check_positive_int
    from genxai.jobs.counterfactual import run_counterfactual

    try:
        check_positive_int(images, "--images")
        check_positive_int(max_steps, "--max-steps")
        if not 0 < threshold < 1:
            raise ValueError(f"--threshold: expected a probability in (0, 1), got {threshold}")
        path, records = run_counterfactual(
            out,
            config=config,
            overrides=overrides or [],
            classifier=classifier,
            target=target,
            images=images,
            threshold=threshold,
            max_steps=max_steps,
            latent_lr=latent_lr,
            pixel_lr=pixel_lr,
            device=device,
            embed=embed,
        )
    except USER_ERRORS as err:
        raise fail(err) from None
    for record in records:
        typer.echo(json.dumps(record))
    typer.echo(f"wrote {path}")
