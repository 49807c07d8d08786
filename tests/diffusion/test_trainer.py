"""The trainer: typed config, exact resume, SIGTERM save, NaN stop, 2 processes, equal budgets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from genxai.data import get_dataset
from genxai.diffusion.config import ExperimentConfig, load_experiment
from genxai.diffusion.pipeline import load_run
from genxai.diffusion.trainer import NonFiniteLossError, Trainer
from genxai.training import checkpoint

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "data.image_size=8",
    "data.limit=64",
    "model.base_channels=16",
    "model.channel_mults=[1,2]",
    "model.num_res_blocks=1",
    "model.attention_resolutions=[4]",
    "model.dropout=0.1",
    "discriminator.base_channels=8",
    "cycle.phase_a=2",
    "cycle.phase_b=2",
    "cycle.cycles=2",
    "train.batch_size=8",
    "train.warmup=3",
    "train.lr=1e-3",
    "train.ema_decay=0.9",
    "train.log_every=2",
    "train.checkpoint_every=100",
    "train.progress=false",
    "eval.num_samples=0",
]


def tiny(tmp_path: Path, *extra: str) -> ExperimentConfig:
    return load_experiment(ROOT / "configs" / "demo.yaml", [*TINY, f"out_dir={tmp_path}", *extra])


@pytest.fixture(scope="module")
def shapes8():
    return get_dataset("shapes", size=8, n=64, seed=0)


# -- config -----------------------------------------------------------------------------------------
def test_config_load_override_and_unknown_key(tmp_path):
    cfg = load_experiment(ROOT / "configs" / "demo.yaml", ["train.batch_size=16", "variant=noise+same"])
    assert cfg.train.batch_size == 16 and cfg.variant == "noise+same" and cfg.attention_maps == "same"
    assert cfg.data.name == "shapes" and cfg.model.channel_mults == [1, 2, 2]  # from the YAML
    with pytest.raises(ValueError, match="batchsize"):
        load_experiment(ROOT / "configs" / "demo.yaml", ["train.batchsize=16"])
    with pytest.raises(ValueError, match="variant"):
        load_experiment(None, ["variant=noise+everything"])
    with pytest.raises(ValueError, match="key=value"):
        load_experiment(None, ["train.batch_size"])
    for name in ("cifar10", "celebahq256"):
        paper = load_experiment(ROOT / "configs" / f"{name}.yaml")
        assert paper.schedule.num_timesteps == 1000 and paper.train.ema_decay == 0.9999
        assert (paper.cycle.phase_a, paper.cycle.phase_b, paper.cycle.cycles) == (20000, 40000, 5)
    cifar = load_experiment(ROOT / "configs" / "cifar10.yaml")
    assert (
        cifar.model.channel_mults == [1, 2, 2, 2]
        and cifar.model.dropout == 0.1
        and cifar.train.warmup == 5000
    )


def test_every_variant_gets_the_same_number_of_processes(tmp_path, shapes8):
    """Trained, not recomputed: every variant ends with the same UNet optimiser steps (Processes),
    counted by the optimiser's own step counter in the final checkpoint."""
    budgets = {}
    for variant in ("baseline", "noise", "noise+same", "noise+hierarchical"):
        cfg = tiny(tmp_path, f"variant={variant}", f"name={variant.replace('+', '_')}", "cycle.cycles=1")
        summary = Trainer(cfg, dataset=shapes8).fit()
        state = checkpoint.read_state(checkpoint.latest(cfg.run_dir / "checkpoints"), "trainer")
        adam_steps = {int(v["step"]) for v in state["optimizers"]["unet"]["state"].values()}
        budgets[variant] = (summary["processes"], *adam_steps)
    assert set(budgets.values()) == {(6, 6)}, budgets


# -- exact resume -----------------------------------------------------------------------------------
def _state(run_dir: Path) -> dict[str, torch.Tensor]:
    path = checkpoint.latest(run_dir / "checkpoints")
    tensors = {}
    for name in ("unet", "unet_ema", "discriminator"):
        for key, value in checkpoint.read_weights(path, name).items():
            tensors[f"{name}.{key}"] = value
    state = checkpoint.read_state(path, "trainer")
    for model, optimizer in state["optimizers"].items():
        for key, value in optimizer["state"].items():
            for name, tensor in value.items():
                tensors[f"optim.{model}.{key}.{name}"] = tensor
    tensors["processes"] = torch.tensor(state["units"])
    return tensors


def test_resume_is_bit_for_bit(tmp_path, shapes8):
    whole = tiny(tmp_path, "variant=noise+same", "name=whole")
    summary = Trainer(whole, dataset=shapes8).fit()
    assert summary["status"] == "finished" and summary["processes"] == 12

    parts = tiny(tmp_path, "variant=noise+same", "name=parts")
    first = Trainer(parts, dataset=shapes8).fit(until=3)  # stops inside phase B of cycle 0
    assert first["status"] == "stopped" and first["iteration"] == 3 and first["processes"] == 4
    resumed = Trainer(parts, dataset=shapes8)
    assert resumed.resumed_from is not None and resumed.iteration == 3
    assert resumed.fit()["status"] == "finished"

    a, b = _state(tmp_path / "whole"), _state(tmp_path / "parts")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"differ after resume: {different[:5]}"
    rows = (tmp_path / "parts" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("iteration,processes") and len(rows) > 3


def test_resume_refuses_another_experiment(tmp_path, shapes8):
    Trainer(tiny(tmp_path, "variant=noise", "name=run"), dataset=shapes8).fit(until=1)
    with pytest.raises(ValueError, match="variant"):
        Trainer(tiny(tmp_path, "variant=baseline", "name=run"), dataset=shapes8)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        Trainer(tiny(tmp_path, "variant=noise", "name=run"), dataset=shapes8, resume=False)


# -- failures ---------------------------------------------------------------------------------------
class _Poisoned(Dataset):
    """The same images with NaN from ``start`` on (a broken sample or an overflow mid-run)."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        image, label, _ = self.base[index]
        return torch.full_like(image, float("nan")), label


def test_nan_loss_stops_with_an_error_and_keeps_the_last_good_checkpoint(tmp_path, shapes8):
    cfg = tiny(tmp_path, "variant=baseline", "name=nan")
    Trainer(cfg, dataset=shapes8).fit(until=2)
    good = checkpoint.latest(tmp_path / "nan" / "checkpoints")
    before = checkpoint.read_weights(good, "unet")
    with pytest.raises(NonFiniteLossError, match=r"NaN or infinite at iteration 2.*ckpt-00000002"):
        Trainer(cfg, dataset=_Poisoned(shapes8)).fit()
    assert checkpoint.all_checkpoints(tmp_path / "nan" / "checkpoints") == [good]
    after = checkpoint.read_weights(good, "unet")
    assert all(torch.equal(before[k], after[k]) and torch.isfinite(after[k]).all() for k in before)


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path):
    """`genxai train` stopped by SIGTERM saves, says where it stopped and exits 128 + 15."""
    overrides = [*TINY, f"out_dir={tmp_path}", "name=term", "cycle.cycles=1000", "train.log_every=1"]
    command = [sys.executable, "-m", "genxai.cli", "train", "--config", str(ROOT / "configs" / "demo.yaml")]
    proc = subprocess.Popen(
        [*command, *overrides],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    metrics = tmp_path / "term" / "metrics.csv"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) > 2):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM"
    processes = summary["processes"]
    assert f"interrupted at Process {processes} (SIGTERM" in err
    assert "rerun the same command to resume" in err
    assert 2 <= summary["iteration"] < 4000
    last = checkpoint.latest(tmp_path / "term" / "checkpoints")
    assert checkpoint.checkpoint_step(last) == summary["iteration"]
    run = load_run(tmp_path / "term")  # the saved run loads for sampling
    assert run.unet.image_size == 8


# -- devices and precision --------------------------------------------------------------------------
def test_bf16_autocast_trains(tmp_path, shapes8):
    cfg = tiny(tmp_path, "variant=noise+hierarchical", "name=bf16", "train.mixed_precision=bf16")
    summary = Trainer(cfg, dataset=shapes8).fit(until=4)
    assert summary["processes"] == 6


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DISTRIBUTED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from genxai.diffusion.config import load_experiment
    from genxai.diffusion.trainer import Trainer
    trainer = Trainer(load_experiment(sys.argv[2], sys.argv[3:]))
    summary = trainer.fit()
    p = next(trainer.accelerator.unwrap_model(trainer.unet).parameters()).detach().flatten()[:4].tolist()
    # One file per rank: the two processes share stdout, where their lines can interleave.
    result = {"rank": trainer.rank, "world": trainer.world, "param": p, **summary}
    Path(sys.argv[1], f"result-{trainer.rank}.json").write_text(json.dumps(result))
    """
)


def test_two_processes_with_accelerate_launch(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    overrides = [
        *TINY,
        f"out_dir={tmp_path}",
        "name=ddp",
        "variant=noise+same",
        "cycle.cycles=1",
        "train.cpu=true",
    ]
    launcher = Path(sys.executable).with_name("accelerate")
    # `--multi_gpu` picks Accelerate's torchrun launcher (its `--cpu` flag starts a single process);
    # with train.cpu the Trainer joins the processes in a gloo group on the CPU.
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*cmd, str(script), str(tmp_path), str(ROOT / "configs" / "demo.yaml"), *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("result-*.json"))]
    assert sorted(r["rank"] for r in results) == [0, 1] and all(r["world"] == 2 for r in results)
    assert results[0]["param"] == results[1]["param"]  # gradients were averaged: same weights everywhere
    assert all(r["processes"] == 6 for r in results)
    last = checkpoint.latest(tmp_path / "ddp" / "checkpoints")
    assert (last / "rng-0.json").is_file() and (last / "rng-1.json").is_file()


# -- learning ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_trained_demo_model_beats_the_untrained_one(tmp_path):
    """A short demo run lowers the offline FID (shapes-classifier features) of its samples."""
    cfg = load_experiment(
        ROOT / "configs" / "demo.yaml",
        [
            f"out_dir={tmp_path}",
            "name=learn",
            "cycle.phase_a=100",
            "cycle.phase_b=50",
            "cycle.cycles=1",  # 200 Processes of the baseline at batch 32
            "train.sample_every=0",
            "train.eval_every=0",
            "train.checkpoint_every=1000",
            "train.progress=false",
            "eval.num_samples=256",
            "eval.real_images=1024",
            "sample.steps=20",
        ],
    )
    trainer = Trainer(cfg)
    untrained = trainer.evaluate()
    name = next(iter(untrained))
    assert name == "FID (offline shapes-classifier features)"
    summary = trainer.fit()
    trained = summary["evals"][-1]["metrics"]
    assert trained[name] < 0.7 * untrained[name], (untrained, trained)


def test_an_interrupted_ablation_stops_and_resumes(tmp_path, shapes8, monkeypatch):
    from genxai.diffusion import ablation

    cfg = tiny(tmp_path, "name=abl", "eval.num_samples=8", "eval.features=classifier")

    class Interrupted(Trainer):
        def fit(self, until=None):
            self.request_stop()  # as if SIGTERM arrived during the first run
            return super().fit(until)

    monkeypatch.setattr(ablation, "Trainer", Interrupted)
    partial = ablation.run_ablation(cfg, variants=("baseline", "noise"), dataset=shapes8)
    assert partial["interrupted"] and partial["signal"] == "SIGTERM" and partial["runs"] == {}
    assert not (tmp_path / "abl" / "noise").exists()  # the ablation stopped at the first run
    monkeypatch.setattr(ablation, "Trainer", Trainer)
    done = ablation.run_ablation(cfg, variants=("baseline", "noise"), dataset=shapes8)
    assert not done["interrupted"] and all(r["processes"] == 12 for r in done["runs"].values())


# -- strict configs and runs ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("guidance.gamma=-1", "guidance.gamma"),
        ("guidance.saliency_method=saliencyy", "guidance.saliency_method"),
        ("guidance.saliency_method=classmodel", "makes images, not saliency maps"),
        ("train.lr=0", "train.lr"),
        ("sample.steps=5000", "sample.steps"),
        ("sample.eta=-0.5", "sample.eta"),
        ("data.name=shapez", "data.name"),
        ("data.image_size=9", "data.image_size"),
        ("schedule.beta_end=0.00001", "schedule.beta_end"),
        ("discriminator.r1_weight=-1", "discriminator.r1_weight"),
        ("eval.features=inceptionn", "eval.features"),
    ],
)
def test_every_value_is_validated_at_load_time(tmp_path, override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        tiny(tmp_path, override)


def test_data_dependent_errors_come_before_training(tmp_path, shapes8):
    with pytest.raises(ValueError, match="batch_size: the data set has 64 images"):
        Trainer(tiny(tmp_path, "train.batch_size=128"), dataset=shapes8)
    with pytest.raises(ValueError, match=r"guidance: 'gradcam' cannot explain.*nope"):
        Trainer(
            tiny(
                tmp_path, "variant=noise", "guidance.saliency_method=gradcam", "guidance.saliency_layer=nope"
            ),
            dataset=shapes8,
        )


def test_resume_checks_every_section_that_changes_training(tmp_path, shapes8):
    Trainer(tiny(tmp_path, "variant=noise", "name=run"), dataset=shapes8).fit(until=1)
    for override, key in (
        ("guidance.gamma=2", "guidance.gamma"),
        ("cycle.phase_b=3", "cycle.phase_b"),
        ("train.lr=0.01", "train.lr"),
    ):
        with pytest.raises(ValueError, match=rf"{key} \(run: "):
            Trainer(tiny(tmp_path, "variant=noise", "name=run", override), dataset=shapes8)
    # where it reports and how it samples may change
    again = Trainer(
        tiny(tmp_path, "variant=noise", "name=run", "train.log_every=1", "sample.steps=3"), dataset=shapes8
    )
    assert again.iteration == 1


def _model_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = {}
    for name in trainer.models:
        for key, value in trainer.unwrap(name).state_dict().items():
            state[f"{name}.{key}"] = value.clone()
    state.update({f"ema.{k}": v.clone() for k, v in trainer.step.ema.state_dict().items()})
    state["rng"] = torch.get_rng_state()
    state["generator"] = trainer.generator.get_state()
    return state


def test_sampling_and_evaluation_never_change_training(tmp_path, shapes8):
    """Snapshots and FID during training run every model in eval mode: a spectral-norm D (whose
    power iteration would update its buffers in train mode), the UNet, the EMA and every random
    stream are as they were."""
    cfg = tiny(
        tmp_path,
        "variant=noise+same",
        "discriminator.spectral_norm=true",
        "guidance.sample_saliency_every=1",
        "sample.steps=3",
        "sample.num_images=4",
        "eval.num_samples=4",
        "eval.batch_size=4",
        "eval.features=classifier",
        "eval.real_images=16",
    )
    trainer = Trainer(cfg, dataset=shapes8)
    trainer.fit(until=3)  # D has trained (phase A) and the run is in phase B
    before = _model_state(trainer)
    trainer.snapshot()
    trainer.evaluate()
    after = _model_state(trainer)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed
    assert trainer.unet.training and trainer.discriminator.training
    assert list((cfg.run_dir / "snapshots").glob("iter_*.safetensors"))


def test_checkpoints_describe_their_modules(tmp_path, shapes8):
    """A checkpoint rebuilds its UNet and D without the experiment config."""
    from genxai.diffusion import Discriminator, UNet

    cfg = tiny(tmp_path, "variant=noise+hierarchical", "name=self")
    trainer = Trainer(cfg, dataset=shapes8)
    trainer.fit(until=1)
    path = checkpoint.latest(tmp_path / "self" / "checkpoints")
    unet = UNet(**checkpoint.read_config(path, "unet_ema"))
    unet.load_state_dict(checkpoint.read_weights(path, "unet_ema"))
    d = Discriminator(**checkpoint.read_config(path, "discriminator"))
    d.load_state_dict(checkpoint.read_weights(path, "discriminator"))
    assert unet.attention_maps == "hierarchical" and unet.image_size == 8
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 9])
    unet.eval()
    assert torch.equal(unet(x, t), trainer.step.ema.module(x, t))
