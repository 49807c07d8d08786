"""A small ResNet-style classifier for small images, its training loop, and model loading.

``SmallResNet`` is a real CNN (residual blocks, BatchNorm, a GAP + linear head) sized for 16-64 px
images: big enough to reach high accuracy on the bundled data sets in a minute on a CPU, small
enough for tests. Its layers have stable names (``stem``, ``layer1``..``layer3``, ``pool``, ``fc``)
so layer methods can name them; ``layer3`` is the usual Grad-CAM layer.

Checkpoints are a folder with ``model.safetensors`` and ``config.json``. ``load_model`` also builds
torchvision models by name, with weights from a local file or, with a warning, random weights
(never downloads).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from genxai.core.checks import check_in_range, check_positive_int
from genxai.core.hooks import default_layer as default_layer  # re-exported: genxai.models

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ClassifierConfig:
    """Constructor arguments of :class:`SmallResNet` (saved next to its weights)."""

    classes: int = 10
    channels: int = 3
    width: int = 16
    image_size: int = 32
    class_names: list[str] = field(default_factory=list)


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, inputs: int, outputs: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """stem -> layer1 (w) -> layer2 (2w, /2) -> layer3 (4w, /2) -> global average pool -> fc."""

    default_layer = "layer3"

    def __init__(self, config: ClassifierConfig | None = None, **kwargs: Any):
        super().__init__()
        config = config or ClassifierConfig(**kwargs)
        check_positive_int(config.classes, "classes")
        check_positive_int(config.channels, "channels")
        check_positive_int(config.width, "width")
        self.config = config
        w = config.width
        self.stem = nn.Sequential(
            nn.Conv2d(config.channels, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()
        )
        self.layer1 = BasicBlock(w, w)
        self.layer2 = BasicBlock(w, 2 * w, stride=2)
        self.layer3 = BasicBlock(2 * w, 4 * w, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, config.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


@dataclass
class TrainResult:
    """A trained model, its accuracy on the held-out images and the mean loss of each epoch."""

    model: SmallResNet
    accuracy: float
    losses: list[float]


def _image_label(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Items are ``(image, label, ...)``: extra fields (masks) are ignored."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError("dataset: expected items (image, label, ...) from the dataset")
    return batch[0].float(), torch.as_tensor(batch[1]).long()


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module, dataset: Dataset, *, batch_size: int = 256, device: str | torch.device = "cpu"
) -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` (items ``(image, label, ...)``)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for batch in DataLoader(dataset, batch_size=batch_size):
        x, y = _image_label(batch)
        correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
        total += y.numel()
    model.train(was_training)
    if total == 0:
        raise ValueError("dataset: no images to evaluate")
    return correct / total


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, loader: DataLoader, device: str | torch.device = "cpu") -> None:
    """Set BatchNorm running statistics to their exact averages over ``loader`` ("precise BN").

    After a short training run the exponential running averages still lag the weights, and eval-mode
    predictions suffer; one pass over the training images fixes that.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass
    model.train()
    for batch in loader:
        model(_image_label(batch)[0].to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


def train_classifier(
    dataset: Dataset,
    epochs: int = 3,
    *,
    test: Dataset | None = None,
    holdout: float = 0.2,
    batch_size: int = 64,
    lr: float = 3e-3,
    width: int = 16,
    classes: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> TrainResult:
    """Train a :class:`SmallResNet` with Adam on ``(image, label, ...)`` items, seeded.

    Accuracy is measured on ``test`` when given, else on a seeded ``holdout`` fraction of
    ``dataset`` that is kept out of training. ``classes`` defaults to the largest label + 1.
    Returns the model in eval mode on ``device``.
    """
    check_positive_int(epochs, "epochs")
    check_positive_int(batch_size, "batch_size")
    check_in_range(holdout, "holdout", 0.0, 0.9)
    if len(dataset) == 0:
        raise ValueError("dataset: it has no images")
    generator = torch.Generator().manual_seed(seed)
    train_set = dataset
    if test is None and holdout > 0:
        order = torch.randperm(len(dataset), generator=generator).tolist()
        cut = max(1, int(len(dataset) * holdout))
        test, train_set = Subset(dataset, order[:cut]), Subset(dataset, order[cut:])
    image = _image_label(dataset[0])[0]
    names = [str(c) for c in getattr(dataset, "classes", None) or []]
    if classes is None:
        classes = len(names) or 1 + max(int(_image_label(b)[1].max()) for b in DataLoader(dataset, 1024))
    config = ClassifierConfig(
        classes=classes, channels=image.shape[0], width=width, image_size=image.shape[-1], class_names=names
    )
    torch.manual_seed(seed)
    model = SmallResNet(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-len(train_set) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=generator, drop_last=False)
    losses = []
    model.train()
    for _ in range(epochs):
        total, count = 0.0, 0
        for batch in loader:
            x, y = _image_label(batch)
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * y.numel()
            count += y.numel()
        losses.append(total / count)
    recompute_batchnorm(model, DataLoader(train_set, batch_size=256), device)
    model.eval()
    accuracy = evaluate_accuracy(model, test if test is not None else train_set, device=device)
    return TrainResult(model=model, accuracy=accuracy, losses=losses)


def save_classifier(model: SmallResNet, folder: str | Path, **extra: Any) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (plus any ``extra`` JSON fields) to ``folder``."""
    if not isinstance(model, SmallResNet):
        raise TypeError(f"model: expected a SmallResNet, got {type(model).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    config = {"arch": "SmallResNet", **dataclasses.asdict(model.config), **extra}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> SmallResNet:
    """Load a checkpoint written by :func:`save_classifier` (the folder or its ``model.safetensors``)."""
    path = Path(path)
    folder = path.parent if path.suffix == ".safetensors" else path
    config_file, weights = folder / "config.json", folder / "model.safetensors"
    if not config_file.is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"model: {path} is not a genxai checkpoint (expected {config_file.name} and {weights.name} in {folder})"
        )
    raw = json.loads(config_file.read_text())
    if raw.get("arch") != "SmallResNet":
        raise ValueError(f"model: unknown architecture {raw.get('arch')!r} in {config_file}")
    names = {f.name for f in dataclasses.fields(ClassifierConfig)}
    model = SmallResNet(ClassifierConfig(**{k: v for k, v in raw.items() if k in names}))
    model.load_state_dict(load_file(str(weights)))
    return model.to(device).eval()


def _normalize_input(mean: tuple[float, ...], std: tuple[float, ...]):
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return ((x - m) / s, *args[1:])

    return hook


def load_torchvision(
    name: str, weights: str | Path | None = None, *, classes: int = 1000, normalize: bool = True
) -> nn.Module:
    """A torchvision classifier by name (``resnet18``, ``vgg16``, ...), random or from a local file.

    ``weights``: a ``.pth``/``.pt`` state dict (loaded with ``weights_only=True``: no code runs) or
    a ``.safetensors`` file; nothing is downloaded. Without it the weights are random.
    ``normalize``: the model takes [0, 1] images and applies the ImageNet mean/std itself (a forward
    pre-hook on the model, so layer names stay those of torchvision: ``layer4``, ``features.28``).
    """
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"model: unknown torchvision model {name!r}.{hint} Known: {', '.join(known)}")
    model = torchvision.models.get_model(name, weights=None, num_classes=classes)
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights: no file at {path}")
        try:
            if path.suffix == ".safetensors":
                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
                state = state.get("state_dict", state) if isinstance(state, dict) else state
        except pickle.UnpicklingError:
            raise ValueError(
                f"weights: {path} holds objects other than tensors, which torch.load(weights_only=True) "
                "refuses; save model.state_dict() (or a .safetensors file) instead"
            ) from None
        except Exception as err:  # not a weights file at all
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(
                f"weights: {path} is not a .safetensors file or a torch state dict: {reason}"
            ) from None
        if not isinstance(state, dict):
            raise ValueError(f"weights: {path} holds a {type(state).__name__}, not a state dict")
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"weights: {path} does not fit {name}: {str(err).splitlines()[0]}") from None
    if normalize:
        model.register_forward_pre_hook(_normalize_input(IMAGENET_MEAN, IMAGENET_STD))
    return model.eval()


def _is_checkpoint(spec: str | Path) -> bool:
    """Whether ``spec`` names a checkpoint (an existing path, or anything that looks like a path)."""
    path = Path(spec)
    return path.exists() or any(sep in str(spec) for sep in ("/", "\\")) or bool(path.suffix)


def random_weights_note(spec: str | Path, weights: str | Path | None) -> str | None:
    """The warning for a torchvision model by name without a weights file (None otherwise)."""
    if weights is not None or _is_checkpoint(spec):
        return None
    return (
        f"model: {spec} has random weights (no weights file was given; genxai never downloads): its "
        "explanations describe an untrained network. Pass local weights with --weights PATH "
        "(.safetensors or a torch state dict)."
    )


def load_model(spec: str | Path, weights: str | Path | None = None, *, classes: int = 1000) -> nn.Module:
    """A genxai checkpoint folder/file, or else a torchvision model name; in eval mode on the CPU.

    A torchvision model without ``weights`` has random weights, and says so (``UserWarning``).
    ``weights`` is for torchvision models only: a checkpoint carries its own (ValueError).
    """
    path = Path(spec)
    if _is_checkpoint(spec):
        if weights is not None:
            raise ValueError(
                f"weights: {spec} is a genxai checkpoint with its own weights; --weights is for "
                "torchvision models by name"
            )
        if not path.exists():
            raise FileNotFoundError(f"model: no checkpoint at {spec}")
        return load_classifier(path)
    model = load_torchvision(str(spec), weights, classes=classes)
    note = random_weights_note(spec, weights)
    if note is not None:
        warnings.warn(note, UserWarning, stacklevel=2)
    return model


def input_size(model: nn.Module, default: int = 224) -> int:
    """The image side a model was made for: a genxai checkpoint's ``config.image_size``, else
    ``default`` (torchvision's ImageNet models: 224)."""
    size = getattr(getattr(model, "config", None), "image_size", None)
    return int(size) if isinstance(size, int) and size > 0 else default
