"""Commands: train, sample, fid, ablate (XAI-guided diffusion).

    genxai train --config configs/demo.yaml variant=noise+same train.batch_size=64
    genxai sample --run runs/demo --n 64
    genxai fid --run runs/demo --n 1000
    genxai ablate --config configs/demo.yaml

Several GPUs or nodes: ``accelerate launch --multi_gpu -m genxai.cli train --config ...``.
User errors print one line ``error: ...`` and exit with code 2; a NaN loss exits with code 1; a
training run stopped by SIGINT/SIGTERM (checkpoint saved) exits with 130/143, as shells report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from genxai.cli.app import USER_ERRORS, app, end_process_group, exit_code, fail, train_command

Overrides = Annotated[
    list[str] | None,
    typer.Argument(
        help="Dotted key=value overrides of the config, e.g. variant=noise+same train.batch_size=64."
    ),
]
ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="Experiment YAML (configs/demo.yaml, ...).")
]
RunOption = Annotated[Path, typer.Option("--run", "-r", help="Run folder written by `genxai train`.")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
DEVICES = ("auto", "cpu", "cuda")
FORMATS = ("png", "safetensors")


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _check_choices(**options: tuple[str | None, tuple[str, ...]]) -> None:
    """Each ``--option`` value (None: not given) among its choices, before any work; else fail."""
    from genxai.core.checks import check_choice

    try:
        for name, (value, choices) in options.items():
            if value is not None:
                check_choice(value, f"--{name.replace('_', '-')}", choices)
    except ValueError as err:
        raise fail(err) from None


@app.command()
def train(config: ConfigOption, overrides: Overrides = None) -> None:
    """Train one variant of an experiment config (resumes the run folder's newest checkpoint).

    The run folder is out_dir/name. SIGTERM or Ctrl-C saves a checkpoint and stops with exit code
    143 or 130; run the same command again to continue.
    """
    from genxai.diffusion.config import load_experiment
    from genxai.diffusion.trainer import Trainer

    train_command(lambda: Trainer(load_experiment(config, overrides or [])))


def _check_sampling(
    cfg, n: int | None, batch_size: int | None, sampler: str | None, steps: int | None, eta: float | None
) -> None:
    """The sampling options against the run (0 is an error, not "the default")."""
    from genxai.core.checks import check_choice, check_positive_int
    from genxai.diffusion.sampling import SAMPLERS

    if n is not None:
        check_positive_int(n, "--n")
    if batch_size is not None:
        check_positive_int(batch_size, "--batch-size")
    if sampler is not None:
        check_choice(sampler, "--sampler", SAMPLERS)
    if steps is not None and not 1 <= steps <= cfg.schedule.num_timesteps:
        raise ValueError(f"--steps: expected 1 <= steps <= {cfg.schedule.num_timesteps} (T), got {steps}")
    if eta is not None and not eta >= 0:
        raise ValueError(f"--eta: expected a number >= 0, got {eta}")


DiffusersOption = Annotated[
    Path | None,
    typer.Option(
        "--diffusers",
        help="A local diffusers model folder (DDPMPipeline/DDIMPipeline or UNet2DModel) instead of --run.",
    ),
]


def _load(run: Path | None, diffusers: Path | None, device: str, **run_options):
    """(the run or the imported diffusers model as a LoadedRun, its sampler options, its folder)."""
    from genxai.diffusion.pipeline import LoadedRun, load_run

    if (run is None) == (diffusers is None):
        raise ValueError(
            "--run, --diffusers: give exactly one (a genxai run folder or a diffusers model folder)"
        )
    if run is not None:
        return load_run(run, device=device, **run_options), None, run
    if run_options.get("checkpoint_path") is not None:
        raise ValueError("--checkpoint: a checkpoint of a run; not with --diffusers")
    from genxai.diffusion.interop import from_diffusers

    imported = from_diffusers(diffusers, device=device)
    for note in imported.notes:
        typer.echo(f"note: {note}", err=True)
    loaded = LoadedRun(imported.cfg, imported.unet, None, imported.schedule, imported.folder)
    return loaded, imported.sampler_options, diffusers


@app.command()
def sample(
    run: Annotated[
        Path | None, typer.Option("--run", "-r", help="Run folder written by `genxai train`.")
    ] = None,
    diffusers: DiffusersOption = None,
    n: Annotated[
        int | None, typer.Option("--n", help="Number of images (default: the run's sample.num_images).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Images per sampling batch.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the starting noise.")] = 0,
    sampler: Annotated[str | None, typer.Option("--sampler", help="ddpm (all T steps) or ddim.")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="DDIM steps.")] = None,
    eta: Annotated[float | None, typer.Option("--eta", help="DDIM eta (0: deterministic).")] = None,
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="Use the EMA weights.")] = True,
    guidance: Annotated[
        float, typer.Option("--guidance", help="Discriminator Guidance weight with the run's D (0: off).")
    ] = 0.0,
    saliency_every: Annotated[
        int | None,
        typer.Option(
            "--saliency-every", help="Attention variants: D's saliency map every k steps (0: all-ones)."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output folder (default: RUN/samples-SEED).")
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="png (grid + one PNG per image) or safetensors.")
    ] = "png",
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", help="A checkpoint folder of the run.")
    ] = None,
    device: DeviceOption = "auto",
    explain: Annotated[
        bool,
        typer.Option(
            "--explain/--no-explain", help="Also write saliency.png: where the run's D sees 'fake'."
        ),
    ] = True,
) -> None:
    """Sample images from a trained run (or a diffusers model folder): a PNG grid plus PNGs or one
    .safetensors tensor.

    EMA weights, isotropic N(0, I) start, generated batch by batch; optional Discriminator
    Guidance with the run's D and saliency attention maps for the attention variants. Runs with a
    discriminator also get saliency.png: samples over D's fake-score saliency. A diffusers model
    samples with its scheduler's settings (DDPM: all T steps; --sampler ddim for fewer).
    """
    from genxai.diffusion.guidance import DiscriminatorGuidance
    from genxai.diffusion.pipeline import sample_run
    from genxai.diffusion.sampling import SAMPLERS

    _check_choices(format=(fmt, FORMATS), sampler=(sampler, SAMPLERS), device=(device, DEVICES))
    try:
        loaded, options, source = _load(
            run, diffusers, _device(device), checkpoint_path=checkpoint, use_ema=ema
        )
        cfg = loaded.cfg
        _check_sampling(cfg, n, batch_size, sampler, steps, eta)
        if saliency_every is not None and saliency_every < 0:
            raise ValueError(f"--saliency-every: expected an integer >= 0, got {saliency_every}")
    except USER_ERRORS as err:
        raise fail(err) from None
    n = n or cfg.sample.num_images
    hook = None
    if guidance:
        if loaded.discriminator is None:
            raise fail(ValueError(f"--guidance: the {cfg.variant} run has no discriminator"))
        if not cfg.discriminator.time_aware:
            typer.echo("note: the run's D is not time-aware; guidance uses its judgement of x0_hat", err=True)
        hook = DiscriminatorGuidance(loaded.discriminator, loaded.schedule, guidance, on="x0_hat")
    out = out or source / f"samples-{seed}"
    try:
        (out / "images" if fmt == "png" else out).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise fail(err) from None
    batches = sample_run(
        cfg,
        loaded.unet,
        loaded.schedule,
        loaded.discriminator,
        num_images=n,
        seed=seed,
        batch_size=batch_size,
        sampler=sampler,
        steps=steps,
        eta=eta,
        saliency_every=saliency_every,
        guidance=hook,
        progress=True,
        sampler_options=options,
    )
    try:
        result = _write_samples(batches, out, fmt, loaded, source, seed, explain)
    except USER_ERRORS as err:
        raise fail(err) from None
    typer.echo(json.dumps(result))


def _write_samples(
    batches: Iterator, out: Path, fmt: str, loaded, run: Path, seed: int, explain: bool
) -> dict:
    """Save the sampled batches as PNGs (+ grid) or one safetensors file, and saliency.png."""
    import torch
    from safetensors.torch import save_file
    from torchvision.utils import save_image

    cfg = loaded.cfg
    grid, stored, count = [], [], 0
    for batch in batches:
        batch = batch.cpu()
        if sum(len(g) for g in grid) < 64:
            grid.append(batch[: 64 - sum(len(g) for g in grid)])
        if fmt == "png":
            for image in batch:
                save_image(image, out / "images" / f"{count:06d}.png")
                count += 1
        else:
            stored.append((batch * 255).round().to(torch.uint8))
            count += len(batch)
    grid_images = torch.cat(grid)
    save_image(grid_images, out / "grid.png", nrow=max(1, int(math.sqrt(len(grid_images)) + 0.5)))
    if fmt == "safetensors":
        meta = {
            "run": str(run),
            "seed": str(seed),
            "range": "uint8 0..255",
            "checkpoint": str(loaded.checkpoint),
        }
        save_file({"images": torch.cat(stored)}, out / "samples.safetensors", metadata=meta)
    result = {"out": str(out), "images": count, "checkpoint": str(loaded.checkpoint)}
    if explain and loaded.discriminator is not None:
        from genxai.jobs.diffusion import fake_saliency_figure

        path = fake_saliency_figure(
            loaded.discriminator,
            grid_images[:32] * 2 - 1,
            out / "saliency.png",
            method=cfg.guidance.saliency_method,
            **cfg.guidance.saliency_options,
        )
        result["saliency"] = str(path)
    return result


def _stored_batches(path: Path, batch_size: int, channels: int) -> Iterator:
    """Images in [0, 1] from a folder of PNGs or a ``samples.safetensors`` file, batch by batch."""
    import torch
    from safetensors import safe_open

    from genxai.data import load_image

    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            images = f.get_slice("images")
            total = images.get_shape()[0]
            for start in range(0, total, batch_size):
                yield images[start : start + batch_size][:, :channels].float() / 255
        return
    files = sorted(p for p in path.rglob("*.png") if p.name != "grid.png")
    if not files:
        raise FileNotFoundError(f"--samples: no PNG images in {path}")
    for start in range(0, len(files), batch_size):
        yield torch.stack([load_image(p, channels=channels) for p in files[start : start + batch_size]])


@app.command()
def fid(
    run: Annotated[
        Path | None, typer.Option("--run", "-r", help="Run folder written by `genxai train`.")
    ] = None,
    diffusers: DiffusersOption = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="With --diffusers: the experiment YAML whose data and eval it uses."
        ),
    ] = None,
    n: Annotated[
        int | None, typer.Option("--n", help="Generated images (default: eval.num_samples or 1000).")
    ] = None,
    samples: Annotated[
        Path | None,
        typer.Option("--samples", help="Use stored samples (a folder of PNGs or samples.safetensors)."),
    ] = None,
    features: Annotated[
        str | None, typer.Option("--features", help="auto, inception or classifier (default: the run's).")
    ] = None,
    inception: Annotated[
        Path | None, typer.Option("--inception", help="TorchScript FID Inception file (e.g. default_1.pt).")
    ] = None,
    classifier: Annotated[
        Path | None, typer.Option("--classifier", help="Offline feature classifier file.")
    ] = None,
    real_images: Annotated[
        int | None, typer.Option("--real-images", help="Real images to compare with (0: the whole data set).")
    ] = None,
    data_root: Annotated[
        Path | None, typer.Option("--data-root", help="Where the run's data set is now.")
    ] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Images per batch.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the generated images.")] = 0,
    sampler: Annotated[str | None, typer.Option("--sampler", help="ddpm or ddim.")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="DDIM steps.")] = None,
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="Use the EMA weights.")] = True,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Also write the result as JSON here.")
    ] = None,
    device: DeviceOption = "auto",
) -> None:
    """FID (and IS where the features allow) of a run's samples against its training data.

    A diffusers model (--diffusers) is compared with the data set of --config. Streamed batch by batch. Offline classifier features are named as such in the result: they
    rank runs on the same data and are not comparable to published (Inception) FIDs.
    """
    from genxai.core.checks import check_choice, check_positive_int
    from genxai.diffusion.config import build_dataset, load_experiment
    from genxai.diffusion.pipeline import sample_run
    from genxai.diffusion.sampling import SAMPLERS
    from genxai.evaluation.fid import FEATURE_KINDS, reference_fid

    _check_choices(features=(features, FEATURE_KINDS), sampler=(sampler, SAMPLERS), device=(device, DEVICES))
    dev = _device(device)
    try:
        if config is not None and diffusers is None:
            raise ValueError("--config: only with --diffusers (a run uses its own config)")
        if diffusers is not None and config is None:
            raise ValueError(
                "--config: with --diffusers, name the experiment YAML whose data set FID compares with"
            )
        loaded, options, source = _load(run, diffusers, dev, use_ema=ema)
        cfg = loaded.cfg
        if config is not None:  # the data and eval settings of --config; sampling stays the model's
            cfg = load_experiment(config)
            image_size, channels = loaded.cfg.data.image_size, loaded.cfg.data.channels
            if cfg.data.image_size != image_size:
                raise ValueError(
                    f"data.image_size: {cfg.data.image_size} in {config}, but the diffusers model's sample_size is {image_size}"
                )
            if cfg.data.channels not in (None, channels):
                raise ValueError(
                    f"data.channels: {cfg.data.channels} in {config}, but the diffusers model makes {channels}"
                )
        _check_sampling(loaded.cfg, n, batch_size, sampler, steps, None)
        if features is not None:
            cfg.eval.features = check_choice(features, "--features", FEATURE_KINDS)
        if inception is not None:
            if not inception.is_file():
                raise FileNotFoundError(f"--inception: file not found: {inception}")
            cfg.eval.inception = str(inception)
        if classifier is not None:
            if not classifier.is_file():
                raise FileNotFoundError(f"--classifier: file not found: {classifier}")
            cfg.eval.classifier = str(classifier)
        if real_images is not None:
            check_positive_int(real_images, "--real-images", minimum=0)
        if samples is not None and not samples.exists():
            raise FileNotFoundError(f"--samples: no such file or folder: {samples}")
        if data_root is not None:
            cfg.data.root = str(data_root)
        dataset = build_dataset(cfg)
        size = batch_size or cfg.eval.batch_size
        cache = run if run is not None else cfg.run_dir
        metric = reference_fid(cfg, dataset, dev, cache, real_images=real_images, batch_size=size)
    except USER_ERRORS as err:
        raise fail(err) from None
    limit = cfg.eval.real_images if real_images is None else real_images
    count = min(len(dataset), limit) if limit else len(dataset)
    if samples is not None:
        fake = _stored_batches(samples, size, cfg.data.channels or 3)
    else:  # as training's evaluation samples: the run's sampler and saliency-conditioned maps
        fake = sample_run(
            loaded.cfg,
            loaded.unet,
            loaded.schedule,
            loaded.discriminator,
            num_images=n or cfg.eval.num_samples or 1000,
            seed=seed,
            batch_size=size,
            sampler=sampler,
            steps=steps,
            progress=True,
            sampler_options=options,
        )
    generated = 0
    try:
        for batch in fake:
            metric.update(batch, real=False)
            generated += len(batch)
    except USER_ERRORS as err:
        raise fail(err) from None
    result = {"run": str(source), "real_images": count, "generated_images": generated, **metric.compute()}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    typer.echo(json.dumps(result))


@app.command()
def ablate(
    config: ConfigOption,
    overrides: Overrides = None,
    variants: Annotated[
        str | None,
        typer.Option("--variants", help="Comma-separated variants (default: ablation.variants, all four)."),
    ] = None,
    seeds: Annotated[
        int | None, typer.Option("--seeds", help="Paired seeds per variant (default: ablation.seeds).")
    ] = None,
    min_snr: Annotated[
        bool | None, typer.Option("--min-snr/--no-min-snr", help="Add the min-SNR-5 baseline (default on).")
    ] = None,
    p2: Annotated[bool | None, typer.Option("--p2/--no-p2", help="Add the P2-weighting baseline.")] = None,
    dg: Annotated[
        bool | None,
        typer.Option("--dg/--no-dg", help="Add the Discriminator Guidance sampler on the baseline."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Ablation folder (default: out_dir/name).")
    ] = None,
) -> None:
    """Train every variant with the same budget, data and paired seeds, then compare them.

    Writes results.json (mean, s.e. and paired bootstrap CIs over seeds; every metric at equal
    cost), results.csv and figures into the ablation folder; rerun the same command to resume.
    """
    from genxai.core.checks import check_choice
    from genxai.diffusion.ablation import run_ablation
    from genxai.diffusion.config import VARIANTS, load_experiment

    try:
        cfg = load_experiment(config, overrides or [])
        a = cfg.ablation
        if variants is not None:
            a.variants = [v.strip() for v in variants.split(",") if v.strip()]
            for v in a.variants:
                check_choice(v, "--variants", VARIANTS)
        for weighting, on in (("min_snr", min_snr), ("p2", p2)):
            if on is not None:
                a.baselines = [b for b in a.baselines if b != weighting] + ([weighting] if on else [])
        if seeds is not None:
            a.seeds = seeds
        if dg is not None:
            a.dg = dg
        results = run_ablation(cfg, out_dir=out, say=lambda text: typer.echo(text, err=True))
    except USER_ERRORS as err:
        raise fail(err) from None
    finally:
        end_process_group()
    code = (
        exit_code({"status": "interrupted", "signal": results.get("signal")}) if results["interrupted"] else 0
    )
    if code:
        typer.echo(
            f"interrupted ({results.get('signal') or 'SIGTERM'}): the current run saved a checkpoint; "
            "rerun the same command to resume",
            err=True,
        )
        if not results.get("runs"):
            raise typer.Exit(code=code)
    name = results["fid_name"]
    typer.echo(f"{'run':<22} {'Processes':>9} {'Processes/s':>11}  {name}")
    for label, r in results["runs"].items():
        value = r["final"].get(name)
        shown = f"{value:.3f}" if value is not None else "-"
        typer.echo(f"{label:<22} {r['processes']:>9} {r['processes_per_s']:>11.2f}  {shown}")
    from genxai.jobs.diffusion import write_ablation_report

    root = out or cfg.run_dir
    typer.echo(f"results: {root / 'results.json'}")
    typer.echo(f"report: {write_ablation_report(root)}")
    if code:
        raise typer.Exit(code=code)
