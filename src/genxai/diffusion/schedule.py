"""The DDPM forward process: noise levels, closed-form noising, and loss weights over noise levels.

    schedule = NoiseSchedule(1000)                       # linear betas 1e-4..0.02 (Ho et al., 2020)
    x_t = schedule.q_sample(x0, t, eps)                  # sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    x0_hat = schedule.predict_x0(x_t, t, eps_theta)      # the model's denoised estimate

The schedule knows nothing of networks (as diffusers' schedulers). Tables are computed in float64
and kept as float32 tensors; they follow the device of the ``t`` they are indexed with.
"""

from __future__ import annotations

import math

import torch

from genxai.core.checks import check_choice, check_in_range, check_positive_int

BETA_SCHEDULES = ("linear", "cosine")
LOSS_WEIGHTS = ("none", "min_snr", "p2")


def as_timesteps(t: torch.Tensor | int, n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(n,) integer timesteps on ``device`` from an int, a 0-d or one-element tensor (shared by the
    batch) or an (n,) tensor: the one place every network taking ``t`` normalises it."""
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(t)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"t: expected integer timesteps, got {t.dtype}")
    if t.ndim == 0 or t.shape == (1,):
        t = t.reshape(()).expand(n)
    if t.shape != (n,):
        raise ValueError(f"t: expected ({n},) timesteps or a scalar, got shape {tuple(t.shape)}")
    return t.to(device) if device is not None else t


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """DDPM's betas: evenly spaced from ``beta_start`` to ``beta_end`` (float64)."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, offset: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021): ``abar(t) = cos^2(((t/T) + s) / (1 + s) * pi/2)``, betas capped at 0.999."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    abar = torch.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


class NoiseSchedule:
    """Betas, alphas and their cumulative products for ``num_timesteps`` steps.

    Args:
        num_timesteps: T; timesteps are integers in [0, T).
        beta_schedule: ``"linear"`` (DDPM) or ``"cosine"`` (improved DDPM).
        beta_start, beta_end: the ends of the linear schedule.

    Attributes (float32, shape (T,)): ``betas``, ``alphas``, ``alphas_cumprod`` (abar_t),
    ``alphas_cumprod_prev`` (abar_{t-1}, 1 at t = 0), ``sqrt_alphas_cumprod``,
    ``sqrt_one_minus_alphas_cumprod`` and the posterior q(x_{t-1} | x_t, x0) terms
    ``posterior_variance``, ``posterior_mean_coef1`` (on x0), ``posterior_mean_coef2`` (on x_t).
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ) -> None:
        self.num_timesteps = check_positive_int(num_timesteps, "num_timesteps", minimum=2)
        self.beta_schedule = check_choice(beta_schedule, "beta_schedule", BETA_SCHEDULES)
        self.beta_start = check_in_range(beta_start, "beta_start", 0.0, 1.0, closed=False)
        self.beta_end = check_in_range(beta_end, "beta_end", 0.0, 1.0, closed=False)
        if beta_schedule == "linear":
            betas = linear_betas(num_timesteps, beta_start, beta_end)
        else:
            betas = cosine_betas(num_timesteps)
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, dim=0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        tables = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": abar.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - abar).sqrt(),
            "posterior_variance": betas * (1.0 - abar_prev) / (1.0 - abar),
            "posterior_mean_coef1": betas * abar_prev.sqrt() / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar),
        }
        self._names = tuple(tables)
        for name, value in tables.items():
            setattr(self, name, value.float())
        self.device = torch.device("cpu")

    # -- bookkeeping -----------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> NoiseSchedule:
        """Move every table to ``device`` (in place; returns self)."""
        for name in self._names:
            setattr(self, name, getattr(self, name).to(device))
        self.device = self.betas.device  # with its index ("cuda" -> cuda:0), to compare with t.device
        return self

    def config(self) -> dict:
        """Constructor arguments, to save with a run and rebuild the schedule."""
        return {
            "num_timesteps": self.num_timesteps,
            "beta_schedule": self.beta_schedule,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
        }

    def gather(self, name: str, t: torch.Tensor, ndim: int = 4) -> torch.Tensor:
        """Table ``name`` at timesteps ``t`` (N,), shaped (N, 1, ..., 1) to broadcast over ``ndim`` dims."""
        t = self._check_t(t)
        table = getattr(self, name)
        if table.device != t.device:  # index a copy there; the schedule itself stays where it is
            table = table.to(t.device)
        return table[t].view(-1, *[1] * (ndim - 1))

    def _check_t(self, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"t: expected a (N,) integer tensor of timesteps, got {type(t).__name__}")
        if t.is_floating_point() or t.is_complex() or t.ndim != 1:
            raise TypeError(f"t: expected a (N,) integer tensor of timesteps, got {t.dtype} {tuple(t.shape)}")
        # A range check on an accelerator would synchronise; there, indexing fails loudly anyway.
        if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(f"t: timesteps must lie in [0, {self.num_timesteps}), got {t.tolist()}")
        return t

    def sample_timesteps(
        self, n: int, *, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``n`` timesteps drawn uniformly from [0, T) (DDPM's training distribution)."""
        return torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator)

    # -- the forward process ---------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (noise ~ N(0, I) when not given)."""
        if noise is None:
            noise = torch.randn_like(x0)
        if noise.shape != x0.shape:
            raise ValueError(f"noise: expected the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
        a = self.gather("sqrt_alphas_cumprod", t, x0.ndim)
        b = self.gather("sqrt_one_minus_alphas_cumprod", t, x0.ndim)
        return a * x0 + b * noise

    add_noise = q_sample

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The denoised estimate ``x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``."""
        a = self.gather("sqrt_alphas_cumprod", t, x_t.ndim)
        b = self.gather("sqrt_one_minus_alphas_cumprod", t, x_t.ndim)
        return (x_t - b * eps) / a

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The noise that takes ``x0`` to ``x_t``: ``(x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)``."""
        a = self.gather("sqrt_alphas_cumprod", t, x_t.ndim)
        b = self.gather("sqrt_one_minus_alphas_cumprod", t, x_t.ndim)
        return (x_t - a * x0) / b

    def posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of ``q(x_{t-1} | x_t, x0)`` (variance shaped (N, 1, ..., 1))."""
        c1 = self.gather("posterior_mean_coef1", t, x_t.ndim)
        c2 = self.gather("posterior_mean_coef2", t, x_t.ndim)
        return c1 * x0 + c2 * x_t, self.gather("posterior_variance", t, x_t.ndim)

    # -- noise levels and loss weights -----------------------------------------------------------
    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ``abar_t / (1 - abar_t)``, shape (N,)."""
        abar = self.gather("alphas_cumprod", t, 1)
        return abar / (1.0 - abar)

    def loss_weight(
        self,
        t: torch.Tensor,
        kind: str = "none",
        *,
        gamma: float = 5.0,
        p2_k: float = 1.0,
        p2_gamma: float = 1.0,
    ) -> torch.Tensor:
        """Per-sample weight (N,) of the eps-prediction loss.

        ``"none"``: 1 (DDPM's L_simple). ``"min_snr"``: ``min(SNR_t, gamma) / SNR_t`` (Hang et al.,
        2023; gamma = 5). ``"p2"``: ``1 / (p2_k + SNR_t) ** p2_gamma`` (Choi et al., 2022).
        """
        check_choice(kind, "kind", LOSS_WEIGHTS)
        if kind == "none":
            return torch.ones(t.shape[0], device=t.device)
        snr = self.snr(t)
        if kind == "min_snr":
            check_in_range(gamma, "gamma", 0.0, math.inf, closed=False)
            return snr.clamp(max=gamma) / snr
        check_in_range(p2_k, "p2_k", 0.0, math.inf)
        check_in_range(p2_gamma, "p2_gamma", 0.0, math.inf)
        return (p2_k + snr).pow(-p2_gamma)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"NoiseSchedule({args})"
