"""The premise check: a discriminator that reacts only to a planted artifact gets its saliency there."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genxai.diffusion.premise import artifact_localization, corrupt_squares

LAPLACE = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


class RoughnessD(nn.Module):
    """Calls an image fake by its high-frequency energy: only a noisy square moves its score."""

    def forward(self, x):
        kernel = LAPLACE.view(1, 1, 3, 3).repeat(x.shape[1], 1, 1, 1)
        lap = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=x.shape[1])
        return -lap.square().sum(dim=(1, 2, 3)).view(-1, 1)


class FixedWeightsD(nn.Module):
    """A linear score with fixed pixel weights: its saliency ignores where the artifact is."""

    def __init__(self, size=16):
        super().__init__()
        self.weights = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(5))

    def forward(self, x):
        return (x * self.weights).sum(dim=(1, 2, 3)).view(-1, 1)


def flat_images(n=16, size=16):
    colours = torch.rand(n, 3, 1, 1, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.6
    return colours.expand(n, 3, size, size).clone()


def test_a_discriminator_that_sees_the_artifact_points_at_it():
    result = artifact_localization(RoughnessD(), flat_images(), corruption="noise", patch=4)
    assert result["chance"] == pytest.approx(16 / 256)
    assert result["pointing"] == 1.0
    assert result["energy"] > 0.5 > 5 * result["chance"]
    assert result["fake_score_rise"] > 0  # the corruption made D call the images more fake


def test_a_discriminator_blind_to_the_artifact_scores_near_chance():
    result = artifact_localization(FixedWeightsD(), flat_images(64), corruption="noise", patch=4)
    assert result["energy"] == pytest.approx(result["chance"], abs=0.05)


def test_corruptions_stay_inside_their_squares():
    images = flat_images(4)
    for corruption in ("noise", "blur", "colour", "flat"):
        bad, masks = corrupt_squares(images, corruption=corruption, patch=5, seed=1)
        assert masks.sum(dim=(1, 2, 3)).eq(25).all()
        assert torch.equal(bad[~masks.expand_as(bad)], images[~masks.expand_as(images)])
    with pytest.raises(ValueError, match="corruption"):
        corrupt_squares(images, corruption="scratch")
    with pytest.raises(ValueError, match="patch"):
        corrupt_squares(images, patch=16)
