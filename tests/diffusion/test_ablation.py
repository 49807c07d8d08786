"""The ablation as an experiment: paired seeds, incremental results, exact resume after SIGKILL, equal cost."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from genxai.data import get_dataset
from genxai.diffusion import ablation
from genxai.diffusion.trainer import Trainer
from genxai.evaluation.fid import save_feature_classifier, train_feature_classifier
from genxai.training import checkpoint
from tests.diffusion.test_trainer import ROOT, TINY, tiny

ABLATION = [
    "name=abl",
    "cycle.cycles=2",
    "train.checkpoint_every=1",
    "train.eval_every=6",
    "eval.num_samples=8",
    "eval.features=classifier",
    "eval.real_images=64",
    "sample.steps=4",
    "ablation.seeds=2",
    "ablation.variants=[baseline,noise]",
    "ablation.baselines=[]",
    "ablation.measure_costs=false",
]
SCRIPT = (
    "import sys, torch; torch.set_num_threads(1)\n"
    "from genxai.diffusion.ablation import run_ablation\n"
    "from genxai.diffusion.config import load_experiment\n"
    "run_ablation(load_experiment(sys.argv[1], sys.argv[2:]))\n"
)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, shapes8):
    """One small FID feature classifier for every ablation here (training it is not under test)."""
    path = tmp_path_factory.mktemp("fid") / "fid_classifier.safetensors"
    save_feature_classifier(train_feature_classifier(shapes8, epochs=1, seed=0), path, "shapes")
    return path


def _config_args(out, classifier) -> list[str]:
    return [
        str(ROOT / "configs" / "demo.yaml"),
        *TINY,
        *ABLATION,
        f"out_dir={out}",
        f"eval.classifier={classifier}",
    ]


def _comparable(results: dict, root) -> dict:
    """results.json without what differs between identical runs: timings and the folder."""
    text = json.dumps(results).replace(str(root), "ROOT")

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in ablation.TIMING_KEYS}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return strip(json.loads(text))


def _ablate(out, classifier) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", SCRIPT, *_config_args(out, classifier)], cwd=ROOT, env=env)


@pytest.mark.slow
def test_a_killed_ablation_resumes_to_the_same_results(tmp_path, classifier):
    whole = _ablate(tmp_path / "whole", classifier)
    assert whole.wait(timeout=300) == 0
    expected = json.loads((tmp_path / "whole" / "abl" / "results.json").read_text())
    assert expected["finished"] == 4 and expected["seeds"] == [0, 1]

    proc = _ablate(tmp_path / "killed", classifier)
    second = tmp_path / "killed" / "abl" / "noise" / "seed0" / "checkpoints"  # the 2nd run of 4
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            last = checkpoint.latest(second)
            if last is not None and checkpoint.checkpoint_step(last) >= 3:
                break
            assert proc.poll() is None, "the ablation ended before it could be killed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    partial = json.loads((tmp_path / "killed" / "abl" / "results.json").read_text())
    assert partial["finished"] == 1  # incremental: the first run's results were already written
    assert _ablate(tmp_path / "killed", classifier).wait(timeout=300) == 0
    resumed = json.loads((tmp_path / "killed" / "abl" / "results.json").read_text())
    assert _comparable(resumed, tmp_path / "killed") == _comparable(expected, tmp_path / "whole")
    stats = resumed["statistics"][resumed["fid_name"]]
    assert stats["summary"]["noise"]["n"] == 2 and "noise" in stats["vs baseline"]


def test_a_seed_gives_every_variant_the_same_start(tmp_path, shapes8):
    runs = ablation.ablation_runs(tiny(tmp_path, *ABLATION), root=tmp_path / "abl")
    assert [(r.label, r.seed) for r in runs] == [("baseline", 0), ("noise", 0), ("baseline", 1), ("noise", 1)]
    nets = [Trainer(r.cfg, dataset=shapes8, resume=False).step.ema.module.state_dict() for r in runs]
    assert all(torch.equal(nets[0][k], nets[1][k]) for k in nets[0])  # baseline vs noise, seed 0
    assert not all(torch.equal(nets[0][k], nets[2][k]) for k in nets[0])  # seed 0 vs seed 1


@pytest.fixture(scope="module")
def shapes8():
    return get_dataset("shapes", size=8, n=64, seed=0)


def test_equal_cost_interpolates_each_curve_at_the_cheapest_budget():
    def run(label, seed, values):
        evals = [{"processes": p, "metrics": {"FID": v}} for p, v in zip((10, 20), values)]
        return {"label": label, "seed": seed, "evals": evals}

    summaries = {
        "a0": run("baseline", 0, (4.0, 2.0)),
        "b0": run("noise", 0, (3.0, 1.0)),
        "a1": run("baseline", 1, (5.0, 3.0)),
        "b1": run("noise", 1, (4.0, 2.0)),
    }
    out = ablation.equal_cost(summaries, ["FID"], {"baseline": 1.0, "noise": 1.5})
    assert out["cost_s"] == 20.0  # the baseline's full budget: 20 Processes x 1 s
    stats = out["metrics"]["FID"]
    # noise reaches 20 s at 13.3 Processes: 3 - 2 * (1/3) = 2.33 (seed 0), 3.33 (seed 1)
    assert stats["summary"]["noise"]["mean"] == pytest.approx(17 / 6)
    assert stats["vs baseline"]["noise"]["mean"] == pytest.approx(17 / 6 - 2.5)
    assert math.isnan(ablation.interpolate([(1.0, 1.0), (2.0, 2.0)], 3.0))


def test_claim_shares_runs_between_live_workers_and_takes_over_dead_ones(tmp_path):
    lock = tmp_path / ".run.lock"
    with ablation.claim(lock) as mine:
        assert mine and lock.read_text() == str(os.getpid())
    assert not lock.exists()
    lock.write_text("1")  # pid 1 is alive: another worker holds the run
    with ablation.claim(lock) as mine:
        assert not mine
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(str(dead.pid))  # a SIGKILLed worker's lock
    with ablation.claim(lock) as mine:
        assert mine


@pytest.mark.slow
def test_discriminator_guidance_on_the_baseline_is_an_ablation_label(tmp_path, classifier, shapes8):
    from genxai.diffusion.dg import dg_dir

    cfg = tiny(
        tmp_path,
        *ABLATION,
        f"eval.classifier={classifier}",
        "ablation.seeds=1",
        "ablation.variants=[baseline]",
        "ablation.dg=true",
        "ablation.dg_iterations=6",
        "ablation.dg_fakes=8",
    )
    results = ablation.run_ablation(cfg, dataset=shapes8)
    assert set(results["runs"]) == {"baseline", "baseline+dg"}
    dg = results["runs"]["baseline+dg"]
    assert dg["label"] == "baseline+dg" and dg["dg"]["d_iterations"] == 6
    assert set(dg["final"]) == set(results["runs"]["baseline"]["final"])  # the same metrics
    assert dg["final"] != results["runs"]["baseline"]["final"]  # the guidance moved the samples
    assert dg["train_time_s"] > results["runs"]["baseline"]["train_time_s"]  # D's training is its cost
    folder = dg_dir(ablation.ablation_runs(cfg, root=tmp_path / "abl")[0].cfg)
    assert (folder / "result.json").is_file() and (folder / "samples.png").is_file()
    again = ablation.run_ablation(cfg, dataset=shapes8)  # finished: nothing is redone
    assert again["runs"]["baseline+dg"]["final"] == dg["final"]
