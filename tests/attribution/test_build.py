"""build(name, model, layer=None, **options): every method by name, strict options, maps required."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import genxai.attribution as attribution
from genxai.attribution import (
    RISE,
    ClassModelVisualization,
    GradCAM,
    LayerAttribution,
    accepted_options,
    build,
    check_options,
    get,
    names,
)


@pytest.mark.parametrize("name", names())
def test_every_method_builds_with_its_defaults_and_runs(gapnet, discriminator, images, name):
    method = build(name, gapnet)
    assert type(method) is get(name)
    if isinstance(method, LayerAttribution):
        assert method.layer_name == "features"  # the model's default layer: the block of the last conv
    x = images[:2]
    maps = method(x, target=1)
    channels = 1 if issubclass(get(name), LayerAttribution) or name == "rise" else 3
    assert maps.shape == (2, channels, 16, 16) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all()
    if name != "cam":  # CAM needs a linear head called fc; the discriminator has none
        d_maps = build(name, discriminator)(x)  # the default layer of a discriminator: main
        assert d_maps.shape[0] == 2 and torch.isfinite(d_maps).all()


def test_misspelt_option_names_the_method_the_option_and_the_closest(gapnet):
    with pytest.raises(ValueError, match=r"options: method 'rise' \(RISE\) has no option 'maskss'") as err:
        build("rise", gapnet, maskss=1000)
    assert "Did you mean 'masks'?" in str(err.value) and "Accepted: masks, cell, p" in str(err.value)
    with pytest.raises(ValueError, match=r"method 'gradcam\+\+' .*'upsampel'.*'upsample'"):
        build("Grad-CAM++", gapnet, upsampel=False)
    with pytest.raises(ValueError, match=r"method 'lrp'.*'canonizer'.*'canonizers'"):
        build("lrp", gapnet, canonizer=[])
    with pytest.raises(ValueError, match="'stride'"):  # an option of another method
        build("rise", gapnet, stride=2)


def test_options_include_those_passed_on_to_the_base_classes(gapnet):
    assert accepted_options("gradcam") == ("layer", "upsample", "normalize", "autocast")
    assert accepted_options("cam") == ("layer", "fc", "upsample", "normalize", "autocast")
    assert accepted_options(RISE)[-2:] == ("normalize", "autocast")
    assert set(accepted_options("lime")) >= {"kernel_width", "alpha", "samples", "segments", "seed"}
    method = build("gradcam", gapnet, "features.2", upsample=False, normalize=True)
    assert isinstance(method, GradCAM) and method.layer_name == "features.2" and not method.upsample
    assert method.normalize
    assert build("smoothgrad", gapnet, autocast=torch.bfloat16).autocast is torch.bfloat16


def test_layer_goes_to_layer_methods_only(gapnet, images):
    saliency = build("saliency", gapnet, layer="no.such.layer")  # ignored by a non-layer method
    assert not hasattr(saliency, "layer_name")
    with pytest.raises(ValueError, match=r"layer: no module named 'features\.9'"):
        build("gradcam", gapnet, "features.9")
    flat = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2))
    with pytest.raises(
        ValueError, match=r"layer: method 'gradcam' \(GradCAM\) explains a layer; .*no Conv2d"
    ):
        build("gradcam", flat)
    assert build("saliency", flat)(images, target=0).shape == images.shape


def test_image_methods_are_refused_where_a_map_is_required(gapnet):
    assert ClassModelVisualization.output == "image"
    assert isinstance(build("classmodel", gapnet), ClassModelVisualization)  # still a method
    with pytest.raises(ValueError, match=r"'classmodel' .*makes an image.*not a saliency map") as err:
        build("activation-maximization", gapnet, require_map=True)
    assert "gradcam" in str(err.value)  # lists the map methods
    assert isinstance(build("gradcam", gapnet, require_map=True), GradCAM)


def test_unknown_names_and_bad_options(gapnet):
    with pytest.raises(ValueError, match=r"unknown name 'gradcma'.*gradcam"):
        build("gradcma", gapnet)
    with pytest.raises(TypeError, match="model:"):
        build("gradcam", "resnet18")
    with pytest.raises(TypeError, match="method:"):
        build(3, gapnet)
    with pytest.raises(ValueError, match="options: expected a mapping"):
        check_options("rise", [("masks", 10)])
    check_options(RISE, {"masks": 10, "seed": None})
    assert attribution.build is build
