"""A multiscale RealNVP (Dinh et al., 2017) for images, trained on the project's one training loop:
the bijection whose latent the diffeomorphic counterfactuals move in.

    cfg = load_flow_config(None, ["data.name=digits", "train.iterations=3000"])
    FlowTrainer(cfg).fit()                  # checkpoints, exact resume, logs (bits per dimension)
    flow = load_flow(cfg.run_dir)
    z = flow.encode(x); x_again = flow.decode(z); bpd = flow.bits_per_dim(x)

Layout per level: 3 checkerboard affine couplings, a squeeze (C, H, W) -> (4C, H/2, W/2), 3
channel-wise couplings, then half the channels leave as latent; the last level has 4 checkerboard
couplings. Images in [0, 1] pass a logit transform first (``alpha = 0.05``). The latent is one flat
(N, D) vector (the factored-out parts concatenated), D = C*H*W, standard normal under the model.

Why our own flow and not normflows (1.7.3 installs here, pure Python): its ``MultiscaleFlow`` keeps
the latent as a list per level with class-conditional base distributions, and its modules carry no
constructor config, so a checkpoint could not rebuild them with ``checkpoint.load_module``; the
RealNVP below is ~150 lines, needs no new dependency, and its latent is the flat vector the
counterfactual search steps in.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from genxai.config import load_config
from genxai.core.checks import check_positive_int
from genxai.data.config import DataConfig, build_dataset, check_images_match, validate_data
from genxai.training import Loop, LoopConfig, TrainStep, checkpoint
from genxai.training.step import BOOKKEEPING

FLOW = "flow"
ALPHA = 0.05  # logit transform of [0, 1] pixels: logit(ALPHA + (1 - 2 ALPHA) x)
LOG_2PI = math.log(2 * math.pi)


def squeeze(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    x = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, 4 * c, h // 2, w // 2)


def unsqueeze(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    x = x.view(n, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(n, c // 4, 2 * h, 2 * w)


class Coupling(nn.Module):
    """Affine coupling ``y = x_a, x_b * exp(s(x_a)) + t(x_a)`` with a checkerboard or channel mask;
    ``s = scale * tanh(.)``, last conv zero-initialised (the identity at the start)."""

    def __init__(self, channels: int, hidden: int, kind: str, parity: int, size: int):
        super().__init__()
        if kind == "checker":
            grid = torch.arange(size).view(-1, 1) + torch.arange(size).view(1, -1)
            mask = ((grid + parity) % 2).float().expand(channels, size, size)
        else:
            mask = torch.zeros(channels, size, size)
            mask[parity * (channels // 2) : (parity + 1) * (channels // 2)] = 1
        self.register_buffer("mask", mask[None].clone(), persistent=False)
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, 1, 1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1),
            nn.ReLU(),
            nn.Conv2d(hidden, 2 * channels, 3, 1, 1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))

    def _st(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.net(x * self.mask).chunk(2, dim=1)
        free = 1 - self.mask
        return self.scale * torch.tanh(s) * free, t * free

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self._st(x)
        return x * torch.exp(s) + t, s.flatten(1).sum(1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        s, t = self._st(y)  # the kept half is unchanged, so s and t are those of the forward pass
        return (y - t) * torch.exp(-s)


class RealNVP(nn.Module):
    """Multiscale RealNVP on (channels, image_size, image_size) images in [0, 1]; ``levels`` scales."""

    def __init__(
        self, channels: int = 3, image_size: int = 16, levels: int = 2, hidden: int = 64, couplings: int = 3
    ):
        super().__init__()
        check_positive_int(levels, "levels")
        if image_size % 2 ** (levels - 1) or image_size // 2 ** (levels - 1) < 2:
            raise ValueError(
                f"image_size: a {levels}-level flow needs a side divisible by {2 ** (levels - 1)} and at "
                f"least {2**levels}, got {image_size}"
            )
        self.config = {
            "channels": channels,
            "image_size": image_size,
            "levels": levels,
            "hidden": hidden,
            "couplings": couplings,
        }
        self.stages = nn.ModuleList()
        c, size = channels, image_size
        self.split_shapes: list[tuple[int, int, int]] = []
        for level in range(levels):
            last = level == levels - 1
            checker = [Coupling(c, hidden, "checker", i % 2, size) for i in range(couplings + last)]
            channel = (
                []
                if last
                else [Coupling(4 * c, hidden, "channel", i % 2, size // 2) for i in range(couplings)]
            )
            self.stages.append(nn.ModuleList([nn.ModuleList(checker), nn.ModuleList(channel)]))
            if not last:
                c, size = 2 * c, size // 2
                self.split_shapes.append((c, size, size))
        self.final_shape = (c, size, size)
        self.dim = channels * image_size * image_size

    def check_images(self, x: torch.Tensor) -> None:
        """Clear error when ``x`` is not (N, channels, image_size, image_size)."""
        c, s = self.config["channels"], self.config["image_size"]
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(f"x: the flow models images of shape (N, {c}, {s}, {s}), got {tuple(x.shape)}")

    def encode_with_logdet(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent (N, D) and ``log |det dz/dx|`` (N,) of images in [0, 1] (logit transform included)."""
        self.check_images(x)
        s = ALPHA + (1 - 2 * ALPHA) * x
        h = torch.log(s) - torch.log1p(-s)
        logdet = (math.log(1 - 2 * ALPHA) - torch.log(s) - torch.log1p(-s)).flatten(1).sum(1)
        parts = []
        for index, (checker, channel) in enumerate(self.stages):
            for layer in checker:
                h, ld = layer(h)
                logdet = logdet + ld
            if index == len(self.stages) - 1:
                break
            h = squeeze(h)
            for layer in channel:
                h, ld = layer(h)
                logdet = logdet + ld
            out, h = h.chunk(2, dim=1)
            parts.append(out.flatten(1))
        parts.append(h.flatten(1))
        return torch.cat(parts, 1), logdet

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_with_logdet(x)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images from latents (N, D): the exact inverse of :meth:`encode` (pixels in about [-0.06, 1.06])."""
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"z: expected latents of shape (N, {self.dim}), got {tuple(z.shape)}")
        sizes = [math.prod(s) for s in self.split_shapes]
        chunks = list(z.split([*sizes, math.prod(self.final_shape)], dim=1))
        h = chunks.pop().view(-1, *self.final_shape)
        for index in range(len(self.stages) - 1, -1, -1):
            checker, channel = self.stages[index]
            if index < len(self.stages) - 1:
                h = torch.cat([chunks.pop().view(-1, *self.split_shapes[index]), h], 1)
                for layer in reversed(channel):
                    h = layer.inverse(h)
                h = unsqueeze(h)
            for layer in reversed(checker):
                h = layer.inverse(h)
        return (torch.sigmoid(h) - ALPHA) / (1 - 2 * ALPHA)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log density (nats) of images in [0, 1]^D under the flow, (N,)."""
        z, logdet = self.encode_with_logdet(x)
        return -0.5 * (z.square() + LOG_2PI).sum(1) + logdet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Bits per dimension (the training loss), (N,)."""
        return self.bits_per_dim(x)

    def bits_per_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood in bits per dimension for 8-bit pixels, (N,) (lower: more likely)."""
        return (-self.log_prob(x) / self.dim + math.log(256)) / math.log(2)


@dataclass
class FlowModel:
    levels: int = 2
    hidden: int = 64
    couplings: int = 3


@dataclass
class FlowTrain:
    iterations: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    grad_clip: float = 100.0
    cpu: bool = False
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    progress: bool = True


@dataclass
class FlowConfig:
    """A flow run: the data and the RealNVP (``model.levels`` must fit ``data.image_size``)."""

    name: str = "flow"
    out_dir: str = "runs"
    seed: int = 0
    data: DataConfig = field(default_factory=lambda: DataConfig(random_flip=False))
    model: FlowModel = field(default_factory=FlowModel)
    train: FlowTrain = field(default_factory=FlowTrain)

    def __post_init__(self) -> None:
        validate_data(self.data)
        for key in ("levels", "hidden", "couplings"):
            check_positive_int(getattr(self.model, key), f"model.{key}")
        size, levels = self.data.image_size, self.model.levels
        if size % 2 ** (levels - 1) or size // 2 ** (levels - 1) < 2:
            raise ValueError(
                f"model.levels: {levels} levels need data.image_size divisible by {2 ** (levels - 1)} "
                f"and >= {2**levels}, got {size}"
            )
        t = self.train
        check_positive_int(t.iterations, "train.iterations")
        check_positive_int(t.batch_size, "train.batch_size")
        check_positive_int(t.warmup, "train.warmup", minimum=0)
        if not t.lr > 0:
            raise ValueError(f"train.lr: expected a number > 0, got {t.lr!r}")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


def load_flow_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> FlowConfig:
    """Defaults, then the YAML at ``path``, then dotted overrides (validated)."""
    return load_config(FlowConfig, path, overrides)


class FlowStep(TrainStep):
    """Maximum likelihood on uniformly dequantised images (noise from the loop's generator)."""

    columns = ("bpd",)
    resume_ignores = (*BOOKKEEPING, "train.iterations")

    def __init__(self, cfg: FlowConfig) -> None:
        self.cfg = self.config = copy.deepcopy(cfg)

    @property
    def total_iterations(self) -> int:
        return self.cfg.train.iterations

    def build(self, loop: Loop) -> None:
        cfg, t = self.cfg, self.cfg.train
        channels = check_images_match(cfg.data, loop.dataset)[0]
        m = cfg.model
        flow = RealNVP(channels, cfg.data.image_size, m.levels, m.hidden, m.couplings)
        optimizer = torch.optim.Adam(flow.parameters(), lr=t.lr)
        self.flow = loop.add_model(FLOW, flow, optimizer, grad_clip=t.grad_clip, warmup=t.warmup, counts=True)

    def __call__(self, loop: Loop, batch: torch.Tensor) -> None:
        x = batch.float()
        if self.cfg.data.random_flip:
            flip = torch.rand(x.shape[0], device=loop.device, generator=loop.generator) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        noise = torch.rand(x.shape, device=loop.device, generator=loop.generator)
        x = (x * 255 + noise) / 256
        bpd = self.flow(x).mean()  # forward = bits per dim, through the distributed wrapper
        loop.log_value("bpd", bpd)
        loop.optimize(FLOW, bpd)


class FlowTrainer(Loop):
    """The training loop with a :class:`FlowStep`; resumes the run folder's newest checkpoint."""

    def __init__(self, cfg: FlowConfig, *, dataset=None, resume: bool = True):
        if not isinstance(cfg, FlowConfig):
            raise TypeError(f"cfg: expected a FlowConfig, got {type(cfg).__name__}")
        config = LoopConfig.from_config(cfg)
        data = dataset if dataset is not None else build_dataset(cfg.data, cfg.seed)
        super().__init__(FlowStep(cfg), config, data, resume=resume)

    @property
    def flow(self) -> RealNVP:
        return self.unwrap(FLOW)


def load_flow(run_dir: str | Path, device: str | torch.device = "cpu") -> RealNVP:
    """The run's flow (newest checkpoint, or ``run_dir`` itself as a checkpoint folder), eval, frozen."""
    run_dir = Path(run_dir)
    path = (
        run_dir if (run_dir / f"{FLOW}.safetensors").is_file() else checkpoint.latest(run_dir / "checkpoints")
    )
    if path is None:
        raise FileNotFoundError(
            f"flow: no flow checkpoint in {run_dir} (train one with `genxai counterfactual train-flow`)"
        )
    return checkpoint.load_module(path, FLOW, RealNVP, device).eval().requires_grad_(False)
