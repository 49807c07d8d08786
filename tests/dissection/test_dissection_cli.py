"""genxai train-segmenter and genxai dissect end to end (a GAN run folder saved as train-gan saves
it, and the planted generator through a patched loader), and their one-line user errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from genxai.cli import app
from genxai.dissection.segmenter import ShapesSegmenter
from genxai.jobs import dissection as job
from genxai.training import checkpoint
from tests.dissection.planted import CONCEPT_UNIT, Planted, RedSegmenter

runner = CliRunner()


def _gan_run(root, channels=3):
    """A run folder holding an (untrained) generator the way `genxai train-gan` checkpoints it."""
    models = pytest.importorskip("genxai.gan.models")
    torch.manual_seed(0)
    g = models.Generator(latent_dim=8, image_size=16, channels=channels, base_channels=4)
    folder = root / "checkpoints" / "ckpt-00000001"
    folder.mkdir(parents=True)
    checkpoint.write_weights(folder, "generator_ema", g.state_dict(), g.config)
    return root


def _segmenter(root):
    torch.manual_seed(0)
    seg = ShapesSegmenter(width=4, depth=2)
    root.mkdir(parents=True, exist_ok=True)
    checkpoint.write_weights(root, "segmenter", seg.state_dict(), seg.config)
    return root


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_train_segmenter_prints_the_miou(tmp_path):
    args = ["train-segmenter", "--out", str(tmp_path / "seg"), "--size", "16", "--images", "32"]
    args += ["--iterations", "3", "--batch-size", "16", "--width", "4", "--eval-images", "8", "--no-progress"]
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "mIoU" in out.output
    summary = json.loads(out.output.strip().splitlines()[-1])
    assert set(summary["iou"]) == {
        "background",
        "circle",
        "square",
        "triangle",
        "cross",
        "ring",
        "diamond",
    } | {
        "flat",
        "stripes",
        "checker",
        "noise",
    }
    for name in ("segmenter.safetensors", "segmenter.json", "segmenter_iou.png", "report.html"):
        assert (tmp_path / "seg" / name).is_file(), name
    out = runner.invoke(app, ["train-segmenter", "--out", str(tmp_path / "x"), "--size", "4"])
    assert out.exit_code == 2 and len(_errors(out.output)) == 1 and "size" in out.output


def test_dissect_a_gan_run(tmp_path):
    run, seg = _gan_run(tmp_path / "gan"), _segmenter(tmp_path / "seg")
    args = ["dissect", "--generator", str(run), "--layer", "blocks.1", "--segmenter", str(seg)]
    out = runner.invoke(
        app, [*args, "--n", "40", "--batch-size", "16", "--out", str(tmp_path / "d"), "--device", "cpu"]
    )
    assert out.exit_code == 0, out.output
    results = json.loads((tmp_path / "d" / "results.json").read_text())
    assert results["layer"] == "blocks.1" and results["units"] == 4 and results["num_samples"] == 40
    assert results["image_size"] == [16, 16] and results["activation_size"] == [8, 8]
    assert results["meta"]["generator"] == str(run)
    for name in (
        "dissection.safetensors",
        "concept_counts.png",
        "unit_iou.png",
        "gallery.png",
        "report.html",
    ):
        assert (tmp_path / "d" / name).is_file(), name


def test_dissect_finds_the_planted_unit_through_the_cli(tmp_path, monkeypatch):
    planted = Planted()
    monkeypatch.setattr(job, "load_gan", lambda run, device: planted)
    monkeypatch.setattr(job, "load_segmenter", lambda path, device: RedSegmenter())
    args = ["dissect", "--generator", "g", "--layer", "units", "--segmenter", "s", "--n", "48"]
    out = runner.invoke(app, [*args, "--batch-size", "16", "--top-k", "4", "--out", str(tmp_path)])
    assert out.exit_code == 0, out.output
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["interpretable"] == [CONCEPT_UNIT] and results["concept_counts"]["red"] == 1
    assert set(results["figures"]) == {"concept_counts", "unit_iou", "gallery"}
    assert "GAN Dissection: units" in (tmp_path / "report.html").read_text()
    assert "1 of 4 units of units interpretable" in out.output
    assert job.write_dissection_report(tmp_path).is_file()


def test_user_errors_are_one_line_and_leave_no_hooks(tmp_path, monkeypatch):
    run, seg = _gan_run(tmp_path / "gan"), _segmenter(tmp_path / "seg")
    grey = _gan_run(tmp_path / "grey", channels=1)
    bad_seg = tmp_path / "bad"
    bad_seg.mkdir()
    linear = torch.nn.Linear(2, 3)
    checkpoint.write_weights(bad_seg, "segmenter", linear.state_dict(), {"in_features": 2, "out_features": 3})
    base = ["dissect", "--out", str(tmp_path / "d"), "--n", "8", "--device", "cpu", "--no-progress"]
    cases = [
        (["--generator", str(run), "--layer", "block.1", "--segmenter", str(seg)], "Closest names: blocks.1"),
        (["--generator", str(run), "--layer", "blocks.1", "--segmenter", str(seg), "--n", "0"], "--n"),
        (
            ["--generator", str(run), "--layer", "blocks.1", "--segmenter", str(tmp_path / "none")],
            "train-segmenter",
        ),
        (
            ["--generator", str(run), "--layer", "blocks.1", "--segmenter", str(bad_seg)],
            "not a shapes segmenter",
        ),
        (["--generator", str(grey), "--layer", "blocks.1", "--segmenter", str(seg)], "3-channel"),
        (["--generator", str(tmp_path / "nogan"), "--layer", "blocks.1", "--segmenter", str(seg)], "run"),
    ]
    for extra, message in cases:
        out = runner.invoke(app, [*base, *extra])
        assert out.exit_code == 2, (extra, out.output)
        assert message in out.output and "Traceback" not in out.output, (extra, out.output)
        assert len(_errors(out.output)) == 1, out.output

    planted = Planted()

    class Broken(RedSegmenter):
        def concept_masks(self, images):
            return super().concept_masks(images).float()  # not bool

    monkeypatch.setattr(job, "load_gan", lambda run, device: planted)
    monkeypatch.setattr(job, "load_segmenter", lambda path, device: Broken())
    out = runner.invoke(app, [*base, "--generator", "g", "--layer", "units", "--segmenter", "s"])
    assert out.exit_code == 2 and "bool" in out.output and len(_errors(out.output)) == 1
    assert sum(len(m._forward_hooks) for m in planted.modules()) == 0
