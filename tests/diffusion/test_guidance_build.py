"""guidance.saliency builds its method by name with genxai.attribution.build: strict options, maps only."""

from __future__ import annotations

import pytest
import torch

from genxai.diffusion import Discriminator
from genxai.diffusion.guidance import saliency


@pytest.fixture
def d():
    torch.manual_seed(0)
    return Discriminator(8, in_channels=1, base_channels=4, time_aware=True).eval()


@pytest.fixture
def batch():
    torch.manual_seed(1)
    return torch.rand(2, 1, 8, 8) * 2 - 1, torch.tensor([3, 700])


def test_class_model_visualisation_is_refused(d, batch):
    x, t = batch
    with pytest.raises(
        ValueError,
        match=r"method: 'classmodel' \(ClassModelVisualization\) makes an image.*not a saliency map",
    ):
        saliency(d, x, t, "classmodel")


def test_misspelt_option_is_an_error(d, batch):
    x, t = batch
    with pytest.raises(ValueError, match=r"method 'smoothgrad' .*'sampels'.*Did you mean 'samples'"):
        saliency(d, x, t, "smoothgrad", sampels=4)


def test_layer_defaults_to_cam_layer_and_is_ignored_by_other_methods(d, batch):
    x, t = batch
    default = saliency(d, x, t, "gradcam")
    torch.testing.assert_close(default, saliency(d, x, t, "gradcam", layer=d.cam_layer), rtol=0, atol=0)
    assert not torch.equal(default, saliency(d, x, t, "gradcam", layer="blocks.0"))
    # the trainer passes its configured layer whatever the method: the gradient ignores it
    torch.testing.assert_close(saliency(d, x, t, "saliency", layer=d.cam_layer), saliency(d, x, t))
