import itertools
import math

import pytest
import torch
from torch import nn

from genxai.attribution.base import METHODS
from genxai.attribution.surrogate import (
    LIME,
    KernelSHAP,
    relabel,
    slic_segments,
    superpixel_means,
    weighted_least_squares,
)


def blocks(n: int, size: int = 8, block: int = 4) -> torch.Tensor:
    """(n, size, size) labels of square blocks: (size / block)^2 superpixels."""
    side = size // block
    grid = torch.arange(side * side).view(side, side)
    return grid.repeat_interleave(block, 0).repeat_interleave(block, 1).expand(n, -1, -1).clone()


class Interactions(nn.Module):
    """A non-additive game on the four 4x4 blocks of an 8x8 image: products and a tanh."""

    def forward(self, x):
        r = x.sum(dim=1).unfold(1, 4, 4).unfold(2, 4, 4).sum(dim=(3, 4)).flatten(1) / 16
        first = r[:, 0] * r[:, 1] + torch.tanh(r[:, 2]) + 0.5 * r[:, 3] + r[:, 0] * r[:, 2] * r[:, 3]
        return torch.stack([first, r.sum(dim=1)], dim=1)


def linear_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3)).eval()


def linear_truth(model: nn.Module, x: torch.Tensor, seg: torch.Tensor, cls: int, base: float = 0.0):
    """The exact per-superpixel coefficients of a linear model: sum of w * (x - baseline) per segment."""
    contribution = (model[1].weight[cls].view(1, 3, 8, 8) * (x - base)).sum(dim=1).flatten(1)
    d = int(seg.max()) + 1
    return torch.zeros(x.shape[0], d).scatter_add_(1, seg.flatten(1), contribution)


def brute_force_shapley(model, x, seg, cls, base):
    """Shapley values from the definition, looping over all coalitions (for d <= 5)."""
    d = int(seg.max()) + 1
    values = {}
    for subset in itertools.product([0, 1], repeat=d):
        kept = torch.tensor(subset, dtype=torch.bool)[seg]
        with torch.no_grad():
            values[subset] = model(torch.where(kept, x, base)[None])[0, cls].item()
    phi = torch.zeros(d)
    for i in range(d):
        for subset, value in values.items():
            if subset[i]:
                continue
            k = sum(subset)
            weight = math.factorial(k) * math.factorial(d - k - 1) / math.factorial(d)
            with_i = (*subset[:i], 1, *subset[i + 1 :])
            phi[i] += weight * (values[with_i] - value)
    return phi


def test_registered():
    assert METHODS.get("lime") is LIME
    assert METHODS.get("kernel_shap") is KernelSHAP


def test_relabel_is_contiguous_per_image():
    seg = torch.tensor([[[5, 5], [9, 7]], [[-2, 0], [0, -2]]])
    labels, counts = relabel(seg)
    assert counts.tolist() == [3, 2]
    assert labels.tolist() == [[[0, 0], [2, 1]], [[0, 1], [1, 0]]]


def test_weighted_least_squares_matches_sklearn_per_image():
    sklearn = pytest.importorskip("sklearn.linear_model")
    torch.manual_seed(0)
    z = torch.randint(0, 2, (3, 40, 5)).float()
    y = torch.randn(3, 40)
    w = torch.rand(3, 40)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    coef, bias = weighted_least_squares(z, y, w, alpha=0.7, mask=mask)
    for i in range(3):
        d = int(mask[i].sum())
        ridge = sklearn.Ridge(alpha=0.7).fit(z[i, :, :d].numpy(), y[i].numpy(), sample_weight=w[i].numpy())
        assert torch.allclose(coef[i, :d], torch.tensor(ridge.coef_).float(), atol=1e-5)
        assert torch.allclose(bias[i], torch.tensor(ridge.intercept_).float(), atol=1e-5)
        assert (coef[i, d:] == 0).all()


def test_weighted_least_squares_constraint_and_singular_fallback():
    torch.manual_seed(0)
    z = torch.randint(0, 2, (2, 30, 4)).float()
    y = torch.randn(2, 30)
    total = torch.tensor([1.5, -2.0])
    coef, _ = weighted_least_squares(z, y, torch.ones(2, 30), intercept=False, total=total)
    assert torch.allclose(coef.sum(dim=1), total, atol=1e-6)
    # One distinct sample for four unknowns: singular, the minimum-norm solution is returned.
    coef, bias = weighted_least_squares(torch.ones(1, 3, 4), torch.full((1, 3), 2.0), torch.ones(1, 3))
    assert torch.isfinite(coef).all() and torch.allclose(coef.sum() + bias, torch.tensor(2.0), atol=1e-5)


def test_kernelshap_exact_equals_shapley_values():
    torch.manual_seed(0)
    model = Interactions().eval()
    x = torch.rand(2, 3, 8, 8)
    seg = blocks(2)
    seg[1][seg[1] == 3] = 2  # the second image has only three superpixels: padded and masked
    fit = KernelSHAP(model, exact=True, baseline=0.2).fit(x, target=0, segmentation=seg)
    assert fit.features.tolist() == [4, 3]
    for i in range(2):
        expected = brute_force_shapley(model, x[i], fit.segmentation[i], 0, torch.full_like(x[i], 0.2))
        d = int(fit.features[i])
        assert torch.allclose(fit.coefficients[i, :d], expected, atol=1e-4)
    with torch.no_grad():
        gap = model(x)[:, 0] - model(torch.full_like(x, 0.2))[:, 0]
    assert torch.allclose(fit.coefficients.sum(dim=1), gap, atol=1e-5)
    assert torch.allclose(fit.intercept, model(torch.full_like(x, 0.2))[:, 0], atol=1e-6)


def test_kernelshap_additive_model_exact_and_sampled():
    model = linear_model()
    torch.manual_seed(1)
    x = torch.rand(2, 3, 8, 8)
    seg = blocks(2, block=2) // 2  # 8 superpixels of 2x4 pixels
    truth = linear_truth(model, x, seg, cls=1)
    exact = KernelSHAP(model, exact=True, batch_size=600).fit(x, target=1, segmentation=seg)
    assert torch.allclose(exact.coefficients, truth, atol=1e-4)
    sampled = KernelSHAP(model, samples=40, seed=0).fit(x, target=1, segmentation=seg)
    assert torch.allclose(sampled.coefficients, truth, atol=1e-4)


def test_kernelshap_efficiency_on_a_network(gapnet):
    torch.manual_seed(0)
    x = torch.zeros(3, 3, 16, 16)
    x[:, 0, :8] = 1.0
    x[:, 1, :, 8:] = 0.7
    x[1, 2, 4:12, 4:12] = 0.9
    x += 0.05 * torch.rand_like(x)
    shap = KernelSHAP(gapnet, samples=40, segments=6, baseline="mean", batch_size=25)
    fit = shap.fit(x, target=torch.tensor([0, 1, 2]))
    assert (fit.features > 1).all()
    base = superpixel_means(x, fit.segmentation, int(fit.features.max()))
    with torch.no_grad():
        gap = (gapnet(x) - gapnet(base))[:, :3].diagonal()
    assert torch.allclose(fit.coefficients.sum(dim=1), gap, atol=1e-5)
    maps = shap(x, target=torch.tensor([0, 1, 2]))
    assert maps.shape == x.shape
    assert torch.allclose(maps, fit.maps(3))


def test_lime_recovers_linear_coefficients():
    model = linear_model(3)
    torch.manual_seed(4)
    x = torch.rand(3, 3, 8, 8)
    seg = blocks(3)
    seg[2] = blocks(1, block=2)[0] // 2  # 8 superpixels of 2x4 for the last image
    for baseline in (0.0, 0.3):
        fit = LIME(model, samples=64, alpha=0.0, baseline=baseline).fit(x, target=2, segmentation=seg)
        truth = linear_truth(model, x, seg, cls=2, base=baseline)
        assert torch.allclose(fit.coefficients, truth, atol=1e-4)


def test_lime_samples_and_kernel():
    model = linear_model()
    x = torch.rand(2, 3, 8, 8)
    fit = LIME(model, samples=30, kernel_width=0.5, seed=5).fit(x, target=0, segmentation=blocks(2))
    assert fit.samples.shape == (2, 30, 4)
    assert (fit.samples[:, 0] == 1).all() and fit.weights[:, 0].eq(1).all()
    kept = fit.samples.sum(dim=2)
    distance = 1 - torch.sqrt(kept / 4)
    assert torch.allclose(fit.weights, torch.exp(-(distance**2) / (2 * 0.5**2)))
    again = LIME(model, samples=30, kernel_width=0.5, seed=5).fit(x, target=0, segmentation=blocks(2))
    assert torch.equal(fit.coefficients, again.coefficients)


def test_slic_segments_follow_the_image():
    x = torch.zeros(2, 3, 16, 16)
    x[0, 0, :8] = 1.0
    x[0, 1, :, :8] = 1.0
    x[1, 2, 4:12, 4:12] = 1.0
    seg, counts = relabel(slic_segments(x, segments=4))
    assert counts.min() >= 2
    # No superpixel of image 0 straddles the colour edges.
    for label in range(int(counts[0])):
        colours = x[0][:, seg[0] == label]
        assert torch.allclose(colours, colours[:, :1].expand_as(colours))
    grey = slic_segments(x[:, :1], segments=4)
    assert grey.shape == (2, 16, 16)


@pytest.mark.peers
def test_lime_agrees_with_captum_on_same_coalitions(gapnet, images):
    captum = pytest.importorskip("captum.attr")
    models = pytest.importorskip("captum._utils.models.linear_model")
    seg = blocks(4, size=16)
    lime = LIME(gapnet, samples=40, kernel_width=0.5, alpha=1.0, seed=0)
    fit = lime.fit(images, target=3, segmentation=seg)
    ours = fit.maps(3)

    def similarity(original, perturbed, interpretable, **kwargs):
        distance = 1 - math.sqrt(interpretable.sum().item() / interpretable.shape[1])
        return math.exp(-(distance**2) / (2 * 0.5**2))

    for i in range(4):

        def coalitions(inputs, i=i, **kwargs):
            yield from fit.samples[i].long()[:, None]

        theirs = captum.Lime(
            gapnet,
            interpretable_model=models.SkLearnRidge(alpha=1.0),
            similarity_func=similarity,
            perturb_func=coalitions,
        ).attribute(
            images[i : i + 1],
            target=3,
            feature_mask=seg[i : i + 1, None],
            baselines=0.0,
            n_samples=40,
            perturbations_per_eval=40,
        )
        assert torch.allclose(ours[i : i + 1], theirs, atol=1e-4)


@pytest.mark.peers
@pytest.mark.filterwarnings("ignore:You are providing multiple inputs")
def test_kernelshap_agrees_with_captum_on_a_linear_model():
    captum = pytest.importorskip("captum.attr")
    model = linear_model(5)
    torch.manual_seed(6)
    x = torch.rand(2, 3, 8, 8)
    seg = blocks(2)
    ours = KernelSHAP(model, samples=40)(x, target=torch.tensor([0, 2]), segmentation=seg)
    torch.manual_seed(0)
    theirs = captum.KernelShap(model).attribute(
        x, target=torch.tensor([0, 2]), feature_mask=seg[:, None], baselines=0.0, n_samples=40
    )
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_bad_input(gapnet, images):
    with pytest.raises(ValueError, match="segments"):
        LIME(gapnet, segments=0)
    with pytest.raises(ValueError, match="segments"):
        slic_segments(images, segments=0)
    with pytest.raises(ValueError, match="segmentation: expected shape"):
        LIME(gapnet)(images, target=0, segmentation=torch.zeros(4, 8, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="segmentation"):
        LIME(gapnet)(images, target=0, segmentation=torch.zeros(4, 16, 16))
    with pytest.raises(ValueError, match="baseline"):
        LIME(gapnet, baseline="median")(images, target=0, segmentation=blocks(4, size=16))
    with pytest.raises(ValueError, match="exact"):
        KernelSHAP(gapnet, exact=True)(images, target=0, segmentation=blocks(4, size=16, block=2))
    with pytest.raises(ValueError, match="samples"):
        KernelSHAP(gapnet, samples=2)
    with pytest.raises(ValueError, match="target: class 9 out of range"):
        KernelSHAP(gapnet, samples=4)(images, target=9, segmentation=blocks(4, size=16))
    bad = images.clone()
    bad[1, 2, 3, 4] = float("inf")
    with pytest.raises(ValueError, match="x: contains 1 NaN"):
        LIME(gapnet).fit(bad, target=0)
