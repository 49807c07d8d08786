"""Commands: train-segmenter, dissect (GAN Dissection), intervene, repair, dissect-unet.

    genxai train-segmenter --out runs/seg --size 32 --images 6000
    genxai dissect --generator runs/gan --layer blocks.2 --segmenter runs/seg --n 1000 --out runs/dissect
    genxai intervene -g runs/gan -l blocks.2 -u 3,7 -s runs/seg --out runs/ablate
    genxai repair -g runs/gan -l blocks.1,blocks.2 -k 4 --fid-samples 1000 --out runs/repair
    genxai dissect-unet --run runs/demo/diffusion/baseline -l mid.blocks.0 -s runs/seg --out runs/unet

User errors (unknown layer, unit out of range, a folder without a segmenter or a generator, a
segmenter that does not fit the generator's images, a timestep the sampler skips, n < 1) print one
line ``error: ...`` and exit with code 2.
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


def parse_ints(text: str, option: str) -> list[int]:
    """``"3,5,8-10"`` -> [3, 5, 8, 9, 10]; anything else is a one-line error naming ``option``."""
    values: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",")):
            low, dash, high = part.partition("-") if not part.startswith("-") else (part, "", "")
            values += list(range(int(low), int(high) + 1)) if dash else [int(part)]
    except ValueError:
        raise ValueError(
            f"{option}: expected integers separated by commas (ranges as 8-10), got {text!r}"
        ) from None
    if not values:
        raise ValueError(f"{option}: expected at least one integer, got {text!r}")
    return values


@app.command("intervene")
def intervene(
    generator: Annotated[
        Path, typer.Option("--generator", "-g", help="GAN run folder (`genxai train-gan`).")
    ],
    layer: Annotated[str, typer.Option("--layer", "-l", help="Generator layer, e.g. blocks.2.")],
    units: Annotated[str, typer.Option("--units", "-u", help="Units (channels): 3,7 or 0-4.")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for the images, intervention.json, report.html.")
    ],
    mode: Annotated[
        str, typer.Option("--mode", help="ablate (units := 0) or insert (units := k).")
    ] = "ablate",
    value: Annotated[float | None, typer.Option("--value", help="insert: k for every unit.")] = None,
    value_concept: Annotated[
        str | None,
        typer.Option(
            "--value-concept", help="insert: k = each unit's mean activation where this concept is."
        ),
    ] = None,
    box: Annotated[
        str | None, typer.Option("--box", help="Only inside top,left,bottom,right (layer pixels, half-open).")
    ] = None,
    segmenter: Annotated[
        Path | None, typer.Option("--segmenter", "-s", help="Segmenter folder: ACE per concept.")
    ] = None,
    n: Annotated[int, typer.Option("--n", help="Seeded samples for the ACE (those of `dissect`).")] = 64,
    show: Annotated[int, typer.Option("--show", help="Samples in the before/after grid.")] = 8,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the latents.")] = 0,
    device: Device = "auto",
) -> None:
    """Ablate or insert units of a generator's layer: before/after images and the ACE per concept."""
    try:
        from genxai.jobs.interventions import run_intervention

        location = tuple(parse_ints(box, "--box")) if box is not None else None
        if location is not None and len(location) != 4:
            raise ValueError(f"--box: expected top,left,bottom,right (4 integers), got {box!r}")
        results = run_intervention(
            generator,
            layer,
            parse_ints(units, "--units"),
            out,
            mode=mode,
            value=value,
            value_concept=value_concept,
            location=location,
            segmenter=segmenter,
            num_samples=n,
            show=show,
            batch_size=batch_size,
            seed=seed,
            device=_device(device),
        )
    except USER_ERRORS as err:
        raise fail(err) from None
    typer.echo(
        f"{mode} units {results['units']} of {results['layer']}: mean pixel change "
        f"{results['pixel_change']:.4f}; wrote {out}/ (before_after.png, intervention.json, report.html)"
    )
    typer.echo(json.dumps({"out": str(out), "units": results["units"], "ace": results["ace"]}))


@app.command("repair")
def repair(
    generator: Annotated[
        Path, typer.Option("--generator", "-g", help="GAN run folder (`genxai train-gan`).")
    ],
    layers: Annotated[
        str, typer.Option("--layers", "-l", help="Layers to correct in order: blocks.1,blocks.2.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for repair.json, images, report.html.")],
    units_per_layer: Annotated[
        str,
        typer.Option("--units-per-layer", "-k", help="Units ablated per layer: one number or one per layer."),
    ] = "4",
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="tousi (classifier Grad-CAM, layer by layer) or dissection (FID of each unit's top samples).",
        ),
    ] = "tousi",
    top: Annotated[int, typer.Option("--top", help="dissection: top samples per unit for its FID.")] = 50,
    classifier: Annotated[
        Path | None,
        typer.Option("--classifier", help="Artifact classifier folder (default: trained on the run's data)."),
    ] = None,
    classifier_iterations: Annotated[
        int, typer.Option("--classifier-iterations", help="Steps when training the classifier.")
    ] = 300,
    classifier_width: Annotated[
        int,
        typer.Option("--classifier-width", help="Channels of the classifier's first conv when training it."),
    ] = 32,
    n: Annotated[int, typer.Option("--n", help="Seeded samples scored per layer.")] = 500,
    eval_samples: Annotated[
        int | None,
        typer.Option("--eval-samples", help="Held-out samples for the artifact score (default --n)."),
    ] = None,
    fid_samples: Annotated[
        int, typer.Option("--fid-samples", help="Samples for FID before/after (0: none).")
    ] = 0,
    features: Annotated[
        str, typer.Option("--features", help="FID features: auto, inception, classifier.")
    ] = "auto",
    inception: Annotated[
        Path | None, typer.Option("--inception", help="TorchScript FID Inception file.")
    ] = None,
    real_images: Annotated[int, typer.Option("--real-images", help="Real images for FID (0: all).")] = 0,
    show: Annotated[int, typer.Option("--show", help="Samples in the before/after grid.")] = 8,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the latents.")] = 0,
    device: Device = "auto",
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bar.")] = True,
) -> None:
    """Artifact correction: find each layer's artifact units, ablate them, report artifact score and FID."""
    try:
        from genxai.jobs.interventions import run_repair

        names = [name.strip() for name in layers.split(",") if name.strip()]
        counts = parse_ints(units_per_layer, "--units-per-layer")
        results = run_repair(
            generator,
            names,
            out,
            units_per_layer=counts[0] if len(counts) == 1 else counts,
            method=method,
            top=top,
            classifier=classifier,
            classifier_iterations=classifier_iterations,
            classifier_width=classifier_width,
            num_samples=n,
            eval_samples=eval_samples,
            fid_samples=fid_samples,
            features=features,
            inception=inception,
            real=real_images,
            show=show,
            batch_size=batch_size,
            seed=seed,
            device=_device(device),
            progress=progress,
        )
    except USER_ERRORS as err:
        raise fail(err) from None
    finally:
        end_process_group()
    for row in results["table"]:
        typer.echo("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    typer.echo(json.dumps({"out": str(out), "units": results["units"], "table": results["table"]}))


@app.command("dissect-unet")
def dissect_unet(
    run: Annotated[Path, typer.Option("--run", "-r", help="Diffusion run folder (`genxai train`).")],
    layer: Annotated[
        str, typer.Option("--layer", "-l", help="UNet block, e.g. mid.blocks.0 or down.1.blocks.0.")
    ],
    segmenter: Annotated[Path, typer.Option("--segmenter", "-s", help="Folder of `genxai train-segmenter`.")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for results.json, emergence.png, report.html.")
    ],
    timesteps: Annotated[
        str | None,
        typer.Option("--timesteps", "-t", help="Timesteps DDIM visits, e.g. 950,700,450,200,0 (default: 5)."),
    ] = None,
    steps: Annotated[int, typer.Option("--steps", help="DDIM steps (eta 0).")] = 20,
    n: Annotated[int, typer.Option("--n", help="Samples dissected.")] = 200,
    ace_samples: Annotated[
        int, typer.Option("--ace-samples", help="Samples per ablation for the ACE over t (0: none).")
    ] = 32,
    ace_units: Annotated[int, typer.Option("--ace-units", help="Best units ablated per concept and t.")] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images sampled at once.")] = 32,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the noise.")] = 0,
    iou_bar: Annotated[
        float, typer.Option("--iou-bar", help="IoU above which a unit is interpretable.")
    ] = 0.04,
    iqr_bar: Annotated[
        float, typer.Option("--iqr-bar", help="IQR a unit's best concept must also pass.")
    ] = 0.01,
    device: Device = "auto",
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bar.")] = True,
) -> None:
    """Dissect a diffusion UNet's block per timestep: concepts per unit at each t, and ACE over t."""
    try:
        from genxai.core.checks import check_positive_int
        from genxai.jobs.dissection import run_timestep_dissection

        chosen = parse_ints(timesteps, "--timesteps") if timesteps is not None else None
        check_positive_int(n, "--n")
        check_positive_int(steps, "--steps")
        check_positive_int(batch_size, "--batch-size")
        check_positive_int(ace_samples, "--ace-samples", minimum=0)
        results = run_timestep_dissection(
            run,
            layer,
            segmenter,
            out,
            timesteps=chosen,
            steps=steps,
            num_samples=n,
            batch_size=batch_size,
            seed=seed,
            ace_samples=ace_samples,
            ace_units=ace_units,
            iou_bar=iou_bar,
            iqr_bar=iqr_bar,
            device=_device(device),
            progress=progress,
        )
    except USER_ERRORS as err:
        raise fail(err) from None
    for record in results["per_timestep"]:
        typer.echo(f"t={record['t']}: {record['interpretable']} of {results['units']} units interpretable")
    typer.echo(json.dumps({"out": str(out), "timesteps": results["timesteps"], "units": results["units"]}))
