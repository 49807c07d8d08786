"""From the discriminator's explanation to the diffusion model: saliency, noise weights, guidance.

    S = saliency(d, x0_hat, t)                       # (N, 1, H, W): where D sees "fake"
    w = noise_weight(S, gamma=1.0)                   # Process2: eps' = w * eps, mean(w^2) = 1
    guide = discriminator_guidance(d, schedule=schedule, weight=1.0)   # a sampler's ``guidance``

* :func:`saliency`: ``|d fake_score / d x0_hat|`` with ``fake_score = -logit``, max of abs over
  channels (Simonyan et al.); any registered attribution method that makes a map may replace the
  gradient (built by name with :func:`genxai.attribution.build`, options checked).
* :func:`noise_weight`: ``s = S / mean(S)``, ``w = 1 + gamma (s - 1)``, Gaussian blur, then
  ``w = clamp(c * w, w_min, w_max)`` with the per-image scalar c making ``mean(w^2) = 1`` (the
  noise energy of Process1). ``mean(clamp(c w)^2)`` grows with c, so batched bisection on log c
  brackets it; one exact step on the final clamped/unclamped split then solves the quadratic.
  ``gamma = 0`` gives exactly ``w = 1``: Process2 becomes Process1.
* :func:`anneal_weight`: ``w -> 1`` as ``t -> T`` (so q(x_T | x0) stays N(0, I)); an option. The
  default keeps sampling isotropic: the model also learns from Process1 throughout.
* :func:`discriminator_guidance`: Kim et al. (2023), ``eps - sqrt(1 - abar_t) w grad log(D/(1-D))``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from genxai.attribution import LayerAttribution, build, get, reduce_channels
from genxai.core.checks import check_choice, check_in_range, check_positive_int
from genxai.core.engine import forward_backward
from genxai.core.hooks import default_layer, get_module
from genxai.core.maps import gaussian_blur  # noise_weight's blur; importable from here too
from genxai.core.targets import DiscriminatorScore, Fake
from genxai.diffusion.schedule import NoiseSchedule, as_timesteps


class _TimeBatchMismatch(Exception):
    """A method fed the time-bound discriminator rows that cannot be matched to their timesteps."""


class TimeConditioned(nn.Module):
    """Any ``model(x, t)`` with its timesteps bound: ``forward(x) = model(x, t)``.

    Attribution methods call one-input models; this wrapper adds nothing to the model and holds no
    state beyond ``t`` (a (N,) tensor or an int; a single timestep serves any batch size). The
    model is a time-aware discriminator, our UNet, or a denoiser of another library: a diffusers
    ``UNet2DModel`` returns an output object, whose ``.sample`` (the predicted noise) is returned::

        eps_at_500 = TimeConditioned(unet2d, 500)                      # x_t -> eps, t = 500
        maps = get("saliency")(eps_at_500)(x_t, target=lambda eps: eps[:, :, 8:16, 8:16].sum((1, 2, 3)))

    Its blocks keep their names under ``discriminator.`` (e.g. ``discriminator.mid_block``), the
    attribute the wrapped model is stored as.
    """

    def __init__(self, discriminator: nn.Module, t: torch.Tensor | int) -> None:
        super().__init__()
        self.discriminator = discriminator
        self.t = as_timesteps(t, 1) if not isinstance(t, torch.Tensor) or t.ndim == 0 else t

    @property
    def model(self) -> nn.Module:
        """The wrapped model (any ``model(x, t)``; stored as ``discriminator``)."""
        return self.discriminator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.t.shape[0] not in (1, x.shape[0]):
            raise _TimeBatchMismatch(
                f"t: {self.t.shape[0]} timesteps are bound but the model got {x.shape[0]} inputs; bind "
                "one timestep for methods that evaluate copies of the input in batches of their own"
            )
        out = self.discriminator(x, as_timesteps(self.t, x.shape[0], x.device))
        return getattr(out, "sample", out)  # diffusers' UNet2DOutput -> its tensor


def _is_time_aware(discriminator: nn.Module) -> bool:
    return bool(getattr(discriminator, "time_aware", False))


def _bound(discriminator: nn.Module, t: torch.Tensor | int | None, n: int, device: torch.device) -> nn.Module:
    """``discriminator`` itself, or with ``t`` bound when it is time-aware."""
    if not _is_time_aware(discriminator):
        return discriminator
    if t is None:
        raise ValueError("t: the discriminator is time-aware; pass the timesteps of x0_hat")
    return TimeConditioned(discriminator, as_timesteps(t, n, device))


def _check_batch(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a floating-point (N, C, H, W) batch, got {got}")


# -- saliency ---------------------------------------------------------------------------------------
def saliency(
    discriminator: nn.Module,
    x0_hat: torch.Tensor,
    t: torch.Tensor | int | None = None,
    method: str = "saliency",
    *,
    layer: str | nn.Module | None = None,
    reduce: str = "max_abs",
    **options: Any,
) -> torch.Tensor:
    """Where D sees "fake" in ``x0_hat``: a non-negative (N, 1, H, W) float32 map.

    Args:
        discriminator: D, (N, C, H, W) -> (N, 1) logits (real high); time-aware D get ``t``.
        x0_hat: the denoised estimates (any graph they carry is not followed).
        t: their timesteps (N,) or an int; used only by a time-aware D.
        method: a registered attribution method that makes a map (``genxai.attribution.names()``):
            the plain gradient by default (one forward/backward), ``"smoothgrad"``, ``"gradcam"``,
            ``"integratedgradients"``, ``"lrp"``, ... Class model visualisation makes an image,
            not a map, and is refused (ValueError).
        layer: D's layer for layer methods (a dotted name of D's modules or the module); None:
            ``d.cam_layer`` for our :class:`Discriminator`, else D's default layer. Other methods
            ignore it, so one call serves any configured method.
        reduce: how multi-channel maps become one (``genxai.attribution.reduce_channels``);
            single-channel maps are reduced the same way (max_abs: their absolute value).
        options: constructor options of the method (``samples``, ``autocast``, ...); one it does
            not take is a ValueError naming the method, the option and the closest accepted ones.

    D is left as it was: no hooks stay, no ``.grad`` is accumulated, its mode is not changed.
    """
    _check_batch(x0_hat, "x0_hat")
    layer, options = _on_discriminator(discriminator, method, layer, options)
    model = _bound(discriminator, t, x0_hat.shape[0], x0_hat.device)
    explain = build(method, model, layer, require_map=True, **options)
    try:
        maps = explain(x0_hat, target=Fake())
    except _TimeBatchMismatch:
        # The method evaluates copies of the images in its own batches: explain one timestep at a time.
        maps = None
        for value in torch.unique(model.t):
            rows = (model.t == value).nonzero()[:, 0]
            bound = TimeConditioned(discriminator, value.view(1))
            part = build(method, bound, layer, require_map=True, **options)(x0_hat[rows], target=Fake())
            if maps is None:
                maps = part.new_zeros(x0_hat.shape[0], *part.shape[1:])
            maps[rows] = part
    return reduce_channels(maps.float(), reduce)


def _on_discriminator(
    discriminator: nn.Module, method: str, layer: str | nn.Module | None, options: dict[str, Any]
) -> tuple[nn.Module | None, dict[str, Any]]:
    """Layer and ``fc`` named on D itself, as modules (D may be wrapped with its timesteps)."""
    options = dict(options)
    if issubclass(get(method), LayerAttribution):
        if layer is None:
            layer = getattr(discriminator, "cam_layer", None) or default_layer(discriminator)
        if isinstance(layer, str):
            layer = get_module(discriminator, layer)
    else:
        layer = None  # build passes a layer to layer methods only
    if isinstance(options.get("fc"), str):
        options["fc"] = get_module(discriminator, options["fc"])
    return layer, options


# -- noise weights ----------------------------------------------------------------------------------
def fit_energy(
    w: torch.Tensor, w_min: float = 0.5, w_max: float = 2.0, bisection_steps: int = 30
) -> torch.Tensor:
    """``clamp(c * w, w_min, w_max)`` with the per-image c that makes ``mean(w^2) = 1``.

    Needs ``w_min <= 1 <= w_max`` (then a solution exists whenever enough of the image has
    ``w > 0``; otherwise the largest reachable energy is used).
    """
    n = w.shape[0]
    flat = w.flatten(1).float()
    if w_min == w_max:
        return torch.ones_like(w, dtype=torch.float32)
    w_top = flat.amax(dim=1)
    positive = torch.where(flat > 0, flat, torch.full_like(flat, math.inf)).amin(dim=1)
    # log c in [lo, hi]: at lo every value is clamped to (at most) w_min, at hi every positive one to w_max.
    lo = torch.log(max(w_min, 1e-6) / w_top.clamp_min(1e-30))
    hi = torch.log(w_max / positive.clamp(1e-30, 1e30))

    def energy(log_c: torch.Tensor) -> torch.Tensor:
        return (log_c.exp()[:, None] * flat).clamp(w_min, w_max).square().mean(dim=1)

    for _ in range(bisection_steps):
        mid = (lo + hi) / 2
        below = energy(mid) < 1
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    c = hi.exp()[:, None]
    # Exact step: with the split into clamped-low / free / clamped-high fixed, mean(w^2) = 1 is
    # c^2 * sum_free w^2 = M - n_low w_min^2 - n_high w_max^2.
    scaled = c * flat
    low, high = scaled <= w_min, scaled >= w_max
    free = ~(low | high)
    m = flat.shape[1]
    rest = m - low.sum(1) * w_min**2 - high.sum(1) * w_max**2
    free_energy = (flat.square() * free).sum(1)
    exact = (rest.clamp_min(0) / free_energy.clamp_min(1e-30)).sqrt()[:, None]
    c = torch.where((free_energy > 0)[:, None] & (rest > 0)[:, None], exact, c)
    out = (c * flat).clamp(w_min, w_max)
    out = torch.where((w_top > 0)[:, None], out, torch.ones_like(out))
    return out.view(n, *w.shape[1:])


def _check_range(w_min: float, w_max: float) -> None:
    check_in_range(w_min, "w_min", 0.0, 1.0)
    check_in_range(w_max, "w_max", 1.0, math.inf)


def noise_weight(
    S: torch.Tensor,
    gamma: float = 1.0,
    blur_sigma: float = 1.0,
    w_min: float = 0.5,
    w_max: float = 2.0,
    bisection_steps: int = 30,
) -> torch.Tensor:
    """Process2's elementwise noise weight w (N, 1, H, W) from saliency maps ``S`` (N, 1, H, W).

    ``s = S / mean(S)`` per image (a flat or all-zero map gives s = 1); ``w = 1 + gamma (s - 1)``;
    Gaussian blur with ``blur_sigma`` pixels (0: none); then ``clamp(c w, w_min, w_max)`` with
    ``mean(w^2) = 1`` per image. ``gamma = 0`` returns exactly ones.
    """
    if not isinstance(S, torch.Tensor) or S.ndim != 4 or S.shape[1] != 1:
        got = tuple(S.shape) if isinstance(S, torch.Tensor) else type(S).__name__
        raise ValueError(f"S: expected saliency maps of shape (N, 1, H, W), got {got}")
    check_in_range(gamma, "gamma", 0.0, math.inf)
    check_in_range(blur_sigma, "blur_sigma", 0.0, math.inf)
    _check_range(w_min, w_max)
    check_positive_int(bisection_steps, "bisection_steps")
    if gamma == 0:
        return torch.ones_like(S, dtype=torch.float32)
    S = S.float()
    mean = S.mean(dim=(2, 3), keepdim=True)
    s = torch.where(mean > 0, S / mean.clamp_min(1e-30), torch.ones_like(S))
    w = gaussian_blur(1 + gamma * (s - 1), blur_sigma)
    return fit_energy(w, w_min, w_max, bisection_steps)


def anneal_weight(
    w: torch.Tensor,
    t: torch.Tensor,
    num_timesteps: int,
    *,
    w_min: float = 0.5,
    w_max: float = 2.0,
    bisection_steps: int = 30,
) -> torch.Tensor:
    """``w`` faded towards 1 as t -> T: ``1 + a (w - 1)``, ``a = (T - 1 - t) / (T - 1)``, energy refitted.

    At ``t = T - 1`` the weight is exactly 1, so q(x_T | x0) is the isotropic prior sampling
    starts from.
    """
    _check_range(w_min, w_max)
    t = as_timesteps(t, w.shape[0], w.device)
    a = ((num_timesteps - 1 - t).float() / (num_timesteps - 1)).clamp(0, 1).view(-1, *[1] * (w.ndim - 1))
    return fit_energy(1 + a * (w.float() - 1), w_min, w_max, bisection_steps)


# -- discriminator guidance -------------------------------------------------------------------------
class DiscriminatorGuidance:
    """A sampler ``guidance(x_t, t, eps) -> eps`` hook: Discriminator Guidance (Kim et al., 2023).

    ``eps - sqrt(1 - abar_t) * weight * grad_x log(D / (1 - D))``; with D = sigmoid(logit),
    ``log(D / (1 - D))`` is the logit. ``on="x_t"`` (the paper): D reads the noisy sample with its
    t (train D on noised real/fake pairs). ``on="x0_hat"``: D reads the denoised estimate, as
    XAI-guided training's D does; the gradient reaches x_t through ``x0_hat = (x_t - sqrt(1 - abar)
    eps) / sqrt(abar)`` with eps held fixed (a factor ``1 / sqrt(abar_t)``).
    """

    def __init__(
        self, discriminator: nn.Module, schedule: NoiseSchedule, weight: float = 1.0, *, on: str = "x_t"
    ):
        if not isinstance(discriminator, nn.Module):
            raise TypeError(f"discriminator: expected an nn.Module, got {type(discriminator).__name__}")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule: expected a NoiseSchedule, got {type(schedule).__name__}")
        self.discriminator = discriminator
        self.schedule = schedule
        self.weight = check_in_range(weight, "weight", -math.inf, math.inf)
        self.on = check_choice(on, "on", ("x_t", "x0_hat"))

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        if self.weight == 0:
            return eps
        _check_batch(x_t, "x_t")
        t = as_timesteps(t, x_t.shape[0], x_t.device)
        model = _bound(self.discriminator, t, x_t.shape[0], x_t.device)
        scale = self.schedule.gather("sqrt_one_minus_alphas_cumprod", t) * self.weight
        if self.on == "x_t":
            x = x_t
        else:
            x = self.schedule.predict_x0(x_t, t, eps)
            scale = scale / self.schedule.gather("sqrt_alphas_cumprod", t)
        grad = forward_backward(model, x, DiscriminatorScore()).input_grad
        return eps - scale * grad.to(eps.dtype)


def discriminator_guidance(
    discriminator: nn.Module,
    x_t: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    eps: torch.Tensor | None = None,
    schedule: NoiseSchedule | None = None,
    weight: float = 1.0,
    *,
    on: str = "x_t",
):
    """The corrected eps for ``(x_t, t, eps)``; without ``x_t``, the :class:`DiscriminatorGuidance`
    hook to pass as a sampler's ``guidance``. ``weight = 0`` returns eps unchanged."""
    if schedule is None:
        raise ValueError("schedule: discriminator guidance needs the NoiseSchedule (for sqrt(1 - abar_t))")
    guide = DiscriminatorGuidance(discriminator, schedule, weight, on=on)
    if x_t is None:
        return guide
    if t is None or eps is None:
        raise ValueError("t, eps: pass both with x_t (or none of the three to get the guidance hook)")
    return guide(x_t, t, eps)
