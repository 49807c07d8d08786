"""The data section every training config shares, and the data set it builds.

data = DataConfig(name="shapes", image_size=32)
dataset = build_dataset(data, seed=0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset, Subset

from genxai.core.checks import check_choice, check_positive_int


@dataclass
class DataConfig:
    """Which images to train on; items come from :func:`genxai.data.get_dataset` in [0, 1]."""

    name: str = "shapes"  # shapes | digits | folder | cifar10 | cifar100 | celebahq
    root: str | None = None  # the user's copy of the data set (folder, CIFAR pickles, CelebA-HQ)
    image_size: int = 16
    channels: int | None = None  # None = from the data set's first image
    random_flip: bool = True  # horizontal flips, drawn from the training loop's generator (resumable)
    num_workers: int = 0
    limit: int | None = None  # use only the first N images (quick experiments)


def validate_data(data: DataConfig, *, min_size: int = 4) -> None:
    """Reject data settings no run can use, naming the ``data.*`` key."""
    from genxai.data import names

    check_choice(data.name, "data.name", names())
    check_positive_int(data.image_size, "data.image_size", minimum=min_size)
    if data.channels is not None:
        check_positive_int(data.channels, "data.channels")
    check_positive_int(data.num_workers, "data.num_workers", minimum=0)
    if data.limit is not None:
        check_positive_int(data.limit, "data.limit")


def build_dataset(data: DataConfig, seed: int, train: bool = True) -> Dataset:
    """The configured data set (images in [0, 1]); the shapes data is generated from ``seed``."""
    from genxai.data import get_dataset

    kwargs: dict[str, Any] = {}
    if data.channels is not None and data.name in ("digits", "folder", "celebahq"):
        kwargs["channels"] = data.channels
    if data.name == "shapes":
        kwargs["seed"] = seed
    dataset = get_dataset(data.name, root=data.root, size=data.image_size, train=train, **kwargs)
    if data.limit is not None:
        dataset = Subset(dataset, range(min(data.limit, len(dataset))))
    return dataset


def check_images_match(data: DataConfig, dataset: Dataset) -> tuple[int, int, int]:
    """The data set's image shape (C, H, W), checked against ``data`` (size, channels); sets
    ``data.channels`` from the data when the config leaves it open."""
    from genxai.data.batches import image_of

    first = image_of(dataset[0])
    size = data.image_size
    if first.ndim != 3 or tuple(first.shape[-2:]) != (size, size):
        raise ValueError(
            f"data: expected images of {size}x{size} (data.image_size), got shape {tuple(first.shape)}"
        )
    if data.channels is not None and first.shape[0] != data.channels:
        raise ValueError(
            f"data.channels: the data has {first.shape[0]} channels, the config says {data.channels}"
        )
    data.channels = int(first.shape[0])
    return tuple(first.shape)
