"""dissect on a planted generator: the unit that draws the concept is found with IoU near 1, noise
units are not interpretable; results do not depend on the batch size; hooks never stay behind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from genxai.dissection import Dissection, dissect, gallery
from genxai.dissection.dissect import LATENT_BLOCK, SeededLatents
from tests.dissection.planted import CONCEPT_UNIT, GRID, SIZE, Planted, RedSegmenter


@pytest.fixture(scope="module")
def result() -> Dissection:
    return dissect(
        Planted(), "units", RedSegmenter(), num_samples=80, batch_size=16, seed=3, top_k=4, bins=256
    )


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_finds_the_planted_unit_and_rejects_noise(result):
    assert result.units == 4 and result.concepts == ["background", "red"]
    red = result.concepts.index("red")
    assert int(result.unit_concept[CONCEPT_UNIT]) == red
    assert result.unit_iou[CONCEPT_UNIT] > 0.85 and result.unit_iqr[CONCEPT_UNIT] > 0.6
    assert result.interpretable == [CONCEPT_UNIT]
    noise = [u for u in range(4) if u != CONCEPT_UNIT]
    assert (result.iqr[noise] < result.iqr_bar).all()
    assert result.concept_counts == {"red": 1, "background": 0}
    # the unit points at red, away from the background: no positive association, score 0
    assert result.iou[CONCEPT_UNIT, 0] == 0
    assert result.image_size == [SIZE, SIZE] and result.activation_size == [GRID, GRID]


def test_top_samples_are_where_the_unit_fires_most(result):
    z = SeededLatents(Planted().latents, 3, "cpu").rows(0, 80)
    peak = 1 + z[:, 3]  # the planted unit's maximum in each sample
    assert result.top_samples[CONCEPT_UNIT].tolist() == peak.topk(4).indices.tolist()
    assert torch.allclose(result.top_values[CONCEPT_UNIT], peak.topk(4).values)


def test_results_do_not_depend_on_the_batch_size(result):
    other = dissect(
        Planted(), "units", RedSegmenter(), num_samples=80, batch_size=7, seed=3, top_k=4, bins=256
    )
    for name in ("iou", "iqr", "threshold", "top_samples", "minimum", "maximum"):
        assert torch.allclose(getattr(other, name).float(), getattr(result, name).float()), name


def test_gallery_regenerates_top_samples_with_their_masks(result):
    g = Planted()
    tiles = gallery(g, "units", result, [CONCEPT_UNIT, 0], count=3)
    assert tiles["images"].shape == (2, 3, 3, SIZE, SIZE) and tiles["masks"].shape == (2, 3, 1, SIZE, SIZE)
    samples = tiles["samples"][0]
    assert samples.tolist() == result.top_samples[CONCEPT_UNIT, :3].tolist()
    z = SeededLatents(g.latents, 3, "cpu").take(samples)
    expected = ((g(z) + 1) / 2).clamp(0, 1)
    assert torch.equal(tiles["images"][0], expected)
    red = RedSegmenter().concept_masks(expected)[:, 1:]
    iou = (tiles["masks"][0] & red).sum() / (tiles["masks"][0] | red).sum()
    assert iou > 0.75  # the strongest samples: their blurred borders pass the threshold further out


def test_save_and_load_round_trip(result, tmp_path):
    result.save(tmp_path)
    back = Dissection.load(tmp_path)
    assert back.concepts == result.concepts and back.layer == "units"
    assert back.interpretable == result.interpretable and back.concept_counts == result.concept_counts
    assert torch.equal(back.iou, result.iou) and torch.equal(back.top_samples, result.top_samples)
    assert back.summary()["unit_records"][CONCEPT_UNIT]["concept"] == "red"


def test_seeded_latents_are_the_same_for_any_range():
    source = SeededLatents(Planted().latents, 1, "cpu")
    everything = source.rows(0, LATENT_BLOCK + 40)
    assert torch.equal(
        source.rows(LATENT_BLOCK - 5, LATENT_BLOCK + 7), everything[LATENT_BLOCK - 5 : LATENT_BLOCK + 7]
    )
    picks = torch.tensor([LATENT_BLOCK + 3, 2, 17])
    assert torch.equal(source.take(picks), everything[picks])


def test_latents_fn_for_generators_without_latents():
    class Bare(nn.Module):  # the planted generator minus its latents method
        def __init__(self):
            super().__init__()
            self.inner = Planted()

        def forward(self, z):
            return self.inner(z)

    fn = Planted().latents
    out = dissect(
        Bare(), "inner.units", RedSegmenter(), num_samples=20, batch_size=10, latents_fn=fn, top_k=2
    )
    assert out.interpretable == [CONCEPT_UNIT]
    with pytest.raises(ValueError, match="latents_fn"):
        dissect(Bare(), "inner.units", RedSegmenter(), num_samples=4)


class _WrongShape(RedSegmenter):
    def concept_masks(self, images):
        return super().concept_masks(images)[:, :1]


class _Fails(RedSegmenter):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def concept_masks(self, images):
        self.calls += 1
        if self.calls > 2:
            raise RuntimeError("segmenter broke in the second pass")
        return super().concept_masks(images)


def test_bad_input_raises_before_work_and_leaves_no_hooks():
    g = Planted().train()
    with pytest.raises(ValueError, match="Closest names: units"):
        dissect(g, "unit", RedSegmenter(), num_samples=4)
    with pytest.raises(ValueError, match="num_samples"):
        dissect(g, "units", RedSegmenter(), num_samples=0)
    with pytest.raises(ValueError, match="segmenter: concept_masks must return"):
        dissect(g, "units", _WrongShape(), num_samples=8, batch_size=4)
    with pytest.raises(ValueError, match="segmenter: expected an object"):
        dissect(g, "units", object(), num_samples=8)
    with pytest.raises(ValueError, match="concept names must be unique"):
        seg = RedSegmenter()
        seg.concepts = ["red", "red"]
        dissect(g, "units", seg, num_samples=8)
    with pytest.raises(ValueError, match="iou_bar"):
        dissect(g, "units", RedSegmenter(), num_samples=8, iou_bar=2)
    with pytest.raises(RuntimeError, match="second pass"):
        dissect(g, "units", _Fails(), num_samples=8, batch_size=4)
    assert _hooks(g) == 0
    assert all(m.training for m in g.modules())  # modes restored
    assert torch.is_grad_enabled()


def test_gallery_bad_input(result):
    with pytest.raises(ValueError, match="units"):
        gallery(Planted(), "units", result, [4])
    with pytest.raises(ValueError, match="count"):
        gallery(Planted(), "units", result, [1], count=5)
    with pytest.raises(ValueError, match="the dissection is of 'units'"):
        gallery(Planted(), "render", result, [1])
