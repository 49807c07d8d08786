"""Small models shared by the tests: a classifier with a GAP + linear head, a GAN-style
discriminator with in-place LeakyReLU and a single logit, and a model returning a tuple/dict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

# The suite's models are tiny: one thread avoids thread-pool overhead that dominates on 2-core machines.
torch.set_num_threads(1)


class GapNet(nn.Module):
    """conv features -> global average pool -> linear: the CAM architecture."""

    def __init__(self, classes: int = 5, channels: int = 3, width: int = 8, inplace: bool = True):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.ReLU(inplace=inplace),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(inplace=inplace),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


class Discriminator(nn.Module):
    """A DCGAN-style discriminator: strided convs, in-place LeakyReLU, one logit per image (N, 1)."""

    def __init__(self, channels: int = 3, width: int = 8):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, 2 * width, 4, 2, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * width, 2 * width, 3, 1, 1),
            nn.LeakyReLU(0.2, inplace=True),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 1))

    def forward(self, x):
        return self.head(self.main(x))


class TupleNet(nn.Module):
    """Returns ``(logits, features)`` or, with ``as_dict``, ``{"logits": ..., "features": ...}``."""

    def __init__(self, as_dict: bool = False):
        super().__init__()
        self.net = GapNet()
        self.as_dict = as_dict

    def forward(self, x):
        feats = self.net.features(x)
        logits = self.net.fc(self.net.pool(feats).flatten(1))
        return {"logits": logits, "features": feats} if self.as_dict else (logits, feats)


@pytest.fixture
def gapnet():
    torch.manual_seed(0)
    return GapNet().eval()


@pytest.fixture
def discriminator():
    torch.manual_seed(0)
    return Discriminator().eval()


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.rand(4, 3, 16, 16)
