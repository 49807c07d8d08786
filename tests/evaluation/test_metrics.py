"""Faithfulness, localisation and sanity-check metrics: hand-computed examples, paper properties and
agreement with pytorch-grad-cam's confidence metrics and SciPy's Spearman correlation."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torchmetrics
from torch import nn

from genxai.attribution import Saliency
from genxai.core.targets import Sigmoid, probability_target
from genxai.evaluation import (
    AverageDrop,
    Deletion,
    IncreaseInConfidence,
    Insertion,
    LocalizationEnergy,
    PointingGame,
    WinPercent,
    average_drop,
    deletion,
    energy_pointing,
    increase_in_confidence,
    insertion,
    localization_energy,
    model_randomization,
    pointing_game,
    spearman,
    ssim,
    win_percent,
)
from genxai.targets import ClassLogit, ClassProbability, DiscriminatorScore, Fake, FunctionTarget, Select


class Additive(nn.Module):
    """logits[n, k] = sum over pixels of weight[k] * x[n]: every pixel's contribution is known."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x):
        return torch.einsum("nchw,kchw->nk", x, self.weight)


def two_class(weight_2x2) -> Additive:
    """Class 0 scores sum(w * x) on a (1, 2, 2) image; class 1 always scores 0."""
    weight = torch.tensor(weight_2x2, dtype=torch.float32).view(1, 1, 2, 2)
    return Additive(torch.cat([weight, torch.zeros_like(weight)])).eval()


# --- Average Drop, Increase in Confidence, Win% ------------------------------------------------


def test_average_drop_and_increase_by_hand_on_logits():
    model = two_class([[1.0, 2.0], [3.0, 4.0]])
    x = torch.ones(2, 1, 2, 2)
    # image 0: map scales to [[0, 1/3], [2/3, 1]] -> O = 2/3 + 2 + 4 = 20/3, Y = 10: drop 100/3 %
    # image 1: map keeps only the weight-4 pixel -> O = 4: drop 60 %
    maps = torch.tensor([[[0.0, 1.0], [2.0, 3.0]], [[5.0, 5.0], [5.0, 9.0]]])
    result = average_drop(model, x, maps, target=0, score="logit")
    assert torch.allclose(result.per_image, torch.tensor([100 / 3, 60.0]))
    assert result.mean == pytest.approx((100 / 3 + 60) / 2)
    increase = increase_in_confidence(model, x, maps, target=0, score="logit")
    assert increase.per_image.tolist() == [0.0, 0.0]


def test_average_drop_and_increase_by_hand_on_probabilities():
    model = two_class([[1.0, -2.0], [0.5, 0.5]])
    x = torch.ones(2, 1, 2, 2)
    maps = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]]])
    y = torch.sigmoid(torch.tensor(0.0))  # logits (0, 0) -> p = 0.5
    o = torch.sigmoid(torch.tensor([1.0, 1.0]))  # masked logits 1 and 0.5 + 0.5
    drop = average_drop(model, x, maps, target=0)  # the default: softmax probabilities
    assert torch.allclose(drop.per_image, torch.zeros(2))
    increase = increase_in_confidence(model, x, maps, target=0)
    assert increase.per_image.tolist() == [100.0, 100.0]
    # the other class loses what class 0 gains: p1 = 1 - p0
    drop1 = average_drop(model, x, maps, target=1)
    assert torch.allclose(drop1.per_image, 100 * ((1 - y) - (1 - o)) / (1 - y))


def test_single_logit_models_score_through_a_sigmoid():
    weight = torch.tensor([[2.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    model = Additive(weight).eval()  # (N, 1) logit
    x = torch.ones(1, 1, 2, 2)
    maps = torch.tensor([[[0.5, 1.0], [0.0, 0.0]]])
    y, o = torch.sigmoid(torch.tensor(2.0)), torch.sigmoid(torch.tensor(1.0))
    assert average_drop(model, x, maps).per_image.item() == pytest.approx(float(100 * (y - o) / y))
    # Fake scores 1 - sigmoid(logit): masking makes the image look faker, no drop
    assert average_drop(model, x, maps, target=Fake()).per_image.item() == pytest.approx(0.0)
    assert increase_in_confidence(model, x, maps, target=Fake()).mean == 100.0


def test_win_percent_by_hand_with_a_tie():
    model = two_class([[1.0, 2.0], [3.0, 4.0]])
    x = torch.ones(3, 1, 2, 2)
    maps_a = torch.tensor([[[0.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 0.0]]])
    maps_b = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 0.0]]])
    result = win_percent(model, x, maps_a, maps_b, target=0)
    assert result.per_image.tolist() == [100.0, 0.0, 50.0]
    assert result.percent_a == pytest.approx(50.0)
    assert result.percent_b == pytest.approx(50.0)


def test_confidence_metrics_agree_with_pytorch_grad_cam(gapnet, images):
    pytest.importorskip("cv2")
    from pytorch_grad_cam.metrics.cam_mult_image import DropInConfidence, IncreaseInConfidence
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    torch.manual_seed(0)
    maps = torch.rand(4, 16, 16)
    maps = (maps - maps.amin((1, 2), keepdim=True)) / (
        maps.amax((1, 2), keepdim=True) - maps.amin((1, 2), keepdim=True)
    )
    classes = [0, 3, 1, 4]
    targets = [ClassifierOutputSoftmaxTarget(c) for c in classes]
    peer_drop = DropInConfidence()(images, maps.numpy(), targets, gapnet)
    peer_increase = IncreaseInConfidence()(images, maps.numpy(), targets, gapnet)
    clean = torch.softmax(gapnet(images), dim=1)[torch.arange(4), classes].detach()
    ours = average_drop(gapnet, images, maps, target=torch.tensor(classes))
    assert np.allclose((ours.per_image * clean / 100).numpy(), peer_drop, atol=1e-6)
    ours_increase = increase_in_confidence(gapnet, images, maps, target=torch.tensor(classes))
    assert np.array_equal(ours_increase.per_image.numpy() / 100, peer_increase)


def test_streaming_equals_one_call_and_reset(gapnet, images):
    torch.manual_seed(0)
    maps = torch.rand(4, 1, 16, 16)
    metric = AverageDrop(gapnet, batch_size=3)
    metric.update(images[:1], maps[:1])
    metric.update(images[1:], maps[1:])
    streamed = metric.compute()
    whole = average_drop(gapnet, images, maps)
    assert torch.allclose(streamed.per_image, whole.per_image, atol=1e-6)
    metric.reset()
    with pytest.raises(RuntimeError, match="before any update"):
        metric.compute()


# --- Deletion and insertion ---------------------------------------------------------------------


def test_deletion_and_insertion_auc_by_hand():
    model = two_class([[4.0, 3.0], [2.0, 1.0]])
    x = torch.ones(1, 1, 2, 2)
    maps = torch.tensor([[[4.0, 3.0], [2.0, 1.0]]])
    deleted = deletion(model, x, maps, target=0, steps=4, score="logit")
    assert deleted.curves[0].tolist() == [10.0, 6.0, 3.0, 1.0, 0.0]
    assert deleted.per_image.item() == pytest.approx(0.25 * (8 + 4.5 + 2 + 0.5))  # 3.75
    assert deleted.fractions.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    inserted = insertion(model, x, maps, target=0, steps=4, baseline=0.0, score="logit")
    assert inserted.curves[0].tolist() == [0.0, 4.0, 7.0, 9.0, 10.0]
    assert inserted.per_image.item() == pytest.approx(0.25 * (2 + 5.5 + 8 + 9.5))  # 6.25


def test_ties_are_removed_in_row_major_order():
    model = two_class([[1.0, 2.0], [3.0, 4.0]])
    x = torch.ones(1, 1, 2, 2)
    result = deletion(model, x, torch.ones(1, 2, 2), target=0, steps=4, score="logit")
    assert result.curves[0].tolist() == [10.0, 9.0, 7.0, 4.0, 0.0]


def test_perfect_map_beats_random_map_on_an_additive_model():
    torch.manual_seed(0)
    weight = torch.randn(3, 3, 8, 8)
    model = Additive(weight).eval()
    x = torch.rand(5, 3, 8, 8)
    target = torch.tensor([0, 1, 2, 0, 1])
    perfect = (x * weight[target]).sum(dim=1, keepdim=True)  # each pixel's contribution to the logit
    noise = torch.rand(5, 1, 8, 8)
    for score in ("logit", "probability"):
        good = deletion(model, x, perfect, target, steps=16, score=score)
        bad = deletion(model, x, noise, target, steps=16, score=score)
        assert bool((good.per_image < bad.per_image).all())
        good_in = insertion(model, x, perfect, target, steps=16, baseline=0.0, score=score)
        bad_in = insertion(model, x, noise, target, steps=16, baseline=0.0, score=score)
        assert bool((good_in.per_image > bad_in.per_image).all())
    # on logits the greedy order is optimal: the perfect curve lies below the random one everywhere
    good = deletion(model, x, perfect, target, steps=16, score="logit")
    bad = deletion(model, x, noise, target, steps=16, score="logit")
    assert bool((good.curves <= bad.curves + 1e-4).all())


def test_chunk_size_does_not_change_results(gapnet, images):
    torch.manual_seed(0)
    maps = torch.rand(4, 1, 16, 16)
    results = [deletion(gapnet, images, maps, steps=6, batch_size=b) for b in (1, 5, 1000)]
    for other in results[1:]:
        assert torch.allclose(results[0].curves, other.curves, atol=1e-6)
        assert torch.allclose(results[0].per_image, other.per_image, atol=1e-6)
    drops = [average_drop(gapnet, images, maps, batch_size=b).per_image for b in (1, 3, 64)]
    assert all(torch.allclose(drops[0], d, atol=1e-5) for d in drops[1:])


def test_insertion_starts_from_a_blur_and_ends_at_the_image(gapnet, images):
    torch.manual_seed(0)
    maps = torch.rand(4, 1, 16, 16)
    result = insertion(gapnet, images, maps, steps=4)
    clean = torch.softmax(gapnet(images), dim=1).detach()
    predicted = clean.argmax(dim=1)
    assert torch.allclose(result.curves[:, -1], clean[torch.arange(4), predicted], atol=1e-6)
    streamed = Deletion(gapnet, steps=4)
    streamed.update(images, maps)
    assert streamed.compute().curves.shape == (4, 5)


# --- Bad input ----------------------------------------------------------------------------------


def test_clear_errors(gapnet, images):
    with pytest.raises(ValueError, match="maps: expected shape"):
        average_drop(gapnet, images, torch.rand(4, 1, 8, 8))
    with pytest.raises(ValueError, match="maps: expected shape"):
        deletion(gapnet, images, torch.rand(3, 1, 16, 16))
    nan_maps = torch.rand(4, 1, 16, 16)
    nan_maps[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="maps: contains 1 NaN"):
        deletion(gapnet, images, nan_maps)
    with pytest.raises(ValueError, match="maps_b"):
        win_percent(gapnet, images, torch.rand(4, 1, 16, 16), nan_maps)
    with pytest.raises(ValueError, match="score: expected one of"):
        average_drop(gapnet, images, torch.rand(4, 1, 16, 16), score="softmax")
    with pytest.raises(ValueError, match="score='logit'"):
        average_drop(gapnet, images, torch.rand(4, 1, 16, 16), target=lambda out: out[:, 0])
    with pytest.raises(ValueError, match="baseline"):
        deletion(gapnet, images, torch.rand(4, 1, 16, 16), baseline="zeros")
    with pytest.raises(ValueError, match="steps"):
        deletion(gapnet, images, torch.rand(4, 1, 16, 16), steps=0)
    model = two_class([[-1.0, 0.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match=r"images \[0\] is <= 0"):
        average_drop(model, torch.ones(1, 1, 2, 2), torch.ones(1, 2, 2), target=0, score="logit")


# --- Localisation -------------------------------------------------------------------------------


def test_pointing_game_by_hand_with_tolerance_and_ties():
    maps = torch.zeros(3, 5, 5)
    maps[0, 1, 1] = 1.0  # peak inside the mask
    maps[1, 4, 4] = 1.0  # peak 2 px right of and 2 px below the mask's corner (2, 2): sqrt(8) px away
    maps[2, 0, 3] = maps[2, 3, 0] = 1.0  # a tie: the first in row-major order, (0, 3), sqrt(18) px away
    masks = torch.zeros(3, 5, 5, dtype=torch.bool)
    masks[:, :3, :3] = True
    masks[2] = False
    masks[2, 3, 0] = True
    assert pointing_game(maps, masks).per_image.tolist() == [1.0, 0.0, 0.0]
    assert pointing_game(maps, masks, tolerance=2.8).per_image.tolist() == [1.0, 0.0, 0.0]
    assert pointing_game(maps, masks, tolerance=math.sqrt(8)).per_image.tolist() == [1.0, 1.0, 0.0]
    assert pointing_game(maps, masks, tolerance=4.25).per_image.tolist() == [1.0, 1.0, 1.0]
    metric = PointingGame()
    metric.update(maps[:2], masks[:2])
    metric.update(maps[2:], masks[2:].unsqueeze(1))
    assert metric.compute().mean == pytest.approx(1 / 3)


def test_localization_energy_by_hand():
    maps = torch.tensor([[[1.0, 0.0], [0.5, 0.0]], [[3.0, 3.0], [3.0, 3.0]]])
    masks = torch.tensor([[[1, 0], [0, 0]], [[1, 1], [0, 0]]])
    assert energy_pointing(maps, masks).per_image.tolist() == pytest.approx([2 / 3, 0.0])
    assert localization_energy(maps, masks, threshold=0.6).per_image.tolist() == pytest.approx([1.0, 0.0])
    shifted = localization_energy(maps[:1] + 7.0, masks[:1]).per_image  # min-max scaling removes offsets
    assert shifted.tolist() == pytest.approx([2 / 3])
    metric = LocalizationEnergy(threshold=0.6)
    metric.update(maps, masks)
    assert metric.compute().mean == pytest.approx(0.5)


def test_localization_errors():
    maps = torch.rand(2, 4, 4)
    with pytest.raises(ValueError, match=r"images \[1\] have an empty mask"):
        pointing_game(maps, torch.tensor([[[1]]]).expand(2, 4, 4) * torch.tensor([1, 0]).view(2, 1, 1))
    with pytest.raises(ValueError, match="masks: expected shape"):
        energy_pointing(maps, torch.ones(2, 5, 5))
    with pytest.raises(ValueError, match="reduce colour channels"):
        pointing_game(torch.rand(2, 3, 4, 4), torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match="maps: contains"):
        energy_pointing(torch.full((2, 4, 4), float("inf")), torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match="threshold"):
        localization_energy(maps, torch.ones(2, 4, 4), threshold=1.5)
    with pytest.raises(TypeError, match="masks"):
        pointing_game(maps, [[1]])


# --- Sanity check -------------------------------------------------------------------------------


def test_spearman_matches_scipy_including_ties():
    stats = pytest.importorskip("scipy.stats")
    torch.manual_seed(0)
    a = torch.randint(0, 5, (3, 1, 6, 6)).float()  # many ties
    b = a + torch.randint(0, 3, (3, 1, 6, 6)).float()
    ours = spearman(a, b)
    theirs = [stats.spearmanr(a[i].flatten().numpy(), b[i].flatten().numpy()).statistic for i in range(3)]
    assert np.allclose(ours.numpy(), theirs, atol=1e-6)
    assert torch.allclose(spearman(a, a), torch.ones(3))
    assert torch.allclose(ssim(a, a), torch.ones(3))


def test_model_randomization_decorrelates_saliency_and_leaves_the_model_alone(gapnet, images):
    before = {k: v.clone() for k, v in gapnet.state_dict().items()}
    rng = torch.random.get_rng_state()
    result = model_randomization(lambda m: Saliency(m), gapnet, images)
    assert result.layers == ["fc", "features.2", "features.0"]
    assert result.spearman.shape == (3, 4) and result.ssim.shape == (3, 4)
    table = result.table()
    assert [row["layer"] for row in table] == result.layers
    assert all(row["spearman_abs"] < 0.5 for row in table)
    for key, value in gapnet.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not any(m._forward_hooks or m._backward_hooks for m in gapnet.modules())
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_a_model_independent_method_fails_the_sanity_check(gapnet, images):
    # Adebayo et al.'s edge-detector example: a map that ignores the model keeps correlation 1.
    def make_method(model):
        return lambda x, target=None: x.abs().sum(dim=1, keepdim=True)

    result = model_randomization(make_method, gapnet, images, cascading=False, layers=["fc", "features"])
    assert torch.allclose(result.spearman, torch.ones(2, 4))
    assert torch.allclose(result.ssim, torch.ones(2, 4))
    seeded = model_randomization(lambda m: Saliency(m), gapnet, images, seed=3, keep_maps=True)
    again = model_randomization(lambda m: Saliency(m), gapnet, images, seed=3)
    assert torch.equal(seeded.spearman, again.spearman)
    assert seeded.maps.shape == (3, *images.shape)


def test_model_randomization_errors(gapnet, images):
    with pytest.raises(ValueError, match="layer: no module named"):
        model_randomization(lambda m: Saliency(m), gapnet, images, layers=["fcc"])
    with pytest.raises(TypeError, match="make_method"):
        model_randomization(None, gapnet, images)
    with pytest.raises(ValueError, match="x: expected shape"):
        model_randomization(lambda m: Saliency(m), gapnet, images[0])


# --- torchmetrics metrics ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "higher"),
    [
        (AverageDrop, False),
        (IncreaseInConfidence, True),
        (WinPercent, True),
        (Deletion, False),
        (Insertion, True),
        (PointingGame, True),
        (LocalizationEnergy, True),
    ],
)
def test_every_metric_is_a_torchmetrics_metric(cls, higher):
    assert issubclass(cls, torchmetrics.Metric)
    assert cls.higher_is_better is higher
    assert cls.full_state_update is False and cls.is_differentiable is False


def test_metric_states_concatenate_and_the_model_is_not_owned(gapnet, images):
    torch.manual_seed(0)
    maps = torch.rand(4, 1, 16, 16)
    whole = deletion(gapnet, images, maps, steps=4)
    first, second = Deletion(gapnet, steps=4), Deletion(gapnet, steps=4)
    first.update(images[:3], maps[:3])
    second.update(images[3:], maps[3:])
    # the "cat" reduction torchmetrics' sync applies across processes (merged states come first)
    second.merge_state(first)
    merged = second.compute()
    assert torch.allclose(merged.per_image, whole.per_image, atol=1e-6)
    assert torch.allclose(merged.curves, whole.curves, atol=1e-6) and merged.curves.shape == (4, 5)
    assert merged.mean == pytest.approx(whole.mean, abs=1e-6)
    # the explained model is referenced, not a submodule: no parameters in the metric's state
    assert list(first.children()) == [] and len(first.state_dict()) == 0
    first.train()
    assert not gapnet.training


def test_forward_gives_the_batch_value_and_accumulates(gapnet, images):
    torch.manual_seed(0)
    maps = torch.rand(4, 1, 16, 16)
    metric = AverageDrop(gapnet)
    batch = metric(images[:1], maps[:1])
    assert batch.per_image.shape == (1,)  # one image stays (1,), though torchmetrics squeezes results
    assert torch.allclose(batch.per_image, average_drop(gapnet, images[:1], maps[:1]).per_image)
    metric(images[1:], maps[1:])
    assert torch.allclose(metric.compute().per_image, average_drop(gapnet, images, maps).per_image, atol=1e-6)
    masks = torch.zeros(1, 16, 16, dtype=torch.bool)
    masks[0, :4, :4] = True
    assert pointing_game(maps[:1, 0], masks).per_image.shape == (1,)


def test_compute_before_update_is_an_error_without_warnings(gapnet):
    for metric in (Deletion(gapnet), WinPercent(gapnet), PointingGame(), LocalizationEnergy()):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(RuntimeError, match="before any update"):
                metric.compute()


def test_metric_constructor_errors(gapnet):
    with pytest.raises(TypeError, match=r"model: expected a torch\.nn\.Module"):
        AverageDrop("resnet")
    with pytest.raises(ValueError, match="batch_size"):
        Insertion(gapnet, batch_size=0)
    with pytest.raises(ValueError, match="tolerance"):
        PointingGame(tolerance=-1.0)
    with pytest.raises(ValueError, match="Unexpected keyword"):
        AverageDrop(gapnet, sync_on_computee=False)


# --- single-logit models (a discriminator) -----------------------------------------------------


def _sigmoid_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.sigmoid(model(x)[:, 0])


def _scaled(maps: torch.Tensor) -> torch.Tensor:
    low = maps.amin(dim=(1, 2, 3), keepdim=True)
    return (maps - low) / (maps.amax(dim=(1, 2, 3), keepdim=True) - low)


def _hand_curves(model, x, maps, steps, start, end):
    """Scores (sigmoid) with the ``count`` most salient pixels taken from ``end``, the rest from ``start``."""
    pixels = x.shape[-2] * x.shape[-1]
    order = torch.sort(maps.mean(dim=1).flatten(1), dim=1, descending=True, stable=True).indices
    points = []
    for k in range(steps + 1):
        changed = torch.zeros(x.shape[0], pixels, dtype=torch.bool)
        changed.scatter_(1, order[:, : round(k * pixels / steps)], True)
        points.append(_sigmoid_of(model, torch.where(changed.view(-1, 1, *x.shape[-2:]), end, start)))
    return torch.stack(points, dim=1)


@pytest.mark.parametrize(
    "target", [None, 0, torch.zeros(4, dtype=torch.long)], ids=["default", "int", "tensor"]
)
def test_every_score_metric_on_a_single_logit_discriminator_uses_the_sigmoid(discriminator, images, target):
    """A softmax over one logit is 1 for every image; each metric must score sigmoid(logit)."""
    from torchvision.transforms.functional import gaussian_blur

    torch.manual_seed(0)
    maps, other = torch.rand(4, 1, 16, 16), torch.rand(4, 1, 16, 16)
    y = _sigmoid_of(discriminator, images)
    o, o_other = (
        _sigmoid_of(discriminator, images * _scaled(maps)),
        _sigmoid_of(discriminator, images * _scaled(other)),
    )
    assert bool((y < 0.99).all()) and bool(((y - o).abs() > 1e-4).all())  # the data are not degenerate

    drop = average_drop(discriminator, images, maps, target)
    assert torch.allclose(drop.per_image, 100 * (y - o).clamp_min(0) / y, atol=1e-4)
    increase = increase_in_confidence(discriminator, images, maps, target)
    assert increase.per_image.tolist() == (100.0 * (y < o).float()).tolist()
    win = win_percent(discriminator, images, maps, other, target)
    assert win.per_image.tolist() == (100.0 * (o > o_other).float() + 50.0 * (o == o_other).float()).tolist()
    assert set(win.per_image.tolist()) != {50.0}

    fractions = torch.linspace(0, 1, 5)
    deleted = deletion(discriminator, images, maps, target, steps=4)
    hand = _hand_curves(discriminator, images, maps, 4, images, torch.zeros_like(images))
    assert torch.allclose(deleted.curves, hand, atol=1e-5)
    assert torch.allclose(deleted.per_image, torch.trapezoid(hand, fractions, dim=1), atol=1e-5)
    assert bool((deleted.curves.std(dim=1) > 1e-4).all())  # not the flat curves of ones
    inserted = insertion(discriminator, images, maps, target, steps=4)
    blurred = gaussian_blur(images, [11, 11], [5.0, 5.0])
    hand = _hand_curves(discriminator, images, maps, 4, blurred, images)
    assert torch.allclose(inserted.curves, hand, atol=1e-5)
    assert torch.allclose(inserted.per_image, torch.trapezoid(hand, fractions, dim=1), atol=1e-5)


def test_probability_targets_decide_the_single_logit_case():
    one = torch.tensor([[0.3], [-1.2]])
    two = torch.tensor([[0.3, 1.0], [-1.2, 0.0]])
    sigmoid = torch.sigmoid(one[:, 0])
    assert torch.allclose(ClassProbability(0)(one), sigmoid)
    assert torch.allclose(probability_target(ClassLogit(0))(one), sigmoid)
    assert torch.allclose(probability_target(ClassLogit(torch.tensor([0, 0])))(one), sigmoid)
    assert torch.allclose(probability_target(DiscriminatorScore())(one), sigmoid)
    assert torch.allclose(probability_target(Fake())(one), 1 - sigmoid)
    assert torch.allclose(probability_target(ClassLogit(1))(two), torch.softmax(two, dim=1)[:, 1])
    assert torch.allclose(probability_target(Select("d", ClassLogit(0)))({"d": one}), sigmoid)
    assert repr(probability_target(Fake())) == "Sigmoid(Fake())"
    assert torch.allclose(probability_target(Fake()).take(torch.tensor([1]))(one[1:]), 1 - sigmoid[1:])
    with pytest.raises(ValueError, match=r"class 1 out of range \[0, 1\)"):
        ClassProbability(1)(one)
    with pytest.raises(ValueError, match="score='logit'"):
        probability_target(FunctionTarget(lambda out: out[:, 0]))
    with pytest.raises(TypeError, match="inner: expected a Target"):
        Sigmoid(0)


@pytest.mark.parametrize("size", [(16, 16), (12, 9), (5, 5), (4, 7), (3, 3), (2, 2), (1, 4)])
def test_insertion_blur_is_torchvisions_11_by_11_sigma_5(size):
    """RISE's blur, now core.maps.gaussian_blur: torchvision's 11 x 11, sigma 5, reflect; smaller odd
    kernels on images under 11 px, none under 3 px (what the metric did before)."""
    from torchvision.transforms.functional import gaussian_blur

    from genxai.evaluation.faithfulness import _rise_blur

    torch.manual_seed(0)
    x = torch.rand(2, 3, *size)
    limit = min(size)
    kernel = min(11, limit if limit % 2 else limit - 1)
    expected = gaussian_blur(x, [kernel, kernel], [5.0, 5.0]) if kernel > 1 else x
    blurred = _rise_blur(x)
    assert blurred.shape == x.shape and torch.allclose(blurred, expected, atol=1e-6)
    assert blurred is not x
