"""Guide and explain any UNet: saliency attention maps hooked into a diffusers UNet2DModel (gates
at 0: the model unchanged, bit for bit), the XAI-guided cycle fine-tuning one from its folder with
checkpoints and exact resume, and the attribution methods on it at a fixed timestep."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from genxai.attribution import get
from genxai.core.hooks import Trace
from genxai.data import get_dataset
from genxai.diffusion import DiffusersUNet, load_run
from genxai.diffusion.config import load_experiment
from genxai.diffusion.guidance import TimeConditioned
from genxai.diffusion.pipeline import sample_run
from genxai.diffusion.trainer import Trainer
from genxai.training import checkpoint

diffusers = pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parents[2]


def unet2d(**overrides) -> nn.Module:
    """A tiny UNet2DModel with diffusers' own defaults (it does not convert to our UNet)."""
    torch.manual_seed(0)
    config = {
        "sample_size": 8,
        "block_out_channels": (16, 32),
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        **overrides,
    }
    return diffusers.UNet2DModel(**config).eval()


@pytest.mark.parametrize("maps", ["same", "hierarchical"])
def test_closed_gates_leave_the_diffusers_unet_unchanged(maps):
    plain = unet2d()
    guided = DiffusersUNet.wrap(plain, maps)
    assert len(guided.sites) == 2 + 2 + 2 * 2  # ResNet blocks: down 1+1, mid 2, up 2+2
    x, t, s = torch.randn(3, 3, 8, 8), torch.tensor([0, 400, 999]), torch.rand(3, 1, 8, 8) ** 4
    with torch.no_grad():
        expected = plain(x, t).sample
        assert torch.equal(guided(x, t), expected) and torch.equal(guided(x, t, saliency=s), expected)
        for gate in guided.gates:
            gate.fill_(0.5)
        opened = guided(x, t, saliency=s)
        assert not torch.allclose(opened, expected, atol=1e-4)
        # Maps are mean-normalised: a constant map acts as None (all-ones), as in our UNet.
        assert torch.allclose(guided(x, t, saliency=torch.full_like(s, 3.0)), guided(x, t), atol=1e-5)
        assert torch.equal(plain(x, t).sample, expected)  # no hook stays behind
    guided.train()
    guided(x, t, saliency=s).square().mean().backward()
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in guided.gates)


TINY = [
    "data.image_size=8",
    "data.limit=32",
    "discriminator.base_channels=8",
    "cycle.phase_a=2",
    "cycle.phase_b=2",
    "cycle.cycles=1",
    "train.batch_size=4",
    "train.warmup=2",
    "train.lr=1e-3",
    "train.ema_decay=0.9",
    "train.log_every=1",
    "train.checkpoint_every=100",
    "train.progress=false",
    "eval.num_samples=0",
    "sample.steps=4",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "pipe"
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    diffusers.DDPMPipeline(unet=unet2d(), scheduler=scheduler).save_pretrained(out)
    return out


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    path = checkpoint.latest(run_dir / "checkpoints")
    tensors = {}
    for name in ("unet", "unet_ema", "discriminator"):
        tensors.update({f"{name}.{k}": v for k, v in checkpoint.read_weights(path, name).items()})
    state = checkpoint.read_state(path, "trainer")
    for model, optimizer in state["optimizers"].items():
        for key, value in optimizer["state"].items():
            tensors.update({f"optim.{model}.{key}.{n}": v for n, v in value.items()})
    return tensors


def test_the_cycle_fine_tunes_a_diffusers_unet_and_resumes_bit_for_bit(tmp_path, folder):
    data = get_dataset("shapes", size=8, n=32, seed=0)
    common = [*TINY, f"out_dir={tmp_path}", f"model.diffusers={folder}", "variant=noise+hierarchical"]
    whole = load_experiment(ROOT / "configs" / "demo.yaml", [*common, "name=whole"])
    trainer = Trainer(whole, dataset=data)
    assert (
        isinstance(trainer.step.ema.module, DiffusersUNet) and trainer.step.ema.module.map_pyramid is not None
    )
    assert trainer.fit()["processes"] == 6  # 2 x Process1+D, 2 x (Process1 + Process2)

    parts = load_experiment(ROOT / "configs" / "demo.yaml", [*common, "name=parts"])
    assert Trainer(parts, dataset=data).fit(until=3)["status"] == "stopped"  # inside phase B
    resumed = Trainer(parts, dataset=data)
    assert resumed.iteration == 3 and resumed.fit()["status"] == "finished"
    a, b = _weights(whole.run_dir), _weights(parts.run_dir)
    assert a.keys() == b.keys() and any(k.startswith("unet.gates") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    before = unet2d().state_dict()
    assert any(not torch.equal(a[f"unet.unet.{k}"], v) for k, v in before.items())  # it trained

    # The run loads without the folder's help (the config travels with the weights) and samples.
    run = load_run(parts.run_dir)
    assert isinstance(run.unet, DiffusersUNet) and run.unet.attention_maps == "hierarchical"
    images = next(sample_run(run.cfg, run.unet, run.schedule, run.discriminator, num_images=2))
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()


def test_fine_tuning_checks_the_data_and_schedule_against_the_folder(tmp_path, folder):
    data = get_dataset("shapes", size=16, n=32, seed=0)
    cfg = load_experiment(
        ROOT / "configs" / "demo.yaml",
        [*TINY, "data.image_size=16", f"out_dir={tmp_path}", f"model.diffusers={folder}"],
    )
    with pytest.raises(ValueError, match=r"^data.image_size: 16, but the diffusers model .* sample_size 8"):
        Trainer(cfg, dataset=data)
    cfg = load_experiment(
        ROOT / "configs" / "demo.yaml",
        [*TINY, "schedule.num_timesteps=100", f"out_dir={tmp_path}", f"model.diffusers={folder}"],
    )
    with pytest.raises(ValueError, match=r"^schedule.num_timesteps: 100, but .* trained with 1000"):
        Trainer(cfg, dataset=get_dataset("shapes", size=8, n=32, seed=0))
    cfg = load_experiment(
        None, [f"model.diffusers={tmp_path / 'nothing'}", f"out_dir={tmp_path}", "train.batch_size=4"]
    )
    with pytest.raises(FileNotFoundError, match=r"^model.diffusers: diffusers: no such folder"):
        Trainer(cfg, dataset=data)


def test_attribution_explains_the_predicted_noise_of_a_diffusers_unet_at_t():
    """Saliency of the predicted noise in a region at t = 500: the gradient autograd gives."""
    model = unet2d()
    x = torch.randn(2, 3, 8, 8)

    def region(eps: torch.Tensor) -> torch.Tensor:
        return eps[:, :, 2:5, 2:5].sum(dim=(1, 2, 3))

    bound = TimeConditioned(model, 500)
    with torch.no_grad():
        assert torch.equal(bound(x), model(x, 500).sample)
    maps = get("saliency")(bound)(x, target=region)
    xr = x.clone().requires_grad_(True)
    region(model(xr, torch.full((2,), 500)).sample).sum().backward()
    assert maps.shape == (2, 3, 8, 8) and torch.allclose(maps, xr.grad.abs(), atol=1e-6)
    # Its blocks are read by name through the wrapper (as the dissection tools do).
    with Trace(bound, "discriminator.mid_block") as trace, torch.no_grad():
        bound(x)
    assert trace.output.shape == (2, 32, 4, 4) and bound.model is model
