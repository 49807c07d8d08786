"""Commands: train-segmenter, dissect (GAN Dissection).

    genxai train-segmenter --out runs/seg --size 32 --images 6000
    genxai dissect --generator runs/gan --layer blocks.2 --segmenter runs/seg --n 1000 --out runs/dissect

User errors (unknown layer, a folder without a segmenter or a generator, a segmenter that does not
fit the generator's images, n < 1) print one line ``error: ...`` and exit with code 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from genxai.cli.app import USER_ERRORS, app, end_process_group, fail

DEVICES = ("auto", "cpu", "cuda")
Device = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]


def _device(name: str) -> str:
    from genxai.core.checks import check_choice

    check_choice(name, "--device", DEVICES)
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


@app.command("train-segmenter")
def train_segmenter(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for the segmenter (resumes its checkpoints).")
    ],
    size: Annotated[int, typer.Option("--size", help="Image side of the shapes images.")] = 32,
    images: Annotated[int, typer.Option("--images", help="Training images.")] = 6000,
    iterations: Annotated[int, typer.Option("--iterations", help="Optimiser steps.")] = 3000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per step.")] = 32,
    lr: Annotated[float, typer.Option("--lr", help="Adam's learning rate (cosine decay to 0).")] = 3e-3,
    width: Annotated[int, typer.Option("--width", help="Channels of the first U-Net level.")] = 16,
    eval_images: Annotated[int, typer.Option("--eval-images", help="Held-out images for the mIoU.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Data and initialisation seed.")] = 0,
    device: Device = "auto",
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bar.")] = True,
) -> None:
    """Train the shapes segmenter (background, shapes, textures) and print its held-out mIoU."""
    try:
        from genxai.dissection.segmenter import SegmenterConfig
        from genxai.jobs.dissection import run_train_segmenter

        cfg = SegmenterConfig(
            size=size,
            images=images,
            iterations=iterations,
            batch_size=batch_size,
            lr=lr,
            width=width,
            eval_images=eval_images,
            seed=seed,
        )
        summary = run_train_segmenter(out, cfg, cpu=_device(device) == "cpu", progress=progress)
    except USER_ERRORS as err:
        raise fail(err) from None
    finally:
        end_process_group()
    if summary["status"] != "finished":
        typer.echo(f"{summary['status']}: saved {summary['checkpoint']}; run the same command to resume")
    if "evaluation" in summary:
        evaluation = summary["evaluation"]
        typer.echo(f"mIoU {evaluation['miou']:.3f} on {evaluation['images']} held-out images")
        typer.echo(
            json.dumps(
                {
                    "out": str(out),
                    "miou": evaluation["miou"],
                    "iou": evaluation["iou"],
                    "iterations": summary["iteration"],
                    "train_time_s": summary["train_time_s"],
                }
            )
        )


@app.command("dissect")
def dissect(
    generator: Annotated[
        Path, typer.Option("--generator", "-g", help="GAN run folder (`genxai train-gan`).")
    ],
    layer: Annotated[str, typer.Option("--layer", "-l", help="Generator layer to dissect, e.g. blocks.2.")],
    segmenter: Annotated[Path, typer.Option("--segmenter", "-s", help="Folder of `genxai train-segmenter`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for results.json, figures, report.html.")],
    n: Annotated[int, typer.Option("--n", help="Generated images to dissect.")] = 1000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the latents.")] = 0,
    iou_bar: Annotated[
        float, typer.Option("--iou-bar", help="IoU above which a unit is interpretable.")
    ] = 0.04,
    iqr_bar: Annotated[
        float, typer.Option("--iqr-bar", help="IQR a unit's best concept must also pass.")
    ] = 0.01,
    top_k: Annotated[int, typer.Option("--top-k", help="Top samples kept per unit.")] = 8,
    gallery_units: Annotated[int, typer.Option("--gallery-units", help="Units shown in the gallery.")] = 12,
    device: Device = "auto",
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bar.")] = True,
) -> None:
    """Dissect a generator's layer: each unit's best concept, IoU and threshold; units per concept."""
    try:
        from genxai.core.checks import check_positive_int
        from genxai.jobs.dissection import run_dissection

        check_positive_int(n, "--n")
        check_positive_int(batch_size, "--batch-size")
        check_positive_int(top_k, "--top-k")
        results = run_dissection(
            generator,
            layer,
            segmenter,
            out,
            num_samples=n,
            batch_size=batch_size,
            seed=seed,
            device=_device(device),
            iou_bar=iou_bar,
            iqr_bar=iqr_bar,
            top_k=top_k,
            gallery_units=gallery_units,
            gallery_count=min(6, top_k),
            progress=progress,
        )
    except USER_ERRORS as err:
        raise fail(err) from None
    typer.echo(
        f"{len(results['interpretable'])} of {results['units']} units of {results['layer']} interpretable; "
        f"wrote {out}/ (results.json, dissection.safetensors, figures, report.html)"
    )
    typer.echo(
        json.dumps({"out": str(out), "units": results["units"], "concept_counts": results["concept_counts"]})
    )
