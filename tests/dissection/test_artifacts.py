"""Artifact correction on a planted generator: the units that paint white patches get the highest
defective scores, ablating them removes the patches, and nothing else is touched.

The generator has two layers: ``coarse`` (6 units at 4x4) and ``fine`` (4 units at 8x8); one unit
in each (``COARSE_PLANTED``, ``FINE_PLANTED``) paints bright white squares where it fires (a few
positions per image), the others draw dim colour content. Most tests use a hand-built detector
(whiteness map -> mean -> logit), so the artifact mask is known exactly; one test trains the
:class:`ArtifactClassifier` through the loop on real (patch-free) against generated images.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from genxai.dissection.artifact_classifier import (
    ArtifactClassifier,
    ArtifactConfig,
    ArtifactStep,
    artifact_masks,
    artifact_probability,
    labelled_images,
    load_artifact_classifier,
    threshold_maps,
    train_artifact_classifier,
)
from genxai.dissection.artifacts import (
    correct_artifacts,
    defective_scores,
    fid_before_after,
)
from genxai.dissection.interventions import ablate
from genxai.evaluation.fid import FID, FeatureExtractor
from genxai.training import Loop, LoopConfig

LATENT, COARSE, FINE = 8, 6, 4
COARSE_PLANTED, FINE_PLANTED = 2, 1
WHITE = 2.7  # a pixel is white when its channels (in [0, 1]) sum above this


class Planted(nn.Module):
    """latents (N, 8) -> images (N, 3, 16, 16) in [-1, 1]: tanh of the nearest-upsampled colour
    mixes of the ``coarse`` and ``fine`` unit maps. The planted units fire rarely (negative bias)
    and add +6 to every channel: white squares (4x4 px coarse, 2x2 fine)."""

    value_range = (-1.0, 1.0)

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fail = fail
        self.coarse_fc, self.coarse = nn.Linear(LATENT, COARSE * 16), nn.ReLU()
        self.fine_fc, self.fine = nn.Linear(LATENT, FINE * 64), nn.ReLU()
        self.coarse_rgb = nn.Conv2d(COARSE, 3, 1, bias=False)
        self.fine_rgb = nn.Conv2d(FINE, 3, 1, bias=False)
        with torch.no_grad():
            for fc, units, planted, bias in (
                (self.coarse_fc, COARSE, COARSE_PLANTED, -1.5),
                (self.fine_fc, FINE, FINE_PLANTED, -2.2),
            ):
                w = torch.randn(fc.out_features, LATENT, generator=g)
                fc.weight.copy_(w / w.norm(dim=1, keepdim=True))
                b = torch.zeros(units, fc.out_features // units)
                b[planted] = bias
                fc.bias.copy_(b.flatten())
            for rgb, units, planted in (
                (self.coarse_rgb, COARSE, COARSE_PLANTED),
                (self.fine_rgb, FINE, FINE_PLANTED),
            ):
                w = (torch.rand(3, units, generator=g) - 0.5) * 0.5
                w[:, planted] = 6.0
                rgb.weight.copy_(w[:, :, None, None])

    def latents(self, n, *, generator=None):
        return torch.randn(
            n, LATENT, generator=generator, device=None if generator is None else generator.device
        )

    def forward(self, z):
        c = self.coarse(self.coarse_fc(z).view(-1, COARSE, 4, 4))
        f = self.fine(self.fine_fc(z).view(-1, FINE, 8, 8))
        if self.fail:
            raise RuntimeError("failure after the layers")
        x = F.interpolate(self.coarse_rgb(c), scale_factor=4) + F.interpolate(
            self.fine_rgb(f), scale_factor=2
        )
        return torch.tanh(x)


class Detector(nn.Module):
    """Hand-built artifact classifier: ``features`` = ReLU(sum of channels - 2.7), the whiteness
    map; logit = 3000 x its mean - 4 (one 2x2 white square is enough to flag an image)."""

    default_layer = "features"

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__()
        self.white, self.features, self.head = nn.Conv2d(3, 1, 1), nn.ReLU(), nn.Linear(1, 1)
        self.calls, self.fail_after = 0, fail_after
        with torch.no_grad():
            self.white.weight.fill_(1.0)
            self.white.bias.fill_(-WHITE)
            self.head.weight.fill_(3000.0)
            self.head.bias.fill_(-4.0)

    def forward(self, x):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("classifier failure")
        return self.head(self.features(self.white(x)).mean((2, 3)))


def images_of(gen, seed, n=256, clean=False):
    """Images in [0, 1]; ``clean``: both planted units ablated (the "real" data)."""
    z = gen.latents(n, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        if not clean:
            return (gen(z) + 1) / 2
        with ablate(gen, "coarse", [COARSE_PLANTED]), ablate(gen, "fine", [FINE_PLANTED]):
            return (gen(z) + 1) / 2


def white(images):
    return images.sum(1) > WHITE


def no_hooks(model):
    return all(not m._forward_hooks for m in model.modules())


@pytest.fixture
def gen():
    return Planted().eval()


FAST = {"num_samples": 256, "batch_size": 64}


def test_threshold_maps_keep_the_top_quantile_and_never_zero():
    heat = torch.arange(100.0).view(1, 1, 10, 10)
    assert int(threshold_maps(heat, 0.9).sum()) == 10  # values 90..99
    sparse = torch.zeros(2, 1, 10, 10)
    sparse[0, 0, :2, :2] = 1.0  # 4% of the map: all of it, none of the zeros
    masks = threshold_maps(sparse, 0.9)
    assert torch.equal(masks[0, 0], sparse[0, 0] > 0) and not masks[1].any()


def test_grad_cam_mask_is_the_patch(gen):
    x = images_of(gen, 1, 64)
    masks = artifact_masks(Detector(), x, quantile=0.9)
    flagged = white(x).flatten(1).float().mean(1) < 0.1  # the patch fits in the top 10%
    assert torch.equal(masks[flagged, 0], white(x)[flagged])
    p = artifact_probability(Detector(), x)
    assert torch.equal(p > 0.5, white(x).flatten(1).sum(1) >= 3)


def test_planted_units_score_highest(gen):
    coarse = defective_scores(gen, "coarse", Detector(), **FAST)
    assert coarse.ranking()[0] == COARSE_PLANTED
    others = torch.cat([coarse.scores[:COARSE_PLANTED], coarse.scores[COARSE_PLANTED + 1 :]])
    assert coarse.scores[COARSE_PLANTED] > 4 * others.max()
    assert 0 < coarse.samples < coarse.num_samples  # only the flagged samples
    fine = defective_scores(gen, "fine", Detector(), **FAST)
    assert fine.ranking()[0] == FINE_PLANTED
    assert no_hooks(gen)


def test_scores_do_not_depend_on_the_batch_size(gen):
    a = defective_scores(gen, "coarse", Detector(), num_samples=100, batch_size=100)
    b = defective_scores(gen, "coarse", Detector(), num_samples=100, batch_size=7)
    torch.testing.assert_close(a.scores, b.scores)
    assert a.samples == b.samples


def test_correction_removes_the_patches_layer_by_layer(gen):
    detector = Detector()
    reference = Planted().eval()
    with torch.no_grad():  # what only the planted units ablated looks like
        reference.coarse_rgb.weight[:, COARSE_PLANTED] = 0
        reference.fine_rgb.weight[:, FINE_PLANTED] = 0
    z = gen.latents(128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = (gen(z) + 1) / 2
    with correct_artifacts(gen, ["coarse", "fine"], detector, units_per_layer=1, **FAST) as fix:
        with torch.no_grad():
            fixed = (gen(z) + 1) / 2
        assert fix.units == {"coarse": [COARSE_PLANTED], "fine": [FINE_PLANTED]}
        first, second = fix.steps
        assert first.artifact_before > 0.35 and first.artifact_before == fix.artifact_before
        assert 0.1 < first.artifact_after < first.artifact_before - 0.1  # the fine patches remain
        assert second.artifact_before == first.artifact_after
        assert second.artifact_after < 0.05 and fix.artifact_after == second.artifact_after
        summary = json.loads(json.dumps(fix.summary()))
        assert summary["units"] == {"coarse": [COARSE_PLANTED], "fine": [FINE_PLANTED]}
        assert len(summary["steps"][0]["scores"]) == COARSE and summary["artifact_after"] < 0.05
    assert white(plain).any() and not white(fixed).any()
    with torch.no_grad():
        torch.testing.assert_close(fixed, (reference(z) + 1) / 2)  # nothing else was ablated
        assert no_hooks(gen) and torch.equal((gen(z) + 1) / 2, plain)
        with fix.ablations():
            torch.testing.assert_close((gen(z) + 1) / 2, fixed)
    assert no_hooks(gen)


def test_more_units_per_layer_takes_the_planted_one_first(gen):
    with correct_artifacts(gen, "coarse", Detector(), units_per_layer=[3], **FAST) as fix:
        assert fix.units["coarse"][0] == COARSE_PLANTED and len(fix.units["coarse"]) == 3
        scores = fix.steps[0].scores.scores
        assert scores[fix.units["coarse"]].tolist() == sorted(scores.tolist(), reverse=True)[:3]


def test_a_layer_with_nothing_flagged_is_left_alone(gen):
    with correct_artifacts(
        gen, ["coarse", "fine", "coarse_rgb"], Detector(), units_per_layer=1, **FAST
    ) as fix:
        assert fix.steps[2].units == [] and fix.steps[2].scores.samples == 0
        assert fix.steps[2].artifact_after == fix.steps[2].artifact_before
        assert list(fix.units) == ["coarse", "fine"]
    with (
        pytest.raises(ValueError, match="flagged"),
        ablate(gen, "coarse", [COARSE_PLANTED]),
        ablate(gen, "fine", [FINE_PLANTED]),
    ):
        defective_scores(gen, "coarse", Detector(), **FAST)
    assert no_hooks(gen)


def test_hooks_removed_after_errors(gen):
    with pytest.raises(RuntimeError, match="failure after"):
        defective_scores(Planted(fail=True), "coarse", Detector(), **FAST)
    detector = Detector(fail_after=20)  # fails in the middle of the second layer
    with pytest.raises(RuntimeError, match="classifier failure"):
        correct_artifacts(gen, ["coarse", "fine"], detector, units_per_layer=1, **FAST)
    assert detector.calls > 10 and no_hooks(gen) and no_hooks(detector)


def test_bad_input_is_rejected_before_work(gen):
    det = Detector()
    with pytest.raises(ValueError, match=r"layer: no module named 'corse'.*coarse"):
        correct_artifacts(gen, ["corse"], det, units_per_layer=1)
    for bad in (0, -1, 1.5, [1]):
        with pytest.raises(ValueError, match="units_per_layer"):
            correct_artifacts(gen, ["coarse", "fine"], det, units_per_layer=bad)
    with pytest.raises(ValueError, match="units_per_layer: 7 is more than the 6 units"):
        correct_artifacts(gen, "coarse", det, units_per_layer=7)
    with pytest.raises(ValueError, match="layers"):
        correct_artifacts(gen, [], det, units_per_layer=1)
    with pytest.raises(ValueError, match="layers: each layer once"):
        correct_artifacts(gen, ["coarse", "coarse"], det, units_per_layer=1)
    with pytest.raises(ValueError, match="classifier: expected one artifact logit"):
        correct_artifacts(gen, "coarse", nn.Sequential(nn.Flatten(), nn.LazyLinear(2)), units_per_layer=1)
    with pytest.raises(ValueError, match="mask_quantile"):
        defective_scores(gen, "coarse", det, mask_quantile=1.0)
    with pytest.raises(ValueError, match="num_samples"):
        defective_scores(gen, "coarse", det, num_samples=0)
    with pytest.raises(ValueError, match="latents_fn"):
        defective_scores(nn.Sequential(nn.Linear(2, 2)), "0", det)
    assert det.calls == 0 and no_hooks(gen)


class Whiteness(FeatureExtractor):
    """Tiny FID features: per-channel means and spreads, and the white fraction."""

    num_features = 7

    def forward(self, images):
        return torch.cat(
            [images.mean((2, 3)), images.std((2, 3)), white(images).float().mean((1, 2))[:, None]], 1
        )


def test_fid_before_after_drops_when_the_patches_go(gen):
    reference = FID(Whiteness())
    for batch in images_of(gen, 7, 512, clean=True).split(128):
        reference.update(batch, real=True)
    with (
        correct_artifacts(gen, ["coarse", "fine"], Detector(), units_per_layer=1, **FAST) as fix,
        pytest.raises(ValueError, match="close it first"),
    ):
        fid_before_after(gen, fix, reference)
    result = fid_before_after(gen, fix, reference, num_samples=256, batch_size=64)
    name = Whiteness.fid_name
    assert result["after"][name] < 0.2 * result["before"][name]
    again = fid_before_after(
        gen, {"coarse": [COARSE_PLANTED], "fine": [FINE_PLANTED]}, reference, num_samples=256
    )
    assert again == result  # the same seeded latents; the reference kept only its real statistics
    assert no_hooks(gen)


# --- the trained classifier -------------------------------------------------------------------


def test_trained_classifier_finds_the_planted_unit(gen, tmp_path):
    """Trained through the loop (150 Adam steps, real = patch-free images vs the generator's)."""
    real = TensorDataset(images_of(gen, 11, 256, clean=True))
    cfg = ArtifactConfig(iterations=150, batch_size=32, lr=3e-3, width=8, depth=1, seed=0)
    clf = train_artifact_classifier(gen, real, tmp_path, cfg, cpu=True)
    x, clean = images_of(gen, 99, 256), images_of(gen, 98, 256, clean=True)
    patched = white(x).flatten(1).sum(1) >= 4
    assert (artifact_probability(clf, x[patched]) > 0.5).float().mean() > 0.9
    assert (artifact_probability(clf, clean) < 0.5).float().mean() > 0.8
    loaded = load_artifact_classifier(tmp_path)
    assert loaded.config == {"channels": 3, "width": 8, "depth": 1}
    torch.testing.assert_close(loaded(x), clf(x))
    scores = defective_scores(gen, "coarse", loaded, **FAST)
    assert scores.ranking()[0] == COARSE_PLANTED
    with correct_artifacts(gen, "coarse", loaded, units_per_layer=1, **FAST) as fix:
        assert fix.units == {"coarse": [COARSE_PLANTED]}
        assert fix.artifact_after < fix.artifact_before - 0.15


def _step_loop(run_dir, data, generator, iterations=6):
    step = ArtifactStep(ArtifactConfig(iterations=iterations, batch_size=8, width=4, depth=1), generator)
    config = LoopConfig(
        run_dir=run_dir, seed=1, batch_size=8, log_every=2, checkpoint_every=100, cpu=True, progress=False
    )
    return Loop(step, config, data)


def test_step_resumes_exactly_and_trains_on_labelled_images(gen, tmp_path):
    real = TensorDataset(images_of(gen, 11, 32, clean=True))
    whole = _step_loop(tmp_path / "a", real, gen)
    whole.fit()
    first = _step_loop(tmp_path / "b", real, gen)
    first.fit(until=3)
    second = _step_loop(tmp_path / "b", real, gen)
    assert second.iteration == 3
    second.fit()
    for a, b in zip(whole.unwrap("classifier").parameters(), second.unwrap("classifier").parameters()):
        assert torch.equal(a, b)  # the generated half comes from the loop's checkpointed generator

    data = labelled_images(images_of(gen, 1, 16), images_of(gen, 2, 16, clean=True))
    assert data[0][1] == 1 and data[16][1] == 0
    clf = train_artifact_classifier(
        None, data, tmp_path / "c", ArtifactConfig(iterations=4, batch_size=8, width=4, depth=1), cpu=True
    )
    assert (
        isinstance(clf, ArtifactClassifier) and (tmp_path / "c" / "artifact_classifier.safetensors").is_file()
    )
    with pytest.raises(ValueError, match="label 1"):
        train_artifact_classifier(
            None, real, tmp_path / "d", ArtifactConfig(iterations=2, batch_size=8), cpu=True
        )
    with pytest.raises(ValueError, match="do not match the generator"):
        small = TensorDataset(torch.rand(16, 3, 8, 8))
        train_artifact_classifier(
            gen, small, tmp_path / "e", ArtifactConfig(iterations=2, batch_size=8), cpu=True
        )
    with pytest.raises(ValueError, match=r"good: images \(1, 8, 8\) differ"):
        labelled_images(torch.rand(2, 3, 8, 8), torch.rand(2, 1, 8, 8))
