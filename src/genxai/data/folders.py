"""Users' own data on disk: image folders, the CIFAR python pickles and CelebA-HQ image folders.

Nothing is downloaded; a missing path or file raises ``FileNotFoundError`` naming it and what was
expected there. Images come back as float (C, H, W) tensors in [0, 1] with an int label.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from genxai.core.checks import check_positive_int

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def _existing_dir(root: str | Path, what: str) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"root: {str(path)!r} is not a directory; expected {what}")
    return path


def _images_in(folder: Path, endings: tuple[str, ...], recursive: bool = False) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in endings)


def load_image(path: str | Path, size: int | None = None, channels: int = 3) -> torch.Tensor:
    """One image file as a float (channels, size, size) tensor in [0, 1], center-cropped to a
    square and resized (antialiased bilinear); ``size=None`` keeps the original size, uncropped."""
    with Image.open(path) as image:
        image = image.convert("RGB" if channels == 3 else "L")
        tensor = pil_to_tensor(image).float() / 255.0
    if size is None:
        return tensor
    height, width = tensor.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    tensor = tensor[:, top : top + side, left : left + side]
    if side != size:
        tensor = F.interpolate(
            tensor[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )[0]
    return tensor.clamp(0.0, 1.0)


class ImageFolderDataset(Dataset):
    """Images from ``root``: one subfolder per class (label = position of the sorted folder name), or a
    flat folder of images (label 0). Each image is center-cropped to a square and resized to ``size``.

    Args:
        root: the folder.
        size: output side in pixels.
        channels: 3 (RGB) or 1 (grey).
        extensions: file endings that count as images.
    """

    def __init__(
        self,
        root: str | Path,
        size: int = 64,
        *,
        channels: int = 3,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ) -> None:
        self.root = _existing_dir(root, "a folder of images or of class subfolders of images")
        self.size = check_positive_int(size, "size")
        if channels not in (1, 3):
            raise ValueError(f"channels: expected 1 or 3, got {channels!r}")
        self.channels = channels
        endings = tuple(e.lower() for e in extensions)
        self.samples, self.classes = self._find(endings)
        if not self.samples:
            raise FileNotFoundError(
                f"root: no images ({', '.join(endings)}) in {str(self.root)!r} or in its subfolders"
            )

    def _find(self, endings: tuple[str, ...]) -> tuple[list[tuple[Path, int]], list[str]]:
        flat = _images_in(self.root, endings)
        subfolders = sorted(p for p in self.root.iterdir() if p.is_dir() and _images_in(p, endings, True))
        if flat or not subfolders:
            return [(p, 0) for p in flat], [self.root.name]
        samples = [
            (p, label) for label, folder in enumerate(subfolders) for p in _images_in(folder, endings, True)
        ]
        return samples, [folder.name for folder in subfolders]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return load_image(path, self.size, self.channels), label


class CelebAHQ(ImageFolderDataset):
    """CelebA-HQ as a folder of face images (e.g. ``celeba_hq_256/*.jpg``), searched recursively; label 0."""

    def __init__(self, root: str | Path, size: int = 256, **kwargs) -> None:
        super().__init__(root, size, **kwargs)

    def _find(self, endings: tuple[str, ...]) -> tuple[list[tuple[Path, int]], list[str]]:
        files = _images_in(self.root, endings, recursive=True)
        return [(p, 0) for p in files], ["face"]


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR: missing file {str(path)!r}")
    with path.open("rb") as f:
        return pickle.load(f, encoding="bytes")  # the CIFAR format itself; load only files you trust


def _field(batch: dict, key: str, path: Path):
    for candidate in (key.encode(), key):
        if candidate in batch:
            return batch[candidate]
    raise ValueError(f"CIFAR: {str(path)!r} has no {key!r} entry; is it a CIFAR python pickle?")


class CIFAR(Dataset):
    """CIFAR-10 or CIFAR-100 from the "python version" pickles (as distributed by its authors).

    ``root`` is the folder holding the pickles (``data_batch_1`` .. ``data_batch_5``, ``test_batch``,
    ``batches.meta`` for CIFAR-10; ``train``, ``test``, ``meta`` for CIFAR-100, fine labels) or the
    folder above it (``cifar-10-batches-py`` / ``cifar-100-python``).

    Args:
        train: the 50,000 training images, else the 10,000 test images.
        cifar100: read CIFAR-100 instead of CIFAR-10.
        size: resize from 32 to this side (None keeps 32).
    """

    def __init__(
        self, root: str | Path, train: bool = True, cifar100: bool = False, size: int | None = None
    ) -> None:
        sub = "cifar-100-python" if cifar100 else "cifar-10-batches-py"
        if cifar100:
            files, meta, labels_key, names_key = (
                (["train"] if train else ["test"]),
                "meta",
                "fine_labels",
                "fine_label_names",
            )
        else:
            files = [f"data_batch_{k}" for k in range(1, 6)] if train else ["test_batch"]
            meta, labels_key, names_key = "batches.meta", "labels", "label_names"
        folder = _existing_dir(root, f"the CIFAR pickles ({', '.join(files)}, {meta}) or a {sub!r} folder")
        if not (folder / files[0]).is_file() and (folder / sub).is_dir():
            folder = folder / sub
        data, labels = [], []
        for name in files:
            batch = _unpickle(folder / name)
            data.append(torch.as_tensor(_field(batch, "data", folder / name), dtype=torch.uint8))
            labels.append(torch.as_tensor(_field(batch, labels_key, folder / name), dtype=torch.long))
        self.data = torch.cat(data).view(-1, 3, 32, 32)
        self.labels = torch.cat(labels)
        if self.data.shape[0] != self.labels.shape[0]:
            raise ValueError(
                f"CIFAR: {self.data.shape[0]} images but {self.labels.shape[0]} labels in {str(folder)!r}"
            )
        names = _field(_unpickle(folder / meta), names_key, folder / meta)
        self.classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        self.size = None if size is None else check_positive_int(size, "size")

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.data[index].float() / 255.0
        if self.size is not None and self.size != 32:
            image = F.interpolate(image[None], size=(self.size, self.size), mode="bilinear", antialias=True)[
                0
            ]
        return image.clamp(0.0, 1.0), int(self.labels[index])


__all__ = ["CIFAR", "IMAGE_EXTENSIONS", "CelebAHQ", "ImageFolderDataset", "load_image"]
