"""GAN Dissection's artifact units (FID of each unit's top samples) on the planted artifact generator
with independent units: the unit that paints white patches has the worst FID against patch-free images."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genxai.dissection.artifact_units import artifact_units, unit_fids
from genxai.dissection.artifacts import fid_before_after
from genxai.dissection.interventions import ablate
from genxai.evaluation.fid import FID, FeatureExtractor
from tests.dissection.test_artifacts import white


class WhiteFraction(FeatureExtractor):
    """Two features: the white fraction of the image and of its 4 x 4 average-pooled version."""

    num_features = 2

    def forward(self, images):
        pooled = F.avg_pool2d(images, 4)
        return torch.stack([white(images).float().mean((1, 2)), white(pooled).float().mean((1, 2))], 1)


UNITS, PLANTED = 6, 2


class Independent(nn.Module):
    """latents (N, 6 * 16) -> ``units`` (N, 6, 4, 4) = ReLU(z - bias), one independent block of
    latents per unit -> 1x1 colour mix -> x4 nearest -> tanh. Unit 2 fires rarely (bias 2.5, about
    one image in ten) and paints white (+6 on every channel); the others paint dim colours."""

    value_range = (-1.0, 1.0)

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.units = nn.ReLU()
        self.rgb = nn.Conv2d(UNITS, 3, 1, bias=False)
        with torch.no_grad():
            w = (torch.rand(3, UNITS, generator=g) - 0.5) * 0.5
            w[:, PLANTED] = 6.0
            self.rgb.weight.copy_(w[:, :, None, None])
        self.register_buffer("bias", torch.tensor([2.5 if u == PLANTED else 0.0 for u in range(UNITS)]))

    def latents(self, n, *, generator=None):
        return torch.randn(n, UNITS * 16, generator=generator)

    def forward(self, z):
        maps = self.units(z.view(-1, UNITS, 4, 4) - self.bias.view(1, -1, 1, 1))
        return torch.tanh(F.interpolate(self.rgb(maps), scale_factor=4))


@pytest.fixture
def gen():
    return Independent().eval()


@pytest.fixture
def reference(gen):
    z = gen.latents(512, generator=torch.Generator().manual_seed(7))
    fid = FID(WhiteFraction())
    with torch.no_grad(), ablate(gen, "units", [PLANTED]):  # real: the same images without patches
        fid.update((gen(z) + 1) / 2, real=True)
    return fid


def test_the_patch_units_have_the_worst_fid(gen, reference):
    result = unit_fids(gen, "units", reference, num_samples=256, top=16, batch_size=64)
    assert result.fids.shape == (UNITS,) and result.ranking()[0] == PLANTED
    others = torch.cat([result.fids[:PLANTED], result.fids[PLANTED + 1 :]])
    assert result.fids[PLANTED] > 2 * others.max()
    again = unit_fids(gen, "units", reference, num_samples=256, top=16, batch_size=17)
    torch.testing.assert_close(again.fids, result.fids, rtol=1e-4, atol=1e-4)  # batch size does not matter
    units, scores = artifact_units(gen, ["units"], reference, units_per_layer=1, num_samples=256, top=16)
    assert units == {"units": [PLANTED]} and len(scores) == 1
    result = fid_before_after(gen, units, reference, num_samples=256)
    name = WhiteFraction.fid_name
    assert result["after"][name] < 0.2 * result["before"][name]
    assert all(not m._forward_hooks for m in gen.modules())


def test_bad_input(gen, reference):
    with pytest.raises(ValueError, match="top: 64 top samples per unit need num_samples >= 64"):
        unit_fids(gen, "units", reference, num_samples=32, top=64)
    with pytest.raises(ValueError, match="Closest names: units"):
        unit_fids(gen, "unit", reference, num_samples=32, top=8)
    with pytest.raises(ValueError, match="reference"):
        unit_fids(gen, "units", None, num_samples=32, top=8)
    with pytest.raises(ValueError, match=f"more than the {UNITS} units"):
        artifact_units(gen, "units", reference, units_per_layer=7, num_samples=32, top=8)
