"""GANMEX (Shih et al., 2021): a class translator trained against the classifier gives the baseline
of Integrated Gradients (and any method with a ``baseline=`` argument).

    cfg = load_config(GANMEXConfig, None, ["classifier=runs/clf", "train.iterations=2000"])
    GANMEXTrainer(cfg).fit()                                   # the project's one training loop
    g = load_translator(cfg.run_dir)
    base = ganmex_baseline(g, classifier, x, target)           # G(x, runner-up class)
    table = compare_baselines(classifier, x, target, {"ganmex": base, **standard_baselines(x)})

The translator ``G(x, c)`` is StarGAN-like (one network, the target class as extra one-hot input
planes) and trained for ``argmin |x - x'|_1 - log R(x') - log S_c(x')``: an L1 term keeps the
translation minimal, a discriminator ``R`` keeps it realistic (non-saturating loss), the *fixed*
classifier being explained gives the class term ``S_c`` (cross-entropy to c), and StarGAN's cycle
loss ``|G(G(x, c), y) - x|_1`` keeps what the class does not explain. G outputs ``x + residual``
clipped to [0, 1], so a zero residual is the identity.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genxai.attribution import build as build_method
from genxai.config import load_config
from genxai.core.checks import check_positive_int
from genxai.core.maps import gaussian_blur
from genxai.data.config import DataConfig, build_dataset, check_images_match, validate_data
from genxai.evaluation import AverageDrop, Deletion, Insertion
from genxai.models.classifier import load_classifier
from genxai.training import Loop, LoopConfig, TrainStep, checkpoint
from genxai.training.step import BOOKKEEPING

TRANSLATOR, CRITIC = "translator", "critic"


class ClassTranslator(nn.Module):
    """StarGAN-style G(x, c): conv encoder (/2), residual blocks, decoder; output ``clip(x + r, 0, 1)``."""

    def __init__(self, channels: int = 3, classes: int = 6, width: int = 32, blocks: int = 2):
        super().__init__()
        self.config = {"channels": channels, "classes": classes, "width": width, "blocks": blocks}
        self.classes = classes
        self.encode = nn.Sequential(
            nn.Conv2d(channels + classes, width, 3, 1, 1),
            nn.InstanceNorm2d(width, affine=True),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 4, 2, 1),
            nn.InstanceNorm2d(2 * width, affine=True),
            nn.ReLU(),
        )
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(2 * width, 2 * width, 3, 1, 1),
                nn.InstanceNorm2d(2 * width, affine=True),
                nn.ReLU(),
                nn.Conv2d(2 * width, 2 * width, 3, 1, 1),
                nn.InstanceNorm2d(2 * width, affine=True),
            )
            for _ in range(blocks)
        )
        self.decode = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1),
            nn.InstanceNorm2d(width, affine=True),
            nn.ReLU(),
            nn.Conv2d(width, channels, 3, 1, 1),
        )

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [0, 1] translated to the classes ``target`` (N,)."""
        onehot = F.one_hot(target.long(), self.classes).to(x.dtype)
        h = self.encode(torch.cat([x, onehot[:, :, None, None].expand(-1, -1, *x.shape[-2:])], 1))
        for block in self.blocks:
            h = h + block(h)
        return (x + torch.tanh(self.decode(h))).clamp(0, 1)


class TranslatorCritic(nn.Module):
    """The realism critic R: strided convs with LeakyReLU (not in place), one logit per image."""

    def __init__(self, channels: int = 3, width: int = 32, image_size: int = 16):
        super().__init__()
        self.config = {"channels": channels, "width": width, "image_size": image_size}
        layers: list[nn.Module] = []
        c, size = channels, image_size
        while size > 4:
            layers += [nn.Conv2d(c, width, 4, 2, 1), nn.LeakyReLU(0.2)]
            c, width, size = width, min(2 * width, 256), size // 2
        layers += [nn.Flatten(), nn.Linear(c * size * size, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1).view(-1)


@dataclass
class GANMEXModel:
    width: int = 32
    blocks: int = 2
    critic_width: int = 32


@dataclass
class GANMEXTrain:
    """Loss weights follow GANMEX's objective: L1 (minimal), class (S_c), adversarial (R), cycle."""

    iterations: int = 2000
    batch_size: int = 32
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    class_weight: float = 1.0
    l1_weight: float = 10.0
    cycle_weight: float = 10.0
    adv_weight: float = 1.0
    cpu: bool = False
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    progress: bool = True


@dataclass
class GANMEXConfig:
    """A GANMEX run: the data, the classifier to explain (a ``save_classifier`` folder), G and R."""

    name: str = "ganmex"
    out_dir: str = "runs"
    seed: int = 0
    classifier: str = ""
    data: DataConfig = field(default_factory=lambda: DataConfig(random_flip=False))
    model: GANMEXModel = field(default_factory=GANMEXModel)
    train: GANMEXTrain = field(default_factory=GANMEXTrain)

    def __post_init__(self) -> None:
        validate_data(self.data, min_size=8)
        if self.data.image_size % 2:
            raise ValueError(f"data.image_size: expected an even size, got {self.data.image_size}")
        for key in ("width", "blocks", "critic_width"):
            check_positive_int(getattr(self.model, key), f"model.{key}")
        t = self.train
        check_positive_int(t.iterations, "train.iterations")
        check_positive_int(t.batch_size, "train.batch_size")
        for key in ("lr", "class_weight", "l1_weight", "cycle_weight", "adv_weight"):
            value = getattr(t, key)
            if not value >= 0 or (key == "lr" and not value > 0):
                raise ValueError(f"train.{key}: expected a number >= 0 (lr > 0), got {value!r}")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


def load_ganmex_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> GANMEXConfig:
    """Defaults, then the YAML at ``path``, then dotted overrides; ``classifier`` is required."""
    cfg = load_config(GANMEXConfig, path, overrides)
    if not cfg.classifier:
        raise ValueError("classifier: expected the folder of a saved classifier (classifier=PATH)")
    return cfg


def random_other_class(labels: torch.Tensor, classes: int, generator: torch.Generator) -> torch.Tensor:
    """A class != label for each image, uniform over the others."""
    shift = torch.randint(1, classes, labels.shape, device=labels.device, generator=generator)
    return (labels + shift) % classes


class GANMEXStep(TrainStep):
    """One D step (realism of real vs translated images) and one G step (GANMEX's objective)."""

    unit = "G step"
    units = "g_steps"
    columns = ("loss_d", "loss_g", "class_ce", "l1", "cycle", "hit_rate")
    resume_ignores = (*BOOKKEEPING, "train.iterations")

    def __init__(self, cfg: GANMEXConfig) -> None:
        self.cfg = self.config = copy.deepcopy(cfg)

    @property
    def total_iterations(self) -> int:
        return self.cfg.train.iterations

    def collate(self, items: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([item[0] for item in items]).float()
        return images, torch.as_tensor([int(item[1]) for item in items])

    def build(self, loop: Loop) -> None:
        cfg, tr = self.cfg, self.cfg.train
        channels = check_images_match(cfg.data, loop.dataset)[0]
        self.classifier = frozen_classifier(cfg.classifier, loop.device)
        c = self.classifier.config
        if c.channels != channels or c.image_size != cfg.data.image_size:
            raise ValueError(
                f"classifier: it takes {c.channels}x{c.image_size}x{c.image_size} images, the data is "
                f"{channels}x{cfg.data.image_size}x{cfg.data.image_size}"
            )
        self.classes = c.classes
        if self.classes < 2:
            raise ValueError("classifier: GANMEX needs at least two classes")
        g = ClassTranslator(channels, self.classes, cfg.model.width, cfg.model.blocks)
        d = TranslatorCritic(channels, cfg.model.critic_width, cfg.data.image_size)
        betas = (float(tr.betas[0]), float(tr.betas[1]))
        self.g = loop.add_model(
            TRANSLATOR, g, torch.optim.Adam(g.parameters(), tr.lr, betas=betas), counts=True
        )
        self.d = loop.add_model(CRITIC, d, torch.optim.Adam(d.parameters(), tr.lr, betas=betas))

    def __call__(self, loop: Loop, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        tr = self.cfg.train
        x, y = batch
        if int(y.max()) >= self.classes or int(y.min()) < 0:
            raise ValueError(f"data: labels must lie in 0..{self.classes - 1} (the classifier's classes)")
        c = random_other_class(y, self.classes, loop.generator)
        fake = self.g(x, c)
        loss_d = F.softplus(-self.d(x)).mean() + F.softplus(self.d(fake.detach())).mean()
        loop.optimize(CRITIC, loss_d)

        critic = loop.unwrap(CRITIC)
        flags = [p.requires_grad for p in critic.parameters()]
        critic.requires_grad_(False)
        try:
            adv = F.softplus(-critic(fake)).mean()
        finally:
            for p, flag in zip(critic.parameters(), flags):
                p.requires_grad_(flag)
        logits = self.classifier(fake)
        class_ce = F.cross_entropy(logits, c)
        l1 = (fake - x).abs().mean()
        cycle = (self.g(fake, y) - x).abs().mean()
        loss_g = (
            tr.adv_weight * adv + tr.class_weight * class_ce + tr.l1_weight * l1 + tr.cycle_weight * cycle
        )
        loop.optimize(TRANSLATOR, loss_g)
        for name, value in (("loss_d", loss_d), ("loss_g", loss_g), ("class_ce", class_ce), ("l1", l1)):
            loop.log_value(name, value)
        loop.log_value("cycle", cycle)
        loop.log_value("hit_rate", (logits.argmax(1) == c).float().mean())


def frozen_classifier(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A saved classifier in eval mode with frozen parameters (what GANMEX and counterfactuals explain)."""
    return load_classifier(path, device).eval().requires_grad_(False)


class GANMEXTrainer(Loop):
    """The training loop with a :class:`GANMEXStep`; resumes the run folder's newest checkpoint."""

    def __init__(self, cfg: GANMEXConfig, *, dataset=None, resume: bool = True):
        if not isinstance(cfg, GANMEXConfig):
            raise TypeError(f"cfg: expected a GANMEXConfig, got {type(cfg).__name__}")
        if not cfg.classifier:
            raise ValueError("classifier: expected the folder of a saved classifier (classifier=PATH)")
        config = LoopConfig.from_config(cfg)
        data = dataset if dataset is not None else build_dataset(cfg.data, cfg.seed)
        super().__init__(GANMEXStep(cfg), config, data, resume=resume)

    @property
    def translator(self) -> ClassTranslator:
        return self.unwrap(TRANSLATOR)


def load_translator(run_dir: str | Path, device: str | torch.device = "cpu") -> ClassTranslator:
    """The run's translator G (newest checkpoint, or ``run_dir`` itself as a checkpoint folder), frozen."""
    run_dir = Path(run_dir)
    path = run_dir if (run_dir / f"{TRANSLATOR}.safetensors").is_file() else None
    path = path or checkpoint.latest(run_dir / "checkpoints")
    if path is None:
        raise FileNotFoundError(
            f"run: no GANMEX checkpoint in {run_dir} (train one with `genxai ganmex train`)"
        )
    module = checkpoint.load_module(path, TRANSLATOR, ClassTranslator, device)
    return module.eval().requires_grad_(False)


def as_classes(value: torch.Tensor | int, n: int, device: torch.device) -> torch.Tensor:
    """An int or (N,) tensor of classes as a (N,) long tensor on ``device``."""
    value = torch.as_tensor(value, device=device).long()
    if value.ndim == 0:
        return value.expand(n).clone()
    if value.shape != (n,):
        raise ValueError(f"target: expected an int or {n} classes, got shape {tuple(value.shape)}")
    return value


@torch.no_grad()
def runner_up(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """For each image, the most likely class other than ``target`` (GANMEX's default baseline class)."""
    logits = model(x).float()
    logits.scatter_(1, target.view(-1, 1), float("-inf"))
    return logits.argmax(1)


@torch.no_grad()
def ganmex_baseline(
    translator: ClassTranslator,
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor | int,
    baseline_class: torch.Tensor | int | None = None,
    *,
    batch_size: int = 256,
) -> torch.Tensor:
    """GANMEX baselines: ``x`` translated to ``baseline_class`` (default: the runner-up class).

    The translator must match the images (channels) and the classifier (classes); batched.
    """
    if x.ndim != 4 or x.shape[1] != translator.config["channels"]:
        raise ValueError(
            f"x: the translator takes {translator.config['channels']}-channel images (N, C, H, W), got "
            f"{tuple(x.shape)}"
        )
    n, classes = x.shape[0], translator.classes
    target = as_classes(target, n, x.device)
    if baseline_class is None:
        other = torch.cat(
            [
                runner_up(model, x[i : i + batch_size], target[i : i + batch_size])
                for i in range(0, n, batch_size)
            ]
        )
    else:
        other = as_classes(baseline_class, n, x.device)
    if int(other.min()) < 0 or int(other.max()) >= classes:
        raise ValueError(
            f"baseline_class: expected a class in 0..{classes - 1}, got {other.unique().tolist()}"
        )
    device = next(translator.parameters()).device
    parts = [
        translator(x[i : i + batch_size].to(device), other[i : i + batch_size].to(device)).to(x.device)
        for i in range(0, n, batch_size)
    ]
    return torch.cat(parts)


def standard_baselines(
    x: torch.Tensor, *, seed: int = 0, sigma: float | None = None
) -> dict[str, torch.Tensor]:
    """The usual baselines to compare with: zero (black), blur (Gaussian, sigma = side / 8) and
    uniform noise in [0, 1] (seeded)."""
    sigma = sigma if sigma is not None else max(1.0, x.shape[-1] / 8)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed)).to(x.device, x.dtype)
    return {
        "zero": torch.zeros_like(x),
        "blur": gaussian_blur(x, sigma, padding="reflect"),
        "uniform": noise,
    }


def baseline_methods() -> list[str]:
    """Registered attribution methods whose ``attribute`` takes a ``baseline=`` argument."""
    from genxai.attribution import get, names

    return [n for n in names() if "baseline" in inspect.signature(get(n).attribute).parameters]


def check_baseline_methods(methods: Sequence[str]) -> None:
    """Fail early, naming the accepted ones, when a method takes no ``baseline=``."""
    from genxai.attribution import get

    accepted = baseline_methods()
    if not methods:
        raise ValueError(f"methods: expected at least one of {', '.join(accepted)}")
    for method in methods:
        if get(method) not in {get(name) for name in accepted}:
            raise ValueError(
                f"methods: {method!r} takes no baseline; methods with one: {', '.join(accepted)}"
            )


def compare_baselines(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    baselines: Mapping[str, torch.Tensor],
    *,
    methods: Sequence[str] = ("integratedgradients",),
    options: Mapping[str, Mapping[str, Any]] | None = None,
    steps: int = 32,
    batch_size: int = 256,
) -> tuple[list[dict[str, Any]], dict[tuple[str, str], torch.Tensor]]:
    """Explain ``model`` on ``x`` with each method and baseline; score the maps with deletion AUC
    (RISE; removed pixels set to 0, to the blurred image: ``deletion_auc_blur``, and to the
    baseline the map was made with: ``deletion_auc_own``), insertion AUC
    (from the blurred image) and Average Drop.

    Returns one record per (method, baseline) and the maps (channels summed, (N, 1, H, W)).
    """
    check_baseline_methods(methods)
    records, maps = [], {}
    for method in methods:
        explainer = build_method(method, model, **dict((options or {}).get(method, {})))
        for name, base in baselines.items():
            if base.shape != x.shape:
                raise ValueError(f"baselines: {name!r} has shape {tuple(base.shape)}, x has {tuple(x.shape)}")
            heat = explainer(x, target, baseline=base).sum(1, keepdim=True)
            maps[(method, name)] = heat
            common = {"batch_size": batch_size, "sync_on_compute": False}
            scores = {}
            for label, metric in (
                ("deletion_auc", Deletion(model, steps=steps, **common)),
                ("deletion_auc_blur", Deletion(model, steps=steps, baseline="blur", **common)),
                ("deletion_auc_own", Deletion(model, steps=steps, baseline=base, **common)),
                ("insertion_auc", Insertion(model, steps=steps, **common)),
                ("average_drop", AverageDrop(model, **common)),
            ):
                metric.update(x, heat, target)
                scores[label] = metric.compute().mean
            records.append({"method": method, "baseline": name, **scores})
    return records, maps
