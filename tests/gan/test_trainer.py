"""The GAN on the training loop: config checks, exact resume, loading the EMA generator, sampling."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from genxai.data import get_dataset
from genxai.gan import (
    GANConfig,
    GANTrainer,
    Generator,
    latent_batches,
    load_discriminator,
    load_gan_config,
    load_gan_run,
    load_generator,
    sample,
)
from genxai.training import NonFiniteLossError, checkpoint

TINY = [
    "data.image_size=8",
    "model.latent_dim=8",
    "model.g_channels=8",
    "model.d_channels=8",
    "model.spectral_norm=true",
    "train.batch_size=8",
    "train.iterations=8",
    "train.ema_decay=0.9",
    "train.r1_weight=1.0",
    "train.log_every=2",
    "train.checkpoint_every=100",
    "train.progress=false",
]


def tiny(tmp_path: Path, *extra: str) -> GANConfig:
    return load_gan_config("gan-shapes", [*TINY, f"out_dir={tmp_path}", *extra])


@pytest.fixture(scope="module")
def shapes8():
    return get_dataset("shapes", size=8, n=64, seed=0)


# -- config -----------------------------------------------------------------------------------------
def test_shipped_config_loads():
    cfg = load_gan_config("gan-shapes")
    assert cfg.name == "gan-shapes" and cfg.data.name == "shapes" and cfg.data.image_size == 32
    assert load_gan_config("gan-shapes", ["train.iterations=7"]).train.iterations == 7
    assert GANConfig().data.image_size == 32  # the defaults are valid on their own


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.image_size=24", "data.image_size: expected a power of 2"),
        ("data.image_size=4", "data.image_size"),
        ("data.name=shapez", "data.name"),
        ("model.latent_dim=0", "model.latent_dim"),
        ("train.lr_g=0", "train.lr_g"),
        ("train.lr_d=-1", "train.lr_d"),
        ("train.betas=[0.5]", "train.betas"),
        ("train.betas=[0.5,1.0]", r"train.betas\[1\]"),
        ("train.ema_decay=1.5", "train.ema_decay"),
        ("train.r1_weight=-1", "train.r1_weight"),
        ("train.iterations=0", "train.iterations"),
        ("train.sample_every=-1", "train.sample_every"),
        ("sample.num_images=0", "sample.num_images"),
        ("eval.features=pixels", "eval.features"),
        ("train.batchsize=3", "batchsize"),
        ("seed=-1", "seed"),
    ],
)
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ValueError, match=key):
        load_gan_config("gan-shapes", [override])


def test_data_of_another_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"data: expected images of 8x8"):
        GANTrainer(tiny(tmp_path), dataset=get_dataset("shapes", size=16, n=16, seed=0))


# -- exact resume -----------------------------------------------------------------------------------
def _state(run_dir: Path) -> dict[str, torch.Tensor]:
    path = checkpoint.latest(run_dir / "checkpoints")
    tensors = {}
    for name in ("generator", "generator_ema", "discriminator"):
        for key, value in checkpoint.read_weights(path, name).items():
            tensors[f"{name}.{key}"] = value
    state = checkpoint.read_state(path, "trainer")
    for model, optimizer in state["optimizers"].items():
        for key, value in optimizer["state"].items():
            for name, tensor in value.items():
                tensors[f"optim.{model}.{key}.{name}"] = torch.as_tensor(tensor)
    tensors["g_steps"] = torch.tensor(state["units"])
    tensors["ema_updates"] = torch.tensor(state["ema_updates"]["generator"])
    return tensors


class StopAt(GANTrainer):
    """Requests a stop (what SIGTERM does) during iteration ``at``."""

    def __init__(self, *args, at: int, **kwargs):
        super().__init__(*args, **kwargs)
        step, loop = self.step, self

        class Stopping(type(step)):
            def __call__(self, loop_, batch):
                super().__call__(loop_, batch)
                if loop.iteration == at:
                    loop.request_stop()

        step.__class__ = Stopping


def test_resume_is_bit_for_bit(tmp_path, shapes8):
    """Stopped twice (fit(until=...), then a stop request mid-run) and resumed, the run equals an
    uninterrupted one: G, its EMA, D (spectral-norm vectors too), both Adam states, the counters.
    The interrupted run also writes sample grids: events never change training."""
    whole = GANTrainer(tiny(tmp_path, "name=whole"), dataset=shapes8).fit()
    assert whole["status"] == "finished" and whole["g_steps"] == 8

    parts = tiny(tmp_path, "name=parts", "train.sample_every=2")
    first = GANTrainer(parts, dataset=shapes8).fit(until=3)
    assert first["status"] == "stopped" and first["g_steps"] == 3
    second = StopAt(parts, dataset=shapes8, at=5)
    assert second.resumed_from is not None and second.iteration == 3
    summary = second.fit()
    assert summary["status"] == "interrupted" and summary["iteration"] == 6
    third = GANTrainer(parts, dataset=shapes8)
    assert third.iteration == 6 and third.fit()["status"] == "finished"

    a, b = _state(tmp_path / "whole"), _state(tmp_path / "parts")
    assert a.keys() == b.keys() and any("_u" in k for k in a)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"differ after resume: {different[:5]}"
    grids = sorted(p.name for p in (tmp_path / "parts" / "samples").glob("*.png"))
    assert grids == ["iter_00000002.png", "iter_00000004.png", "iter_00000006.png", "iter_00000008.png"]
    header = (tmp_path / "parts" / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("iteration,g_steps,loss_d,loss_g,r1,d_real,d_fake")


def test_resume_refuses_other_settings_but_may_run_longer(tmp_path, shapes8):
    GANTrainer(tiny(tmp_path, "name=run"), dataset=shapes8).fit(until=2)
    with pytest.raises(ValueError, match=r"model\.latent_dim"):
        GANTrainer(tiny(tmp_path, "name=run", "model.latent_dim=4"), dataset=shapes8)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        GANTrainer(tiny(tmp_path, "name=run"), dataset=shapes8, resume=False)
    longer = GANTrainer(tiny(tmp_path, "name=run", "train.iterations=10"), dataset=shapes8)
    assert longer.iteration == 2 and longer.fit()["g_steps"] == 10


class _Poisoned(Dataset):
    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        return torch.full_like(self.base[index][0], float("nan"))


def test_nan_stops_with_an_error_and_keeps_the_last_good_checkpoint(tmp_path, shapes8):
    cfg = tiny(tmp_path, "name=nan")
    GANTrainer(cfg, dataset=shapes8).fit(until=2)
    good = checkpoint.latest(cfg.run_dir / "checkpoints")
    with pytest.raises(NonFiniteLossError, match="NaN or infinite at iteration 2"):
        GANTrainer(cfg, dataset=_Poisoned(shapes8)).fit()
    assert checkpoint.all_checkpoints(cfg.run_dir / "checkpoints") == [good]


# -- the run as a pipeline --------------------------------------------------------------------------
def test_load_generator_reproduces_the_trained_networks(tmp_path, shapes8):
    cfg = tiny(tmp_path, "name=load")
    trainer = GANTrainer(cfg, dataset=shapes8)
    trainer.fit()
    # the G step's backward went through D with D frozen: no gradient left behind for D's next step
    assert all(p.grad is None for p in trainer.discriminator.parameters())
    z = torch.randn(5, 8)
    g = load_generator(cfg.run_dir)
    assert isinstance(g, Generator) and not g.training
    assert not any(p.requires_grad for p in g.parameters())
    assert torch.equal(g(z), trainer.ema_generator(z))
    raw = load_generator(cfg.run_dir, use_ema=False)
    trainer.g.eval()
    assert torch.equal(raw(z), trainer.g(z)) and not torch.equal(raw(z), g(z))
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    trainer.discriminator.eval()
    assert torch.equal(load_discriminator(cfg.run_dir)(x), trainer.discriminator(x))
    run = load_gan_run(cfg.run_dir)
    assert run.cfg.model.latent_dim == 8 and run.checkpoint.name == "ckpt-00000008"
    assert torch.equal(run.generator(z), g(z))
    # the call shape dissection uses: latents from a seeded CPU generator, moved to G's device
    same = g(g.latents(4, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(same, g(g.latents(4, generator=torch.Generator().manual_seed(1))))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_generator(tmp_path)
    with pytest.raises(FileNotFoundError, match="no folder"):
        load_generator(tmp_path / "missing")


def test_sample_is_batch_size_invariant_and_seeded():
    torch.manual_seed(0)
    g = Generator(latent_dim=8, image_size=8, base_channels=8)
    g(torch.randn(16, 8))  # running statistics away from their initial values
    g.train()
    whole = torch.cat(list(sample(g, 10, seed=2, batch_size=10)))
    assert g.training  # the mode is restored
    for batch_size in (1, 3, 64):
        batches = list(sample(g, 10, seed=2, batch_size=batch_size))
        assert [len(b) for b in batches] == [min(batch_size, 10 - s) for s in range(0, 10, batch_size)]
        assert torch.allclose(torch.cat(batches), whole, atol=1e-6, rtol=0)
    assert whole.shape == (10, 3, 8, 8) and whole.min() >= 0 and whole.max() <= 1
    g.eval()
    z = g.latents(10, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(whole, (g(z) + 1) / 2, atol=1e-6, rtol=0)
    assert torch.equal(torch.cat(list(latent_batches(g, 10, seed=2, batch_size=4))), z)
    other = torch.cat(list(sample(g, 10, seed=3)))
    assert not torch.allclose(other, whole)
    with pytest.raises(ValueError, match="num_images"):
        next(sample(g, 0))
    with pytest.raises(ValueError, match="batch_size"):
        next(sample(g, 4, batch_size=0))
    with pytest.raises(TypeError, match="generator"):
        next(sample(torch.nn.Identity(), 4))


@pytest.mark.slow
def test_a_short_run_brings_samples_closer_to_the_data(tmp_path):
    """A short run on 16-px shapes lowers the offline FID (shapes-classifier features) of the EMA
    samples well below the untrained generator's."""
    cfg = load_gan_config(
        "gan-shapes",
        [
            f"out_dir={tmp_path}",
            "name=learn",
            "data.image_size=16",
            "model.latent_dim=32",
            "model.g_channels=16",
            "model.d_channels=16",
            "train.batch_size=32",
            "train.iterations=400",
            "train.sample_every=0",
            "train.checkpoint_every=1000",
            "train.progress=false",
            "eval.num_samples=512",
            "eval.real_images=1024",
            "eval.batch_size=256",
            "eval.features=classifier",
        ],
    )
    trainer = GANTrainer(cfg)
    untrained = trainer.evaluate()
    name = next(iter(untrained))
    assert name == "FID (offline shapes-classifier features)"
    trained = trainer.fit()["evals"][-1]["metrics"]
    assert trained[name] < 0.5 * untrained[name], (untrained, trained)


DISTRIBUTED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from genxai.gan import GANTrainer, load_gan_config
    trainer = GANTrainer(load_gan_config("gan-shapes", sys.argv[2:]))
    summary = trainer.fit()
    g = next(trainer.g.parameters()).detach().flatten()[:4].tolist()
    d = next(trainer.discriminator.parameters()).detach().flatten()[:4].tolist()
    result = {"rank": trainer.rank, "world": trainer.world, "g": g, "d": d, **summary}
    Path(sys.argv[1], f"result-{trainer.rank}.json").write_text(json.dumps(result))
    """
)


@pytest.mark.slow
def test_two_processes_with_accelerate_launch(tmp_path):
    """Under DDP (two gloo processes on the CPU, each its own data and latents) G and D stay the
    same everywhere: both gradients are averaged, R1's double backward and the frozen D included."""
    script = tmp_path / "train.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = Path(sys.executable).with_name("accelerate")
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    overrides = [*TINY, f"out_dir={tmp_path}", "name=ddp", "train.iterations=4", "train.cpu=true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*cmd, str(script), str(tmp_path), *overrides], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("result-*.json"))]
    assert sorted(r["rank"] for r in results) == [0, 1] and all(r["world"] == 2 for r in results)
    assert results[0]["g"] == results[1]["g"] and results[0]["d"] == results[1]["d"]
    assert all(r["g_steps"] == 4 for r in results)
