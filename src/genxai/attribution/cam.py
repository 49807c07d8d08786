"""The CAM family: class activation maps from one layer's activations ``A`` (N, K, h, w).

Every method forms ``cam = sum_k w_k * A_k`` (LayerCAM: per-position weights), applies the ReLU its
paper applies, and upsamples bilinearly to the input. :class:`BaseCAM` does all of that; each
method states only how its weights are computed:

* :class:`CAM` (Zhou et al., 2016): the rows of a GAP + linear head's weight matrix.
* :class:`GradCAM` (Selvaraju et al., 2017): spatial mean of the gradients.
* :class:`GradCAMPlusPlus` (Chattopadhay et al., 2018): closed form with an exponential output.
* :class:`LayerCAM` (Jiang et al., 2021): ReLU(gradient) at every position.
* :class:`ScoreCAM` (Wang et al., 2020): softmax of the target scores of inputs masked by each
  channel, evaluated in large batches.

    heat = GradCAM(model, layer="layer4")(x, target=3)       # (N, 1, H, W) float32 on x's device

Gradients and activations come from :func:`genxai.core.engine.forward_backward` (one
``autograd.grad`` call; safe with an in-place ReLU/LeakyReLU after the layer). Results follow
pytorch-grad-cam's formulas, without its min-max scaling (pass ``normalize=True`` for that).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from genxai.attribution.base import LayerAttribution, register
from genxai.core.checks import check_positive_int
from genxai.core.engine import autocast_context, batched_scores, forward_backward
from genxai.core.hooks import Trace, resolve_layer
from genxai.core.maps import minmax_normalize
from genxai.core.targets import ClassLogit, Select, Target, evaluate


def layer_forward(
    model: nn.Module, x: torch.Tensor, layer: str, autocast: torch.dtype | None = None
) -> tuple[Any, torch.Tensor]:
    """One forward under ``no_grad``: the model's output and ``layer``'s activation (float32).

    ``retain_grad`` makes the trace hand the next layer a copy, so an in-place activation that
    follows the layer cannot overwrite the activation we keep.
    """
    with (
        torch.no_grad(),
        Trace(model, layer, retain_grad=True) as trace,
        autocast_context(x.device, autocast),
    ):
        output = model(x)
    return output, trace.require_output().detach().float()


class BaseCAM(LayerAttribution):
    """Forward (and backward), weighting, ReLU and upsampling shared by the CAM family.

    Subclasses implement :meth:`weights`. ``uses_gradients = False`` skips the backward pass and
    binds the target on the clean output instead; ``relu = False`` keeps signed maps.
    """

    uses_gradients: ClassVar[bool] = True
    relu: ClassVar[bool] = True

    def attribute(self, x: torch.Tensor, target: Target) -> torch.Tensor:
        if self.uses_gradients:
            result = forward_backward(
                self.model, x, target, layers=[self.layer_name], input_grad=False, autocast=self.autocast
            )
            activations = result.activations[self.layer_name].float()
            gradients = result.gradients[self.layer_name].float()
        else:
            output, activations = layer_forward(self.model, x, self.layer_name, self.autocast)
            target = target.bind(output)
            evaluate(target, output, x.shape[0])  # a clear error now for a bad target
            gradients = None
        if activations.ndim != 4:
            raise ValueError(
                f"layer: {self.layer_name!r} gives activations of shape {tuple(activations.shape)}; the CAM "
                "family needs (N, C, h, w) feature maps (pick a convolutional layer)"
            )
        weights = self.weights(x, target, activations, gradients)
        if weights.ndim == 2:  # one weight per channel
            weights = weights[:, :, None, None]
        cam = (weights * activations).sum(dim=1, keepdim=True)
        if self.relu:
            cam = cam.clamp_min(0)
        return self.finish(cam, x)

    @abstractmethod
    def weights(
        self,
        x: torch.Tensor,
        target: Target,
        activations: torch.Tensor,
        gradients: torch.Tensor | None,
    ) -> torch.Tensor:
        """Channel weights (N, K), or per-position weights (N, K, h, w).

        ``target`` is bound to the clean output when ``uses_gradients`` is False; ``gradients``
        (d score / d activations) is None then.
        """


@register("cam")
class CAM(BaseCAM):
    """Class activation mapping for a GAP + linear head: ``sum_k w[c, k] A_k`` (signed, as the paper).

    Args:
        layer: the layer whose output the global average pool reads.
        fc: the ``nn.Linear`` classifier after the pool (dotted name or module).

    The target must name a class (an int, a (N,) tensor of classes, or None for the predicted class).
    Averaging the map over positions and adding ``fc.bias[c]`` gives the class logit.
    """

    uses_gradients = False
    relu = False

    def __init__(self, model: nn.Module, layer: str | nn.Module, *, fc: str | nn.Module = "fc", **kwargs):
        super().__init__(model, layer, **kwargs)
        try:
            self.fc_name, self.fc = resolve_layer(model, fc)
        except ValueError as err:
            raise ValueError(f"fc: {str(err).removeprefix('layer: ')}") from err
        if not isinstance(self.fc, nn.Linear):
            raise TypeError(
                f"fc: expected an nn.Linear classifier, {self.fc_name!r} is a {type(self.fc).__name__}"
            )

    def weights(self, x, target, activations, gradients):
        inner = target.target if isinstance(target, Select) else target
        if not isinstance(inner, ClassLogit):
            raise TypeError(
                f"target: CAM explains a class; pass an int, a (N,) tensor of classes or None, got {target!r}"
            )
        channels = activations.shape[1]
        if self.fc.in_features != channels:
            raise ValueError(
                f"fc: {self.fc_name!r} has in_features={self.fc.in_features}, but layer {self.layer_name!r} "
                f"has {channels} channels; CAM needs the layer that feeds the pool before the fc"
            )
        rows = self.fc.weight.detach().float().to(activations.device)[inner.index]
        return rows.expand(activations.shape[0], channels)


@register("gradcam", "grad_cam")
class GradCAM(BaseCAM):
    """Grad-CAM: ``ReLU(sum_k alpha_k A_k)`` with ``alpha_k`` the spatial mean of d score / d A_k."""

    def weights(self, x, target, activations, gradients):
        return gradients.mean(dim=(2, 3))


@register("gradcam++", "gradcampp", "gradcamplusplus")
class GradCAMPlusPlus(BaseCAM):
    """Grad-CAM++ in closed form, assuming an exponential output (eq. 19 of the paper).

    ``alpha = g^2 / (2 g^2 + sum_ab A_ab g^3)`` (0 where g = 0), weights ``sum_ij alpha ReLU(g)``;
    the same stabiliser (1e-6) as pytorch-grad-cam.
    """

    eps: ClassVar[float] = 1e-6

    def weights(self, x, target, activations, gradients):
        g2 = gradients.pow(2)
        g3 = g2 * gradients
        denominator = 2 * g2 + activations.sum(dim=(2, 3), keepdim=True) * g3 + self.eps
        alpha = torch.where(denominator != 0, g2 / denominator, torch.zeros_like(gradients))  # 0 where g = 0
        return (alpha * gradients.clamp_min(0)).sum(dim=(2, 3))


@register("layercam", "layer_cam")
class LayerCAM(BaseCAM):
    """LayerCAM: ``ReLU(sum_k ReLU(g_k) * A_k)``, weighting every position by its positive gradient."""

    def weights(self, x, target, activations, gradients):
        return gradients.clamp_min(0)


@register("scorecam", "score_cam")
class ScoreCAM(BaseCAM):
    """Score-CAM: channel weights from the target scores of the input masked by each channel.

    Each channel's activation is upsampled to the input (bilinear, corners aligned), min-max scaled
    to [0, 1] (a flat channel gives a zero mask, never NaN; pytorch-grad-cam adds 1e-8 to the span,
    so its masks reach 1 - 1e-8 / span), and ``x * mask`` is scored; the weights are the softmax
    over channels of those scores, as in pytorch-grad-cam. The N * K masked inputs
    run ``batch_size`` rows per forward, many images and channels in one batch.

    Args:
        batch_size: masked inputs per forward pass.
    """

    uses_gradients = False

    def __init__(self, model: nn.Module, layer: str | nn.Module, *, batch_size: int = 64, **kwargs):
        super().__init__(model, layer, **kwargs)
        self.batch_size = check_positive_int(batch_size, "batch_size")

    def weights(self, x, target, activations, gradients):
        n, channels = activations.shape[:2]

        def make_batch(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
            rows = torch.arange(start, stop, device=x.device)
            image, channel = rows // channels, rows % channels
            masks = F.interpolate(
                activations[image, channel][:, None], size=x.shape[-2:], mode="bilinear", align_corners=True
            )
            return x[image] * minmax_normalize(masks).to(x.dtype), image

        scores = batched_scores(
            self.model, make_batch, n * channels, target, batch_size=self.batch_size, autocast=self.autocast
        )
        return torch.softmax(scores.view(n, channels), dim=1)
