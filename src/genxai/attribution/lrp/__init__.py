"""Layer-wise Relevance Propagation: rules, composites, canonizers, LRP and Relevance-CAM.

from genxai.attribution.lrp import LRP, EpsilonGammaBox, MergeBatchNorm
rel = LRP(model, EpsilonGammaBox(low=0.0, high=1.0), canonizers=[MergeBatchNorm()])(x, target=3)

with EpsilonPlus().context(model) as m:        # the rules live only inside the block
    out = m(x)
    rel, = torch.autograd.grad(out, x, seed)
"""

from genxai.attribution.lrp.canonizers import Canonizer, MergeBatchNorm, ResNetCanonizer, Sum
from genxai.attribution.lrp.composites import (
    Composite,
    EpsilonAlpha2Beta1,
    EpsilonGammaBox,
    EpsilonPlus,
    EpsilonPlusFlat,
    NameMap,
    get_composite,
)
from genxai.attribution.lrp.lrp import LRP, RelevanceCAM, lrp_context, relevance_pass
from genxai.attribution.lrp.rules import (
    AlphaBeta,
    Epsilon,
    Flat,
    Gamma,
    Norm,
    Pass,
    Rule,
    WSquare,
    ZBox,
    ZPlus,
    attach,
    stabilize,
)

__all__ = [
    "LRP",
    "AlphaBeta",
    "Canonizer",
    "Composite",
    "Epsilon",
    "EpsilonAlpha2Beta1",
    "EpsilonGammaBox",
    "EpsilonPlus",
    "EpsilonPlusFlat",
    "Flat",
    "Gamma",
    "MergeBatchNorm",
    "NameMap",
    "Norm",
    "Pass",
    "RelevanceCAM",
    "ResNetCanonizer",
    "Rule",
    "Sum",
    "WSquare",
    "ZBox",
    "ZPlus",
    "attach",
    "get_composite",
    "lrp_context",
    "relevance_pass",
    "stabilize",
]
