"""The artifact classifier of artifact correction (Tousi et al., CVPR 2021), and its Grad-CAM masks.

An :class:`ArtifactClassifier` (one logit: artifact / generated vs good / real) is trained through
the training loop by :class:`ArtifactStep` (:func:`train_artifact_classifier`) on real against
generated images, or on labelled flawed / good ones (:func:`labelled_images`); its Grad-CAM of the
artifact logit, thresholded per image, marks where the artifact is (:func:`artifact_masks`).
:mod:`genxai.dissection.artifacts` scores and ablates the generator units behind those masks.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from genxai.attribution import build
from genxai.core.checks import check_images, check_in_range, check_positive_int
from genxai.core.modes import evaluation_mode
from genxai.core.targets import DiscriminatorScore
from genxai.training import Loop, LoopConfig, TrainStep, checkpoint

WEIGHTS = "artifact_classifier"  # the weights in a training folder: DIR/artifact_classifier.safetensors
LatentsFn = Callable[..., torch.Tensor]
Range = tuple[float, float]


class ArtifactClassifier(nn.Module):
    """A small CNN: images (N, channels, H, W) in [0, 1] -> one logit (N, 1), high = artifact.

    ``features`` (Grad-CAM's default layer): a 3x3 conv, then ``depth`` stages of a stride-2 and a
    3x3 conv (LeakyReLU, no normalisation: each image's score is its own); ``head``: global average
    pool and a linear layer. ``self.config`` holds the constructor arguments.
    """

    default_layer = "features"

    def __init__(self, channels: int = 3, width: int = 32, depth: int = 2) -> None:
        super().__init__()
        for value, name in ((channels, "channels"), (width, "width"), (depth, "depth")):
            check_positive_int(value, name)
        self.config = {"channels": channels, "width": width, "depth": depth}
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.LeakyReLU(0.2)]
        for i in range(depth):
            cin, cout = width * 2 ** min(i, 2), width * 2 ** min(i + 1, 2)
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
            layers += [nn.Conv2d(cout, cout, 3, padding=1), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cout, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images * 2 - 1))


def load_artifact_classifier(path: str | Path, device: torch.device | str = "cpu") -> ArtifactClassifier:
    """The classifier of a training folder (``DIR/artifact_classifier.safetensors``) or a file."""
    path = Path(path)
    folder, name = (path.parent, path.stem) if path.suffix == ".safetensors" else (path, WEIGHTS)
    if not (folder / f"{name}.safetensors").is_file():
        raise FileNotFoundError(f"classifier: no {name}.safetensors in {folder}")
    return checkpoint.load_module(folder, name, ArtifactClassifier, device).eval()


def artifact_probability(classifier: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The classifier's artifact probability (N,), the sigmoid of its single logit."""
    with torch.no_grad(), evaluation_mode(classifier):
        logits = classifier(images)
    if not isinstance(logits, torch.Tensor) or logits.numel() != len(images) or logits.ndim > 2:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"classifier: expected one artifact logit per image, (N,) or (N, 1), got {got}")
    return torch.sigmoid(logits.float().reshape(-1))


def threshold_maps(heat: torch.Tensor, quantile: float) -> torch.Tensor:
    """Bool masks (N, 1, H, W): the pixels of each map above its own ``quantile`` (at most the top
    ``1 - quantile`` of its pixels, fewer with ties; never a pixel where the map is <= 0)."""
    flat = heat.detach().float().flatten(1)
    k = min(max(round(quantile * flat.shape[1]), 1), flat.shape[1])
    threshold = flat.kthvalue(k, dim=1).values.clamp_min(0)
    return (flat > threshold[:, None]).view(heat.shape)


def artifact_masks(
    classifier: nn.Module, images: torch.Tensor, *, layer: str | None = None, quantile: float = 0.9
) -> torch.Tensor:
    """Where the artifact is, (N, 1, H, W) bool: Grad-CAM of the artifact logit at ``layer``
    (default: the classifier's ``default_layer``), thresholded per image by :func:`threshold_maps`."""
    check_in_range(quantile, "quantile", 0.0, 1.0, closed=False)
    heat = build("gradcam", classifier, layer=layer)(images, target=DiscriminatorScore())
    return threshold_maps(heat, quantile)


# --- training -----------------------------------------------------------------------------------


@dataclass
class ArtifactConfig:
    """How the artifact classifier is trained (saved as the run's ``config.yaml``)."""

    iterations: int = 500
    batch_size: int = 64  # real (or labelled) images per iteration; as many generated ones are added
    lr: float = 1e-3
    width: int = 32
    depth: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("iterations", "batch_size", "width", "depth"):
            check_positive_int(getattr(self, name), name)
        check_positive_int(self.seed, "seed", minimum=0)
        check_in_range(self.lr, "lr", 0.0, 1.0, closed=False)


class ArtifactStep(TrainStep):
    """One Adam step on class-balanced binary cross-entropy, label 1 for generated (flawed) and 0
    for real (good) images. With a ``generator`` the batch is real images and the generator (frozen,
    in eval mode, moved to the loop's device) adds as many from ``latents_fn(n, generator=
    loop.generator)`` (the loop's seeded, checkpointed stream); without one the data set's items are
    ``(image, label)`` with label 1 = flawed."""

    columns = ("loss", "accuracy")

    def __init__(self, cfg: ArtifactConfig, generator: nn.Module | None = None, **source: Any) -> None:
        self.config, self.generator = cfg, generator
        if generator is not None:  # source: latents_fn, value_range
            self.latents_fn, self.value_range = source_options(generator, **source)

    @property
    def total_iterations(self) -> int:
        return self.config.iterations

    def build(self, loop: Loop) -> None:
        first = loop.dataset[0]
        image = first[0] if isinstance(first, (tuple, list)) else first
        if not isinstance(image, torch.Tensor) or image.ndim != 3:
            raise ValueError("dataset: expected items (image (C, H, W) in [0, 1], ...) or bare images")
        if self.generator is None:
            label = first[1] if isinstance(first, (tuple, list)) and len(first) > 1 else None
            if label is None or float(label) not in (0.0, 1.0):
                raise ValueError(
                    "dataset: without a generator, items must be (image, label) with label 1 (flawed) or "
                    f"0 (good), got {label!r}; see labelled_images(flawed, good)"
                )
        else:
            self.generator = self.generator.to(loop.device)
            z = self.latents_fn(1, generator=torch.Generator().manual_seed(0)).to(loop.device)
            shape = tuple(self._images(z).shape[1:])
            if shape != tuple(image.shape):
                raise ValueError(f"dataset: images {tuple(image.shape)} do not match the generator's {shape}")
        net = ArtifactClassifier(image.shape[0], self.config.width, self.config.depth)
        optimizer = torch.optim.Adam(net.parameters(), lr=self.config.lr)
        self.net = loop.add_model("classifier", net, optimizer, counts=True)

    def _images(self, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), evaluation_mode(self.generator):
            return to_unit_range(self.generator(z), self.value_range, len(z))

    def collate(self, items: list[Any]) -> Any:
        if self.generator is not None:
            return super().collate(items)
        return torch.stack([item[0] for item in items]), torch.tensor([float(item[1]) for item in items])

    def __call__(self, loop: Loop, batch: Any) -> None:
        if self.generator is None:
            images, labels = batch
        else:
            fake = self._images(self.latents_fn(len(batch), generator=loop.generator).to(loop.device))
            images = torch.cat([batch.float(), fake])
            labels = torch.cat([torch.zeros(len(batch)), torch.ones(len(fake))]).to(loop.device)
        logits = self.net(images.float()).reshape(-1)
        positives, negatives = labels.sum().clamp_min(1), (1 - labels).sum().clamp_min(1)
        weights = torch.where(labels > 0.5, 0.5 / positives, 0.5 / negatives)
        weights = weights / weights.sum()  # a batch of one class: the plain mean
        loss = (F.binary_cross_entropy_with_logits(logits, labels, reduction="none") * weights).sum()
        loop.log_value("loss", loss)
        loop.log_value("accuracy", ((logits > 0).float() == labels).float().mean())
        loop.optimize("classifier", loss)


def labelled_images(flawed: torch.Tensor, good: torch.Tensor) -> Dataset:
    """A data set of ``(image, label)`` items, label 1 for ``flawed`` and 0 for ``good`` images
    (each (N, C, H, W) in [0, 1]), to train the classifier without a generator."""
    flawed, good = check_images(flawed, "flawed"), check_images(good, "good")
    if flawed.shape[1:] != good.shape[1:]:
        raise ValueError(f"good: images {tuple(good.shape[1:])} differ from flawed {tuple(flawed.shape[1:])}")
    labels = torch.cat([torch.ones(len(flawed)), torch.zeros(len(good))])
    return TensorDataset(torch.cat([flawed, good]).float(), labels)


def train_artifact_classifier(
    generator: nn.Module | None,
    dataset: Dataset,
    run_dir: str | Path,
    cfg: ArtifactConfig | None = None,
    *,
    latents_fn: LatentsFn | None = None,
    value_range: Range | None = None,
    cpu: bool = False,
    progress: bool = False,
) -> ArtifactClassifier:
    """Train an :class:`ArtifactClassifier` in ``run_dir`` (resuming its checkpoints): real images
    of ``dataset`` against ``generator``'s, or, with ``generator`` None, labelled images (items
    ``(image, label)``, label 1 = flawed). Writes ``run_dir/artifact_classifier.safetensors`` (with
    its config) and ``artifact_classifier.json`` (the loop's summary); returns the classifier."""
    cfg = cfg if cfg is not None else ArtifactConfig()
    source = {"latents_fn": latents_fn, "value_range": value_range} if generator is not None else {}
    half = max(cfg.iterations // 2, 1)
    config = LoopConfig(run_dir, cfg.seed, cfg.batch_size, min(50, half), half, cpu=cpu, progress=progress)
    loop = Loop(ArtifactStep(cfg, generator, **source), config, dataset)
    summary = loop.fit()
    net = loop.unwrap("classifier")
    if loop.is_main:
        checkpoint.write_weights(run_dir, WEIGHTS, net.state_dict(), net.config)
        record = json.dumps({**summary, "config": asdict(cfg)}, indent=2, default=str)
        (Path(run_dir) / f"{WEIGHTS}.json").write_text(record)
    return net.eval()


def source_options(
    generator: Any, latents_fn: Any = None, value_range: Any = None
) -> tuple[LatentsFn, Range]:
    if not isinstance(generator, nn.Module):
        raise ValueError(f"generator: expected an nn.Module, latents -> images, got {type(generator)}")
    fn = latents_fn if latents_fn is not None else getattr(generator, "latents", None)
    if not callable(fn):
        raise ValueError(
            f"latents_fn: {type(generator).__name__} has no latents(n, generator=...) method; pass "
            "latents_fn=lambda n, generator: torch.randn(n, DIM, generator=generator)"
        )
    value_range = value_range if value_range is not None else getattr(generator, "value_range", (-1.0, 1.0))
    ok = isinstance(value_range, Sequence) and len(value_range) == 2
    if not (ok and all(isinstance(v, (int, float)) for v in value_range) and value_range[1] > value_range[0]):
        raise ValueError(f"value_range: expected (low, high) with low < high, got {value_range!r}")
    return fn, (float(value_range[0]), float(value_range[1]))


def to_unit_range(out: Any, value_range: Range, n: int) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[0] != n:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"generator: expected images (N={n}, C, H, W), got {got}")
    return ((out.float() - value_range[0]) / (value_range[1] - value_range[0])).clamp(0, 1)
