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
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
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
from genxai.core.engine import autocast_context
from genxai.core.hooks import TraceDict
from genxai.core.targets import Target, evaluate


@dataclass
class Relevance:
    """What one relevance pass gives back (all detached)."""

    input: torch.Tensor
    scores: torch.Tensor
    layer: torch.Tensor | None = None
    activation: torch.Tensor | None = None


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in _tensors(item)]
    return []


def relevance(
    model: nn.Module,
    x: torch.Tensor,
    target: Target,
    composite: Composite,
    canonizers: Sequence[Canonizer] = (),
    *,
    layer: str | None = None,
    autocast: torch.dtype | None = None,
) -> Relevance:
    """One forward and one modified backward: the relevance of ``x`` (and of ``layer``'s output).

    The model is rewritten (canonizers, then the composite's rules) only inside this call.
    """
    n = x.shape[0]
    layers = [layer] if layer else []
    traced = list(dict.fromkeys(layers + ([target.layer] if target.layer else [])))
    with ExitStack() as stack:
        stack.enter_context(torch.enable_grad())
        for canonizer in canonizers:
            stack.enter_context(canonizer.apply(model))
        stack.enter_context(composite.context(model))
        traces = stack.enter_context(TraceDict(model, traced, retain_grad=True))
        inputs = x.detach().requires_grad_(True)
        with autocast_context(x.device, autocast):
            output = model(inputs)
        traces.require_outputs()
        scored = traces[target.layer].output if target.layer else output
        target = target.bind(scored)
        scores = evaluate(target, scored, n)
        outputs = [t for t in _tensors(scored) if t.requires_grad]
        if not scores.requires_grad or not outputs:
            raise ValueError(f"target: the scores of {target!r} do not depend on the input (no gradient)")
        grads = torch.autograd.grad(scores.sum(), outputs, retain_graph=True, allow_unused=True)
        used = [(out, (grad * out).detach()) for out, grad in zip(outputs, grads) if grad is not None]
        wrt = [inputs] + [traces[name].output for name in layers]
        found = torch.autograd.grad(
            [out for out, _ in used], wrt, [seed for _, seed in used], allow_unused=True
        )
    if found[0] is None:
        raise ValueError("x: the target score does not depend on the input (no relevance reaches it)")
    result = Relevance(input=found[0], scores=scores.detach())
    if layer:
        if found[1] is None:
            raise ValueError(f"layer: the target score does not depend on layer {layer!r}")
        result.layer, result.activation = found[1], traces[layer].output.detach()
    return result


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
        result = relevance(self.model, x, target, self.composite, self.canonizers, autocast=self.autocast)
        return result.input


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
        result = relevance(
            self.model,
            x,
            target,
            self.composite,
            self.canonizers,
            layer=self.layer_name,
            autocast=self.autocast,
        )
        activation, layer_relevance = result.activation.float(), result.layer.float()
        if activation.ndim != 4:
            raise ValueError(
                f"layer: {self.layer_name!r} gives activations of shape {tuple(activation.shape)}; "
                "Relevance-CAM needs (N, C, h, w) feature maps (pick a convolutional layer)"
            )
        weights = layer_relevance.sum(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * activation).sum(dim=1, keepdim=True))
        return self.finish(cam, x)
