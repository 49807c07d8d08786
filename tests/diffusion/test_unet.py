"""UNet: DDPM's architecture (parameter count, agreement with diffusers' UNet2DModel), and the
saliency attention maps: gates at 0 give the baseline exactly, open gates let the map act."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from genxai.diffusion import UNet

TINY = {
    "image_size": 16,
    "base_channels": 16,
    "channel_mults": (1, 2),
    "num_res_blocks": 1,
    "attention_resolutions": (8,),
    "dropout": 0.0,
}


def reinit(model: nn.Module) -> nn.Module:
    """Default PyTorch init everywhere (the zero-initialised output convs would hide differences)."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.reset_parameters()
    return model.eval()


@pytest.mark.parametrize("size", [16, 32])
def test_output_shape_equals_input_shape(size):
    model = reinit(UNet(**{**TINY, "image_size": size, "channel_mults": (1, 2, 2)}))
    x = torch.randn(2, 3, size, size)
    out = model(x, torch.tensor([3, 700]))
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert model.levels == (size, size // 2, size // 4)
    assert torch.equal(model(x, 5), model(x, torch.tensor([5, 5])))


def test_untrained_output_is_zero_like_ddpm_init():
    model = UNet(**TINY)
    assert torch.equal(model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2])), torch.zeros(2, 3, 16, 16))


@pytest.mark.parametrize("embedding", ["fourier", "random_fourier"])
def test_fourier_time_embeddings(embedding):
    model = reinit(UNet(**TINY, time_embedding=embedding, in_channels=1))
    x = torch.randn(2, 1, 16, 16)
    a, b = model(x, torch.tensor([1, 1])), model(x, torch.tensor([900, 900]))
    assert a.shape == x.shape and not torch.allclose(a, b)
    learned = model.time_features.weights.requires_grad
    assert learned == (embedding == "fourier")


@pytest.mark.parametrize("variant", ["same", "hierarchical"])
def test_closed_gates_give_the_baseline_exactly(variant):
    base = reinit(UNet(**TINY))
    guided = UNet(**TINY, attention_maps=variant).eval()
    missing, unexpected = guided.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("gates", "map_pyramid")) for k in missing)
    torch.manual_seed(1)
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 400, 999])
    s = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        expected = base(x, t)
        assert torch.equal(guided(x, t), expected)
        assert torch.equal(guided(x, t, saliency=s), expected)
        assert torch.equal(base(x, t, saliency=s), expected)  # the baseline ignores maps


@pytest.mark.parametrize("variant", ["same", "hierarchical"])
def test_open_gates_let_the_saliency_act(variant):
    model = reinit(UNet(**TINY, attention_maps=variant))
    with torch.no_grad():
        for gate in model.gates:
            gate.fill_(0.5)
    torch.manual_seed(2)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    s = torch.rand(2, 1, 16, 16) ** 4
    with torch.no_grad():
        plain = model(x, t)
        assert not torch.allclose(model(x, t, saliency=s), plain, atol=1e-4)
        # None means all-ones, and any constant map is as uninformative (maps are mean-normalised).
        assert torch.allclose(model(x, t, saliency=torch.full((2, 1, 16, 16), 3.0)), plain, atol=1e-5)
        assert torch.allclose(model(x, t, saliency=3 * s), model(x, t, saliency=s), atol=1e-5)
        # A smaller map is resized to the input size.
        assert model(x, t, saliency=s[:, :, ::2, ::2]).shape == x.shape


def test_gates_and_map_encoder_get_gradients():
    model = reinit(UNet(**TINY, attention_maps="hierarchical")).train()
    x, t, s = torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), torch.rand(2, 1, 16, 16)
    model(x, t, saliency=s).square().mean().backward()
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in model.gates)
    with torch.no_grad():
        for gate in model.gates:
            gate.fill_(0.3)
    model.zero_grad()
    model(x, t, saliency=s).square().mean().backward()
    assert all(h.weight.grad.abs().sum() > 0 for h in model.map_pyramid.heads)


def test_hierarchical_levels_get_maps_of_their_own():
    model = UNet(**TINY, attention_maps="hierarchical")
    s = torch.rand(2, 1, 16, 16)
    x = torch.zeros(2, 3, 16, 16)
    same = UNet(**TINY, attention_maps="same").attention_pyramid(s, x)
    hier = model.attention_pyramid(s, x)
    assert [m.shape[-1] for m in hier] == [16, 8] and all(torch.allclose(a, b) for a, b in zip(same, hier))
    with torch.no_grad():
        for head in model.map_pyramid.heads:
            nn.init.normal_(head.weight, std=0.1)
    hier = model.attention_pyramid(s, x)
    assert not torch.allclose(hier[1], same[1])


def test_ddpm_cifar10_has_35_7m_parameters():
    model = UNet.ddpm_cifar10()
    assert model.num_parameters() == sum(p.numel() for p in model.parameters()) == 35_746_307
    assert model.levels == (32, 16, 8, 4) and model.config["channel_mults"] == [1, 2, 2, 2]


def test_bad_input_is_rejected():
    model = UNet(**TINY)
    with pytest.raises(ValueError, match=r"^x: height and width must be divisible by 2, got \(15, 15\)"):
        model(torch.zeros(1, 3, 15, 15), 0)
    with pytest.raises(ValueError, match=r"^t: expected \(2,\) timesteps or a scalar, got shape \(3,\)"):
        model(torch.zeros(2, 3, 16, 16), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="attention_maps"):
        UNet(**TINY, attention_maps="both")
    with pytest.raises(ValueError, match="image_size"):
        UNet(**{**TINY, "image_size": 18, "channel_mults": (1, 2, 2)})
    with pytest.raises(ValueError, match="saliency"):
        UNet(**TINY, attention_maps="same")(torch.zeros(2, 3, 16, 16), 0, saliency=torch.ones(2, 3, 16, 16))


def _diffusers_twin(config: dict):
    from diffusers import UNet2DModel

    chans = [config["base_channels"] * m for m in config["channel_mults"]]
    attn = [config["image_size"] // 2**i in config["attention_resolutions"] for i in range(len(chans))]
    return UNet2DModel(
        sample_size=config["image_size"],
        in_channels=config["in_channels"],
        out_channels=config["in_channels"],
        block_out_channels=tuple(chans),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        layers_per_block=config["num_res_blocks"],
        attention_head_dim=None,
        norm_num_groups=config["norm_groups"],
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=1,
        dropout=config["dropout"],
    )


def _copy_from_diffusers(ours: UNet, theirs) -> None:
    sd, out = theirs.state_dict(), {}
    resnet = {
        "norm1": "norm1",
        "conv1": "conv1",
        "temb_proj": "time_emb_proj",
        "norm2": "norm2",
        "conv2": "conv2",
        "skip": "conv_shortcut",
    }

    def block(dst: str, src: str, attention: nn.Module | None, att_src: str | None) -> None:
        for a, b in resnet.items():
            for p in ("weight", "bias"):
                if f"{src}.{b}.{p}" in sd:
                    out[f"{dst}.{a}.{p}"] = sd[f"{src}.{b}.{p}"]
        if attention is not None and not isinstance(attention, nn.Identity):
            dst_att = dst.replace("blocks", "attention")
            for p in ("weight", "bias"):
                out[f"{dst_att}.norm.{p}"] = sd[f"{att_src}.group_norm.{p}"]
                out[f"{dst_att}.qkv.{p}"] = torch.cat([sd[f"{att_src}.to_{k}.{p}"] for k in "qkv"])
                out[f"{dst_att}.proj.{p}"] = sd[f"{att_src}.to_out.0.{p}"]

    for p in ("weight", "bias"):
        for a, b in {
            "conv_in": "conv_in",
            "time_mlp.0": "time_embedding.linear_1",
            "time_mlp.2": "time_embedding.linear_2",
            "norm_out": "conv_norm_out",
            "conv_out": "conv_out",
        }.items():
            out[f"{a}.{p}"] = sd[f"{b}.{p}"]
    for path, stages, their_path, sampler in (
        ("down", ours.down, "down_blocks", "downsamplers"),
        ("up", ours.up, "up_blocks", "upsamplers"),
    ):
        for i, stage in enumerate(stages):
            for j, attention in enumerate(stage.attention):
                block(
                    f"{path}.{i}.blocks.{j}",
                    f"{their_path}.{i}.resnets.{j}",
                    attention,
                    f"{their_path}.{i}.attentions.{j}",
                )
            if not isinstance(stage.resample, nn.Identity):
                for p in ("weight", "bias"):
                    out[f"{path}.{i}.resample.conv.{p}"] = sd[f"{their_path}.{i}.{sampler}.0.conv.{p}"]
    block("mid.blocks.0", "mid_block.resnets.0", ours.mid.attention[0], "mid_block.attentions.0")
    block("mid.blocks.1", "mid_block.resnets.1", None, None)
    ours.load_state_dict(out, strict=True)


@pytest.mark.peers
def test_agrees_with_diffusers_unet2dmodel():
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ours = UNet(**{**TINY, "channel_mults": (1, 2, 2)}, norm_groups=8).eval()
    theirs = _diffusers_twin(ours.config).eval()
    assert ours.num_parameters() == sum(p.numel() for p in theirs.parameters())
    _copy_from_diffusers(ours, theirs)
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 10, 999])
    with torch.no_grad():
        expected = theirs(x, t).sample
        assert torch.allclose(ours(x, t), expected, atol=1e-4, rtol=1e-4)
