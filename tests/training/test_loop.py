"""The training loop with a second, non-diffusion model: checkpoints, a killed run resumed bit for
bit, strict resume, the NaN stop and on_main's promise that side work never changes training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from genxai.training import checkpoint
from tests.training import autoencoder

ROOT = Path(__file__).resolve().parents[2]


def _final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    path = checkpoint.latest(run_dir / "checkpoints")
    tensors = {f"w.{k}": v for k, v in checkpoint.read_weights(path, "net").items()}
    tensors.update({f"ema.{k}": v for k, v in checkpoint.read_weights(path, "net_ema").items()})
    state = checkpoint.read_state(path, "trainer")
    for key, value in state["optimizers"]["net"]["state"].items():
        tensors.update({f"adam.{key}.{name}": t for name, t in value.items()})
    tensors["units"] = torch.tensor(state["units"])
    tensors["snapshots"] = torch.tensor(state["step"]["snapshots"])
    return tensors


def test_a_second_model_trains_through_the_same_loop(tmp_path):
    loop = autoencoder.loop(tmp_path / "ae")
    start = loop.unwrap("net")[1].weight.detach().clone()
    summary = loop.fit()
    assert summary["status"] == "finished" and summary["steps"] == 40 and summary["iteration"] == 40
    assert not torch.equal(start, loop.unwrap("net")[1].weight)
    rows = (tmp_path / "ae" / "metrics.csv").read_text().splitlines()
    assert rows[0] == "iteration,steps,loss,lr,train_time_s,steps_per_s" and len(rows) == 11
    losses = [float(r.split(",")[2]) for r in rows[1:]]
    assert losses[-1] < losses[0]  # it learns
    assert (tmp_path / "ae" / "config.yaml").is_file() and loop.step.snapshots == 4


def test_a_killed_run_resumes_bit_for_bit(tmp_path):
    whole = autoencoder.loop(tmp_path / "whole")
    whole.fit()

    run = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tests.training.autoencoder", str(run)], cwd=ROOT, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            last = checkpoint.latest(run / "checkpoints")
            if last is not None and checkpoint.checkpoint_step(last) >= 12:
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # no handler, no final save: whatever was on disk stays
    finally:
        proc.wait(timeout=60)
    killed_at = checkpoint.checkpoint_step(checkpoint.latest(run / "checkpoints"))
    assert 12 <= killed_at < 40

    resumed = autoencoder.loop(run)
    assert resumed.resumed_from is not None and resumed.iteration == killed_at
    assert resumed.fit()["status"] == "finished"
    a, b = _final_state(tmp_path / "whole"), _final_state(run)
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]


def test_resume_checks_the_config_and_refuses_to_overwrite(tmp_path):
    autoencoder.loop(tmp_path / "ae", iterations=40).fit(until=3)
    changed = autoencoder.AutoencoderStep(autoencoder.AutoencoderConfig(lr=0.5))
    config = autoencoder.loop(tmp_path / "other").config
    config.run_dir = tmp_path / "ae"
    with pytest.raises(ValueError, match=r"lr \(run: 0.01, now: 0.5\)"):
        autoencoder.Loop(changed, config, autoencoder.dataset())
    slow = autoencoder.loop(tmp_path / "ae", delay=0.001)  # delay is in resume_ignores
    assert slow.iteration == 3
    with pytest.raises(ValueError, match="already holds checkpoints"):
        autoencoder.Loop(slow.step, slow.config, autoencoder.dataset(), resume=False)


def test_bad_arguments_are_clear_errors(tmp_path):
    step = autoencoder.AutoencoderStep(autoencoder.AutoencoderConfig())
    with pytest.raises(ValueError, match="batch_size"):
        autoencoder.LoopConfig(run_dir=tmp_path, batch_size=0)
    big = autoencoder.LoopConfig(run_dir=tmp_path, batch_size=64, cpu=True)
    with pytest.raises(ValueError, match="batch_size: the data set has 48 images"):
        autoencoder.Loop(step, big, autoencoder.dataset())


def test_on_main_leaves_modes_and_random_streams_as_they_were(tmp_path):
    loop = autoencoder.loop(tmp_path / "ae")
    net = loop.models["net"].module
    before = torch.get_rng_state()

    def side_work():
        assert not net.training  # models run in eval mode for side work
        return torch.randn(5)

    loop.on_main(side_work)
    assert net.training and torch.equal(torch.get_rng_state(), before)
