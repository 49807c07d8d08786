"""Every command of the README's "Command line" block, run as written on a `make demo`-like folder.

The commands are read from README.md, so a command edited there is the command tested. They run in
one folder holding what the README assumes: ``runs/demo`` (the demo's output), ``DIR`` (images),
``resnet18.pth`` (local weights), ``ckpt/`` (a genxai checkpoint: the demo's classifier) and
``configs/``. The fast test builds the demo folder at toy scale and appends small-budget options
to each command (later options and overrides win); the long test runs ``make demo``'s command and
then every README command exactly as written.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from genxai.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

DIFFUSION_TINY = [
    "data.image_size=8",
    "data.limit=96",
    "model.base_channels=16",
    "model.channel_mults=[1,2]",
    "model.num_res_blocks=1",
    "model.attention_resolutions=[4]",
    "discriminator.base_channels=8",
    "cycle.phase_a=2",
    "cycle.phase_b=2",
    "cycle.cycles=1",
    "train.batch_size=8",
    "train.log_every=2",
    "train.sample_every=2",
    "train.eval_every=6",
    "train.progress=false",
    "eval.num_samples=16",
    "eval.batch_size=16",
    "eval.real_images=64",
    "sample.steps=4",
    "sample.num_images=8",
]
GAN_TINY = [
    "data.image_size=16",
    "model.latent_dim=8",
    "model.g_channels=8",
    "model.d_channels=8",
    "train.batch_size=8",
    "train.iterations=4",
    "train.log_every=2",
    "train.sample_every=4",
    "train.checkpoint_every=100",
    "train.progress=false",
    "data.limit=64",
]
SEGMENTER_TINY = [
    "--size",
    "16",
    "--images",
    "32",
    "--iterations",
    "3",
    "--batch-size",
    "16",
    "--width",
    "4",
    "--eval-images",
    "8",
]
SMALL_METHODS = [
    "options.rise.masks=32",
    "options.rise.batch_size=32",
    "options.scorecam.batch_size=64",
    "options.occlusion.window=8",
    "options.occlusion.stride=8",
    "options.lime.samples=16",
    "options.kernelshap.samples=16",
    "options.smoothgrad.samples=2",
    "options.integratedgradients.steps=4",
    "options.classmodel.steps=2",
    "--curve-steps",
    "4",
]


def readme_commands() -> list[list[str]]:
    """The commands of the README's "Command line" block: comments and optional ``[...]`` parts off."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Command line", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.splitlines():
        line = re.sub(r"\s*\[[^\]]*\]", "", re.sub(r"\s+#.*$", "", line)).strip()
        if line:
            commands.append(shlex.split(line))
    return commands


def small(command: list[str]) -> list[str]:
    """Options appended in the fast test so each command runs in seconds."""
    name = command[1]
    if name == "explain":
        return ["--size", "32", *SMALL_METHODS] if "resnet18" in command else SMALL_METHODS
    return {
        "train": DIFFUSION_TINY,
        "fid": ["--n", "16", "--real-images", "64"],
        "ablate": [
            *DIFFUSION_TINY,
            "ablation.variants=[baseline,noise+hierarchical]",
            "ablation.baselines=[]",
            "ablation.measure_costs=false",
        ],
        "train-gan": GAN_TINY,
        "train-segmenter": SEGMENTER_TINY,
        "dissect": ["--n", "24", "--batch-size", "8", "--device", "cpu"],
    }.get(name, [])


@contextlib.contextmanager
def inside(folder: Path) -> Iterator[Path]:
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(before)


def workspace(folder: Path) -> Path:
    """What the README's commands assume besides ``runs/demo``: DIR, resnet18.pth, configs/."""
    from genxai.data.shapes import ShapesDataset
    from genxai.report.figures import save_png

    torch.manual_seed(0)
    shapes = ShapesDataset(3, 32, 7)
    for i in range(3):
        save_png(shapes[i][0], folder / "DIR" / ("sub" if i == 2 else "") / f"img{i}.png")
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), folder / "resnet18.pth")
    (folder / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    return folder


def run_readme(folder: Path, *, fast: bool) -> dict[str, str]:
    """Run every README command in ``folder``; returns {command: its output}. Each must exit 0."""
    shutil.copytree(folder / "runs" / "demo" / "model", folder / "ckpt")  # "a genxai checkpoint"
    outputs = {}
    with inside(folder):
        for command in readme_commands():
            assert command[0] == "genxai", command
            args = command[1:] + (small(command) if fast else [])
            out = runner.invoke(app, args)
            shown = shlex.join(command)
            assert out.exit_code == 0, f"{shown}\n{out.output[-3000:]}"
            assert "Traceback" not in out.output, shown
            outputs[shown] = out.output
    return outputs


def check_outputs(folder: Path, outputs: dict[str, str]) -> None:
    """What each command says it writes is there."""
    runs = folder / "runs"
    assert json.loads((runs / "x" / "metrics.json").read_text())["methods"]
    assert (runs / "x" / "report.html").is_file()
    assert (runs / "ns" / "config.yaml").is_file() and any((runs / "ns" / "checkpoints").iterdir())
    assert len(list((runs / "ns" / "samples-0" / "images").glob("*.png"))) == 64
    fid = next(text for command, text in outputs.items() if command.startswith("genxai fid"))
    last = fid.strip().splitlines()[-1]  # a progress bar may share the line
    result = json.loads(last[last.index("{") :])
    assert any(key.startswith("FID") and value >= 0 for key, value in result.items())
    assert (runs / "demo" / "diffusion" / "noise+hierarchical" / "samples-0" / "grid.png").is_file()
    ablate = next(command for command in outputs if command.startswith("genxai ablate"))
    report = next(line for line in outputs[ablate].splitlines() if line.startswith("report: "))
    assert (folder / report.removeprefix("report: ")).is_file()
    assert "genxai demo" in (runs / "demo" / "report.html").read_text(), "a README command overwrote the demo"
    assert (runs / "seg").is_dir() and (runs / "dissect" / "report.html").is_file()


def test_readme_block_is_read():
    commands = readme_commands()
    names = [c[1] for c in commands]
    for name in ("explain", "report", "train", "sample", "fid", "ablate", "train-gan", "sample-gan"):
        assert name in names
    assert all("#" not in token and "[" not in token for c in commands for token in c)


def test_readme_commands_on_a_toy_demo_folder(tmp_path):
    """Each README command as written (plus small budgets) exits 0 and writes what it says.

    The demo folder is laid out as `make demo` lays it out, at toy scale: its classifier part by
    the demo job, its diffusion run trained as the demo trains it (the demo config, same folder);
    the long test below runs the demo itself.
    """
    from genxai.jobs.demo import run_demo

    folder = workspace(tmp_path)
    with inside(folder):
        run_demo(
            "runs/demo",
            size=16,
            train_images=120,
            epochs=1,
            explain_images=2,
            methods=["gradcam"],
            progress=False,
            diffusion=False,
        )
        variant = "noise+hierarchical"
        args = ["train", "--config", "demo", *DIFFUSION_TINY, "eval.num_samples=0", f"variant={variant}"]
        out = runner.invoke(app, [*args, "out_dir=runs/demo/diffusion", f"name={variant}"])
        assert out.exit_code == 0, out.output
    check_outputs(folder, run_readme(folder, fast=True))


@pytest.mark.long
def test_readme_commands_after_make_demo(tmp_path):
    """`make demo`, then every README command exactly as written (about an hour on 2 CPU cores)."""
    folder = workspace(tmp_path)
    make = (ROOT / "Makefile").read_text()
    demo = shlex.split(re.search(r"^demo:.*\n\t(.*)$", make, re.M).group(1))
    assert demo[0].endswith("genxai"), demo
    with inside(folder):
        out = runner.invoke(app, demo[1:])
        assert out.exit_code == 0, out.output[-3000:]
    check_outputs(folder, run_readme(folder, fast=False))
