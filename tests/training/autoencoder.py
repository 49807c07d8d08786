"""A second model on the training loop: a linear autoencoder, as a TrainStep of a few lines.

Used by test_loop.py in-process and in a subprocess that is killed mid-run.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genxai.training import EMA, Event, Loop, LoopConfig, TrainStep


@dataclass
class AutoencoderConfig:
    width: int = 8
    iterations: int = 40
    lr: float = 1e-2
    dropout: float = 0.2  # consumes the global RNG: resume must restore it
    delay: float = 0.0  # seconds per iteration (the kill test needs a slow run)


class AutoencoderStep(TrainStep):
    """Reconstruct flattened images through a linear bottleneck (MSE), with EMA and warmup."""

    columns = ("loss",)
    resume_ignores = ("delay",)

    def __init__(self, cfg: AutoencoderConfig) -> None:
        self.config = cfg
        self.snapshots = 0

    @property
    def total_iterations(self) -> int:
        return self.config.iterations

    def build(self, loop: Loop) -> None:
        dim = loop.dataset[0][0].numel()
        net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(dim, self.config.width),
            nn.Dropout(self.config.dropout),
            nn.Linear(self.config.width, dim),
        )
        optimizer = torch.optim.Adam(net.parameters(), lr=self.config.lr)
        self.net = loop.add_model(
            "net", net, optimizer, ema=EMA(net, 0.9), warmup=5, grad_clip=1.0, counts=True
        )

    def __call__(self, loop: Loop, batch: torch.Tensor) -> None:
        noise = torch.randn(batch.shape, device=loop.device, generator=loop.generator) * 0.01
        loss = F.mse_loss(self.net(batch + noise), batch.flatten(1))
        loop.log_value("loss", loss)
        loop.optimize("net", loss)
        time.sleep(self.config.delay)

    def events(self) -> list[Event]:
        return [Event("count", 10, self._count)]

    def _count(self) -> None:
        self.snapshots += 1
        torch.randn(3)  # consumes the (forked) global RNG: must not change training

    def state_dict(self) -> dict:
        return {"snapshots": self.snapshots}

    def load_state_dict(self, state: dict) -> None:
        self.snapshots = state["snapshots"]


def dataset():
    from genxai.data import get_dataset

    return get_dataset("shapes", size=8, n=48, seed=0)


def loop(run_dir, *, delay: float = 0.0, iterations: int = 40, checkpoint_every: int = 100) -> Loop:
    step = AutoencoderStep(AutoencoderConfig(iterations=iterations, delay=delay))
    config = LoopConfig(
        run_dir=run_dir,
        seed=3,
        batch_size=8,
        log_every=4,
        checkpoint_every=checkpoint_every,
        progress=False,
        cpu=True,
    )
    return Loop(step, config, dataset())


if (
    __name__ == "__main__"
):  # python -m tests.training.autoencoder RUN_DIR: a slow run, checkpointed every unit
    torch.set_num_threads(1)
    loop(sys.argv[1], delay=0.05, checkpoint_every=1).fit()
