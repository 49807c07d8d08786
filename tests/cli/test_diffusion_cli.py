"""The diffusion commands end to end: train -> sample -> fid, ablate, and their user errors."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from genxai.cli import app

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs" / "demo.yaml")
TINY = [
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
    "train.progress=false",
    "eval.num_samples=0",
    "sample.steps=4",
    "sample.num_images=8",
]

runner = CliRunner()


def _json(output: str) -> dict:
    """The JSON result line (progress bars on stderr may share the line)."""
    last = output.strip().splitlines()[-1]
    return json.loads(last[last.index("{") :])


def test_train_sample_fid(tmp_path):
    out = runner.invoke(
        app, ["train", "--config", DEMO, *TINY, f"out_dir={tmp_path}", "name=r", "variant=noise+same"]
    )
    assert out.exit_code == 0, out.output
    summary = _json(out.output)
    assert summary["status"] == "finished" and summary["processes"] == 6
    run = tmp_path / "r"
    for name in ("config.yaml", "metrics.csv", "tb", "samples", "snapshots"):
        assert (run / name).exists(), name

    out = runner.invoke(app, ["sample", "--run", str(run), "--n", "5", "--batch-size", "3", "--seed", "1"])
    assert out.exit_code == 0, out.output
    pngs = sorted((run / "samples-1" / "images").glob("*.png"))
    assert len(pngs) == 5 and (run / "samples-1" / "grid.png").is_file()
    assert _json(out.output)["saliency"] == str(run / "samples-1" / "saliency.png")
    assert (run / "samples-1" / "saliency.png").is_file()  # where D sees "fake" in the samples

    args = [
        "sample",
        "--run",
        str(run),
        "--n",
        "4",
        "--format",
        "safetensors",
        "--sampler",
        "ddim",
        "--steps",
        "3",
    ]
    out = runner.invoke(
        app, [*args, "--saliency-every", "2", "--guidance", "0.5", "--out", str(tmp_path / "st")]
    )
    assert out.exit_code == 0, out.output
    with safe_open(str(tmp_path / "st" / "samples.safetensors"), framework="pt") as f:
        images = f.get_tensor("images")
    assert images.shape == (4, 3, 8, 8) and images.dtype == torch.uint8

    fid_args = [
        "fid",
        "--run",
        str(run),
        "--features",
        "classifier",
        "--real-images",
        "64",
        "--batch-size",
        "32",
    ]
    out = runner.invoke(app, [*fid_args, "--n", "32", "--steps", "3", "--out", str(tmp_path / "fid.json")])
    assert out.exit_code == 0, out.output
    result = _json(out.output)
    name = "FID (offline shapes-classifier features)"
    assert result[name] > 0 and "IS (offline shapes-classifier)" in result and "FID" not in result
    assert result["generated_images"] == 32 and json.loads((tmp_path / "fid.json").read_text()) == result
    assert (run / "fid_classifier.safetensors").is_file()  # trained once, cached in the run

    out = runner.invoke(app, [*fid_args, "--samples", str(run / "samples-1" / "images")])
    assert out.exit_code == 0, out.output
    assert _json(out.output)["generated_images"] == 5
    out = runner.invoke(app, [*fid_args, "--samples", str(tmp_path / "st" / "samples.safetensors")])
    assert out.exit_code == 0 and _json(out.output)["generated_images"] == 4


def test_ablate(tmp_path):
    args = ["ablate", "--config", DEMO, *TINY, f"out_dir={tmp_path}", "name=abl", "eval.num_samples=16"]
    out = runner.invoke(app, [*args, "--variants", "baseline,noise+hierarchical", "--no-min-snr"])
    assert out.exit_code == 0, out.output
    root = tmp_path / "abl"
    results = json.loads((root / "results.json").read_text())
    assert set(results["runs"]) == {"baseline", "noise+hierarchical"}
    assert results["fid_name"] == "FID (offline shapes-classifier features)"
    assert all(r["processes"] == 6 and r["final"] for r in results["runs"].values())
    assert "t_D cutoff" in results["discriminator"]
    for name in (
        "fid_vs_processes",
        "fid_vs_time",
        "samples",
        "maps_noise+hierarchical",
        "attention_noise+hierarchical",
    ):
        assert (root / results["figures"][name]).is_file(), name
    html = (root / "report.html").read_text()
    assert "XAI-guided diffusion: ablation" in html
    assert "fake_saliency_noise_hierarchical.png" in html and "fake_saliency_baseline" not in html
    (root / "report.html").unlink()
    assert runner.invoke(app, ["report", str(root)]).exit_code == 0
    assert (root / "report.html").is_file()
    assert (root / "results.csv").read_text().startswith("run,label,seed,variant,loss_weighting")
    assert "FID (offline shapes-classifier features)" in out.output


def test_user_errors_are_one_line(tmp_path):
    out = runner.invoke(app, ["train", "--config", DEMO, "train.batchsize=3", f"out_dir={tmp_path}"])
    assert out.exit_code == 2 and "error:" in out.output and "batchsize" in out.output
    out = runner.invoke(app, ["sample", "--run", str(tmp_path / "missing")])
    assert out.exit_code == 2 and "no config.yaml" in out.output
    out = runner.invoke(app, ["ablate", "--config", DEMO, f"out_dir={tmp_path}", "--variants", "nope"])
    assert out.exit_code == 2 and "--variants: expected one of" in out.output


def test_fid_equals_the_training_evaluation(tmp_path):
    """`genxai fid` samples as training's evaluation does (sampler, saliency-conditioned maps), so
    for the evaluation's seed it gives the same number."""
    extra = [
        "variant=noise+same",
        "guidance.sample_saliency_every=2",
        "eval.num_samples=16",
        "eval.batch_size=8",
        "eval.real_images=64",
        "eval.features=classifier",
        "train.sample_every=0",
        "train.warmup=0",  # the attention gates leave 0 within the few Processes
        "train.lr=0.01",
    ]
    out = runner.invoke(app, ["train", "--config", DEMO, *TINY, *extra, f"out_dir={tmp_path}", "name=r"])
    assert out.exit_code == 0, out.output
    run = tmp_path / "r"
    trained = json.loads((run / "evals.jsonl").read_text().splitlines()[-1])["metrics"]
    from genxai.diffusion.config import load_experiment

    eval_seed = load_experiment(run / "config.yaml").seed + 12345
    out = runner.invoke(app, ["fid", "--run", str(run), "--n", "16", "--seed", str(eval_seed)])
    assert out.exit_code == 0, out.output
    result = _json(out.output)
    name = "FID (offline shapes-classifier features)"
    assert result[name] == pytest.approx(trained[name], rel=1e-6, abs=1e-9)


def test_sampling_arguments_are_checked(tmp_path):
    out = runner.invoke(app, ["train", "--config", DEMO, *TINY, f"out_dir={tmp_path}", "name=r"])
    assert out.exit_code == 0, out.output
    run = str(tmp_path / "r")
    for args, message in (
        (["sample", "--run", run, "--sampler", "ddpx"], "--sampler: expected one of 'ddpm', 'ddim'"),
        (["sample", "--run", run, "--steps", "0"], "--steps: expected 1 <= steps <= 1000"),
        (["sample", "--run", run, "--steps", "1001"], "--steps: expected 1 <= steps <= 1000"),
        (["sample", "--run", run, "--n", "0"], "--n: expected an integer >= 1"),
        (["sample", "--run", run, "--eta", "-1"], "--eta: expected a number >= 0"),
        (["sample", "--run", run, "--batch-size", "0"], "--batch-size"),
        (["fid", "--run", run, "--features", "inceptionn"], "--features: expected one of"),
        (["fid", "--run", run, "--inception", str(tmp_path / "none.pt")], "--inception: file not found"),
        (["sample", "--run", str(tmp_path)], "the runs inside are: r"),
    ):
        out = runner.invoke(app, args)
        assert out.exit_code == 2, (args, out.output)
        assert message in out.output and "Traceback" not in out.output, (args, out.output)
        assert len([line for line in out.output.splitlines() if line.startswith("error:")]) == 1


def test_errors_inside_training_are_one_line(tmp_path):
    """A missing FID Inception is found before the first iteration, and reported as one line."""
    args = ["train", "--config", DEMO, *TINY, f"out_dir={tmp_path}", "name=r", "eval.num_samples=4"]
    out = runner.invoke(app, [*args, "eval.features=inception", f"eval.inception={tmp_path / 'no.pt'}"])
    assert out.exit_code == 2 and out.output.startswith("error:") and "FID Inception" in out.output
    assert out.exception is None or isinstance(out.exception, SystemExit)
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_an_interrupted_train_exits_with_the_signal_and_a_rerun_resumes(tmp_path, monkeypatch, signum, code):
    from genxai.diffusion.trainer import Trainer

    fit = Trainer.fit

    def interrupted_fit(self, until=None):
        fit(self, 2)
        self._signal = signum  # as the signal handler does, after two iterations
        return fit(self, until)

    args = ["train", "--config", DEMO, *TINY, f"out_dir={tmp_path}", "name=r"]
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "fit", interrupted_fit)
        out = runner.invoke(app, args)
    assert out.exit_code == code, out.output
    name = signal.Signals(signum).name
    summary = _json(out.stdout)
    done = summary["processes"]
    assert summary["status"] == "interrupted" and summary["signal"] == name and 0 < done < 6
    assert f"interrupted at Process {done} ({name}, saved " in out.stderr
    assert "rerun the same command to resume" in out.stderr

    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    assert out.stderr.startswith(f"resuming from Process {done} (")
    summary = _json(out.stdout)
    assert summary["status"] == "finished" and summary["signal"] is None and summary["processes"] == 6


def test_an_interrupted_ablation_exits_with_the_signal(tmp_path, monkeypatch):
    from genxai.diffusion import ablation
    from genxai.diffusion.trainer import Trainer

    class Interrupted(Trainer):
        def fit(self, until=None):
            self.request_stop()  # as if SIGTERM arrived during the first run
            return super().fit(until)

    monkeypatch.setattr(ablation, "Trainer", Interrupted)
    args = ["ablate", "--config", DEMO, *TINY, f"out_dir={tmp_path}", "name=abl", "eval.num_samples=8"]
    out = runner.invoke(app, [*args, "--variants", "baseline,noise", "--no-min-snr"])
    assert out.exit_code == 143, out.output
    assert "interrupted (SIGTERM)" in out.output and "rerun the same command to resume" in out.output
