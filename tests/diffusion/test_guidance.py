"""Saliency of D's "fake" decision, Process2's noise weights, and Discriminator Guidance."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import genxai.attribution as attribution
from genxai.data import get_dataset
from genxai.diffusion import Discriminator, NoiseSchedule, d_loss
from genxai.diffusion.guidance import (
    anneal_weight,
    discriminator_guidance,
    fit_energy,
    gaussian_blur,
    noise_weight,
    saliency,
)
from genxai.diffusion.trainer import GuidedDiffusionStep, Trainer
from tests.diffusion.test_trainer import tiny


def untouched(d: nn.Module) -> bool:
    """No hooks left on any module and no gradient accumulated on any parameter."""
    for m in d.modules():
        if (
            m._forward_hooks
            or m._forward_pre_hooks
            or m._backward_hooks
            or getattr(m, "_backward_pre_hooks", None)
        ):
            return False
    return all(p.grad is None for p in d.parameters())


def by_hand(d, x, t=None):
    x = x.clone().requires_grad_(True)
    logits = d(x) if t is None else d(x, t)
    (grad,) = torch.autograd.grad((-logits).sum(), x)
    return grad.abs().amax(dim=1, keepdim=True)


@pytest.fixture
def x():
    torch.manual_seed(3)
    return torch.rand(4, 3, 16, 16) * 2 - 1


def test_saliency_is_the_max_abs_gradient_of_the_fake_score(discriminator, x):
    S = saliency(discriminator, x)
    assert S.shape == (4, 1, 16, 16) and S.dtype == torch.float32 and bool((S >= 0).all())
    assert torch.allclose(S, by_hand(discriminator, x), atol=1e-7)
    assert untouched(discriminator) and not discriminator.training


def test_time_aware_saliency_uses_t_and_leaves_d_unchanged(x):
    torch.manual_seed(0)
    d = Discriminator(16, base_channels=8, time_aware=True).train()
    state = {k: v.clone() for k, v in d.state_dict().items()}
    t = torch.tensor([0, 100, 500, 999])
    S = saliency(d, x, t)
    assert torch.allclose(S, by_hand(d, x, t), atol=1e-7)
    assert not torch.allclose(S, saliency(d, x, 999), atol=1e-6)
    assert untouched(d) and d.training
    assert all(torch.equal(v, d.state_dict()[k]) for k, v in state.items())
    with pytest.raises(ValueError, match=r"^t: the discriminator is time-aware"):
        saliency(d, x)


class AtT(nn.Module):
    """A time-aware D with its timesteps fixed: ``forward(x) = d(x, t)``; an int t serves any batch."""

    def __init__(self, d: nn.Module, t: int | torch.Tensor):
        super().__init__()
        self.d, self.t = d, torch.as_tensor(t)

    def forward(self, x):
        return self.d(x, self.t.expand(x.shape[0]))


def fake_smoothgrad(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SmoothGrad of the fake score (-logit), reduced as ``saliency`` reduces it (seeded noise)."""
    maps = attribution.SmoothGrad(model, samples=4, seed=0)(x, target=lambda out: -out[:, 0])
    return maps.abs().amax(1, keepdim=True)


@pytest.mark.parametrize("time_aware", [False, True])
def test_saliency_with_smoothgrad(x, time_aware):
    torch.manual_seed(0)
    d = Discriminator(16, base_channels=8, time_aware=time_aware).eval()
    t = torch.tensor([5, 5, 700, 30])  # mixed timesteps
    S = saliency(d, x, t, "smoothgrad", samples=4, internal_batch_size=3, seed=0)
    assert S.shape == (4, 1, 16, 16) and bool((S >= 0).all()) and torch.isfinite(S).all()
    if not time_aware:
        assert torch.allclose(S, fake_smoothgrad(d, x), atol=1e-6)
    else:
        # SmoothGrad evaluates noisy copies in its own batches, which cannot carry per-image
        # timesteps: saliency explains one timestep at a time, each as its own seeded SmoothGrad call.
        for value in (5, 30, 700):
            rows = (t == value).nonzero()[:, 0]
            assert torch.allclose(S[rows], fake_smoothgrad(AtT(d, value), x[rows]), atol=1e-6), value
    assert untouched(d)


@pytest.mark.parametrize("time_aware", [False, True])
def test_saliency_with_gradcam_on_a_layer(x, time_aware):
    torch.manual_seed(4)  # a D whose last-block Grad-CAM is not all zero (with seed 0 it is, after the ReLU)
    d = Discriminator(16, base_channels=8, time_aware=time_aware).eval()
    t = torch.tensor([1, 2, 3, 4])
    S = saliency(d, x, t, "gradcam", layer=d.cam_layer)
    assert S.shape == (4, 1, 16, 16) and bool((S >= 0).all())
    assert bool((S.flatten(1).amax(1) > 0).all())
    # Grad-CAM of the fake score on D's layer; a time-aware D reads each image's own timestep.
    model = AtT(d, t) if time_aware else d
    expected = attribution.get("gradcam")(model, layer=d.get_submodule(d.cam_layer))(
        x, target=lambda out: -out[:, 0]
    )
    assert torch.allclose(S, expected, rtol=1e-5, atol=1e-5 * S.amax().item())
    assert torch.equal(saliency(d, x, t, "gradcam"), S)  # layer defaults to d.cam_layer
    if time_aware:
        assert not torch.allclose(S, saliency(d, x, 999, "gradcam"), atol=1e-6)  # t matters
    assert untouched(d)


def test_noise_weight_gamma_zero_is_exactly_one():
    torch.manual_seed(0)
    S = torch.rand(3, 1, 16, 16) ** 3 * 5
    assert torch.equal(noise_weight(S, gamma=0.0), torch.ones(3, 1, 16, 16))
    assert not torch.equal(noise_weight(S, gamma=1.0), torch.ones(3, 1, 16, 16))


@pytest.fixture(scope="module")
def shapes8():
    return get_dataset("shapes", size=8, n=64, seed=0)


def _trained(tmp_path, shapes8, name: str, *extra: str) -> dict[str, torch.Tensor]:
    """UNet, EMA and D weights after the tiny two-cycle run of the ``noise`` variant."""
    trainer = Trainer(tiny(tmp_path, "variant=noise", f"name={name}", *extra), dataset=shapes8)
    assert trainer.fit()["processes"] == 12
    models = {
        "unet": trainer.unwrap("unet"),
        "ema": trainer.step.ema.module,
        "d": trainer.unwrap("discriminator"),
    }
    return {
        f"{m}.{k}": v.detach().clone() for m, module in models.items() for k, v in module.state_dict().items()
    }


def test_process2_with_gamma_zero_trains_exactly_as_process1(tmp_path, shapes8, monkeypatch):
    """Trained, not recomputed: with gamma = 0, every phase-B Process2 updates the UNet exactly as a
    plain Process1 (no noise weight) would, so UNet, EMA and the next cycle's D end bit-equal."""
    zero = _trained(tmp_path, shapes8, "gamma0", "guidance.gamma=0")
    shaped = _trained(tmp_path, shapes8, "gamma1", "guidance.gamma=1")

    original = GuidedDiffusionStep.saliency_and_weight
    calls = []

    def as_process1(self, x0_hat, t):
        s, _ = original(self, x0_hat, t)  # same work, same random numbers; then no weight at all
        calls.append(len(t))
        return s, None

    monkeypatch.setattr(GuidedDiffusionStep, "saliency_and_weight", as_process1)
    plain = _trained(tmp_path, shapes8, "process1", "guidance.gamma=1")
    assert len(calls) == 4  # phase B: 2 iterations x 2 cycles ran a second, unweighted Process

    assert zero.keys() == plain.keys()
    different = [k for k in zero if not torch.equal(zero[k], plain[k])]
    assert not different, f"gamma = 0 differs from Process1 in {different[:5]}"
    # and the noise weight does act when gamma > 0 (else the check above could not fail)
    assert any(not torch.equal(shaped[k], plain[k]) for k in plain if k.startswith("unet."))
    assert any(not torch.equal(shaped[k], plain[k]) for k in plain if k.startswith("ema."))


@pytest.mark.parametrize("gamma, sigma", [(1.0, 1.0), (2.0, 0.0), (0.5, 2.0), (3.0, 1.0)])
def test_noise_weight_has_unit_energy_and_stays_in_range(gamma, sigma):
    torch.manual_seed(1)
    S = torch.rand(8, 1, 16, 16) ** 3 * 5
    w = noise_weight(S, gamma=gamma, blur_sigma=sigma, w_min=0.5, w_max=2.0)
    assert w.shape == S.shape and w.dtype == torch.float32
    assert torch.allclose(w.square().mean(dim=(1, 2, 3)), torch.ones(8), atol=1e-5)
    assert bool((w >= 0.5).all()) and bool((w <= 2.0).all())


def test_noise_weight_is_monotone_in_the_saliency():
    torch.manual_seed(2)
    S = torch.rand(2, 1, 8, 8)
    w = noise_weight(S, gamma=1.0, blur_sigma=0.0, w_min=0.2, w_max=5.0)
    for s, v in zip(S.flatten(1), w.flatten(1)):
        order = s.argsort()
        assert bool((v[order][1:] >= v[order][:-1]).all())
        free = (v > 0.2) & (v < 5.0)
        slope = (v[free] - v[free].mean()) / (s[free] - s[free].mean())
        assert bool((slope > 0).all())
    # unclamped, w is c (1 + gamma (s - 1)): an affine function of S with a positive slope
    w = noise_weight(S, gamma=0.5, blur_sigma=0.0, w_min=0.0, w_max=100.0)
    s = S / S.mean(dim=(2, 3), keepdim=True)
    c = w / (1 + 0.5 * (s - 1))
    assert torch.allclose(c, c.flatten(1)[:, :1].view(2, 1, 1, 1).expand_as(c), atol=1e-5)


def test_flat_and_zero_maps_give_uniform_noise():
    for S in (torch.zeros(2, 1, 8, 8), torch.full((2, 1, 8, 8), 0.3)):
        assert torch.allclose(noise_weight(S, gamma=1.0), torch.ones(2, 1, 8, 8), atol=1e-6)


def test_fit_energy_when_the_range_binds():
    w = torch.tensor([[[[10.0, 10.0, 0.01, 0.01]]]])
    out = fit_energy(w, 0.5, 2.0)
    assert out.square().mean().item() == pytest.approx(1.0, abs=1e-6)
    assert bool((out >= 0.5).all()) and bool((out <= 2.0).all())


def test_blur_matches_torchvision():
    tv = pytest.importorskip("torchvision.transforms.functional")
    torch.manual_seed(0)
    S = torch.rand(2, 1, 16, 16)
    assert torch.allclose(gaussian_blur(S, 1.0), tv.gaussian_blur(S, [7, 7], [1.0, 1.0]), atol=1e-6)
    assert torch.equal(gaussian_blur(S, 0.0), S)


def test_anneal_weight_fades_to_one_at_t_max():
    torch.manual_seed(0)
    w = noise_weight(torch.rand(3, 1, 8, 8), gamma=1.0)
    out = anneal_weight(w, torch.tensor([999, 0, 500]), 1000)
    assert torch.equal(out[0], torch.ones(1, 8, 8))
    assert torch.allclose(out[1], w[1], atol=1e-5)
    assert torch.allclose(out.square().mean(dim=(1, 2, 3)), torch.ones(3), atol=1e-5)
    dev_mid, dev_start = (out[2] - 1).abs().mean(), (w[2] - 1).abs().mean()
    assert 0 < dev_mid < dev_start


def test_bad_noise_weight_arguments():
    with pytest.raises(ValueError, match=r"^S: expected saliency maps of shape \(N, 1, H, W\)"):
        noise_weight(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="w_max"):
        noise_weight(torch.rand(2, 1, 8, 8), w_max=0.9)
    with pytest.raises(ValueError, match="gamma"):
        noise_weight(torch.rand(2, 1, 8, 8), gamma=-1.0)


class LinearD(nn.Module):
    """logit = <a, x> + b t: its gradient in x is a, for any t."""

    time_aware = True

    def __init__(self, shape):
        super().__init__()
        torch.manual_seed(5)
        self.a = nn.Parameter(torch.randn(shape))

    def forward(self, x, t):
        return (x * self.a).flatten(1).sum(1, keepdim=True) + 0.01 * t.float()[:, None]


def test_discriminator_guidance_matches_the_formula():
    schedule = NoiseSchedule(1000)
    d = LinearD((3, 8, 8))
    torch.manual_seed(0)
    x_t, eps, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    assert discriminator_guidance(d, x_t, t, eps, schedule, weight=0.0) is eps
    b = schedule.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
    a = schedule.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
    got = discriminator_guidance(d, x_t, t, eps, schedule, weight=2.0)
    assert torch.allclose(got, eps - b * 2.0 * d.a.detach(), atol=1e-6)
    hook = discriminator_guidance(d, schedule=schedule, weight=2.0, on="x0_hat")
    assert torch.allclose(hook(x_t, t, eps), eps - b / a * 2.0 * d.a.detach(), atol=1e-5)
    assert untouched(d)


def test_discriminator_guidance_pushes_towards_real():
    torch.manual_seed(0)
    d = Discriminator(8, in_channels=1, base_channels=8, time_aware=True).eval()
    schedule = NoiseSchedule(100)
    x_t, eps, t = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), torch.full((4,), 10)
    guided = discriminator_guidance(d, x_t, t, eps, schedule, weight=1.0)
    # A small step along -eps (the sampler's direction) raises D's logit where guidance acted.
    step = 1e-2
    before = d(x_t - step * eps, t)
    after = d(x_t - step * guided, t)
    assert bool((after > before).all())


# -- the discriminator ------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [8, 16, 32])
def test_discriminator_gives_one_logit_per_image(size):
    d = Discriminator(size, base_channels=8)
    out = d(torch.randn(3, 3, size, size))
    assert out.shape == (3, 1) and d.final_resolution == 4
    assert d.cam_layer == f"blocks.{len(d.blocks) - 1}"


def test_time_aware_discriminator_uses_t():
    torch.manual_seed(0)
    d = Discriminator(16, base_channels=8, time_aware=True, spectral_norm=True).eval()
    x = torch.randn(2, 3, 16, 16)
    assert not torch.allclose(d(x, torch.tensor([0, 0])), d(x, torch.tensor([900, 900])))
    assert torch.equal(d(x, 7), d(x, torch.tensor([7, 7])))
    with pytest.raises(ValueError, match=r"^t: this discriminator is time-aware"):
        d(x)
    plain = Discriminator(16, base_channels=8)
    assert torch.equal(plain(x, torch.tensor([1, 2])), plain(x))  # t is ignored when not time-aware


@pytest.mark.parametrize("time_aware, r1", [(False, 0.0), (True, 0.1)])
def test_d_loss_decreases_on_toy_data(time_aware, r1):
    torch.manual_seed(0)
    d = Discriminator(8, in_channels=1, base_channels=8, time_aware=time_aware)
    opt = torch.optim.Adam(d.parameters(), lr=2e-3)
    real = 0.5 + 0.1 * torch.randn(16, 1, 8, 8)
    fake = 0.1 * torch.randn(16, 1, 8, 8)
    t = torch.randint(0, 1000, (16,))
    losses = []
    for _ in range(15):
        loss = d_loss(d, real, fake, t, r1_weight=r1)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(2 * torch.nn.functional.softplus(torch.tensor(0.0)).item(), abs=0.3)
    assert losses[-1] < 0.6 * losses[0]
    loss, real_logits, fake_logits = d_loss(d, real, fake, t, return_logits=True)
    assert bool((real_logits > fake_logits.mean()).float().mean() > 0.9)
    with pytest.raises(ValueError, match="fake"):
        d_loss(d, real, fake[:2], t)


@pytest.mark.parametrize(
    "method", [n for n in attribution.names() if n != "cam" and attribution.get(n).output == "map"]
)  # CAM needs a GAP + fc head; class model visualisation makes an image (refused, see test_guidance_build)
def test_saliency_accepts_every_registered_method(method):
    torch.manual_seed(0)
    d = Discriminator(8, in_channels=1, base_channels=4, time_aware=True).eval()
    x, t = torch.rand(2, 1, 8, 8) * 2 - 1, torch.tensor([3, 700])
    S = saliency(d, x, t, method)
    assert S.shape == (2, 1, 8, 8) and S.dtype == torch.float32 and bool((S >= 0).all())
    assert untouched(d)
