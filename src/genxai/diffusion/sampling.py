"""Samplers: DDPM ancestral sampling and DDIM, for any ``model_fn(x_t, t) -> eps``.

    images = ddpm_sample(lambda x, t: unet(x, t), schedule, (16, 3, 32, 32), device="cuda")
    images = ddim_sample(model_fn, schedule, shape, steps=50, eta=0.0, guidance=hook)

``guidance(x_t, t, eps) -> eps`` corrects each prediction (Discriminator Guidance:
:func:`genxai.diffusion.guidance.discriminator_guidance`). :class:`SaliencyConditioned` is a
``model_fn`` that feeds a map-conditioned UNet D's saliency on the current denoised estimate.
Model calls run under ``torch.no_grad``; guidance may differentiate (it enables grad itself).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from genxai.core.checks import check_choice, check_in_range, check_positive_int
from genxai.diffusion.guidance import saliency
from genxai.diffusion.schedule import NoiseSchedule

SAMPLERS = ("ddpm", "ddim")
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GuidanceFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _start(
    shape: tuple[int, ...],
    x_T: torch.Tensor | None,
    generator: torch.Generator | None,
    device: torch.device | str | None,
) -> torch.Tensor:
    """The starting noise x_T ~ N(0, I) (or the given ``x_T``) on the sampling device."""
    if x_T is not None:
        if tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T: expected shape {tuple(shape)}, got {tuple(x_T.shape)}")
        return x_T.to(device) if device is not None else x_T
    if device is None:
        device = generator.device if generator is not None else "cpu"
    return torch.randn(tuple(shape), generator=generator, device=device)


def _eps(model_fn: ModelFn, guidance: GuidanceFn | None, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        eps = model_fn(x, t)
    if eps.shape != x.shape:
        raise ValueError(f"model_fn: expected eps of shape {tuple(x.shape)}, got {tuple(eps.shape)}")
    if guidance is not None:
        eps = guidance(x, t, eps)
    return eps.to(x.dtype)


def ddpm_sample(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    guidance: GuidanceFn | None = None,
    x_T: torch.Tensor | None = None,
    clip_denoised: bool = True,
    variance: str = "fixed_large",
) -> torch.Tensor:
    """Ancestral sampling (Ho et al., 2020, Algorithm 2) over all T steps; returns x0 in [-1, 1].

    Args:
        model_fn: ``(x_t, t) -> eps`` with t a (N,) long tensor.
        shape: (N, C, H, W) of the batch.
        generator: for the starting noise and every step's noise (on the sampling device).
        device: where to sample (default: the generator's device, else the CPU).
        guidance: ``(x_t, t, eps) -> eps`` applied to every prediction.
        x_T: the starting noise (default: drawn from ``generator``).
        clip_denoised: clip each x0 estimate to [-1, 1] before the posterior mean (as DDPM).
        variance: ``"fixed_large"`` (sigma^2 = beta_t, DDPM's CIFAR-10 choice) or
            ``"fixed_small"`` (the posterior variance beta-tilde).
    """
    check_choice(variance, "variance", ("fixed_large", "fixed_small"))
    x = _start(shape, x_T, generator, device)
    schedule.to(x.device)
    if variance == "fixed_large":
        # DDPM: beta_t, with the posterior variance at t = 0 (no noise is added there anyway).
        sigma2 = torch.cat([schedule.posterior_variance[1:2], schedule.betas[1:]])
    else:
        sigma2 = schedule.posterior_variance
    n = x.shape[0]
    for i in tqdm(range(schedule.num_timesteps - 1, -1, -1), disable=not progress, desc="DDPM"):
        t = torch.full((n,), i, device=x.device, dtype=torch.long)
        eps = _eps(model_fn, guidance, x, t)
        x0 = schedule.predict_x0(x, t, eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _ = schedule.posterior(x0, x, t)
        if i > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = mean + sigma2[i].sqrt() * noise
        else:
            x = mean
    return x.clamp(-1, 1)


def ddim_timesteps(num_timesteps: int, steps: int, spacing: str = "uniform") -> list[int]:
    """The timesteps DDIM visits, largest first.

    ``"uniform"``: 0, c, 2c, ... with c = T // steps (Song et al., 2021). ``"trailing"``: ends at
    T - 1, so the first step sees pure noise (Lin et al., 2024).
    """
    check_choice(spacing, "spacing", ("uniform", "trailing"))
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps: expected 1 <= steps <= {num_timesteps}, got {steps}")
    if spacing == "uniform":
        ts = [i * (num_timesteps // steps) for i in range(steps)]
    else:
        ts = [round(num_timesteps - 1 - i * num_timesteps / steps) for i in range(steps)][::-1]
    return ts[::-1]


def ddim_sample(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    steps: int = 50,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    guidance: GuidanceFn | None = None,
    x_T: torch.Tensor | None = None,
    clip_denoised: bool = True,
    spacing: str = "uniform",
) -> torch.Tensor:
    """DDIM (Song et al., 2021) in ``steps`` steps; ``eta = 0`` is deterministic given x_T.

    ``x_{prev} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z`` with
    ``sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)``; when x0
    is clipped, eps is recomputed from it (as guided-diffusion). Other arguments as
    :func:`ddpm_sample`. Returns x0 in [-1, 1].
    """
    check_positive_int(steps, "steps")
    check_in_range(eta, "eta", 0.0, math.inf)
    timesteps = ddim_timesteps(schedule.num_timesteps, steps, spacing)
    x = _start(shape, x_T, generator, device)
    schedule.to(x.device)
    abar = schedule.alphas_cumprod
    n = x.shape[0]
    for k, i in enumerate(tqdm(timesteps, disable=not progress, desc="DDIM")):
        t = torch.full((n,), i, device=x.device, dtype=torch.long)
        eps = _eps(model_fn, guidance, x, t)
        x0 = schedule.predict_x0(x, t, eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
            eps = schedule.predict_eps(x, t, x0)
        a_t = abar[i]
        a_prev = abar[timesteps[k + 1]] if k + 1 < len(timesteps) else torch.ones_like(a_t)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp_min(0).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp_min(0).sqrt() * eps
        if eta > 0 and k + 1 < len(timesteps):
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x.clamp(-1, 1)


class SaliencyConditioned:
    """A ``model_fn`` for the samplers: a map-conditioned UNet fed D's saliency on its own estimate.

    The first call uses the all-ones map; every ``every`` calls the map is recomputed from D's
    saliency on the current clipped estimate ``x0_hat``, and conditions the following steps (one
    UNet pass per step: the map lags the estimate by up to ``every`` steps). Estimates at t above
    ``max_t`` (e.g. the t_D that D was trained up to) give no map: the next steps use all-ones. Call :meth:`reset` between sampling runs.

    Args:
        unet: ``unet(x_t, t, saliency=...) -> eps`` (a :class:`~genxai.diffusion.UNet`).
        discriminator: D; time-aware D get t.
        schedule: the noise schedule (for x0_hat).
        every: recompute the map every ``every`` steps.
        max_t: no saliency from estimates at t > max_t (None: from every step).
        method, method_kwargs: the attribution method, as :func:`~genxai.diffusion.guidance.saliency`.
    """

    def __init__(
        self,
        unet: nn.Module,
        discriminator: nn.Module,
        schedule: NoiseSchedule,
        *,
        every: int = 1,
        max_t: int | None = None,
        method: str = "saliency",
        **method_kwargs,
    ) -> None:
        self.unet = unet
        self.discriminator = discriminator
        self.schedule = schedule
        self.every = check_positive_int(every, "every")
        self.max_t = max_t
        self.method = method
        self.method_kwargs = method_kwargs
        self.reset()

    def reset(self) -> None:
        self.map: torch.Tensor | None = None
        self.calls = 0

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = self.unet(x_t, t, saliency=self.map)
        if self.calls % self.every == 0:
            self.map = None
            if self.max_t is None or int(t.max()) <= self.max_t:
                x0_hat = self.schedule.predict_x0(x_t, t, eps).clamp(-1, 1)
                self.map = saliency(self.discriminator, x0_hat, t, self.method, **self.method_kwargs)
        self.calls += 1
        return eps
