"""The DCGAN pair: shapes, ranges and named layers at several sizes, seeded latents, bad arguments."""

from __future__ import annotations

import pytest
import torch

from genxai.core.hooks import Trace
from genxai.gan import LATENT_CHUNK, Discriminator, Generator, discriminator_loss, generator_loss


@pytest.mark.parametrize("size", [8, 16, 32, 64])
def test_generator_and_discriminator_shapes_ranges_and_names(size):
    torch.manual_seed(0)
    g = Generator(latent_dim=8, image_size=size, channels=3, base_channels=4)
    d = Discriminator(image_size=size, channels=3, base_channels=4)
    blocks = size.bit_length() - 3
    assert len(g.blocks) == blocks and g.layer_names == [*(f"blocks.{i}" for i in range(blocks)), "to_rgb"]
    names = {name for name, _ in g.named_modules()}
    assert {"blocks.0.conv", "blocks.0.norm", "blocks.0.act", "to_rgb.conv", "to_rgb.act"} <= names
    z = torch.randn(5, 8)
    with torch.no_grad():
        g.to_rgb.conv.weight.mul_(1e3)  # far out: tanh still bounds the images
    x = g(z)
    assert x.shape == (5, 3, size, size) and x.min() >= -1 and x.max() <= 1 and x.abs().max() > 0.99
    assert d(x).shape == (5, 1)
    # each block doubles the side: 4x4 after blocks.0, size / 2 after the last one
    with Trace(g, f"blocks.{blocks - 1}") as tr:
        g(z[:2])
    assert tr.output.shape[-1] == size // 2 and tr.output.shape[1] == 4
    assert d.cam_layer == f"blocks.{len(d.blocks) - 1}" and len(d.blocks) == blocks


def test_widths_double_towards_z_and_respect_the_cap():
    g = Generator(latent_dim=16, image_size=64, base_channels=8, max_channels=32)
    assert [b.conv.out_channels for b in g.blocks] == [32, 32, 16, 8]
    d = Discriminator(image_size=64, base_channels=8, max_channels=32)
    assert [b.conv.out_channels for b in d.blocks] == [8, 16, 32, 32]


def test_config_rebuilds_the_same_module():
    torch.manual_seed(0)
    g = Generator(latent_dim=8, image_size=16, channels=1, base_channels=4, max_channels=64)
    copy = Generator(**g.config)
    copy.load_state_dict(g.state_dict())
    g.eval(), copy.eval()
    z = torch.randn(3, 8)
    assert torch.equal(g(z), copy(z)) and g(z).shape == (3, 1, 16, 16)
    d = Discriminator(image_size=16, channels=1, base_channels=4, spectral_norm=True)
    assert Discriminator(**d.config).state_dict().keys() == d.state_dict().keys()


def test_latents_are_seeded_and_prefix_stable():
    g = Generator(latent_dim=8, image_size=8, base_channels=4)
    a = g.latents(LATENT_CHUNK + 7, generator=torch.Generator().manual_seed(3))
    b = g.latents(5, generator=torch.Generator().manual_seed(3))
    c = g.latents(5, generator=torch.Generator().manual_seed(4))
    assert a.shape == (LATENT_CHUNK + 7, 8) and torch.equal(a[:5], b) and not torch.equal(b, c)
    assert abs(float(a.mean())) < 0.1 and abs(float(a.std()) - 1) < 0.1  # N(0, I)
    torch.manual_seed(1)
    first = g.latents(4)
    torch.manual_seed(1)
    assert torch.equal(first, g.latents(4))  # the global RNG without a generator
    assert g.latents(2).device == g.device


def test_spectral_norm_bounds_each_conv():
    torch.manual_seed(0)
    d = Discriminator(image_size=16, base_channels=8, spectral_norm=True)
    for _ in range(30):  # power iterations run in training mode
        d(torch.randn(4, 3, 16, 16))
    d.eval()
    for conv in (d.blocks[0].conv, d.blocks[1].conv, d.head):
        sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
        assert float(sigma) == pytest.approx(1.0, rel=0.05)


def test_losses_and_r1():
    torch.manual_seed(0)
    d = Discriminator(image_size=8, base_channels=4)
    real, fake = torch.rand(4, 3, 8, 8) * 2 - 1, torch.rand(4, 3, 8, 8) * 2 - 1
    out = discriminator_loss(d, real, fake)
    expected = torch.nn.functional.softplus(-d(real)).mean() + torch.nn.functional.softplus(d(fake)).mean()
    assert torch.allclose(out.loss, expected, atol=1e-6) and out.r1 is None
    with_r1 = discriminator_loss(d, real, fake, r1_weight=4.0)
    x = real.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(d(x).sum(), x)
    assert torch.allclose(with_r1.r1, grad.square().flatten(1).sum(1).mean(), rtol=1e-5)
    assert torch.allclose(with_r1.loss, out.loss + 2.0 * with_r1.r1, rtol=1e-5)
    # only G learns from the G loss when D is frozen; the fakes carry the gradient
    g = Generator(latent_dim=4, image_size=8, base_channels=4)
    d.requires_grad_(False)
    generator_loss(d, g(torch.randn(4, 4))).backward()
    assert all(p.grad is not None for p in g.parameters()) and all(p.grad is None for p in d.parameters())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 24}, "image_size: expected a power of 2"),
        ({"image_size": 4}, "image_size: expected an integer >= 8"),
        ({"latent_dim": 0}, "latent_dim"),
        ({"base_channels": 2.5}, "base_channels"),
    ],
)
def test_generator_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Generator(**kwargs)


def test_bad_inputs_name_the_argument():
    g = Generator(latent_dim=8, image_size=8, base_channels=4)
    with pytest.raises(ValueError, match=r"z: expected shape \(N, 8\)"):
        g(torch.randn(2, 9))
    with pytest.raises(ValueError, match="n: expected an integer >= 1"):
        g.latents(0)
    d = Discriminator(image_size=8, base_channels=4)
    with pytest.raises(ValueError, match=r"x: expected shape \(N, 3, 8, 8\)"):
        d(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="spectral_norm"):
        Discriminator(image_size=8, spectral_norm="yes")
