"""The command line's basics: ``--version``, the method names in ``explain --help``, and every
option with a fixed set of choices rejecting a misspelt value with one ``error:`` line, exit 2."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import genxai
from genxai.attribution import names
from genxai.cli import app

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs" / "demo.yaml")

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"genxai {genxai.__version__}"


@pytest.mark.parametrize("command", ["explain", "demo"])
def test_help_lists_the_method_names(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    listed = result.output.split("Methods:", 1)[1].split(".", 1)[0]
    assert re.sub(r"[\s│]", "", listed).split(",") == names()  # wrapped in the help's box


# (command line, the option named in the error); paths need not exist: choices are checked first
CHOICES = [
    (["explain", "--images", "x", "--device", "cpuu"], "--device: expected one of 'auto', 'cpu', 'cuda'"),
    (["explain", "--images", "x", "--method", "gradcma"], "unknown name 'gradcma'"),
    (["demo", "--device", "gpu"], "--device: expected one of 'cpu', 'cuda'"),
    (["demo", "--method", "salincy"], "unknown name 'salincy'"),
    (["sample", "--run", "r", "--format", "jpg"], "--format: expected one of 'png', 'safetensors'"),
    (["sample", "--run", "r", "--sampler", "ddimm"], "--sampler: expected one of 'ddpm', 'ddim'"),
    (["sample", "--run", "r", "--device", "tpu"], "--device: expected one of 'auto', 'cpu', 'cuda'"),
    (["fid", "--run", "r", "--features", "incepton"], "--features: expected one of 'auto', 'inception'"),
    (["fid", "--run", "r", "--sampler", "dddpm"], "--sampler: expected one of 'ddpm', 'ddim'"),
    (["fid", "--run", "r", "--device", "gpu"], "--device: expected one of 'auto', 'cpu', 'cuda'"),
    (["ablate", "--config", DEMO, "--variants", "baseline,noize"], "--variants: expected one of 'baseline'"),
    (["train", "--config", DEMO, "variant=noize"], "variant: expected one of 'baseline'"),
]


@pytest.mark.parametrize(("args", "message"), CHOICES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in CHOICES])
def test_a_misspelt_choice_is_one_error_line(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing is written where the tests run
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output and list(tmp_path.iterdir()) == []
