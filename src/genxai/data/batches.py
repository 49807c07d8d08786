"""Batches of a data set: a data order that resumes exactly, and images taken from items."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler


class ResumableBatches(Sampler[list[int]]):
    """Endless batches of indices: epoch e is a permutation seeded by (seed, e), cut into global
    batches, each split over the processes. Batch k is a pure function of k, so starting at
    ``start`` resumes the data order exactly (workers may prefetch; the caller counts what it used).
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        if size < batch_size * world:
            raise ValueError(
                f"data: {size} images are fewer than one global batch ({batch_size} x {world} processes); "
                "lower train.batch_size or use more data"
            )
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world, self.start = rank, world, start
        self.per_epoch = size // (batch_size * world)

    def __iter__(self) -> Iterator[list[int]]:
        k = self.start
        while True:
            epoch, index = divmod(k, self.per_epoch)
            order = torch.randperm(
                self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            )
            glob = order[index * self.batch_size * self.world : (index + 1) * self.batch_size * self.world]
            yield glob[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()
            k += 1

    def __len__(self) -> int:  # one epoch (the sampler itself never ends)
        return self.per_epoch


def image_of(item: Any) -> torch.Tensor:
    """The image of a data set item ``(image, label[, mask])`` or a bare image."""
    return item[0] if isinstance(item, (tuple, list)) else item


def collate_images(items: list[Any]) -> torch.Tensor:
    """A batch (N, C, H, W) of the items' images (labels and masks dropped)."""
    return torch.stack([image_of(item) for item in items])


def image_batches(dataset: Dataset, count: int, batch_size: int) -> Iterator[torch.Tensor]:
    """The images of the first ``count`` items, ``batch_size`` at a time (never all held at once)."""
    count = min(count, len(dataset))
    for start in range(0, count, batch_size):
        yield collate_images([dataset[k] for k in range(start, min(count, start + batch_size))])
