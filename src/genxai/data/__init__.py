"""Data sets, all offline: procedural shapes with object masks, scikit-learn digits, image folders,
CIFAR-10/100 pickles and CelebA-HQ folders.

Images are float tensors in [0, 1] (the diffusion code rescales them to [-1, 1] itself). Items are
``(image, label)``; the shapes data set adds the ground-truth object mask: ``(image, label, mask)``.

    train = get_dataset("shapes", size=32)                   # generated, seeded
    test = get_dataset("cifar10", root="~/data", train=False)  # reads cifar-10-batches-py
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from genxai.core.registry import Registry
from genxai.data.batches import ResumableBatches, collate_images, image_batches, image_of
from genxai.data.digits import DigitsDataset
from genxai.data.folders import CIFAR, IMAGE_EXTENSIONS, CelebAHQ, ImageFolderDataset, load_image
from genxai.data.shapes import BACKGROUNDS, SHAPES, TEXTURES, ShapesDataset, generate_shapes

Builder = Callable[..., Dataset]
DATASETS: Registry[Builder] = Registry("data set")


def _needs_root(name: str, root: str | Path | None, what: str) -> str | Path:
    if root is None:
        raise ValueError(
            f"root: the {name!r} data set is read from local files (nothing is downloaded); pass {what}"
        )
    return root


@DATASETS.register("shapes")
def _shapes(root, size, train, **kwargs) -> Dataset:
    return ShapesDataset(size=size or 32, train=train, **kwargs)


@DATASETS.register("digits", "sklearn_digits")
def _digits(root, size, train, **kwargs) -> Dataset:
    return DigitsDataset(train=train, size=size or 16, **kwargs)


@DATASETS.register("folder", "imagefolder")
def _folder(root, size, train, **kwargs) -> Dataset:
    return ImageFolderDataset(_needs_root("folder", root, "root=<folder of images>"), size or 64, **kwargs)


@DATASETS.register("cifar10")
def _cifar10(root, size, train, **kwargs) -> Dataset:
    root = _needs_root("cifar10", root, "root=<folder holding cifar-10-batches-py>")
    return CIFAR(root, train=train, size=size, **kwargs)


@DATASETS.register("cifar100")
def _cifar100(root, size, train, **kwargs) -> Dataset:
    root = _needs_root("cifar100", root, "root=<folder holding cifar-100-python>")
    return CIFAR(root, train=train, cifar100=True, size=size, **kwargs)


@DATASETS.register("celebahq", "celeba_hq")
def _celebahq(root, size, train, **kwargs) -> Dataset:
    return CelebAHQ(_needs_root("celebahq", root, "root=<folder of CelebA-HQ images>"), size or 256, **kwargs)


def get_dataset(
    name: str,
    root: str | Path | None = None,
    size: int | None = None,
    train: bool = True,
    **kwargs: Any,
) -> Dataset:
    """A data set by name: "shapes", "digits", "folder", "cifar10", "cifar100" or "celebahq".

    Args:
        root: the folder to read ("folder", "cifar10", "cifar100", "celebahq"); unused otherwise.
        size: image side in pixels (default: shapes 32, digits 16, folder 64, CIFAR 32, CelebA-HQ 256).
        train: training or test split (shapes: a disjoint seed stream; digits: a stratified split;
            CIFAR: the official split). Folders have no split.
        kwargs: passed on, e.g. ``n``/``seed`` (shapes), ``channels`` (digits, folders).
    """
    return DATASETS.get(name)(root, size, train, **kwargs)


def names() -> list[str]:
    """Names accepted by :func:`get_dataset`."""
    return DATASETS.names()


__all__ = [
    "BACKGROUNDS",
    "CIFAR",
    "IMAGE_EXTENSIONS",
    "SHAPES",
    "TEXTURES",
    "CelebAHQ",
    "DigitsDataset",
    "ImageFolderDataset",
    "ResumableBatches",
    "ShapesDataset",
    "collate_images",
    "generate_shapes",
    "get_dataset",
    "image_batches",
    "image_of",
    "load_image",
    "names",
]
