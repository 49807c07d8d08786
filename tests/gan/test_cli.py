"""`genxai train-gan` and `genxai sample-gan` end to end, and their one-line user errors."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from genxai.cli import app
from genxai.data import load_image
from genxai.gan import load_generator, sample
from tests.gan.test_trainer import TINY

runner = CliRunner()


def _json(output: str) -> dict:
    last = output.strip().splitlines()[-1]
    return json.loads(last[last.index("{") :])


def test_train_then_sample(tmp_path):
    args = ["train-gan", "--config", "gan-shapes", *TINY, "data.limit=64", f"out_dir={tmp_path}", "name=r"]
    out = runner.invoke(app, [*args, "train.iterations=4"])
    assert out.exit_code == 0, out.output
    summary = _json(out.output)
    assert summary["status"] == "finished" and summary["g_steps"] == 4
    run = tmp_path / "r"
    assert summary["run_dir"] == str(run)
    for name in ("config.yaml", "metrics.csv", "tb", "checkpoints", "samples/iter_00000004.png"):
        assert (run / name).exists(), name
    out = runner.invoke(app, [*args, "train.iterations=6"])  # the same command, longer: resumes
    assert out.exit_code == 0 and _json(out.output)["g_steps"] == 6

    out = runner.invoke(
        app, ["sample-gan", "--run", str(run), "--n", "5", "--batch-size", "2", "--seed", "3"]
    )
    assert out.exit_code == 0, out.output
    result = _json(out.output)
    folder = run / "samples-3"
    assert result["images"] == 5 and result["out"] == str(folder) and result["checkpoint"].endswith("06")
    pngs = sorted((folder / "images").glob("*.png"))
    assert len(pngs) == 5 and (folder / "grid.png").is_file()
    expected = torch.cat(list(sample(load_generator(run), 5, seed=3)))
    stored = torch.stack([load_image(p, channels=3) for p in pngs])
    assert (stored - expected).abs().max() <= 1 / 255 + 1e-6  # PNG rounding only

    out = runner.invoke(
        app, ["sample-gan", "--run", str(run), "--n", "2", "--no-ema", "--out", str(tmp_path / "o")]
    )
    assert out.exit_code == 0 and len(list((tmp_path / "o" / "images").glob("*.png"))) == 2


def test_user_errors_are_one_line(tmp_path):
    def error(args):
        out = runner.invoke(app, args)
        assert out.exit_code == 2, out.output
        lines = [line for line in out.output.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), out.output
        return lines[0]

    base = ["train-gan", "--config", "gan-shapes", f"out_dir={tmp_path}"]
    assert "train.lr_g" in error([*base, "train.lr_g=-1"])
    assert "batchsize" in error([*base, "train.batchsize=3"])
    assert "data.image_size" in error([*base, "data.image_size=48"])
    assert "key=value" in error([*base, "train.iterations"])
    assert "no file" in error(["train-gan", "--config", str(tmp_path / "nope.yaml")])
    assert "no folder" in error(["sample-gan", "--run", str(tmp_path / "missing")])
    assert "no checkpoint" in error(["sample-gan", "--run", str(tmp_path)])
    assert "--n" in error(["sample-gan", "--run", str(tmp_path), "--n", "0"])
    assert "--batch-size" in error(["sample-gan", "--run", str(tmp_path), "--batch-size", "0"])
    assert "--device" in error(["sample-gan", "--run", str(tmp_path), "--device", "tpu"])


def test_a_nan_loss_exits_with_code_1(tmp_path, monkeypatch):
    from genxai.gan import trainer

    def diverge(self, until=None):
        raise trainer.NonFiniteLossError("training stopped: the loss became NaN or infinite at iteration 3")

    monkeypatch.setattr(trainer.GANTrainer, "fit", diverge)
    args = ["train-gan", "--config", "gan-shapes", *TINY, "data.limit=64", f"out_dir={tmp_path}"]
    out = runner.invoke(app, args)
    assert out.exit_code == 1 and out.output.strip().startswith("error: training stopped"), out.output


def test_an_interrupted_run_exits_with_the_signal_and_resumes(tmp_path, monkeypatch):
    """train-gan shares train's reporting: 143 on SIGTERM with how to resume, then a resumed run says so."""
    from genxai.gan import trainer

    class Interrupted(trainer.GANTrainer):
        def fit(self, until=None):
            self.request_stop()  # as if SIGTERM arrived before the first iteration
            return super().fit(until)

    args = ["train-gan", "--config", "gan-shapes", *TINY, "data.limit=64", f"out_dir={tmp_path}", "name=r"]
    monkeypatch.setattr(trainer, "GANTrainer", Interrupted)
    out = runner.invoke(app, [*args, "train.iterations=4"])
    assert out.exit_code == 143, out.output
    assert "interrupted at G step 0 (SIGTERM" in out.output and "rerun the same command" in out.output
    monkeypatch.undo()
    out = runner.invoke(app, [*args, "train.iterations=4"])
    assert out.exit_code == 0 and "resuming from G step 0" in out.output
