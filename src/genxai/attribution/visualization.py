"""Class model visualisation (activation maximisation): the image a model scores highest.

Simonyan et al. (2013) find ``argmax_I  S_c(I) - lambda ||I||^2`` by gradient ascent on the
pre-softmax class score from a zero image. Random jitter (rolling the image a few pixels each step)
and a periodic Gaussian blur (Yosinski et al., 2015) keep the result from being high-frequency
noise. Any target works, e.g. ``UnitActivation(layer, unit)`` visualises one unit of a layer.

A result that stayed constant (no gradient reached the image: a random network's ReLUs all off at
the zero start, say) comes with a warning instead of passing silently as a picture.
"""

from __future__ import annotations

import math
import time
import warnings

import torch
from torch import nn

from genxai.attribution.base import Attribution, register
from genxai.core.checks import check_choice, check_in_range, check_positive_int
from genxai.core.engine import forward_backward, model_output
from genxai.core.maps import gaussian_blur
from genxai.core.targets import Target


@register("classmodel", "activationmaximization", "classmodelvisualization")
class ClassModelVisualization(Attribution):
    """Optimise images to maximise a target score minus ``l2 * ||I||^2`` (Simonyan et al., 2013).

    ``ClassModelVisualization(model)(x_like, target=3)`` returns images of ``x_like``'s shape and
    device, optimised from zeros (``init="zeros"``) or from ``x_like`` itself (``init="input"``).
    A ``None`` target explains the class predicted for the starting image.

    Args:
        steps: gradient-ascent steps.
        lr: step size of ``I <- I + lr * d(score - l2 ||I||^2)/dI``.
        l2: the L2 penalty lambda.
        jitter: each step the image is rolled by up to this many pixels (0: off).
        blur_every: blur the image every this many steps (0: off).
        blur_sigma: the blur's standard deviation in pixels.
        init: "zeros" or "input".
        normalize_grad: divide each image's gradient by its mean absolute value (as DeepDream), so
            ``lr`` is the mean step per pixel whatever the model's gradient scale.
        seed: seed of the jitter (None: the global generator).
        max_seconds: stop after this many seconds, with a warning, even before ``steps`` steps
            (None: no time limit).

    Warns (``UserWarning``) when an image comes out constant, e.g. all zero.
    """

    output = "image"

    def __init__(
        self,
        model: nn.Module,
        *,
        steps: int = 200,
        lr: float = 1.0,
        l2: float = 1e-4,
        jitter: int = 2,
        blur_every: int = 4,
        blur_sigma: float = 0.5,
        init: str = "zeros",
        normalize_grad: bool = False,
        seed: int | None = 0,
        max_seconds: float | None = None,
        **kwargs,
    ):
        super().__init__(model, **kwargs)
        self.steps = check_positive_int(steps, "steps")
        self.lr = check_in_range(lr, "lr", 0.0, math.inf, closed=False)
        self.l2 = check_in_range(l2, "l2", 0.0, math.inf)
        self.jitter = check_positive_int(jitter, "jitter", minimum=0)
        self.blur_every = check_positive_int(blur_every, "blur_every", minimum=0)
        self.blur_sigma = check_in_range(blur_sigma, "blur_sigma", 0.0, math.inf, closed=False)
        self.init = check_choice(init, "init", ("zeros", "input"))
        self.normalize_grad = bool(normalize_grad)
        self.seed = seed
        self.max_seconds = (
            None
            if max_seconds is None
            else check_in_range(max_seconds, "max_seconds", 0.0, math.inf, closed=False)
        )

    def attribute(self, x: torch.Tensor, target: Target, init: str | None = None) -> torch.Tensor:
        init = check_choice(self.init if init is None else init, "init", ("zeros", "input"))
        image = torch.zeros_like(x) if init == "zeros" else x.detach().clone()
        if target.layer is None:
            target = target.bind(model_output(self.model, image, self.autocast))
        generator = torch.Generator()
        if self.seed is not None:
            generator.manual_seed(self.seed)
        else:
            generator.seed()
        deadline = None if self.max_seconds is None else time.monotonic() + self.max_seconds
        for step in range(self.steps):
            if deadline is not None and step > 0 and time.monotonic() > deadline:
                warnings.warn(
                    f"ClassModelVisualization: stopped after {step} of {self.steps} steps "
                    f"(max_seconds={self.max_seconds:g})",
                    UserWarning,
                    stacklevel=3,
                )
                break
            shift = (0, 0)
            if self.jitter:
                shift = tuple(
                    torch.randint(-self.jitter, self.jitter + 1, (2,), generator=generator).tolist()
                )
            rolled = image.roll(shift, dims=(2, 3))
            grad = forward_backward(self.model, rolled, target, autocast=self.autocast).input_grad
            grad = grad.to(image.dtype).roll((-shift[0], -shift[1]), dims=(2, 3))
            if not bool(grad.any()) and not bool(image.any()):
                break  # a zero image with no gradient stays zero: every further step is the same
            if self.normalize_grad:
                grad = grad / grad.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
            image = image + self.lr * (grad - 2 * self.l2 * image)
            if self.blur_every and (step + 1) % self.blur_every == 0:
                radius = max(1, math.ceil(3 * self.blur_sigma))  # at least 3 taps, borders replicated
                image = gaussian_blur(image, self.blur_sigma, radius=radius, padding="replicate")
        _warn_if_constant(image)
        return image


def _warn_if_constant(images: torch.Tensor) -> None:
    """Warn when any image of the batch is constant (the ascent found no direction to move in)."""
    flat = images.detach().flatten(1)
    constant = (flat.amax(dim=1) == flat.amin(dim=1)).nonzero().flatten().tolist()
    if constant:
        value = float(flat[constant[0], 0])
        warnings.warn(
            f"ClassModelVisualization: the result is constant ({value:g}) for images {constant}: no "
            "gradient of the target reached the image (e.g. a random or untrained network whose ReLUs "
            "are all off at the zero start). Try init='input', another target, or a trained model.",
            UserWarning,
            stacklevel=4,
        )
