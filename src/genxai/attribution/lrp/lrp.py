"""Layer-wise Relevance Propagation and Relevance-CAM.

    rel = LRP(model, composite=EpsilonGammaBox(low=0, high=1))(x, target=3)     # (N, C, H, W)
    cam = RelevanceCAM(model, layer="features.8")(x, target=3)                  # (N, 1, H, W)

LRP (Bach et al., 2015) redistributes the explained score backward layer by layer, each layer by
its rule (see :mod:`rules`), so the input relevance sums to the score up to what biases and
stabilisers absorb. The composite's rules live only while the relevance is computed.

The output relevance (the *seed*) is ``d score / d output * output``: the one-hot logit for a
class target, the logit itself for a single-logit discriminator, and the same formula for any
callable target. Relevance-CAM (Lee et al., CVPR 2021) weighs a layer's channels by the relevance
that reaches them: ``cam = ReLU(sum_k w_k A_k)`` with ``w_k = sum_ij R_k(i, j)``.

Both run the one forward/backward pass of :func:`genxai.core.engine.forward_backward`, with the
model rewritten by :func:`lrp_context` around it and ``output_relevance=True`` (the seed above).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genxai.attribution.base import Attribution, LayerAttribution, register
from genxai.attribution.lrp.canonizers import (
    RESNET_BLOCKS,
    Canonizer,
    MergeBatchNorm,
    ResNetCanonizer,
    check_canonizers,
)
from genxai.attribution.lrp.composites import Composite, get_composite
from genxai.core.engine import Gradients, forward_backward
from genxai.core.targets import Target


@contextmanager
def lrp_context(
    model: nn.Module, composite: Composite, canonizers: Sequence[Canonizer] = ()
) -> Iterator[nn.Module]:
    """The model rewritten for LRP inside the block: ``canonizers`` first, then the composite's
    canonizers and rules. Leaving the block, however it is left, restores the model exactly."""
    with ExitStack() as stack:
        for canonizer in canonizers:
            stack.enter_context(canonizer.apply(model))
        stack.enter_context(composite.context(model))
        yield model


def relevance_pass(
    model: nn.Module,
    x: torch.Tensor,
    target: Target,
    composite: Composite,
    canonizers: Sequence[Canonizer] = (),
    *,
    layers: Sequence[str] = (),
    autocast: torch.dtype | None = None,
) -> Gradients:
    """One forward and one relevance backward through :func:`genxai.core.engine.forward_backward`:
    ``input_grad`` is the input's relevance, ``gradients[name]`` the relevance of ``layers``."""
    return forward_backward(
        model,
        x,
        target,
        layers=layers,
        autocast=autocast,
        context=partial(lrp_context, composite=composite, canonizers=canonizers),
        output_relevance=True,
    )


def default_canonizers(
    model: nn.Module, composite: Composite, canonizers: Sequence[Canonizer] | None
) -> list[Canonizer]:
    """The canonizers given; for None, when the composite brings no canonizers of its own,
    BatchNorm merging if the model has BatchNorm and residual sums if it has torchvision ResNet blocks."""
    if canonizers is not None or composite.canonizers:
        return check_canonizers(canonizers)
    modules = list(model.modules())
    chosen: list[Canonizer] = []
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules):
        chosen.append(MergeBatchNorm())
    if any(isinstance(m, RESNET_BLOCKS) for m in modules):
        chosen.append(ResNetCanonizer())
    return chosen


@register("lrp")
class LRP(Attribution):
    """Layer-wise Relevance Propagation: relevance of the input's shape (N, C, H, W).

    Args:
        composite: which rule each layer gets (default :class:`EpsilonPlus`); a Composite or a name
            ('epsilon-plus', 'epsilon-alpha2-beta1', 'epsilon-plus-flat').
        canonizers: model rewrites applied first; default (None): ``MergeBatchNorm()`` when the
            model has BatchNorm layers and ``ResNetCanonizer()`` when it has torchvision ResNet
            blocks, unless the composite has canonizers; pass ``[]`` for none.
    """

    def __init__(
        self,
        model: nn.Module,
        composite: Composite | str | None = None,
        canonizers: Sequence[Canonizer] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        self.composite = get_composite(composite)
        self.canonizers = default_canonizers(model, self.composite, canonizers)

    def attribute(self, x: torch.Tensor, target: Target) -> torch.Tensor:
        result = relevance_pass(
            self.model, x, target, self.composite, self.canonizers, autocast=self.autocast
        )
        return result.input_grad


@register("relevancecam")
class RelevanceCAM(LayerAttribution):
    """Relevance-CAM (Lee et al., CVPR 2021): ``ReLU(sum_k w_k A_k)``, ``w_k`` the relevance of
    channel k of ``layer`` summed over positions. Maps are (N, 1, H, W), upsampled like other CAMs.

    Args:
        composite, canonizers: as for :class:`LRP` (default EpsilonPlus: z+ for convolutions, as the paper).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | nn.Module,
        composite: Composite | str | None = None,
        canonizers: Sequence[Canonizer] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, layer, **kwargs)
        self.composite = get_composite(composite)
        self.canonizers = default_canonizers(model, self.composite, canonizers)

    def attribute(self, x: torch.Tensor, target: Target) -> torch.Tensor:
        result = relevance_pass(
            self.model,
            x,
            target,
            self.composite,
            self.canonizers,
            layers=[self.layer_name],
            autocast=self.autocast,
        )
        activation = result.activations[self.layer_name].float()
        layer_relevance = result.gradients[self.layer_name].float()
        if activation.ndim != 4:
            raise ValueError(
                f"layer: {self.layer_name!r} gives activations of shape {tuple(activation.shape)}; "
                "Relevance-CAM needs (N, C, h, w) feature maps (pick a convolutional layer)"
            )
        weights = layer_relevance.sum(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * activation).sum(dim=1, keepdim=True))
        return self.finish(cam, x)
