"""Dissection of a denoiser's units per timestep (genxai.dissection.timesteps).

A planted denoiser: its block ``paint`` outputs 3 units at 8 x 8; unit 1 is the indicator of the
cells where the coarse red channel of x_t is positive, gated to t < GATE; units 0 and 2 are the
coarse green and blue channels of x_t (noise above the gate). Its eps makes the denoised estimate red (1, -1, -1)
on unit 1's cells and grey elsewhere, so DDIM keeps the cells fixed (they are those of x_T) and
the final sample is red exactly there: unit 1 draws "red" from GATE down, nothing above.
A tiny genxai UNet (random weights) checks the streamed scores against a hold-everything
recomputation at the chosen t.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genxai.diffusion.guidance import TimeConditioned
from genxai.diffusion.sampling import ddim_sample, ddim_timesteps
from genxai.diffusion.schedule import NoiseSchedule
from genxai.diffusion.unet import UNet
from genxai.dissection.timesteps import TimestepSampler, dissect_timesteps, timestep_ace
from tests.dissection.planted import RedSegmenter

T, STEPS, GATE, PAINT = 100, 10, 50, 1


class PlantedDenoiser(nn.Module):
    def __init__(self, schedule: NoiseSchedule) -> None:
        super().__init__()
        self.schedule = schedule
        self.paint = nn.Identity()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        coarse = F.avg_pool2d(x, 4)  # (N, 3, 8, 8)
        on = (coarse[:, 0] > 0).float() * (t < GATE).float().view(-1, 1, 1)
        units = self.paint(torch.stack([coarse[:, 1], on, coarse[:, 2]], 1) + 0 * self.anchor)
        drawn = F.interpolate(units[:, 1:2], scale_factor=4)
        x0 = drawn * torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1)
        a = self.schedule.gather("alphas_cumprod", t).float()
        return (x - a.sqrt() * x0) / (1 - a).sqrt()


def _sampler(model, layer, schedule, steps=STEPS, shape=(3, 32, 32), seed=0):
    def sample(model_fn, x_T):
        return ddim_sample(model_fn, schedule, tuple(x_T.shape), steps=steps, x_T=x_T)

    def denoise(x, t):
        return TimeConditioned(model, t)(x)

    visited = ddim_timesteps(schedule.num_timesteps, steps)
    return TimestepSampler(model, layer, sample, visited, shape, denoise=denoise, seed=seed)


class Bright:
    concepts = ("dark", "bright")

    def concept_masks(self, images):
        bright = images.mean(1) > 0.5
        return torch.stack([~bright, bright], 1)


@pytest.fixture
def schedule():
    return NoiseSchedule(num_timesteps=T)


def test_planted_unit_carries_red_from_the_gate_on(schedule):
    model = PlantedDenoiser(schedule)
    sampler = _sampler(model, "paint", schedule)
    assert sampler.visited == [90, 80, 70, 60, 50, 40, 30, 20, 10, 0]
    result = dissect_timesteps(
        sampler, RedSegmenter(), timesteps=[90, 60, 40, 0], num_samples=24, batch_size=12
    )
    red = result.concepts.index("red")
    assert result.timesteps == [90, 60, 40, 0]
    assert result.iou[:2, PAINT].max() == 0  # unit 1 is constant 0 above the gate: no association
    assert not result.interpretable[:2].any()  # above the gate every unit is noise
    assert (result.best_iou[:2, red] < 0.05).all()  # so the emergence curve is flat there
    assert (result.best_unit[2:, red] == PAINT).all() and (result.best_iou[2:, red] > 0.8).all()
    assert result.interpretable[2:, PAINT].all() and (result.unit_concept[2:, PAINT] == red).all()
    summary = result.summary()
    assert summary["per_timestep"][3]["best_unit"]["red"] == PAINT
    assert 0.1 < summary["concept_fraction"]["red"] < 0.9


def test_ace_per_timestep_removes_red_only_at_the_last_step(schedule):
    """Ablating unit 1 at one step: the estimate is grey there, but the cells stay those of x_T,
    so later steps paint them again; only at t = 0 (the last step) the sample loses all its red."""
    model = PlantedDenoiser(schedule)
    sampler = _sampler(model, "paint", schedule)
    result = dissect_timesteps(sampler, RedSegmenter(), timesteps=[60, 40, 0], num_samples=16, batch_size=16)
    ace = timestep_ace(sampler, RedSegmenter(), result, concepts=["red"], num_samples=16)
    red = result.concepts.index("red")
    assert ace.units[1:, red, 0].tolist() == [PAINT, PAINT]
    assert ace.ace[2, red] == pytest.approx(-float(ace.baseline[red]), abs=1e-6)
    assert abs(float(ace.ace[1, red])) < 0.01
    assert torch.isnan(ace.ace[:, 0]).all()  # background was not asked for
    assert ace.summary()["ace"][-1]["t"] == 0
    assert all(not m._forward_hooks for m in model.modules())


def test_unet_block_matches_a_hold_everything_recomputation(schedule):
    """A tiny genxai UNet: the IoU at each chosen t and the chosen threshold equals the IoU
    recomputed from all the block's outputs at that t held at once, and the samples are DDIM's."""
    torch.manual_seed(0)
    unet = UNet(
        image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=()
    )
    unet.eval()

    sampler = _sampler(unet, "down.1.blocks.0", schedule, steps=5, shape=(3, 8, 8), seed=3)
    result = dissect_timesteps(sampler, Bright(), timesteps=[80, 20], num_samples=20, batch_size=7)
    images, acts = sampler.run(0, 20, read=[80, 20])
    with torch.no_grad():
        x_T = sampler.noise.rows(0, 20)
        plain = ddim_sample(lambda x, t: unet(x, t), schedule, (20, 3, 8, 8), steps=5, x_T=x_T)
    torch.testing.assert_close(images, ((plain + 1) / 2).clamp(0, 1))
    masks = Bright().concept_masks(images)
    for i, t in enumerate([80, 20]):
        up = F.interpolate(acts[t], size=(8, 8), mode="bilinear", align_corners=False)
        for c in range(2):
            unit_masks = up > result.threshold[i, :, c].view(1, -1, 1, 1)
            inter = (unit_masks & masks[:, c : c + 1]).sum((0, 2, 3)).double()
            union = (unit_masks | masks[:, c : c + 1]).sum((0, 2, 3)).double()
            exact = torch.where(union > 0, inter / union.clamp_min(1), 0.0).float()
            scored = result.iqr[i, :, c] > 0
            torch.testing.assert_close(result.iou[i, scored, c], exact[scored], atol=1e-5, rtol=0)
    assert not torch.equal(result.iou[0], result.iou[1])  # the two timesteps differ
    assert all(not m._forward_hooks for m in unet.modules())


def test_bad_timesteps_and_layers_are_named(schedule):
    model = PlantedDenoiser(schedule)
    with pytest.raises(ValueError, match="Closest names: paint"):
        _sampler(model, "pain", schedule)
    sampler = _sampler(model, "paint", schedule)
    with pytest.raises(ValueError, match=r"timesteps: \[55\] are not .* visits 10 from 90 to 0"):
        dissect_timesteps(sampler, RedSegmenter(), timesteps=[90, 55], num_samples=4)
    with pytest.raises(ValueError, match="num_samples"):
        dissect_timesteps(sampler, RedSegmenter(), timesteps=[90], num_samples=0)
    result = dissect_timesteps(sampler, RedSegmenter(), timesteps=[0], num_samples=4)
    with pytest.raises(ValueError, match="concepts"):
        timestep_ace(sampler, RedSegmenter(), result, concepts=["blue"], num_samples=4)
    assert all(not m._forward_hooks for m in model.modules())


# --- the job and the command --------------------------------------------------------------------


def test_dissect_unet_command_on_the_planted_denoiser(tmp_path, schedule, monkeypatch):
    import json

    from typer.testing import CliRunner

    from genxai.cli import app
    from genxai.jobs import dissection as job

    model = PlantedDenoiser(schedule)
    monkeypatch.setattr(job, "load_diffusion", lambda run, device: (model, schedule, [3, 32, 32]))
    monkeypatch.setattr(job, "load_segmenter", lambda path, device: RedSegmenter())
    runner = CliRunner()
    base = ["dissect-unet", "--run", "r", "-s", "s", "--steps", str(STEPS), "--n", "16", "--ace-samples", "8"]
    out = runner.invoke(app, [*base, "-l", "paint", "-t", "90,40,0", "--out", str(tmp_path), "--no-progress"])
    assert out.exit_code == 0, out.output
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["timesteps"] == [90, 40, 0] and results["sampler"] == "the 10-step DDIM sampler"
    assert [r["best_unit"]["red"] for r in results["per_timestep"]][1:] == [PAINT, PAINT]
    last = next(r for r in results["ace"]["ace"] if r["t"] == 0 and r["concept"] == "red")
    assert last["ace"] == pytest.approx(-results["ace"]["baseline"]["red"], abs=1e-6)
    assert (tmp_path / "emergence.png").is_file() and (tmp_path / "timesteps.safetensors").is_file()
    assert "Dissection over timesteps: paint" in (tmp_path / "report.html").read_text()
    for extra, message in (
        (["-l", "pain", "-t", "90"], "Closest names: paint"),
        (["-l", "paint", "-t", "95"], "visits 10 from 90 to 0"),
        (["-l", "paint", "-t", "9x"], "--timesteps: expected integers"),
        (["-l", "paint", "--n", "0"], "--n"),
    ):
        out = runner.invoke(app, [*base, *extra, "--out", str(tmp_path / "x")])
        assert out.exit_code == 2 and message in out.output, (extra, out.output)
        assert len([x for x in out.output.splitlines() if x.startswith("error:")]) == 1
    monkeypatch.undo()
    from tests.dissection.test_dissection_cli import _segmenter

    seg = str(_segmenter(tmp_path / "seg"))
    args = [*base, "-l", "paint", "-s", seg, "--run", str(tmp_path / "none"), "--out", str(tmp_path / "y")]
    out = runner.invoke(app, args)
    assert out.exit_code == 2 and "no config.yaml" in out.output
    assert all(not m._forward_hooks for m in model.modules())


def test_a_diffusers_unet_by_its_block_names(schedule):
    """diffusers' UNet2DModel (tiny, random): its blocks return tuples and its output a UNet2DOutput."""
    diffusers = pytest.importorskip("diffusers")
    from genxai.jobs.dissection import diffusion_sampler

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()  # fmt: skip

    sampler = diffusion_sampler(unet, schedule, "down_blocks.1", (3, 8, 8), steps=4, seed=1)
    result = dissect_timesteps(sampler, Bright(), timesteps=[75, 0], num_samples=6, batch_size=6)
    assert result.iou.shape == (2, 16, 2) and result.layer == "down_blocks.1"
    images, acts = sampler.run(0, 6, read=[75])
    with torch.no_grad():
        plain = ddim_sample(
            lambda x, t: unet(x, t).sample, schedule, (6, 3, 8, 8), steps=4, x_T=sampler.noise.rows(0, 6)
        )
    torch.testing.assert_close(images, ((plain + 1) / 2).clamp(0, 1))
    assert acts[75].shape == (6, 16, 4, 4)
    with pytest.raises(ValueError, match=r"Closest names: down_blocks\.1"):
        diffusion_sampler(unet, schedule, "down_block.1", (3, 8, 8))
