"""CAM family: paper properties (CAM = Grad-CAM on a GAP head, the CAM logit identity, Fake flips
Grad-CAM's weights), agreement with pytorch-grad-cam and Captum, Score-CAM edge cases, bad input."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from genxai.attribution.base import METHODS
from genxai.attribution.cam import CAM, GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM
from genxai.core.engine import forward_backward
from genxai.core.maps import minmax_normalize
from genxai.targets import ClassLogit, DiscriminatorScore, Fake

CLASSES = [1, 3, 0, 2]
PEER_PAIRS = [
    (GradCAM, "GradCAM"),
    (GradCAMPlusPlus, "GradCAMPlusPlus"),
    (LayerCAM, "LayerCAM"),
    (ScoreCAM, "ScoreCAM"),
]


def assert_maps_close(ours: torch.Tensor, theirs: torch.Tensor, rtol: float = 1e-4) -> None:
    """Equal up to ``rtol`` of the largest value (raw maps can be tiny)."""
    scale = float(theirs.abs().max())
    assert scale > 0, "the reference map is all zero: the comparison would prove nothing"
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=rtol * scale)


def no_inplace(model: nn.Module) -> nn.Module:
    """A copy with every in-place activation made out-of-place (same weights)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    return model


def grad_cam_layer_maps(method, model: nn.Module, layer: nn.Module, x: torch.Tensor, targets) -> torch.Tensor:
    """pytorch-grad-cam's un-normalised layer-resolution map ReLU(cam): (N, 1, h, w)."""
    cam = method(model=model, target_layers=[layer])
    try:
        cam(input_tensor=x, targets=targets)
        store = cam.activations_and_grads
        activations = store.activations[0].numpy()
        gradients = store.gradients[0].numpy() if store.gradients else None
        raw = cam.get_cam_image(x, layer, targets, activations, gradients, False)
    finally:
        cam.activations_and_grads.release()
    return torch.from_numpy(np.maximum(raw, 0)).float()[:, None]


def grad_cam_maps(method, model: nn.Module, layer: nn.Module, x: torch.Tensor, targets) -> torch.Tensor:
    """pytorch-grad-cam's public output: upsampled and min-max scaled, (N, 1, H, W)."""
    cam = method(model=model, target_layers=[layer])
    try:
        return torch.from_numpy(cam(input_tensor=x, targets=targets)).float()[:, None]
    finally:
        cam.activations_and_grads.release()


# --- paper properties -------------------------------------------------------------------------


def test_gradcam_equals_cam_on_gap_head(gapnet, images):
    """Grad-CAM's alpha on a GAP + linear head is w_c / (h w): Grad-CAM = ReLU(CAM) / (h w)."""
    target = torch.tensor(CLASSES)
    cam = CAM(gapnet, "features.3", fc="fc", upsample=False)(images, target)
    grad = GradCAM(gapnet, "features.3", upsample=False)(images, target)
    h, w = cam.shape[-2:]
    assert (cam < 0).any() and (cam > 0).any(), "CAM is signed, as in the paper"
    torch.testing.assert_close(grad * (h * w), cam.clamp_min(0), rtol=1e-4, atol=1e-6)
    full_cam = minmax_normalize(CAM(gapnet, "features.3")(images, target).clamp_min(0))
    full_grad = GradCAM(gapnet, "features.3", normalize=True)(images, target)
    torch.testing.assert_close(full_grad, full_cam, rtol=1e-4, atol=1e-5)


def test_cam_mean_plus_bias_is_the_logit(gapnet, images):
    logits = gapnet(images).detach()
    for c in range(logits.shape[1]):
        cam = CAM(gapnet, "features.3", fc=gapnet.fc, upsample=False)(images, c)
        torch.testing.assert_close(cam.mean(dim=(1, 2, 3)) + gapnet.fc.bias[c].detach(), logits[:, c])


def test_cam_default_target_is_predicted_class(gapnet, images):
    predicted = gapnet(images).argmax(dim=1)
    torch.testing.assert_close(
        CAM(gapnet, "features.3")(images), CAM(gapnet, "features.3")(images, predicted)
    )


def test_output_form(discriminator, images):
    for method in (GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM):
        maps = method(discriminator, "main.5")(images, DiscriminatorScore())
        assert maps.shape == (4, 1, 16, 16) and maps.dtype == torch.float32
        assert maps.device == images.device and torch.isfinite(maps).all() and (maps >= 0).all()
        small = method(discriminator, "main.5", upsample=False)(images, DiscriminatorScore())
        assert small.shape == (4, 1, 4, 4)
        norm = method(discriminator, "main.5", normalize=True)(images, DiscriminatorScore())
        assert norm.min() >= 0 and norm.max() <= 1


def test_registry_names():
    assert METHODS.get("cam") is CAM
    assert METHODS.get("Grad-CAM") is GradCAM
    for name in ("gradcam++", "gradcampp", "GradCAMPlusPlus"):
        assert METHODS.get(name) is GradCAMPlusPlus
    assert METHODS.get("layercam") is LayerCAM
    assert METHODS.get("score_cam") is ScoreCAM


# --- discriminators: single logit, in-place LeakyReLU -------------------------------------------


def test_fake_flips_gradcam_weights(discriminator, images):
    x = images * 2 - 1  # the GAN range [-1, 1]; main.2 is a conv before an in-place LeakyReLU
    real = GradCAM(discriminator, "main.2", upsample=False)(x, DiscriminatorScore())
    fake = GradCAM(discriminator, "main.2", upsample=False)(x, Fake())
    assert torch.isfinite(real).all() and torch.isfinite(fake).all()
    # The signed map S of the real logit: real = ReLU(S), fake = ReLU(-S).
    result = forward_backward(discriminator, x, DiscriminatorScore(), layers=["main.2"], input_grad=False)
    a, g = result.activations["main.2"], result.gradients["main.2"]
    signed = (g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1, keepdim=True)
    assert (signed > 0).any() and (signed < 0).any()
    torch.testing.assert_close(real - fake, signed)
    assert (real * fake == 0).all()
    fake_pass = forward_backward(discriminator, x, Fake(), layers=["main.2"], input_grad=False)
    torch.testing.assert_close(fake_pass.gradients["main.2"], -g)


@pytest.mark.peers
def test_discriminator_agrees_with_pytorch_grad_cam(discriminator, images):
    pgc = pytest.importorskip("pytorch_grad_cam")
    x = images * 2 - 1
    fake_target = [lambda o: -o[0]] * x.shape[0]
    layer = discriminator.main[3]  # nothing in-place follows it, so pytorch-grad-cam is reliable here
    theirs = grad_cam_layer_maps(pgc.GradCAM, discriminator, layer, x, fake_target)
    ours = GradCAM(discriminator, "main.3", upsample=False)(x, Fake())
    assert_maps_close(ours, theirs)
    theirs = grad_cam_maps(pgc.GradCAM, discriminator, layer, x, fake_target)
    ours = GradCAM(discriminator, "main.3", normalize=True)(x, Fake())
    assert_maps_close(ours, theirs)


@pytest.mark.peers
def test_layer_before_inplace_leaky_relu(discriminator, images):
    """main.4 is a conv followed by an in-place LeakyReLU: we match the out-of-place model."""
    pgc = pytest.importorskip("pytorch_grad_cam")
    reference = no_inplace(discriminator)
    x = images * 2 - 1
    targets = [lambda o: o[0]] * x.shape[0]
    for ours_cls, theirs_name in PEER_PAIRS:  # signed conv activations also test Grad-CAM++'s sum_ab A_ab
        theirs = grad_cam_layer_maps(getattr(pgc, theirs_name), reference, reference.main[4], x, targets)
        ours = ours_cls(discriminator, "main.4", upsample=False)(x, DiscriminatorScore())
        assert_maps_close(ours, theirs)


# --- agreement with the peers ------------------------------------------------------------------


@pytest.mark.peers
@pytest.mark.parametrize(("ours_cls", "theirs_name"), PEER_PAIRS)
def test_agrees_with_pytorch_grad_cam_on_classifier(gapnet, images, ours_cls, theirs_name):
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    theirs_cls = getattr(pgc, theirs_name)
    targets = [ClassifierOutputTarget(c) for c in CLASSES]
    theirs = grad_cam_layer_maps(theirs_cls, gapnet, gapnet.features[3], images, targets)
    ours = ours_cls(gapnet, "features.3", upsample=False)(images, torch.tensor(CLASSES))
    assert_maps_close(ours, theirs)


@pytest.mark.peers
@pytest.mark.parametrize(("ours_cls", "theirs_name"), PEER_PAIRS)
def test_agrees_with_pytorch_grad_cam_upsampled(discriminator, images, ours_cls, theirs_name):
    """A 4x4 layer upsampled to 16x16, after the same min-max scaling."""
    pgc = pytest.importorskip("pytorch_grad_cam")
    targets = [lambda o: o[0]] * images.shape[0]
    theirs = grad_cam_maps(getattr(pgc, theirs_name), discriminator, discriminator.main[5], images, targets)
    ours = ours_cls(discriminator, "main.5", normalize=True)(images, DiscriminatorScore())
    assert ours.shape == theirs.shape == (4, 1, 16, 16)
    assert_maps_close(ours, theirs)


@pytest.mark.peers
def test_gradcam_plus_plus_third_order_term(discriminator, images):
    """Large gradients make sum_ab A_ab g^3 matter; signed conv activations make its sign matter."""
    pgc = pytest.importorskip("pytorch_grad_cam")
    reference = no_inplace(discriminator)
    x = images * 2 - 1
    theirs = grad_cam_layer_maps(
        pgc.GradCAMPlusPlus, reference, reference.main[4], x, [lambda o: 1000 * o[0]] * x.shape[0]
    )
    ours = GradCAMPlusPlus(discriminator, "main.4", upsample=False)(x, lambda o: 1000 * o[:, 0])
    assert_maps_close(ours, theirs)
    # The closed form is not scale-invariant: with small gradients alpha -> 1/2 and the maps differ.
    small = GradCAMPlusPlus(discriminator, "main.4", upsample=False)(x, DiscriminatorScore())
    assert not torch.allclose(minmax_normalize(small), minmax_normalize(ours), atol=1e-3)


@pytest.mark.peers
def test_gradcam_agrees_with_captum(gapnet, images):
    captum_attr = pytest.importorskip("captum.attr")
    model = no_inplace(gapnet)
    theirs = captum_attr.LayerGradCam(model, model.features[2]).attribute(
        images, target=torch.tensor(CLASSES), relu_attributions=True
    )
    ours = GradCAM(gapnet, "features.2", upsample=False)(images, torch.tensor(CLASSES))
    assert_maps_close(ours, theirs.detach())


# --- Score-CAM specifics -----------------------------------------------------------------------


class FlatNet(nn.Module):
    """A classifier whose ``flat`` layer outputs the same constant everywhere."""

    def __init__(self):
        super().__init__()
        self.flat = nn.Conv2d(3, 4, 3, padding=1)
        nn.init.zeros_(self.flat.weight)
        nn.init.constant_(self.flat.bias, 0.5)
        self.head = nn.Sequential(nn.Conv2d(4, 3, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        # The shortcut keeps the masked inputs' scores meaningful although the masks are zero.
        return self.head(self.flat(x)) + x.mean(dim=(2, 3))


def test_scorecam_flat_activation_is_finite(images):
    torch.manual_seed(0)
    model = FlatNet().eval()
    maps = ScoreCAM(model, "flat")(images, 1)
    assert torch.isfinite(maps).all()
    # Every mask is zero, so every channel scores the same and gets weight 1/K: the map is 0.5.
    torch.testing.assert_close(maps, torch.full_like(maps, 0.5))
    assert (ScoreCAM(model, "flat", normalize=True)(images, 1) == 0).all()


def test_scorecam_batch_size_does_not_change_maps(gapnet, images):
    target = torch.tensor(CLASSES)
    one = ScoreCAM(gapnet, "features.3", batch_size=1)(images, target)
    many = ScoreCAM(gapnet, "features.3", batch_size=64)(images, target)
    odd = ScoreCAM(gapnet, "features.3", batch_size=7)(images, target)
    torch.testing.assert_close(one, many, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(odd, many, rtol=1e-6, atol=1e-7)


def test_scorecam_batches_many_images_per_forward(gapnet, images):
    sizes = []
    handle = gapnet.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    try:
        ScoreCAM(gapnet, "features.3", batch_size=48)(images, 0)
    finally:
        handle.remove()
    # One clean forward, then 4 images x 16 channels = 64 masked rows in chunks of 48.
    assert sizes == [4, 48, 16]


def test_scorecam_predicted_class_is_fixed_on_clean_image(gapnet, images):
    predicted = gapnet(images).argmax(dim=1)
    torch.testing.assert_close(
        ScoreCAM(gapnet, "features.3")(images), ScoreCAM(gapnet, "features.3")(images, predicted)
    )


# --- bad input and model state -----------------------------------------------------------------

ALL = (CAM, GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM)


@pytest.mark.parametrize("method", ALL)
def test_unknown_layer_lists_close_names(gapnet, method):
    with pytest.raises(ValueError, match=r"layer: .*features\.3"):
        method(gapnet, "features.33")


@pytest.mark.parametrize("method", ALL)
def test_bad_target_and_input(gapnet, images, method):
    cam = method(gapnet, "features.3")
    with pytest.raises(ValueError, match="out of range"):
        cam(images, 7)
    with pytest.raises(ValueError, match="out of range"):
        cam(images, torch.tensor([0, 1, 2, 9]))
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x: contains 1 NaN"):
        cam(bad, 0)
    assert not any(m._forward_hooks for m in gapnet.modules())


@pytest.mark.parametrize("method", ALL)
def test_hooks_removed_after_failure_in_forward(gapnet, images, method):
    model = gapnet
    cam = method(model, "features.3")
    with pytest.raises(RuntimeError):
        cam(images[:, :2], 0)  # wrong channel count: the first conv fails
    with pytest.raises(ValueError):
        cam(images, 5)
    assert not model.features[3]._forward_hooks
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_cam_rejects_bad_fc_and_target(gapnet, images, discriminator):
    with pytest.raises(TypeError, match=r"fc: expected an nn\.Linear"):
        CAM(gapnet, "features.3", fc="pool")
    with pytest.raises(ValueError, match=r"fc: no module named 'fcc'.*fc"):
        CAM(gapnet, "features.3", fc="fcc")
    with pytest.raises(ValueError, match=r"fc: .*in_features=16.*8 channels"):
        CAM(gapnet, "features.1")(images, 0)
    with pytest.raises(TypeError, match="target: CAM explains a class"):
        CAM(discriminator, "main.5", fc="head.2")(images, Fake())
    assert not any(m._forward_hooks for m in gapnet.modules())


def test_scorecam_rejects_bad_batch_size(gapnet):
    with pytest.raises(ValueError, match="batch_size"):
        ScoreCAM(gapnet, "features.3", batch_size=0)


def test_non_spatial_layer_is_rejected(gapnet, images):
    with pytest.raises(ValueError, match=r"layer: 'fc' gives activations of shape \(4, 5\)"):
        GradCAM(gapnet, "fc")(images, 0)


@pytest.mark.parametrize("method", ALL)
def test_no_grad_and_frozen_model(gapnet, images, method):
    target = ClassLogit(torch.tensor(CLASSES))
    expected = method(gapnet, "features.3")(images, target)
    with torch.no_grad():
        torch.testing.assert_close(method(gapnet, "features.3")(images, target), expected)
    frozen = copy.deepcopy(gapnet).requires_grad_(False)
    torch.testing.assert_close(method(frozen, "features.3")(images, target), expected)
    assert all(p.grad is None for p in gapnet.parameters())
    assert all(not p.requires_grad for p in frozen.parameters())


@pytest.mark.parametrize("method", ALL)
def test_bfloat16_autocast_gives_float32_close_maps(gapnet, images, method):
    fast = method(gapnet, "features.3", autocast=torch.bfloat16, normalize=True)(images, 1)
    exact = method(gapnet, "features.3", normalize=True)(images, 1)
    assert fast.dtype == torch.float32
    assert (fast - exact).abs().max() < 0.1
