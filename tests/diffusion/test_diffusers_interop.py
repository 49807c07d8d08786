"""genxai with diffusers, in and out: a diffusers folder loads as our UNet with the same outputs
(both downsampling conventions, eps 1e-6 as the DDPM conversions), others load as the diffusers
module itself; a run exported as a DDPMPipeline folder samples in diffusers as in genxai for the
same seed (DDPM and DDIM); bad folders, blocks, schedulers and sizes are clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from genxai.data import get_dataset
from genxai.diffusion import DiffusersUNet, UNet, export_run, from_diffusers, load_run
from genxai.diffusion.config import load_experiment
from genxai.diffusion.convert import UNET2D_DEFAULTS, diffusers_config
from genxai.diffusion.pipeline import sample_run
from genxai.diffusion.trainer import Trainer
from genxai.training import checkpoint

diffusers = pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parents[2]


def ddpm_like(padding: int = 1, eps: float = 1e-5, **overrides) -> nn.Module:
    """A tiny UNet2DModel configured as DDPM (the google/ddpm-* conversions' keys), random weights."""
    torch.manual_seed(0)
    config = {
        "sample_size": 8,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (16, 32),
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
        "layers_per_block": 1,
        "attention_head_dim": None,
        "norm_num_groups": 8,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "downsample_padding": padding,
        "norm_eps": eps,
        **overrides,
    }
    return diffusers.UNet2DModel(**config).eval()


def save_pipeline(unet: nn.Module, folder: Path, **scheduler) -> Path:
    sched = diffusers.DDPMScheduler(num_train_timesteps=50, **scheduler)
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(folder)
    return folder


@pytest.mark.peers
@pytest.mark.parametrize("padding,eps", [(0, 1e-6), (1, 1e-5), (1, 1e-6)])
def test_ddpm_configs_convert_to_our_unet_exactly(tmp_path, padding, eps):
    theirs = ddpm_like(padding, eps)
    loaded = from_diffusers(save_pipeline(theirs, tmp_path / "pipe"))
    assert loaded.converted and isinstance(loaded.unet, UNet)
    assert loaded.unet.config["downsample_padding"] == padding and loaded.unet.config["norm_eps"] == eps
    assert loaded.schedule.num_timesteps == 50 and loaded.cfg.data.image_size == 8
    assert loaded.sampler_options == {"clip_denoised": True, "variance": "fixed_small"}
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([0, 17, 49])
    with torch.no_grad():
        expected = theirs(x, t).sample
        assert (loaded.unet(x, t) - expected).abs().max() < 1e-5
        # The convention matters: the same weights with the other padding compute another function.
        other = UNet(**{**loaded.unet.config, "downsample_padding": 1 - padding})
        other.load_state_dict(loaded.unet.state_dict())
        assert (other(x, t) - expected).abs().max() > 1e-3


# config.json of the DDPM paper's conversions (google/ddpm-cifar10-32, google/ddpm-celebahq-256).
DDPM_CIFAR10 = {
    "_class_name": "UNet2DModel",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
DDPM_CELEBAHQ = {
    **DDPM_CIFAR10,
    "block_out_channels": [128, 128, 256, 256, 512, 512],
    "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
    "sample_size": 256,
}


def test_the_ddpm_papers_configs_are_our_paper_unets():
    from genxai.diffusion.convert import unet_arguments
    from genxai.diffusion.interop import UNET2D_DEFAULTS as defaults

    for config, ours in ((DDPM_CIFAR10, UNet.ddpm_cifar10), (DDPM_CELEBAHQ, UNet.ddpm_celebahq256)):
        arguments, why = unet_arguments({**defaults, **config, "_unknown": []})
        assert arguments is not None, why
        expected = ours(downsample_padding=0, norm_eps=1e-6, dropout=arguments["dropout"]).config
        assert all(expected[k] == v for k, v in arguments.items()), arguments


@pytest.mark.peers
def test_the_cifar10_conversion_config_loads_exactly(tmp_path):
    """The full 35.7M network of google/ddpm-cifar10-32's config (random weights)."""
    config = {k: v for k, v in DDPM_CIFAR10.items() if not k.startswith("_")}
    torch.manual_seed(0)
    theirs = diffusers.UNet2DModel(**config).eval()
    theirs.save_pretrained(tmp_path / "unet")
    loaded = from_diffusers(tmp_path / "unet")
    assert loaded.converted and loaded.unet.num_parameters() == 35_746_307
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([321])
    with torch.no_grad():
        assert (loaded.unet(x, t) - theirs(x, t).sample).abs().max() < 1e-5


@pytest.mark.peers
def test_a_unet_folder_without_scheduler_loads_with_ddpms_schedule(tmp_path):
    theirs = ddpm_like()
    theirs.save_pretrained(tmp_path / "unet")
    loaded = from_diffusers(tmp_path / "unet", image_size=8)
    assert loaded.converted and loaded.schedule.num_timesteps == 1000 and loaded.notes


@pytest.mark.peers
def test_other_unets_are_used_as_they_are(tmp_path):
    theirs = ddpm_like(flip_sin_to_cos=True, freq_shift=0, attention_head_dim=8)  # diffusers' defaults
    loaded = from_diffusers(save_pipeline(theirs, tmp_path / "pipe"))
    assert not loaded.converted and isinstance(loaded.unet, DiffusersUNet)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 30])
    with torch.no_grad():
        assert torch.equal(loaded.unet(x, t), theirs(x, t).sample)
    with pytest.raises(ValueError, match="flip_sin_to_cos"):
        from_diffusers(tmp_path / "pipe", convert=True)


def test_defaults_are_unet2dmodels():
    import inspect

    signature = inspect.signature(diffusers.UNet2DModel.__init__).parameters
    for key, value in UNET2D_DEFAULTS.items():
        default = signature[key].default
        assert (list(default) if isinstance(default, tuple) else default) == value, key


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_bad_folders_blocks_schedulers_and_sizes_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a diffusers model folder"):
        from_diffusers(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        from_diffusers(tmp_path / "missing")
    folder = save_pipeline(ddpm_like(), tmp_path / "pipe")
    with pytest.raises(ValueError, match=r"^image_size: 16, but the diffusers model's sample_size is 8"):
        from_diffusers(folder, image_size=16)
    scheduler = folder / "scheduler" / "scheduler_config.json"
    _edit_json(scheduler, beta_schedule="scaled_linear")
    with pytest.raises(ValueError, match=r"^scheduler beta_schedule: 'scaled_linear'"):
        from_diffusers(folder)
    _edit_json(scheduler, beta_schedule="linear", prediction_type="v_prediction")
    with pytest.raises(ValueError, match=r"^scheduler prediction_type: 'v_prediction'"):
        from_diffusers(folder)
    _edit_json(scheduler, _class_name="PNDMScheduler", prediction_type="epsilon")
    with pytest.raises(ValueError, match=r"^scheduler: 'PNDMScheduler' .* not implemented"):
        from_diffusers(folder)
    _edit_json(scheduler, _class_name="DDPMScheduler")
    config = folder / "unet" / "config.json"
    _edit_json(config, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"])
    with pytest.raises(ValueError, match=r"^down_block_types: 'CrossAttnDownBlock2D' is not supported"):
        from_diffusers(folder)
    _edit_json(config, down_block_types=["DownBlock2D", "AttnDownBlock2D"], sample_size=7)
    with pytest.raises(ValueError, match=r"^sample_size: 7 is not divisible by 2"):
        from_diffusers(folder)
    _edit_json(config, sample_size=8, _class_name="UNet2DConditionModel")
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        from_diffusers(folder)

    from genxai.cli import app

    result = CliRunner().invoke(app, ["sample", "--diffusers", str(folder), "--n", "1"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: _class_name")
    result = CliRunner().invoke(app, ["sample", "--n", "1"])
    assert result.exit_code == 2 and "--run, --diffusers" in result.output


# -- out: a run as a DDPMPipeline folder --------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A baseline run (T = 20) of two iterations whose EMA weights are then randomised (so the
    exported network computes a non-trivial function) and saved back into its checkpoint."""
    out = tmp_path_factory.mktemp("runs")
    overrides = [
        "data.image_size=8",
        "data.limit=16",
        "schedule.num_timesteps=20",
        "model.base_channels=32",
        "model.channel_mults=[1,2]",
        "model.num_res_blocks=1",
        "model.attention_resolutions=[4]",
        "cycle.phase_a=1",
        "cycle.phase_b=0",
        "cycle.cycles=2",
        "train.batch_size=4",
        "train.progress=false",
        "eval.num_samples=0",
        "sample.steps=5",
        f"out_dir={out}",
        "name=base",
    ]
    cfg = load_experiment(ROOT / "configs" / "demo.yaml", overrides)
    Trainer(cfg, dataset=get_dataset("shapes", size=8, n=16, seed=0)).fit()
    path = checkpoint.latest(cfg.run_dir / "checkpoints")
    unet = checkpoint.load_module(path, "unet_ema", UNet)
    torch.manual_seed(3)
    for module in unet.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.reset_parameters()
    checkpoint.write_weights(path, "unet_ema", unet.state_dict(), unet.config)
    return cfg.run_dir


@pytest.mark.peers
def test_exported_run_samples_in_diffusers_as_in_genxai(run, tmp_path):
    from genxai.cli import app

    result = CliRunner().invoke(app, ["export", "--run", str(run), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"model_index.json", "unet", "scheduler"}
    loaded = load_run(run)
    n = 4

    def ours(sampler: str, **options) -> torch.Tensor:
        return next(
            sample_run(
                loaded.cfg, loaded.unet, loaded.schedule, num_images=n, seed=7, sampler=sampler, **options
            )
        )

    def theirs(pipeline, **options) -> torch.Tensor:
        generator = torch.Generator().manual_seed(7)
        images = pipeline(batch_size=n, generator=generator, output_type="np", **options).images
        return torch.from_numpy(images).permute(0, 3, 1, 2)

    ddpm = diffusers.DDPMPipeline.from_pretrained(tmp_path / "out")
    ddpm.set_progress_bar_config(disable=True)
    expected = ours("ddpm")
    assert expected.std() > 0.05  # a non-trivial image, not a constant
    assert (theirs(ddpm, num_inference_steps=20) - expected).abs().max() < 1e-4
    ddim = diffusers.DDIMPipeline.from_pretrained(tmp_path / "out")
    ddim.set_progress_bar_config(disable=True)
    for eta in (0.0, 0.5):
        got = theirs(ddim, num_inference_steps=5, eta=eta, use_clipped_model_output=True)
        assert (got - ours("ddim", steps=5, eta=eta)).abs().max() < 1e-4, eta

    # ... and back: the folder loads as our UNet with the run's weights.
    back = from_diffusers(tmp_path / "out")
    assert back.converted and back.sampler_options["variance"] == "fixed_large"
    state = loaded.unet.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in back.unet.state_dict().items())
    result = CliRunner().invoke(app, ["export", "--run", str(run), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "not empty" in result.output


def test_what_a_unet2dmodel_cannot_express_is_refused():
    with pytest.raises(ValueError, match=r"^attention_maps: the UNet takes 'same' saliency maps"):
        diffusers_config(UNet(8, base_channels=32, channel_mults=(1, 2), attention_maps="same"))
    with pytest.raises(ValueError, match=r"^norm_groups: 32 does not divide"):
        diffusers_config(UNet(8, base_channels=16, channel_mults=(1, 2)))
    with pytest.raises(ValueError, match=r"^time_embedding"):
        diffusers_config(UNet(8, base_channels=32, channel_mults=(1, 2), time_embedding="fourier"))


def test_export_refuses_a_missing_run(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config.yaml"):
        export_run(tmp_path, tmp_path / "out")


@pytest.mark.peers
def test_converting_and_exporting_need_no_diffusers_and_the_rest_says_so(run, tmp_path, monkeypatch):
    convertible = save_pipeline(ddpm_like(), tmp_path / "ddpm")
    other = save_pipeline(ddpm_like(flip_sin_to_cos=True), tmp_path / "other")
    monkeypatch.setitem(__import__("sys").modules, "diffusers", None)  # `import diffusers` now fails
    assert from_diffusers(convertible).converted
    assert from_diffusers(export_run(run, tmp_path / "exported")).converted
    with pytest.raises(ValueError, match=r"pip install diffusers"):
        from_diffusers(other)
