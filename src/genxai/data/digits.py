"""scikit-learn's handwritten digits (8 x 8, 10 classes, 1,797 images; shipped with scikit-learn,
so nothing is downloaded) as a torch Dataset at a chosen size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from genxai.core.checks import check_in_range, check_positive_int


class DigitsDataset(Dataset):
    """``(image (channels, size, size) in [0, 1], label)`` pairs of the digits data set.

    Args:
        train: the training part, else the test part of a stratified split.
        size: side in pixels; the 8 x 8 images are resized bilinearly.
        channels: 1 (grey) or 3 (grey replicated, for RGB models).
        test_fraction: share of each class held out for testing.
        seed: seed of the split (the same seed always gives the same split).
    """

    def __init__(
        self,
        train: bool = True,
        size: int = 16,
        channels: int = 1,
        *,
        test_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        self.size = check_positive_int(size, "size")
        if channels not in (1, 3):
            raise ValueError(f"channels: expected 1 or 3, got {channels!r}")
        check_in_range(test_fraction, "test_fraction", 0.0, 1.0, closed=False)
        digits = load_digits()
        train_idx, test_idx = train_test_split(
            list(range(len(digits.target))),
            test_size=test_fraction,
            random_state=seed,
            stratify=digits.target,
        )
        keep = torch.tensor(sorted(train_idx if train else test_idx))
        images = torch.as_tensor(digits.images, dtype=torch.float32)[keep, None] / 16.0
        if size != 8:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        self.images = images.clamp(0.0, 1.0).expand(-1, channels, -1, -1).contiguous()
        self.labels = torch.as_tensor(digits.target, dtype=torch.long)[keep]
        self.classes = [str(k) for k in range(10)]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


__all__ = ["DigitsDataset"]
