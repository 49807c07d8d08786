"""Command: export (a trained run as a diffusers DDPMPipeline folder).

    genxai export --run runs/demo --out exported/demo
    python -c "from diffusers import DDPMPipeline; DDPMPipeline.from_pretrained('exported/demo')"

User errors print one line ``error: ...`` and exit with code 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from genxai.cli.app import USER_ERRORS, app, fail


@app.command()
def export(
    run: Annotated[Path, typer.Option("--run", "-r", help="Run folder written by `genxai train`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The diffusers folder to write (new or empty).")],
    checkpoint: Annotated[
        Path | None,
        typer.Option("--checkpoint", help="A checkpoint folder of the run (default: the newest)."),
    ] = None,
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="Export the EMA weights.")] = True,
) -> None:
    """Write a run's UNet (EMA weights) and noise schedule as a diffusers DDPMPipeline folder.

    model_index.json, unet/ (config.json + diffusion_pytorch_model.safetensors) and scheduler/
    (a DDPMScheduler set as genxai's DDPM sampler). Runs with saliency attention maps (noise+same,
    noise+hierarchical) have no UNet2DModel equivalent and are refused.
    """
    from genxai.diffusion.interop import export_run

    try:
        folder = export_run(run, out, checkpoint_path=checkpoint, use_ema=ema)
    except USER_ERRORS as err:
        raise fail(err) from None
    typer.echo(json.dumps({"run": str(run), "out": str(folder), "pipeline": "DDPMPipeline"}))
