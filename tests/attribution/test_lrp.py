"""LRP and Relevance-CAM: conservation, agreement with zennit, exact restoration of the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from genxai.attribution import get
from genxai.attribution.lrp import (
    LRP,
    AlphaBeta,
    Composite,
    Epsilon,
    EpsilonAlpha2Beta1,
    EpsilonGammaBox,
    EpsilonPlus,
    EpsilonPlusFlat,
    Flat,
    Gamma,
    MergeBatchNorm,
    NameMap,
    Norm,
    RelevanceCAM,
    WSquare,
    ZBox,
    ZPlus,
    stabilize,
)
from genxai.core.targets import UnitActivation
from tests.conftest import Discriminator

# --- small models ---------------------------------------------------------------------------------


class VGGish(nn.Module):
    """conv/relu/maxpool features, average pool, flatten, a two-layer classifier (as VGG)."""

    def __init__(self, batch_norm: bool = False, classes: int = 5):
        super().__init__()

        def block(cin, cout, bias=True):
            layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=bias and not batch_norm)]
            return [*layers, nn.BatchNorm2d(cout)] if batch_norm else layers

        self.features = nn.Sequential(
            *block(3, 8),
            nn.ReLU(inplace=True),
            *block(8, 8),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            *block(8, 16),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AvgPool2d(2)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Linear(16 * 4 * 4, 32), nn.ReLU(inplace=True), nn.Dropout(), nn.Linear(32, classes)
        )

    def forward(self, x):
        return self.classifier(self.flatten(self.pool(self.features(x))))


class Generator(nn.Module):
    """A DCGAN-style generator: transposed convolutions, BatchNorm, ReLU, Tanh: (N, 4, 4, 4) -> (N, 3, 16, 16)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.ConvTranspose2d(4, 8, 4, 2, 1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(8, 3, 4, 2, 1),
            nn.Tanh(),
        )

    def forward(self, z):
        return self.net(z)


def randomize_batch_norms(model: nn.Module, eps: float | None = None) -> nn.Module:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                if eps is not None:
                    module.eps = eps
    return model.eval()


def bias_free_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 16, bias=False),
        nn.ReLU(),
        nn.Linear(16, 5, bias=False),
    ).eval()


@pytest.fixture
def vgg():
    torch.manual_seed(0)
    return VGGish().eval()


@pytest.fixture
def signed_images():
    torch.manual_seed(2)
    return torch.rand(2, 3, 16, 16) * 2 - 1


def class_seed(output: torch.Tensor, target: int | None) -> torch.Tensor:
    """The one-hot logit (or the logit of a single-logit model)."""
    if target is None:
        return output.detach()
    seed = torch.zeros_like(output)
    seed[:, target] = output[:, target].detach()
    return seed


def zennit_relevance(model, x, composite, target=None, seed_fn=None) -> torch.Tensor:
    """The reference: ``with composite.context(model) as m: rel = grad(m(x), x, seed)``."""
    x = x.clone().requires_grad_(True)
    with composite.context(model) as modified:
        out = modified(x)
        seed = seed_fn(out) if seed_fn is not None else class_seed(out, target)
        (rel,) = torch.autograd.grad(out, x, seed)
    return rel


def assert_agree(ours: torch.Tensor, theirs: torch.Tensor, rtol: float = 1e-5) -> None:
    """Elementwise agreement relative to the largest relevance."""
    scale = theirs.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(ours, theirs, rtol=0.0, atol=rtol * scale)


def snapshot(model: nn.Module) -> dict:
    return {
        "params": {name: (p, p.detach().clone()) for name, p in model.named_parameters()},
        "param_slots": [dict(m._parameters) for m in model.modules()],
        "buffers": {name: b.detach().clone() for name, b in model.named_buffers()},
        "forward": [dict(m.__dict__).get("forward") for m in model.modules()],
        "hooks": [
            (
                dict(m._forward_hooks),
                dict(m._forward_pre_hooks),
                dict(m._backward_hooks),
                dict(m._backward_pre_hooks),
            )
            for m in model.modules()
        ],
    }


def assert_restored(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["forward"] == before["forward"]
    assert after["hooks"] == before["hooks"]
    assert after["param_slots"] == before["param_slots"]
    assert after["params"].keys() == before["params"].keys()
    for name, (param, value) in before["params"].items():
        now, _ = after["params"][name]
        assert now is param, name
        assert torch.equal(param.detach().view(torch.int32), value.view(torch.int32)), name
    for name, value in before["buffers"].items():
        assert torch.equal(after["buffers"][name], value), name


# --- conservation ---------------------------------------------------------------------------------


def test_epsilon_conserves_the_logit(signed_images):
    model = bias_free_net()
    composite = Composite({(nn.Conv2d, nn.Linear): Epsilon(1e-9)})
    rel = LRP(model, composite)(signed_images, target=3)
    logit = model(signed_images)[:, 3]
    torch.testing.assert_close(rel.sum(dim=(1, 2, 3)), logit, rtol=1e-4, atol=1e-7)


def test_unit_target_conserves_the_unit_score(signed_images):
    model = bias_free_net()
    target = UnitActivation("3", unit=2)  # mean activation of channel 2 of the second conv
    rel = LRP(model, Composite({(nn.Conv2d, nn.Linear): Epsilon(1e-9)}))(signed_images, target=target)
    with torch.no_grad():
        score = model[:4](signed_images)[:, 2].mean(dim=(1, 2))
    torch.testing.assert_close(rel.sum(dim=(1, 2, 3)), score, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "first",
    [
        ZPlus(1e-9),
        AlphaBeta(2, 1, 1e-9),
        Gamma(0.25, 1e-9),
        Flat(1e-9),
        WSquare(1e-9),
        ZBox(0.0, 1.0, 1e-9),
        Epsilon(1e-9),
    ],
    ids=repr,
)
def test_rules_conserve_on_positive_inputs(images, first):
    model = bias_free_net()
    composite = Composite({nn.Conv2d: ZPlus(1e-9), nn.Linear: Epsilon(1e-9)}, first=[(nn.Conv2d, first)])
    rel = LRP(model, composite)(images, target=1)
    logit = model(images)[:, 1]
    torch.testing.assert_close(rel.sum(dim=(1, 2, 3)), logit, rtol=1e-4, atol=1e-7)


def test_stabilize_moves_away_from_zero():
    z = torch.tensor([-2.0, 0.0, 3.0])
    assert torch.equal(stabilize(z, 0.5), torch.tensor([-2.5, 0.5, 3.5]))


def test_output_form_and_batch_independence(vgg, images):
    rel = LRP(vgg)(images, target=torch.tensor([0, 1, 2, 3]))
    assert rel.shape == images.shape and rel.dtype == torch.float32 and rel.device == images.device
    assert torch.isfinite(rel).all()
    single = LRP(vgg)(images[2:3], target=2)
    torch.testing.assert_close(rel[2:3], single, rtol=1e-5, atol=1e-8)


def test_model_output_unchanged_inside_the_context(discriminator, images):
    reference = discriminator(images)
    with EpsilonGammaBox(0.0, 1.0).context(discriminator) as model:
        inside = model(images)
    torch.testing.assert_close(inside, reference, rtol=0, atol=0)


# --- agreement with zennit ------------------------------------------------------------------------

COMPOSITE_PAIRS = [
    ("EpsilonPlus", lambda: EpsilonPlus(), lambda z: z.EpsilonPlus()),
    ("EpsilonGammaBox", lambda: EpsilonGammaBox(0.0, 1.0), lambda z: z.EpsilonGammaBox(0.0, 1.0)),
    ("EpsilonAlpha2Beta1", lambda: EpsilonAlpha2Beta1(), lambda z: z.EpsilonAlpha2Beta1()),
    ("EpsilonPlusFlat", lambda: EpsilonPlusFlat(), lambda z: z.EpsilonPlusFlat()),
]


@pytest.mark.peers
@pytest.mark.parametrize("name, ours, theirs", COMPOSITE_PAIRS, ids=[p[0] for p in COMPOSITE_PAIRS])
def test_composites_match_zennit(vgg, images, name, ours, theirs):
    composites = pytest.importorskip("zennit.composites")
    rel = LRP(vgg, ours())(images, target=2)
    assert_agree(rel, zennit_relevance(vgg, images, theirs(composites), target=2))


@pytest.mark.peers
@pytest.mark.parametrize("name, ours, theirs", COMPOSITE_PAIRS, ids=[p[0] for p in COMPOSITE_PAIRS])
def test_discriminator_matches_zennit(discriminator, images, name, ours, theirs):
    composites = pytest.importorskip("zennit.composites")
    rel = LRP(discriminator, ours())(images)  # single logit: the default target
    assert_agree(rel, zennit_relevance(discriminator, images, theirs(composites)))


@pytest.mark.peers
def test_gapnet_matches_zennit(gapnet, images):
    composites = pytest.importorskip("zennit.composites")
    rel = LRP(gapnet, "epsilon-plus")(images, target=4)
    assert_agree(rel, zennit_relevance(gapnet, images, composites.EpsilonPlus(), target=4))


def _rule_pairs():
    zr = pytest.importorskip("zennit.rules")
    return [
        (Epsilon(0.01), zr.Epsilon(0.01)),
        (Gamma(0.5), zr.Gamma(0.5)),
        (ZPlus(), zr.ZPlus()),
        (AlphaBeta(2, 1), zr.AlphaBeta(2, 1)),
        (AlphaBeta(1, 0), zr.AlphaBeta(1, 0)),
        (Flat(), zr.Flat()),
        (WSquare(), zr.WSquare(zero_params=["bias"])),  # the paper's w^2 rule ignores the bias
        (Norm(), zr.Norm()),
    ]


@pytest.mark.peers
def test_each_rule_matches_zennit(vgg, signed_images):
    zc = pytest.importorskip("zennit.composites")
    zr = pytest.importorskip("zennit.rules")
    zt = pytest.importorskip("zennit.types")
    for ours, theirs in _rule_pairs():
        composite = Composite({nn.Conv2d: ours, nn.Linear: Epsilon()})
        reference = zc.LayerMapComposite(
            [
                (zt.Activation, zr.Pass()),
                (zt.AvgPool, zr.Norm()),
                (nn.Conv2d, theirs),
                (nn.Linear, zr.Epsilon()),
            ]
        )
        rel = LRP(vgg, composite)(signed_images, target=0)
        assert_agree(rel, zennit_relevance(vgg, signed_images, reference, target=0))


@pytest.mark.peers
def test_zbox_with_channel_bounds_and_name_map_match_zennit(vgg, signed_images):
    zc = pytest.importorskip("zennit.composites")
    zr = pytest.importorskip("zennit.rules")
    zt = pytest.importorskip("zennit.types")
    low, high = torch.full((1, 3, 1, 1), -1.0), torch.tensor([1.0, 1.5, 2.0]).view(1, 3, 1, 1)
    ours = Composite({nn.Conv2d: ZPlus(), nn.Linear: Epsilon()}, first=[(nn.Conv2d, ZBox(low, high))])
    theirs = zc.SpecialFirstLayerMapComposite(
        [
            (zt.Activation, zr.Pass()),
            (zt.AvgPool, zr.Norm()),
            (nn.Conv2d, zr.ZPlus()),
            (nn.Linear, zr.Epsilon()),
        ],
        [(nn.Conv2d, zr.ZBox(low, high))],
    )
    assert_agree(LRP(vgg, ours)(signed_images, 1), zennit_relevance(vgg, signed_images, theirs, target=1))

    ours = NameMap(
        {"features.0": Flat(), "classifier.3": Epsilon(0.1)},
        type_map={nn.Conv2d: Gamma(), nn.Linear: Epsilon()},
    )
    theirs = zc.NameLayerMapComposite(
        name_map=[(("features.0",), zr.Flat()), (("classifier.3",), zr.Epsilon(0.1))],
        layer_map=[
            (zt.Activation, zr.Pass()),
            (zt.AvgPool, zr.Norm()),
            (nn.Conv2d, zr.Gamma()),
            (nn.Linear, zr.Epsilon()),
        ],
    )
    assert_agree(LRP(vgg, ours)(signed_images, 1), zennit_relevance(vgg, signed_images, theirs, target=1))


@pytest.mark.peers
@pytest.mark.parametrize("name, ours, theirs", COMPOSITE_PAIRS, ids=[p[0] for p in COMPOSITE_PAIRS])
def test_batch_norm_canonizer_matches_zennit(images, name, ours, theirs):
    composites = pytest.importorskip("zennit.composites")
    canonizers = pytest.importorskip("zennit.canonizers")
    torch.manual_seed(0)
    # zennit leaves each merged BatchNorm computing x / sqrt(1 + eps) instead of x; a tiny eps removes
    # that difference (ours is the exact identity, see test_merged_batch_norm_keeps_the_function).
    model = randomize_batch_norms(VGGish(batch_norm=True), eps=1e-10)
    rel = LRP(model, ours(), canonizers=[MergeBatchNorm()])(images, target=3)
    reference = theirs(composites)
    reference.canonizers = [canonizers.SequentialMergeBatchNorm()]
    assert_agree(rel, zennit_relevance(model, images, reference, target=3))


@pytest.mark.peers
def test_generator_with_transposed_convs_matches_zennit():
    composites = pytest.importorskip("zennit.composites")
    canonizers = pytest.importorskip("zennit.canonizers")
    torch.manual_seed(0)
    model = randomize_batch_norms(Generator(), eps=1e-10)
    z = torch.randn(2, 4, 4, 4)

    def corner(out):  # a callable target: the top-left quarter of the generated image
        return out[:, :, :8, :8].sum(dim=(1, 2, 3))

    def corner_seed(out):
        mask = torch.zeros_like(out)
        mask[:, :, :8, :8] = 1
        return mask * out.detach()

    rel = LRP(model, EpsilonPlus(canonizers=[MergeBatchNorm()]))(z, target=corner)
    reference = composites.EpsilonPlus(canonizers=[canonizers.SequentialMergeBatchNorm()])
    assert_agree(rel, zennit_relevance(model, z, reference, seed_fn=corner_seed))


# --- restoring the model --------------------------------------------------------------------------


def test_model_restored_after_use_and_after_exceptions(images):
    torch.manual_seed(0)
    model = randomize_batch_norms(VGGish(batch_norm=True))
    calls = []
    model.features[0].register_forward_hook(lambda *args: calls.append(1))
    before = snapshot(model)
    composite = EpsilonGammaBox(0.0, 1.0, canonizers=[MergeBatchNorm()])

    LRP(model, composite)(images, target=1)
    assert_restored(model, before)
    with pytest.raises(RuntimeError, match="boom"), composite.context(model) as modified:
        modified(images)
        raise RuntimeError("boom")
    assert_restored(model, before)
    with pytest.raises(ValueError, match="target"):  # raised inside the context
        LRP(model, composite)(images, target=9)
    assert_restored(model, before)
    with pytest.raises(ValueError, match="target"):
        RelevanceCAM(model, "features.3", composite)(images, target=9)
    assert_restored(model, before)
    assert calls  # the user's hook stayed and kept working


def test_merged_batch_norm_keeps_the_function():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, groups=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2),
        nn.BatchNorm2d(8),
        nn.ConvTranspose2d(8, 6, 4, 2, 1, groups=2),
        nn.BatchNorm2d(6),
        nn.Flatten(),
        nn.Linear(6 * 32 * 32, 4),
        nn.BatchNorm1d(4),
    )
    randomize_batch_norms(model)
    with torch.no_grad():
        model[9].running_mean.uniform_(-0.5, 0.5)
        model[9].running_var.uniform_(0.5, 2.0)
    x = torch.rand(2, 3, 16, 16)
    before = snapshot(model)
    reference = model(x)
    with MergeBatchNorm().apply(model):
        assert model[0].bias is not None
        merged = model(x)
    torch.testing.assert_close(merged, reference, rtol=1e-5, atol=1e-6)
    assert_restored(model, before)
    assert model[0].bias is None


def test_canonizer_needs_eval_mode_and_lrp_runs_a_training_model_in_it(images):
    model = VGGish(batch_norm=True).train()
    before = snapshot(model)
    with pytest.raises(ValueError, match="eval"), MergeBatchNorm().apply(model):
        pass
    relevance = LRP(model, canonizers=[MergeBatchNorm()])(images, target=0)  # eval mode inside the call
    assert_restored(model, before)
    assert model.training and all(m.training for m in model.modules())
    expected = LRP(model.eval(), canonizers=[MergeBatchNorm()])(images, target=0)
    torch.testing.assert_close(relevance, expected)


# --- Relevance-CAM --------------------------------------------------------------------------------


def test_relevance_cam_shape(vgg, images):
    cam = RelevanceCAM(vgg, "features.5")(images, target=1)
    assert cam.shape == (4, 1, 16, 16) and cam.dtype == torch.float32
    assert torch.isfinite(cam).all() and (cam >= 0).all()
    assert get("relevancecam") is RelevanceCAM and get("relevance-cam") is RelevanceCAM


def test_relevance_cam_matches_direct_computation_on_a_gap_net(gapnet, images):
    target = 2
    cam = RelevanceCAM(gapnet, "features", upsample=False)(images, target=target)
    with torch.no_grad():
        activation = gapnet.features(images.clone())
        pooled = activation.mean(dim=(2, 3))
        logit = gapnet.fc(pooled)[:, target]
        # epsilon rule at the linear head, seeded with the logit ...
        r_pooled = pooled * gapnet.fc.weight[target] * (logit / stabilize(logit, 1e-6))[:, None]
        # ... then the Norm rule through global average pooling, summed over positions
        weights = pooled * r_pooled / stabilize(pooled, 1e-6)
        expected = torch.relu((weights[:, :, None, None] * activation).sum(dim=1, keepdim=True))
    torch.testing.assert_close(cam, expected, rtol=1e-5, atol=1e-7)


# --- options and errors ---------------------------------------------------------------------------


def test_registered_and_named_composites(vgg, images):
    assert get("lrp") is LRP
    by_name = LRP(vgg, "epsilon-plus-flat")(images, target=0)
    torch.testing.assert_close(by_name, LRP(vgg, EpsilonPlusFlat())(images, target=0), rtol=0, atol=0)


def test_autocast_bfloat16_runs_close_to_float32(gapnet, images):
    full = LRP(gapnet)(images, target=1)
    half = LRP(gapnet, autocast=torch.bfloat16)(images, target=1)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert torch.nn.functional.cosine_similarity(full.flatten(1), half.flatten(1)).min() > 0.99


def test_bad_inputs_name_the_argument(vgg, images):
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x:"):
        LRP(vgg)(bad, target=0)
    with pytest.raises(ValueError, match="target: class 7 out of range"):
        LRP(vgg)(images, target=7)
    with pytest.raises(ValueError, match="composite:"):
        LRP(vgg, "no-such-composite")
    with pytest.raises(TypeError, match="composite:"):
        LRP(vgg, composite=3)
    with pytest.raises(TypeError, match="canonizers:"):
        LRP(vgg, canonizers=["merge"])
    with pytest.raises(ValueError, match="alpha, beta"):
        AlphaBeta(1, 1)
    with pytest.raises(ValueError, match="epsilon"):
        Epsilon(-1.0)
    with pytest.raises(ValueError, match="gamma"):
        Gamma(-1.0)
    with pytest.raises(TypeError, match="type_map"):
        Composite({nn.Conv2d: "zplus"})
    with pytest.raises(ValueError, match=r"name_map: no module named 'features\.99'"):
        LRP(vgg, NameMap({"features.99": Flat()}))(images, target=0)
    with pytest.raises(TypeError, match=r"features\.1"):  # a weight rule on a ReLU
        LRP(vgg, NameMap({"features.1": ZPlus()}))(images, target=0)
    with pytest.raises(ValueError, match="low"):
        LRP(vgg, EpsilonGammaBox(torch.zeros(5), 1.0))(images, target=0)
    with pytest.raises(ValueError, match="layer"):
        RelevanceCAM(vgg, "features.50")
    with pytest.raises(ValueError, match="layer"):
        RelevanceCAM(vgg, "classifier.0")(images, target=0)
    assert_restored(vgg, snapshot(vgg))


def test_spectral_norm_layers_use_their_normalised_weight(images):
    """GAN discriminators often use spectral norm: the rules must see the weight the forward used."""
    torch.manual_seed(0)
    plain = Discriminator().eval()
    normed = Discriminator()
    normed.load_state_dict(plain.state_dict())
    normed.main[0] = nn.utils.spectral_norm(normed.main[0])
    normed.eval()
    with torch.no_grad():
        normed(images)  # eval mode: the stored power-iteration vectors give the weight
        plain.main[0].weight.copy_(normed.main[0].weight)
    ours = LRP(normed, EpsilonGammaBox(0.0, 1.0))(images)
    torch.testing.assert_close(ours, LRP(plain, EpsilonGammaBox(0.0, 1.0))(images), rtol=1e-5, atol=1e-7)


def test_batchnorm_is_merged_by_default():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    )
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.rand(2, 3, 8, 8)
    default = LRP(model)(x, target=1)
    explicit = LRP(model, canonizers=[MergeBatchNorm()])(x, target=1)
    unmerged = LRP(model, canonizers=[])(x, target=1)
    torch.testing.assert_close(default, explicit)
    assert not torch.allclose(default, unmerged)
