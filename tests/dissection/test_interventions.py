"""Interventions: exact edits, clean errors, and causal effects on a planted generator."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from genxai.core.hooks import Trace
from genxai.dissection.interventions import (
    ablate,
    average_causal_effect,
    insert,
    optimize_alpha,
    rank_units_by_ace,
    unit_means,
)

UNITS, PLANTED = 6, 2


class Planted(nn.Module):
    """latent (N, 4) -> fc -> "features" (N, 6, 4, 4) after ReLU -> 1x1 "to_rgb" -> image (N, 3, 4, 4).

    Image channel 0 ("red") is 4 x unit 2 plus faint traces of the other units, so unit 2 alone
    draws red; the other units only paint channels 1 and 2 (noise for the red concept)."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc = nn.Linear(4, UNITS * 16)
        self.unflatten = nn.Unflatten(1, (UNITS, 4, 4))
        self.features = nn.ReLU()
        self.to_rgb = nn.Conv2d(UNITS, 3, 1)
        self.fail = fail
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(UNITS * 16, 4, generator=g))
            self.fc.bias.zero_()
            weight = torch.zeros(3, UNITS)
            weight[0] = 0.02 * torch.randn(UNITS, generator=g)
            weight[0, PLANTED] = 4.0
            weight[1:] = torch.rand(2, UNITS, generator=g)
            weight[1:, PLANTED] = 0.0
            self.to_rgb.weight.copy_(weight.view(3, UNITS, 1, 1))
            self.to_rgb.bias.copy_(torch.tensor([-0.1, 0.0, 0.0]))

    def forward(self, z):
        h = self.features(self.unflatten(self.fc(z)))
        if self.fail:
            raise RuntimeError("failure after the layer")
        return self.to_rgb(h)


class ColorSegmenter:
    """Segments 'red' and 'green' where that image channel exceeds 0.5; the soft version is a
    sigmoid per concept (multi-label), so green never competes with red."""

    concepts = ("red", "green")

    def concept_masks(self, images):
        return images[:, :2] > 0.5

    def concept_probabilities(self, images):
        return torch.sigmoid(8 * (images[:, :2] - 0.5))


def red_fraction(images):
    return (images[:, 0] > 0.5).float().flatten(1).mean(1)


@pytest.fixture
def gen():
    return Planted().eval()


@pytest.fixture
def z():
    return torch.randn(32, 4, generator=torch.Generator().manual_seed(1))


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


def _features(model, z, context=None):
    with Trace(model, "fc") as fc, Trace(model, "features") as feats, torch.no_grad():
        out = model(z)
    return fc.output, feats.output, out


def test_ablate_zeroes_exactly_those_channels(gen, z):
    fc0, ref, out0 = _features(gen, z)
    with ablate(gen, "features", [1, 4]):
        fc1, edited, _ = _features(gen, z)
    assert torch.equal(fc1, fc0)  # the layer before is untouched
    assert torch.all(edited[:, [1, 4]] == 0)
    keep = [0, 2, 3, 5]
    assert torch.equal(edited[:, keep], ref[:, keep])
    assert _no_hooks(gen)
    assert torch.equal(gen(z), out0)  # nothing left behind


def test_units_as_bool_mask_and_list_agree(gen, z):
    mask = torch.tensor([False, True, False, False, True, False])
    with ablate(gen, "features", mask):
        a = gen(z)
    with ablate(gen, "features", [4, 1]):
        b = gen(z)
    assert torch.equal(a, b)


def test_insert_sets_units_to_k_per_unit(gen, z):
    _, ref, _ = _features(gen, z)
    with insert(gen, "features", [3, 0], torch.tensor([1.5, -2.0])):
        _, edited, _ = _features(gen, z)
    assert torch.all(edited[:, 3] == 1.5) and torch.all(edited[:, 0] == -2.0)
    assert torch.equal(edited[:, [1, 2, 4, 5]], ref[:, [1, 2, 4, 5]])
    per_channel = torch.arange(UNITS, dtype=torch.float32)  # one k per channel of the layer
    with insert(gen, "features", [5], per_channel):
        _, edited, _ = _features(gen, z)
    assert torch.all(edited[:, 5] == 5.0)


def test_insert_only_inside_location(gen, z):
    _, ref, _ = _features(gen, z)
    with insert(gen, "features", [2], 7.0, location=(1, 0, 3, 2)):
        _, edited, _ = _features(gen, z)
    box = torch.zeros(4, 4, dtype=torch.bool)
    box[1:3, 0:2] = True
    assert torch.all(edited[:, 2][:, box] == 7.0)
    assert torch.equal(edited[:, 2][:, ~box], ref[:, 2][:, ~box])
    assert torch.equal(edited[:, [0, 1, 3, 4, 5]], ref[:, [0, 1, 3, 4, 5]])
    with ablate(gen, "features", [2], location=box):  # the same place as a bool mask
        _, masked, _ = _features(gen, z)
    assert torch.all(masked[:, 2][:, box] == 0)
    assert torch.equal(masked[:, 2][:, ~box], ref[:, 2][:, ~box])


def test_out_of_range_units_declared_width_fail_before_forward(gen):
    with pytest.raises(
        ValueError, match=r"units: \[6\] out of range for 'to_rgb' with 3 channels \(valid: 0\.\.2\)"
    ):
        ablate(gen, "to_rgb", [0, 6])
    assert _no_hooks(gen)


def test_out_of_range_units_checked_at_first_forward_and_hook_removed(gen, z):
    # a ReLU does not declare its width: the check runs on the first output, before any edit
    with pytest.raises(ValueError, match=r"valid: 0\.\.5"), ablate(gen, "features", [9]):
        gen(z)
    assert _no_hooks(gen)


def test_unknown_layer_and_bad_arguments(gen, z):
    with pytest.raises(ValueError, match=r"layer: no module named 'feature'.*features"):
        ablate(gen, "feature", [0])
    with pytest.raises(ValueError, match="units: indices must be >= 0"):
        ablate(gen, "fc", [-1])
    with pytest.raises(ValueError, match="units: expected at least one unit"):
        ablate(gen, "fc", [])
    with pytest.raises(ValueError, match=r"units: a bool mask over 'to_rgb' needs 3 entries"):
        ablate(gen, "to_rgb", [True, False])
    with pytest.raises(ValueError, match=r"value: expected a number or a 1-D tensor with one per unit \(2\)"):
        insert(gen, "to_rgb", [0, 1], torch.ones(5))
    with (
        pytest.raises(ValueError, match=r"location: expected a \(4, 4\) mask"),
        ablate(gen, "features", [0], location=torch.ones(8, 8, dtype=torch.bool)),
    ):
        gen(z)
    with (
        pytest.raises(ValueError, match="location: box"),
        ablate(gen, "features", [0], location=(0, 0, 5, 2)),
    ):
        gen(z)
    assert _no_hooks(gen)


def test_causal_effect_checks_arguments_before_generating(gen, z):
    calls = []

    def measure(images):
        calls.append(images.shape[0])
        return red_fraction(images)

    with pytest.raises(ValueError, match=r"location: expected a \(4, 4\) mask"):
        average_causal_effect(gen, "features", [2], measure, z, location=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"valid: 0\.\.5"):
        rank_units_by_ace(gen, "features", measure, z, units=[0, 6])
    with pytest.raises(ValueError, match="concept: a segmenter needs the name of the concept"):
        average_causal_effect(gen, "features", [2], ColorSegmenter(), z)
    assert calls == [] and _no_hooks(gen)


def test_hooks_removed_after_error_mid_forward(z):
    gen = Planted(fail=True)
    with pytest.raises(RuntimeError, match="failure after the layer"), insert(gen, "features", [1], 3.0):
        gen(z)
    assert _no_hooks(gen)
    with pytest.raises(RuntimeError):
        average_causal_effect(gen, "features", [1], red_fraction, z)
    assert _no_hooks(gen)


def test_ace_exact_on_identity_generator():
    # image = latent: ablating channel 1 removes exactly its mean from a "channel 1 mean" concept
    gen = nn.Sequential(nn.Identity())
    x = torch.rand(10, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    ace = average_causal_effect(gen, "0", [1], lambda im: im[:, 1].flatten(1).mean(1), x, batch_size=3)
    assert ace == pytest.approx(-float(x[:, 1].mean()), abs=1e-6)
    ace = average_causal_effect(gen, "0", [1], lambda im: im[:, 1].flatten(1).mean(1), x, value=2.0)
    assert ace == pytest.approx(2.0 - float(x[:, 1].mean()), abs=1e-6)


def test_ablation_ace_ranks_planted_unit_first(gen, z):
    ranking = rank_units_by_ace(gen, "features", ColorSegmenter(), z, concept="red", batch_size=40)
    assert ranking.ablation and int(ranking.units[0]) == PLANTED
    assert ranking.effects[0] < -0.1  # ablating it removes much of the red
    assert torch.all(ranking.effects[1:].abs() < 0.02)  # the others barely touch red
    alone = average_causal_effect(gen, "features", [PLANTED], red_fraction, z)
    assert alone == pytest.approx(float(ranking.effects[0]), abs=1e-6)


def test_insertion_with_unit_means_ranks_planted_unit_first(gen, z):
    k = unit_means(gen, "features", z, ColorSegmenter(), concept="red")
    assert k.shape == (UNITS,) and float(k[PLANTED]) > 0
    ranking = rank_units_by_ace(gen, "features", red_fraction, z, value=k)
    assert not ranking.ablation and int(ranking.units[0]) == PLANTED and ranking.effects[0] > 0.1
    with insert(gen, "features", [PLANTED], k):  # the per-channel k picks unit 2's mean
        _, edited, _ = _features(gen, z)
    assert torch.allclose(edited[:, PLANTED], k[PLANTED].expand_as(edited[:, PLANTED]))


def test_unit_means_is_the_concept_conditional_mean():
    gen = nn.Sequential(nn.Identity())
    x = torch.rand(4, 2, 2, 2, generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(4, 2, 2, dtype=torch.bool)
    mask[0, 0, 1] = mask[2, 1, 1] = True
    k = unit_means(gen, "0", x, lambda im: mask[: im.shape[0]], batch_size=4)
    assert torch.allclose(k, (x[0, :, 0, 1] + x[2, :, 1, 1]) / 2)
    # image at twice the layer's size: a mask over one 2x2 block and half of another weighs by area
    up = nn.Sequential(nn.Identity(), nn.Upsample(scale_factor=2))
    big = torch.zeros(1, 4, 4, dtype=torch.bool)
    big[0, :2, :2] = True
    big[0, 2:, 2] = True
    k = unit_means(up, "0", x[:1], lambda im: big)
    assert torch.allclose(k, (x[0, :, 0, 0] + 0.5 * x[0, :, 1, 1]) / 1.5)
    with pytest.raises(ValueError, match="never present"):
        unit_means(gen, "0", x, lambda im: torch.zeros(im.shape[0], 2, 2, dtype=torch.bool))


def test_unknown_concept_and_hard_segmenter_for_optimisation(gen, z):
    with pytest.raises(ValueError, match=r"concept: 'rde' is not one of .* Closest: red"):
        rank_units_by_ace(gen, "features", ColorSegmenter(), z, concept="rde")

    class HardOnly:
        concepts = ("red",)

        def concept_masks(self, images):
            return images[:, :1] > 0.5

    with pytest.raises(ValueError, match="differentiable measure"):
        optimize_alpha(gen, "features", HardOnly(), z, k=0.0, steps=1, concept="red")


def test_optimize_alpha_ablation_puts_largest_alpha_on_planted_unit(gen, z):
    result = optimize_alpha(gen, "features", ColorSegmenter(), z, k=0.0, steps=120, concept="red", top=3)
    assert result.alpha.shape == (UNITS,) and int(result.units[0]) == PLANTED
    assert float(result.alpha[PLANTED]) > 0.9
    others = torch.cat([result.alpha[:PLANTED], result.alpha[PLANTED + 1 :]])
    assert float(others.max()) < 0.1
    assert result.units.shape == (3,) and result.losses.shape == (120,)
    assert all(p.grad is None for p in gen.parameters())


def test_optimize_alpha_insertion_puts_largest_alpha_on_planted_unit(gen, z):
    seg = ColorSegmenter()
    k = unit_means(gen, "features", z, seg, concept="red")
    result = optimize_alpha(gen, "features", seg, z, k=k, steps=120, concept="red", batch_size=16)
    assert int(result.alpha.argmax()) == PLANTED and float(result.alpha[PLANTED]) > 0.1
    others = torch.cat([result.alpha[:PLANTED], result.alpha[PLANTED + 1 :]])
    assert float(others.max()) < 0.1 * float(result.alpha[PLANTED])
    assert bool(((result.alpha >= 0) & (result.alpha <= 1)).all())
    assert _no_hooks(gen)
