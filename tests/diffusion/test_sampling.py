"""DDPM and DDIM samplers: with the optimal eps of a Gaussian data distribution they recover it;
DDIM with eta = 0 is deterministic; guidance hooks and saliency-conditioned UNets plug in."""

from __future__ import annotations

import pytest
import torch

from genxai.diffusion import Discriminator, NoiseSchedule, UNet
from genxai.diffusion.sampling import SaliencyConditioned, ddim_sample, ddim_timesteps, ddpm_sample

MU, STD = 0.3, 0.2


def oracle(schedule: NoiseSchedule):
    """E[eps | x_t] for x0 ~ N(MU, STD^2 I): ``b (x_t - a MU) / (a^2 STD^2 + b^2)``."""

    def model_fn(x_t, t):
        a = schedule.gather("sqrt_alphas_cumprod", t, x_t.ndim)
        b = schedule.gather("sqrt_one_minus_alphas_cumprod", t, x_t.ndim)
        return b * (x_t - a * MU) / (a**2 * STD**2 + b**2)

    return model_fn


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_ddpm_with_the_oracle_recovers_the_data_distribution(variance):
    schedule = NoiseSchedule(1000)
    g = torch.Generator().manual_seed(0)
    x = ddpm_sample(oracle(schedule), schedule, (500, 1, 2, 2), generator=g, variance=variance)
    assert x.shape == (500, 1, 2, 2) and bool((x.abs() <= 1).all())
    assert x.mean().item() == pytest.approx(MU, abs=0.02)
    assert x.std().item() == pytest.approx(STD, rel=0.1)


def ddim_moments(schedule: NoiseSchedule, timesteps: list[int], eta: float) -> tuple[float, float]:
    """Exact mean and std of DDIM's output with the oracle: every step is affine in x plus noise."""
    abar = schedule.alphas_cumprod.double()
    mean, var = 0.0, 1.0
    for k, i in enumerate(timesteps):
        a_t = abar[i].item()
        a_p = abar[timesteps[k + 1]].item() if k + 1 < len(timesteps) else 1.0
        a, b = a_t**0.5, (1 - a_t) ** 0.5
        g = b / (a_t * STD**2 + b**2)  # eps_hat = g (x - a MU)
        sigma = eta * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)) ** 0.5
        c = (1 - a_p - sigma**2) ** 0.5
        slope = a_p**0.5 * (1 - b * g) / a + c * g  # x_prev = slope x + offset + sigma z
        offset = a_p**0.5 * b * g * MU - c * g * a * MU
        mean, var = slope * mean + offset, slope**2 * var + sigma**2
    return mean, var**0.5


@pytest.mark.parametrize(
    "eta, spacing", [(0.0, "uniform"), (1.0, "uniform"), (0.0, "trailing"), (0.5, "trailing")]
)
def test_ddim_with_the_oracle_matches_the_exact_output_distribution(eta, spacing):
    schedule = NoiseSchedule(1000)
    g = torch.Generator().manual_seed(1)
    x = ddim_sample(
        oracle(schedule), schedule, (500, 1, 2, 2), steps=50, eta=eta, generator=g, spacing=spacing
    )
    mean, std = ddim_moments(schedule, ddim_timesteps(1000, 50, spacing), eta)
    assert x.mean().item() == pytest.approx(mean, abs=0.02)
    assert x.std().item() == pytest.approx(std, rel=0.08)
    # roughly the data: DDIM with 50 steps loses some spread (eta = 1; trailing's last jump from t = 19)
    assert mean == pytest.approx(MU, abs=0.01) and std == pytest.approx(STD, rel=0.25)


@pytest.mark.peers
def test_ddim_agrees_with_diffusers_ddim_scheduler():
    diffusers = pytest.importorskip("diffusers")
    schedule = NoiseSchedule(1000)
    theirs = diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
    )
    theirs.set_timesteps(20)
    assert theirs.timesteps.tolist() == ddim_timesteps(1000, 20)
    model_fn = oracle(schedule)
    x_T = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    x = x_T.clone()
    for t in theirs.timesteps:
        x = theirs.step(model_fn(x, torch.full((64,), int(t))), t, x, eta=0.0).prev_sample
    ours = ddim_sample(model_fn, schedule, x_T.shape, steps=20, x_T=x_T, clip_denoised=False)
    assert torch.allclose(ours, x.clamp(-1, 1), atol=1e-5)


def test_ddim_eta_zero_is_deterministic():
    schedule = NoiseSchedule(100)
    x_T = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    a = ddim_sample(
        oracle(schedule), schedule, x_T.shape, steps=10, x_T=x_T, generator=torch.Generator().manual_seed(1)
    )
    b = ddim_sample(
        oracle(schedule), schedule, x_T.shape, steps=10, x_T=x_T, generator=torch.Generator().manual_seed(2)
    )
    assert torch.equal(a, b)
    c = ddim_sample(
        oracle(schedule),
        schedule,
        x_T.shape,
        steps=10,
        eta=1.0,
        x_T=x_T,
        generator=torch.Generator().manual_seed(2),
    )
    assert not torch.equal(a, c)
    # and seeded sampling reproduces itself
    d1 = ddpm_sample(oracle(schedule), schedule, (4, 1, 4, 4), generator=torch.Generator().manual_seed(3))
    d2 = ddpm_sample(oracle(schedule), schedule, (4, 1, 4, 4), generator=torch.Generator().manual_seed(3))
    assert torch.equal(d1, d2)


def test_ddim_timesteps():
    assert ddim_timesteps(1000, 4) == [750, 500, 250, 0]
    assert ddim_timesteps(1000, 4, "trailing") == [999, 749, 499, 249]
    assert ddim_timesteps(10, 10) == list(range(9, -1, -1))
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(10, 11)


def test_unet_sampling_shapes_range_and_guidance_hook():
    torch.manual_seed(0)
    unet = UNet(16, 3, 16, (1, 2), 1, (8,), 0.0).eval()
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.05)
    schedule = NoiseSchedule(20)
    seen = []

    def hook(x_t, t, eps):
        seen.append(int(t[0]))
        return eps * 1.0

    x = ddpm_sample(unet, schedule, (2, 3, 16, 16), guidance=hook, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 16, 16) and bool((x >= -1).all() and (x <= 1).all())
    assert seen == list(range(19, -1, -1))
    seen.clear()
    x = ddim_sample(unet, schedule, (2, 3, 16, 16), steps=4, guidance=hook)
    assert x.shape == (2, 3, 16, 16) and seen == [15, 10, 5, 0]


def test_discriminator_guidance_as_a_sampler_hook():
    from genxai.diffusion import discriminator_guidance

    schedule = NoiseSchedule(50)
    torch.manual_seed(0)
    d = Discriminator(4, in_channels=1, base_channels=4, time_aware=True).eval()
    x_T = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    zero = torch.zeros(4, dtype=torch.long)

    def final_logits(weight: float | None) -> torch.Tensor:
        hook = None if weight is None else discriminator_guidance(d, schedule=schedule, weight=weight)
        x = ddim_sample(oracle(schedule), schedule, x_T.shape, steps=5, x_T=x_T, guidance=hook)
        with torch.no_grad():
            return d(x, zero)[:, 0]  # D's verdict on the finished samples (t = 0)

    plain = final_logits(None)
    assert torch.equal(final_logits(0.0), plain)  # weight 0 leaves eps as it is
    # Guidance moves every sample towards what D calls real, a negative weight away from it,
    # and a larger weight further (the effect here is ~0.02 logits per image at |weight| = 5).
    towards, away, stronger = final_logits(5.0), final_logits(-5.0), final_logits(10.0)
    assert bool((towards > plain + 5e-3).all()) and bool((away < plain - 5e-3).all())
    assert bool((stronger > towards).all())
    assert towards.mean() > plain.mean() > away.mean()
    assert all(p.grad is None for p in d.parameters())


def test_saliency_conditioned_sampling():
    torch.manual_seed(0)
    unet = UNet(16, 3, 16, (1, 2), 1, (8,), 0.0, attention_maps="same").eval()
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.05)
    d = Discriminator(16, base_channels=8, time_aware=True).eval()
    schedule = NoiseSchedule(100)
    model_fn = SaliencyConditioned(unet, d, schedule, every=2, max_t=60)
    maps = []
    original = unet.forward

    def spy(x, t, saliency=None):
        maps.append(None if saliency is None else saliency.shape)
        return original(x, t, saliency=saliency)

    unet.forward = spy
    x = ddim_sample(model_fn, schedule, (2, 3, 16, 16), steps=5)  # t = 80, 60, 40, 20, 0
    assert x.shape == (2, 3, 16, 16)
    # maps are refreshed after calls 0, 2, 4 (every=2): at t=80 (above max_t: none), t=40 (a map),
    # so the UNet sees none at t=80, 60, 40 and the t=40 map at t=20 and 0.
    assert maps == [None, None, None, (2, 1, 16, 16), (2, 1, 16, 16)]
    assert model_fn.calls == 5
    model_fn.reset()
    assert model_fn.map is None and model_fn.calls == 0
