import pytest
import torch
from torch import nn

from genxai.attribution.base import METHODS
from genxai.attribution.perturbation import RISE, Occlusion
from genxai.targets import UnitActivation


class RegionSum(nn.Module):
    """Logit 0: the sum of the top-left quarter's pixels; logit 1: the sum of the whole image."""

    def forward(self, x):
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        return torch.stack([x[..., :h, :w].sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3))], dim=1)


def test_registered():
    assert METHODS.get("occlusion") is Occlusion
    assert METHODS.get("RISE") is RISE


def test_one_pixel_occlusion_is_exact_pixel_deletion(gapnet):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 6, 6)
    target = torch.tensor([1, 4])
    maps = Occlusion(gapnet, window=1, stride=1, batch_size=10)(x, target=target)
    # Reference without loops: every image with each pixel (all channels) deleted, in one batch.
    eye = torch.eye(36).view(36, 1, 6, 6)
    deleted = (x[:, None] * (1 - eye)).reshape(-1, 3, 6, 6)
    with torch.no_grad():
        clean = gapnet(x).gather(1, target[:, None])
        scores = gapnet(deleted).view(2, 36, -1).gather(2, target.view(2, 1, 1).expand(2, 36, 1))[..., 0]
    expected = (clean - scores).view(2, 1, 6, 6).expand(-1, 3, -1, -1)
    assert maps.shape == x.shape
    assert torch.allclose(maps, expected, atol=1e-6)


def test_occlusion_uncovered_pixels_are_zero(gapnet, images):
    # 16 px, window 5, stride 5: windows start at 0, 5, 10; the last pixel row/column is never occluded.
    maps = Occlusion(gapnet, window=5, stride=5)(images, target=0)
    assert torch.isfinite(maps).all()
    assert (maps[..., 15, :] == 0).all() and (maps[..., :, 15] == 0).all()


@pytest.mark.peers
@pytest.mark.parametrize("baseline", [0.0, 0.5])
def test_occlusion_agrees_with_captum(gapnet, baseline):
    captum = pytest.importorskip("captum.attr")
    torch.manual_seed(2)
    x = torch.rand(3, 3, 9, 9)
    target = torch.tensor([0, 2, 4])
    ours = Occlusion(gapnet, window=(3, 3), stride=2, baseline=baseline, batch_size=7)(x, target=target)
    theirs = captum.Occlusion(gapnet).attribute(
        x, sliding_window_shapes=(3, 3, 3), strides=(3, 2, 2), baselines=baseline, target=target
    )
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_occlusion_batch_size_and_tensor_baseline(gapnet, images):
    baseline = images.mean(dim=(2, 3), keepdim=True)
    a = Occlusion(gapnet, window=6, stride=5, batch_size=5)(images, target=2, baseline=baseline)
    b = Occlusion(gapnet, window=6, stride=5, batch_size=500, baseline=baseline)(images, target=2)
    assert torch.allclose(a, b, atol=1e-6)


def test_rise_is_seeded_and_chunk_independent(gapnet, images):
    a = RISE(gapnet, masks=24, cell=4, batch_size=16, seed=3)(images, target=1)
    b = RISE(gapnet, masks=24, cell=4, batch_size=16, seed=3)(images, target=1)
    c = RISE(gapnet, masks=24, cell=4, batch_size=7, seed=3)(images, target=1)
    d = RISE(gapnet, masks=24, cell=4, batch_size=16, seed=4)(images, target=1)
    assert a.shape == (4, 1, 16, 16)
    assert torch.equal(a, b)
    assert torch.allclose(a, c, atol=1e-6)
    assert not torch.allclose(a, d)


def test_rise_masks_are_smooth_shifted_grids():
    rise = RISE(nn.Identity(), masks=400, cell=4, p=0.3, seed=0)
    grids, shifts = rise.grids(10, 10, torch.device("cpu"))
    masks = rise.upsample(grids, shifts, 10, 10)
    assert masks.shape == (400, 10, 10)
    assert masks.min() >= 0 and masks.max() <= 1 + 1e-6
    assert abs(masks.mean().item() - 0.3) < 0.03
    assert len(set(shifts[:, 0].tolist())) == 3  # cell size ceil(10 / 4) = 3 offsets
    assert ((masks > 0) & (masks < 1)).any()  # bilinear, not blocky


def test_rise_finds_the_region_the_score_depends_on():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 16, 16) + 0.5
    maps = RISE(RegionSum(), masks=300, cell=4, seed=0)(x, target=0)[:, 0]
    # Pixels far from the region only see the mean score E[f]; every pixel inside it scores higher.
    inside, outside = maps[:, 1:7, 1:7].amin(dim=(1, 2)), maps[:, 10:, 10:].amax(dim=(1, 2))
    assert (inside > outside).all()


def test_rise_bfloat16_autocast(gapnet, images):
    full = RISE(gapnet, masks=64, cell=4, seed=0)(images, target=1)
    half = RISE(gapnet, masks=64, cell=4, seed=0, autocast=torch.bfloat16)(images, target=1)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    correlation = torch.corrcoef(torch.stack([full.flatten(), half.flatten()]))[0, 1]
    assert correlation > 0.9


def test_rise_default_target_is_the_predicted_class(gapnet, images):
    with torch.no_grad():
        predicted = gapnet(images).argmax(dim=1)
    a = RISE(gapnet, masks=30, cell=4)(images)
    b = RISE(gapnet, masks=30, cell=4)(images, target=predicted)
    assert torch.equal(a, b)


def test_bad_input(gapnet, images):
    with pytest.raises(ValueError, match="window"):
        Occlusion(gapnet, window=20)(images, target=0)
    with pytest.raises(ValueError, match="window"):
        Occlusion(gapnet, window=0)
    with pytest.raises(ValueError, match="stride"):
        Occlusion(gapnet, window=3, stride=(1, 2, 3))
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x: contains 1 NaN"):
        Occlusion(gapnet, window=4)(bad, target=0)
    with pytest.raises(ValueError, match="target: class 7 out of range"):
        Occlusion(gapnet, window=4)(images, target=7)
    with pytest.raises(ValueError, match="target"):
        RISE(gapnet, masks=4)(images, target=UnitActivation("features.0", 0))
    with pytest.raises(ValueError, match="baseline"):
        Occlusion(gapnet, window=4)(images, target=0, baseline=torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="masks"):
        RISE(gapnet, masks=0)
    with pytest.raises(ValueError, match=r"^p: expected a number in \(0, 1\], got 0 "):
        RISE(gapnet, p=0.0)
