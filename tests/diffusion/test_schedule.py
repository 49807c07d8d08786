"""NoiseSchedule: DDPM's betas, the closed-form forward process, and loss weights over noise levels."""

from __future__ import annotations

import math

import pytest
import torch

from genxai.diffusion import NoiseSchedule


def test_linear_betas_are_ddpm():
    s = NoiseSchedule()
    assert s.num_timesteps == 1000 and s.betas.shape == (1000,) and s.betas.dtype == torch.float32
    assert s.betas[0].item() == pytest.approx(1e-4)
    assert s.betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(s.betas[1:] - s.betas[:-1], torch.full((999,), (0.02 - 1e-4) / 999), atol=1e-9)
    assert torch.allclose(s.alphas, 1 - s.betas)


def test_abar_is_the_product_of_alphas_and_the_iterated_variance():
    s = NoiseSchedule()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    mean_coef, var = 1.0, 0.0
    means, variances = [], []
    for beta in betas.tolist():  # x_t = sqrt(1 - b) x_{t-1} + sqrt(b) eps: mean and variance recursions
        mean_coef *= math.sqrt(1 - beta)
        var = (1 - beta) * var + beta
        means.append(mean_coef)
        variances.append(var)
    assert torch.allclose(s.sqrt_alphas_cumprod.double(), torch.tensor(means, dtype=torch.float64), rtol=1e-5)
    assert torch.allclose(
        s.sqrt_one_minus_alphas_cumprod.double() ** 2, torch.tensor(variances, dtype=torch.float64), rtol=1e-5
    )
    assert torch.allclose(s.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), rtol=1e-5)


def test_q_sample_matches_the_iterated_chain_in_distribution():
    s = NoiseSchedule(200)
    g = torch.Generator().manual_seed(0)
    n, x0 = 40_000, 0.7
    x = torch.full((n,), x0, dtype=torch.float64)
    checkpoints = {0: None, 49: None, 199: None}
    for t in range(200):
        beta = s.betas[t].double()
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(n, generator=g, dtype=torch.float64)
        if t in checkpoints:
            checkpoints[t] = x.clone()
    for t, chain in checkpoints.items():
        tt = torch.full((n,), t)
        closed = s.q_sample(torch.full((n, 1, 1, 1), x0), tt, torch.randn(n, 1, 1, 1, generator=g)).flatten()
        exp_mean = s.sqrt_alphas_cumprod[t].item() * x0
        exp_std = s.sqrt_one_minus_alphas_cumprod[t].item()
        for sample in (chain.float(), closed):
            assert sample.mean().item() == pytest.approx(exp_mean, abs=4 * exp_std / math.sqrt(n))
            assert sample.std().item() == pytest.approx(exp_std, rel=0.02)


def test_predict_x0_inverts_q_sample_and_predict_eps():
    s = NoiseSchedule()
    torch.manual_seed(0)
    x0, eps = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)
    t = torch.tensor([0, 1, 10, 500, 900, 999])
    x_t = s.q_sample(x0, t, eps)
    assert torch.allclose(s.predict_x0(x_t, t, eps), x0, atol=2e-3)
    assert torch.allclose(s.predict_x0(x_t[:4], t[:4], eps[:4]), x0[:4], atol=1e-5)
    assert torch.allclose(s.predict_eps(x_t, t, x0), eps, atol=1e-4)


def test_posterior_matches_bayes_for_the_gaussian_chain():
    s = NoiseSchedule(100)
    t = torch.tensor([1, 50, 99])
    betas = torch.linspace(1e-4, 0.02, 100, dtype=torch.float64)
    beta, abar_prev = betas[t], torch.cumprod(1 - betas, 0)[t - 1]
    # q(x_{t-1}|x_t, x0) for x_{t-1} ~ N(sqrt(abar_prev) x0, 1 - abar_prev) and the one-step kernel.
    prior_var = 1 - abar_prev
    var = 1 / (1 / prior_var + (1 - beta) / beta)
    x0, x_t = torch.full((3, 1), 0.3, dtype=torch.float64), torch.full((3, 1), -0.5, dtype=torch.float64)
    mean = var[:, None] * (
        abar_prev.sqrt()[:, None] * x0 / prior_var[:, None] + (1 - beta).sqrt()[:, None] * x_t / beta[:, None]
    )
    got_mean, got_var = s.posterior(x0, x_t, t)
    assert torch.allclose(got_var.flatten().double(), var, rtol=1e-3)
    assert torch.allclose(got_mean.double(), mean, rtol=1e-4, atol=1e-5)


def test_cosine_schedule():
    s = NoiseSchedule(1000, "cosine")
    expected = (
        torch.cos(torch.tensor((1 / 1000 + 0.008) / 1.008 * math.pi / 2)) ** 2
        / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    )
    assert s.alphas_cumprod[0].item() == pytest.approx(expected.item(), rel=1e-5)
    assert s.betas.max().item() == pytest.approx(0.999) and bool(
        (s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all()
    )


def test_snr_and_loss_weights():
    s = NoiseSchedule()
    t = torch.arange(0, 1000, 37)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t]
    snr = s.snr(t)
    # float32 tables: 1 - abar_0 = 1e-4 carries a relative rounding error of ~6e-4
    assert torch.allclose(snr.double(), abar / (1 - abar), rtol=2e-3)
    assert bool((snr[1:] < snr[:-1]).all())
    assert torch.equal(s.loss_weight(t), torch.ones(len(t)))
    # min-SNR-5 (Hang et al., 2023), eps-prediction: 1 while SNR <= 5, then 5 / SNR (w * SNR = 5)
    w = s.loss_weight(t, "min_snr", gamma=5.0)
    clear = snr <= 5
    assert 0 < int(clear.sum()) < len(t)
    assert torch.allclose(w[clear], torch.ones(int(clear.sum())))
    assert torch.allclose(w[~clear] * snr[~clear], torch.full((int((~clear).sum()),), 5.0))
    assert torch.equal(s.loss_weight(t, "min_snr"), w)  # gamma = 5 by default
    # P2 (Choi et al., 2022) with k = 1: 1 + SNR = 1 / (1 - abar), so the weight is (1 - abar)^gamma
    sigma = s.sqrt_one_minus_alphas_cumprod[t]
    assert torch.allclose(s.loss_weight(t, "p2", p2_k=1.0, p2_gamma=0.5), sigma, atol=1e-6)
    assert torch.allclose(s.loss_weight(t, "p2", p2_k=1.0, p2_gamma=1.0), sigma**2, atol=1e-6)
    assert torch.equal(s.loss_weight(t, "p2"), s.loss_weight(t, "p2", p2_k=1.0, p2_gamma=1.0))


def test_tables_follow_the_device_and_bad_input_is_rejected():
    s = NoiseSchedule(10).to("cpu")
    assert s.gather("betas", torch.tensor([0, 9])).shape == (2, 1, 1, 1)
    with pytest.raises(ValueError, match="t: timesteps"):
        s.q_sample(torch.zeros(1, 1, 2, 2), torch.tensor([10]))
    with pytest.raises(TypeError, match=r"^t: expected a \(N,\) integer tensor"):
        s.q_sample(torch.zeros(1, 1, 2, 2), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule(10, "quadratic")
    with pytest.raises(ValueError, match="kind"):
        s.loss_weight(torch.tensor([0]), "snr")
