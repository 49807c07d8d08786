"""E-GBAS on planted piecewise-linear layers: the boundary set, the region's samples, clean errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from genxai.dissection.boundaries import sample_region, smallest_boundary_set

LATENT, UNITS, PLANTED = 6, 10, (1, 4, 7)


class PiecewiseLinear(nn.Module):
    """latent (N, 6) -> "fc" (10 pre-activations) -> ReLU -> image (N, 1, 2, 5) = the activations.

    Planted units 1, 4, 7 have orthonormal normals (latent axes 0, 1, 2) and bias 0.4, so z = 0 is
    0.4 inside each of their half-spaces; decoy unit 0 is nearly parallel to unit 1 (a boundary that
    cuts off almost the same samples); the other units have random normals and biases."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc = nn.Linear(LATENT, UNITS)
        self.act = nn.ReLU()
        with torch.no_grad():
            weight = torch.randn(UNITS, LATENT, generator=g)
            weight = weight / weight.norm(dim=1, keepdim=True)
            bias = (0.2 + 0.4 * torch.rand(UNITS, generator=g)) * torch.sign(torch.randn(UNITS, generator=g))
            for axis, unit in enumerate(PLANTED):
                weight[unit] = torch.nn.functional.one_hot(torch.tensor(axis), LATENT).float()
                bias[unit] = 0.4
            weight[0] = torch.tensor([1.0, 0.0, 0.0, 0.3, 0.0, 0.0]) / 1.0440306508910551
            bias[0] = 0.38
            self.fc.weight.copy_(weight)
            self.fc.bias.copy_(bias)

    def forward(self, z):
        return self.act(self.fc(z)).view(-1, 1, 2, 5)


def all_planted_on(images):
    """The semantics: 1 when every planted unit is active in the image, else 0."""
    return (images.flatten(1)[:, list(PLANTED)] > 0).all(1).long()


@pytest.fixture
def gen():
    return PiecewiseLinear().eval()


def _pre(gen, z):
    return gen.fc(z.flatten(1))


def test_recovers_planted_boundary_set(gen):
    z0 = torch.zeros(1, LATENT)
    found = smallest_boundary_set(gen, "fc", z0, all_planted_on, samples=2048, radius=1.5, purity=1.0)
    assert sorted(found.units.tolist()) == list(PLANTED)
    assert found.reached and found.purity == 1.0
    assert len(found.history) == 3 and found.history == sorted(found.history)  # no detour, purer each step
    assert found.initial_purity < 0.9  # without boundaries the neighbourhood does change semantics
    assert 0 < found.coverage < 1 and found.side.shape == (UNITS,)


def test_single_inactive_unit_is_the_whole_boundary_set(gen):
    # z0 is 0.3 outside unit 4's half-space: staying on that side alone keeps the label 0
    z0 = torch.zeros(1, LATENT)
    z0[0, 1] = -0.7
    assert int(all_planted_on(gen(z0))) == 0
    found = smallest_boundary_set(gen, "fc", z0, all_planted_on, samples=1024, radius=1.5, purity=1.0)
    assert found.units.tolist() == [4]


def test_pruning_drops_a_greedy_pick_the_final_set_does_not_need():
    # semantics: units 0 and 1 active; unit 2's diagonal boundary alone is the purest first pick,
    # but once 0 and 1 are in it is redundant and must be dropped
    fc = nn.Linear(2, 3)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7071, 0.7071]]))
        fc.bias.copy_(torch.tensor([0.4, 0.4, 0.2]))
    gen = nn.Sequential(fc)

    def both_on(images):
        return ((images[:, 0] > 0) & (images[:, 1] > 0)).long()

    found = smallest_boundary_set(gen, "0", torch.zeros(1, 2), both_on, samples=2048, radius=1.5, purity=1.0)
    assert len(found.history) == 3 and found.units.tolist() == [0, 1] and found.purity == 1.0


def test_region_samples_inside_outside_and_which_units_bound(gen):
    z0 = torch.zeros(1, LATENT)
    samples = sample_region(gen, "fc", z0, list(PLANTED), 256, radius=1.5, semantics=all_planted_on)
    planted = list(PLANTED)
    assert samples.inside.shape[0] > 200 and samples.outside.shape[0] > 50
    assert bool((_pre(gen, samples.inside)[:, planted] > 0).all())  # exactly inside every half-space
    pre_out = _pre(gen, samples.outside)[:, planted]
    assert torch.equal(samples.crossed, pre_out <= 0)
    assert bool(samples.crossed.any(1).all())
    assert pre_out.min() > -0.01  # bisection puts the outside points just past the boundary
    assert bool(samples.inside_kept.all()) and not bool(samples.outside_kept.any())
    assert torch.equal(samples.change_rate, torch.ones(3))  # crossing any planted boundary changes it


def test_non_bounding_unit_has_low_change_rate(gen):
    z0 = torch.zeros(1, LATENT)
    other = next(u for u in range(UNITS) if u not in PLANTED)
    samples = sample_region(gen, "fc", z0, [1, other], 256, radius=1.5, semantics=all_planted_on)
    rate = samples.change_rate
    assert float(rate[0]) == 1.0
    assert math.isnan(float(rate[1])) or float(rate[1]) < 1.0


def test_channel_and_neuron_granularity_on_a_conv_layer():
    # channel 0 = z, channel 1 = -z (1x1 conv); z0 = 0.5 everywhere on a 2x2 latent
    conv = nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        conv.bias.zero_()
    gen = nn.Sequential(conv)
    z0 = torch.full((1, 1, 2, 2), 0.5)
    channel = sample_region(gen, "0", z0, [0], 200, radius=2.0, seed=1)
    assert bool((channel.inside > 0).all())  # every position of channel 0 keeps its sign
    assert bool((channel.outside <= 0).flatten(1).any(1).all())
    neuron = sample_region(gen, "0", z0, [0], 200, radius=2.0, per="neuron", seed=1)
    assert bool((neuron.inside[:, 0, 0, 0] > 0).all())
    assert bool((neuron.inside.flatten(1)[:, 1:] <= 0).any())  # other positions are free
    with pytest.raises(
        ValueError, match=r"units: \[8\] out of range for '0' with 8 units \(per='neuron'; valid: 0\.\.7\)"
    ):
        sample_region(gen, "0", z0, [8], 10, per="neuron")


def test_bad_input_is_a_clear_error_and_no_hook_stays(gen):
    z0 = torch.zeros(1, LATENT)
    with pytest.raises(ValueError, match=r"z0: expected one latent with a batch dimension of 1"):
        smallest_boundary_set(gen, "fc", torch.zeros(LATENT), all_planted_on)
    with pytest.raises(ValueError, match=r"layer: no module named 'f'.*fc"):
        smallest_boundary_set(gen, "f", z0, all_planted_on)
    with pytest.raises(ValueError, match=r"units: \[10\] out of range for 'fc' with 10 units"):
        sample_region(gen, "fc", z0, [1, 10], 8)
    with pytest.raises(ValueError, match=r"purity: expected a number in \(0, 1\]"):
        smallest_boundary_set(gen, "fc", z0, all_planted_on, purity=1.5)
    with pytest.raises(ValueError, match="per: expected one of"):
        smallest_boundary_set(gen, "fc", z0, all_planted_on, per="unit")
    with pytest.raises(ValueError, match=r"semantics: expected one label per image"):
        smallest_boundary_set(gen, "fc", z0, lambda images: images.flatten(1), samples=8)

    def broken(images):
        raise RuntimeError("classifier failed")

    with pytest.raises(RuntimeError, match="classifier failed"):
        sample_region(gen, "fc", z0, [1], 8, semantics=broken)
    assert all(not m._forward_hooks for m in gen.modules())
