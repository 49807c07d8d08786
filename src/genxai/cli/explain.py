"""Commands: explain, report, demo.

User errors (unknown method, model or layer; missing or empty image folder) print one line
``error: ...`` and exit with code 2, without a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import click
import typer
from typer.core import TyperCommand

from genxai.cli.app import app, end_process_group, fail, warnings_as_lines

DEVICES = ("auto", "cpu", "cuda")


class MethodsInHelp(TyperCommand):
    """A command whose ``--method`` help lists the registered methods (looked up for --help only,
    so other commands start without importing torch)."""

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from genxai.attribution import names

        for param in self.params:
            if param.name == "method" and "Methods:" not in (param.help or ""):
                param.help = f"{param.help} Methods: {', '.join(names())}."
        super().format_help(ctx, formatter)


@app.command(cls=MethodsInHelp)
def explain(
    images: Annotated[
        Path | None, typer.Option("--images", "-i", help="Folder of images (searched recursively).")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder to write.")] = Path("runs/explain"),
    model: Annotated[
        str, typer.Option("--model", "-m", help="torchvision model name or genxai checkpoint folder.")
    ] = "resnet18",
    method: Annotated[
        list[str] | None,
        typer.Option(
            "--method",
            help="Attribution method, repeat for several; 'all' for every registered one (default: gradcam).",
        ),
    ] = None,
    layer: Annotated[
        str | None, typer.Option("--layer", help="Layer of the CAM-style methods (default: last conv block).")
    ] = None,
    target: Annotated[
        int | None, typer.Option("--target", help="Class to explain (default: each image's prediction).")
    ] = None,
    size: Annotated[
        int | None,
        typer.Option(
            "--size",
            help="Images are center-cropped and resized to SIZE x SIZE (default: a checkpoint's "
            "own input size, 224 for torchvision models).",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per batch.")] = 16,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    weights: Annotated[
        Path | None,
        typer.Option(
            "--weights",
            help="Local weights of a torchvision model (.safetensors or a torch state dict); "
            "without it the model has random weights.",
        ),
    ] = None,
    classes: Annotated[
        int, typer.Option("--classes", help="Number of classes of a torchvision model.")
    ] = 1000,
    metrics: Annotated[
        bool, typer.Option("--metrics/--no-metrics", help="Compute faithfulness metrics.")
    ] = True,
    curve_steps: Annotated[
        int, typer.Option("--curve-steps", help="Steps of the deletion/insertion curves.")
    ] = 32,
    cmap: Annotated[
        str, typer.Option("--cmap", help="Colormap of the overlays (jet, inferno, ...).")
    ] = "jet",
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="YAML of run settings (ExplainConfig fields), applied over the options."
        ),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            help="Dotted key=value overrides, last, e.g. options.rise.masks=1000 methods=[gradcam,rise]."
        ),
    ] = None,
) -> None:
    """Explain a classifier's decisions on a folder of images: overlays, raw maps, metrics, report.

    Many images: `accelerate launch --multi_gpu --num_processes N -m genxai.cli explain ...` runs N processes, each explaining its share (add --device cpu to run them on CPUs); an error on one process stops all of them with that error.
    """
    from genxai.core.checks import check_choice

    try:
        check_choice(device, "--device", DEVICES)
    except ValueError as err:
        raise fail(err) from None
    from genxai.config import load_config
    from genxai.jobs.explain import ExplainConfig, run_explain

    cfg = ExplainConfig(
        model=model,
        weights=str(weights) if weights else None,
        classes=classes,
        images=str(images) if images else "",
        out=str(out),
        methods=list(method or ["gradcam"]),
        layer=layer,
        target=target,
        size=size,
        batch_size=batch_size,
        device=device,
        metrics=metrics,
        curve_steps=curve_steps,
        cmap=cmap,
    )
    try:
        if config is not None or overrides:
            cfg = load_config(cfg, config, overrides or [])
        if not cfg.images:
            raise ValueError("--images: a folder of images is required (or images: in --config)")
        with warnings_as_lines():  # e.g. a torchvision model without --weights has random weights
            run_dir = run_explain(cfg)
        from accelerate import PartialState

        main = PartialState().is_main_process
    except (ValueError, FileNotFoundError) as err:
        raise fail(err) from None
    finally:
        end_process_group()
    if main:
        typer.echo(f"wrote {run_dir}/ (overlays/, maps/, metrics.json, metrics.csv, report.html)")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="Folder of an explain, demo or ablate run.")],
    embed: Annotated[
        bool, typer.Option("--embed/--link", help="Inline the images (one portable file).")
    ] = False,
    max_images: Annotated[int, typer.Option("--max-images", help="Rows of the image grid.")] = 24,
) -> None:
    """Build RUN_DIR/report.html: the image x method grid, the metric table and the run config."""
    from genxai.jobs.demo import is_demo, write_demo_report
    from genxai.jobs.diffusion import write_ablation_report
    from genxai.jobs.explain import explain_sections
    from genxai.report.html import build_report

    try:
        if (run_dir / "results.json").is_file():  # a `genxai ablate` folder
            path = write_ablation_report(run_dir, embed=embed)
        elif is_demo(run_dir):  # both parts of the demo, not only its explanations
            path = write_demo_report(run_dir, embed=embed)
        else:
            path = build_report(run_dir, explain_sections(run_dir, max_images=max_images), embed=embed)
    except (ValueError, FileNotFoundError) as err:
        raise fail(err) from None
    typer.echo(f"wrote {path}")


@app.command(cls=MethodsInHelp)
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder to write.")] = Path("runs/demo"),
    size: Annotated[int, typer.Option("--size", help="Image side in pixels.")] = 32,
    epochs: Annotated[int, typer.Option("--epochs", help="Training epochs.")] = 3,
    train_images: Annotated[int, typer.Option("--train-images", help="Shapes images to train on.")] = 2400,
    images: Annotated[int, typer.Option("--images", help="Held-out images to explain.")] = 12,
    method: Annotated[
        list[str] | None, typer.Option("--method", help="Methods to run (default: all registered).")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    diffusion: Annotated[
        bool, typer.Option("--diffusion/--no-diffusion", help="Run the XAI-guided diffusion part first.")
    ] = True,
) -> None:
    """The main job at toy scale, a few CPU minutes: XAI-guided diffusion, then every explanation method.

    Trains the demo diffusion config as the baseline and the noise+hierarchical variant on the same
    budget and seeds, then a small CNN on the bundled shapes explained with every method; one report.
    """
    from genxai.core.checks import check_choice

    try:
        check_choice(device, "--device", ("cpu", "cuda"))
        from genxai.jobs.demo import run_demo

        path = run_demo(
            out,
            size=size,
            epochs=epochs,
            train_images=train_images,
            explain_images=images,
            methods=method or ["all"],
            device=device,
            diffusion=diffusion,
        )
    except (ValueError, FileNotFoundError) as err:
        raise fail(err) from None
    typer.echo(f"wrote {path}")
