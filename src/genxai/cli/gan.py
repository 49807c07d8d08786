"""Commands: train-gan, sample-gan (a DCGAN to explain and dissect).

    genxai train-gan --config gan-shapes train.iterations=3000
    genxai sample-gan --run runs/gan-shapes --n 64 --seed 1

User errors print one line ``error: ...`` and exit with code 2; a NaN loss exits with code 1.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer

from genxai.cli.app import USER_ERRORS, app, fail, train_command


@app.command("train-gan")
def train_gan(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="GAN config YAML or a shipped name (gan-shapes).")
    ],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="Dotted key=value overrides, e.g. train.iterations=3000 name=long."),
    ] = None,
) -> None:
    """Train a DCGAN (resumes the run folder's newest checkpoint).

    The run folder is out_dir/name. SIGTERM or Ctrl-C saves a checkpoint and stops with exit code
    143 or 130; run the same command again to continue (or with a larger train.iterations to train longer).
    """
    from genxai.gan.config import load_gan_config
    from genxai.gan.trainer import GANTrainer

    train_command(lambda: GANTrainer(load_gan_config(config, overrides or [])))


@app.command("sample-gan")
def sample_gan(
    run: Annotated[Path, typer.Option("--run", "-r", help="Run folder written by `genxai train-gan`.")],
    n: Annotated[int, typer.Option("--n", help="Number of images.")] = 64,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the latents (image i is the same for any --n).")
    ] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per batch.")] = 64,
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="Use the EMA generator.")] = True,
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", help="A checkpoint folder of the run [default: newest].")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output folder [default: RUN/samples-SEED].")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Sample a trained GAN: grid.png (the first 64 images) and one PNG per image in images/."""
    import torch
    from torchvision.utils import save_image

    from genxai.core.checks import check_positive_int
    from genxai.gan.pipeline import find_checkpoint, load_generator, sample

    try:
        check_positive_int(n, "--n")
        check_positive_int(batch_size, "--batch-size")
        check_positive_int(seed, "--seed", minimum=0)
        if device not in ("auto", "cpu") and not device.startswith("cuda"):
            raise ValueError(f"--device: expected auto, cpu or cuda[:N], got {device!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device: {device} is not available on this machine; use cpu or auto")
        dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        path = find_checkpoint(run, checkpoint)
        generator = load_generator(run, use_ema=ema, device=dev, checkpoint_path=path)
        out = out or run / f"samples-{seed}"
        (out / "images").mkdir(parents=True, exist_ok=True)
    except USER_ERRORS as err:
        raise fail(err) from None
    grid, count = [], 0
    for batch in sample(generator, n, seed=seed, batch_size=batch_size):
        batch = batch.cpu()
        shown = sum(len(g) for g in grid)
        if shown < 64:
            grid.append(batch[: 64 - shown])
        for image in batch:
            save_image(image, out / "images" / f"{count:06d}.png")
            count += 1
    images = torch.cat(grid)
    save_image(images, out / "grid.png", nrow=max(1, int(math.sqrt(len(images)) + 0.5)))
    typer.echo(json.dumps({"out": str(out), "images": count, "seed": seed, "checkpoint": str(path)}))
