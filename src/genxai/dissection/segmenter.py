"""Segmenters: what dissection compares units against, and a small one for the bundled shapes data.

Dissection needs, for every generated image, a boolean mask per concept. Anything with these two
members is a segmenter (:class:`Segmenter`, a protocol: no base class to inherit)::

    class MySegmenter:
        concepts = ["sky", "tree", "door"]
        def concept_masks(self, images):      # (N, 3, H, W) in [0, 1]
            return masks                       # (N, len(concepts), H, W) bool, same H, W

Masks may overlap (a pixel can be "circle" and "stripes"). :class:`ShapesSegmenter` is a small
fully-convolutional U-Net for images like :mod:`genxai.data.shapes`: a shape head (background or
one of the shapes, per pixel) and a texture head (the object's fill, read on object pixels), so
its concepts are ``background``, every shape and every texture. It is trained through the one
training loop (:class:`SegmenterStep`, :func:`train_segmenter`) and scored on held-out images by
per-concept IoU (:func:`evaluate_segmenter`).

    summary = train_segmenter("runs/seg", SegmenterConfig(size=32, images=6000))
    seg = load_segmenter("runs/seg")
    masks = seg.concept_masks(images)            # (N, 11, H, W) bool
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from genxai.core.checks import check_in_range, check_positive_int
from genxai.data.shapes import SHAPES, TEXTURES, ShapesDataset, generate_shapes_with_attributes
from genxai.training import Loop, LoopConfig, TrainStep, checkpoint

WEIGHTS = "segmenter"
"""The segmenter's weights file in a training folder: ``DIR/segmenter.safetensors`` (with its config)."""


@runtime_checkable
class Segmenter(Protocol):
    """What dissection segments generated images with: concept names and their masks.

    ``concept_masks(images)`` takes (N, C, H, W) images in [0, 1] and returns (N, len(concepts),
    H, W) bool masks at the images' resolution.
    """

    concepts: list[str]

    def concept_masks(self, images: torch.Tensor) -> torch.Tensor: ...


def check_segmenter(segmenter: Any) -> list[str]:
    """The segmenter's concept names, after checking it has what :class:`Segmenter` requires."""
    concepts = getattr(segmenter, "concepts", None)
    if not callable(getattr(segmenter, "concept_masks", None)):
        raise ValueError(
            f"segmenter: expected an object with `concepts` and `concept_masks(images)`, got "
            f"{type(segmenter).__name__} without concept_masks"
        )
    if isinstance(concepts, (str, bytes)) or not isinstance(concepts, Sequence) or not concepts:
        raise ValueError(f"segmenter: expected `concepts` to be a non-empty list of names, got {concepts!r}")
    concepts = list(concepts)
    if not all(isinstance(c, str) and c for c in concepts):
        raise ValueError(f"segmenter: concept names must be non-empty strings, got {concepts}")
    repeated = sorted({c for c in concepts if concepts.count(c) > 1})
    if repeated:
        raise ValueError(f"segmenter: concept names must be unique, repeated: {repeated}")
    return concepts


def check_concept_masks(masks: Any, images: torch.Tensor, concepts: Sequence[str]) -> torch.Tensor:
    """A segmenter's answer for ``images``: (N, len(concepts), H, W) bool at the images' size."""
    n, _, h, w = images.shape
    expected = (n, len(concepts), h, w)
    if not isinstance(masks, torch.Tensor) or tuple(masks.shape) != expected:
        got = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise ValueError(
            f"segmenter: concept_masks must return (N, len(concepts), H, W) = {expected} for images "
            f"{tuple(images.shape)}, got {got}"
        )
    if masks.dtype != torch.bool:
        raise ValueError(f"segmenter: concept_masks must return a bool tensor, got dtype {masks.dtype}")
    return masks


def shapes_concepts(shapes: Sequence[str] = SHAPES, textures: Sequence[str] = TEXTURES) -> list[str]:
    """The concepts of shapes images: ``background``, each shape, each texture (on object pixels)."""
    return ["background", *shapes, *textures]


def shapes_concept_groups(
    shapes: Sequence[str] = SHAPES, textures: Sequence[str] = TEXTURES
) -> dict[str, str]:
    """Each shapes concept's kind (``scene``, ``shape``, ``texture``), e.g. to colour a bar chart."""
    return {"background": "scene", **dict.fromkeys(shapes, "shape"), **dict.fromkeys(textures, "texture")}


def shapes_concept_masks(
    labels: torch.Tensor, masks: torch.Tensor, textures: torch.Tensor, shapes: int
) -> torch.Tensor:
    """Ground-truth concept masks (N, 1 + shapes + len(TEXTURES), H, W) of shapes images.

    ``labels`` (N,) index the shapes, ``masks`` (N, 1, H, W) are the objects, ``textures`` (N,)
    index :data:`TEXTURES` (as from :func:`genxai.data.shapes.generate_shapes_with_attributes`).
    """
    obj = masks[:, 0].bool()
    shape_ids = torch.arange(shapes, device=labels.device)
    texture_ids = torch.arange(len(TEXTURES), device=labels.device)
    per_shape = (labels[:, None] == shape_ids)[:, :, None, None] & obj[:, None]
    per_texture = (textures[:, None] == texture_ids)[:, :, None, None] & obj[:, None]
    return torch.cat([~obj[:, None], per_shape, per_texture], dim=1)


def _check_shapes(shapes: Sequence[str]) -> list[str]:
    shapes = list(shapes)
    if not shapes or any(s not in SHAPES for s in shapes) or len(set(shapes)) != len(shapes):
        raise ValueError(f"shapes: expected distinct names among {', '.join(SHAPES)}, got {shapes}")
    return shapes


def _block(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 conv + GroupNorm + ReLU layers (per-image normalisation: a pixel's masks never
    depend on the other images of the batch, nor on running statistics of the training data)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.GroupNorm(math.gcd(8, cout), cout),
        nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.GroupNorm(math.gcd(8, cout), cout),
        nn.ReLU(),
    )


class ShapesSegmenter(nn.Module):
    """A small U-Net: images (N, channels, H, W) in [0, 1] -> shape logits (N, 1 + shapes, H, W)
    (class 0 = background) and texture logits (N, textures, H, W).

    A pixel's shape class depends on the whole object: ``depth`` halvings widen the view and the
    bottleneck adds a global-average-pooled context (ParseNet) to every position before decoding.
    Any H, W works (padded to a multiple of ``2 ** depth``).
    ``self.config`` holds the constructor arguments, so saved weights rebuild their module.
    """

    def __init__(
        self,
        shapes: Sequence[str] = SHAPES,
        textures: Sequence[str] = TEXTURES,
        width: int = 16,
        depth: int = 3,
        channels: int = 3,
    ) -> None:
        super().__init__()
        shapes, textures = _check_shapes(shapes), list(textures)
        if textures != list(TEXTURES):
            raise ValueError(f"textures: expected the data set's textures {list(TEXTURES)}, got {textures}")
        check_positive_int(width, "width")
        check_positive_int(depth, "depth")
        check_positive_int(channels, "channels")
        self.config = {
            "shapes": shapes,
            "textures": textures,
            "width": width,
            "depth": depth,
            "channels": channels,
        }
        self.shapes, self.textures, self.channels, self.depth = shapes, textures, channels, depth
        widths = [width * 2 ** min(i, 2) for i in range(depth + 1)]
        self.down = nn.ModuleList(
            [_block(channels if i == 0 else widths[i - 1], widths[i]) for i in range(depth + 1)]
        )
        self.context = nn.Sequential(nn.Linear(widths[-1], widths[-1]), nn.ReLU())
        self.image_head = nn.Linear(widths[-1], len(shapes) + len(textures))  # a training signal only
        self.up = nn.ModuleList(
            [_block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(depth))]
        )
        self.shape_head = nn.Conv2d(widths[0], 1 + len(shapes), 1)
        self.texture_head = nn.Conv2d(widths[0], len(textures), 1)

    @property
    def concepts(self) -> list[str]:
        return shapes_concepts(self.shapes, self.textures)

    @property
    def concept_groups(self) -> dict[str, str]:
        return shapes_concept_groups(self.shapes, self.textures)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Shape logits (N, 1 + shapes, H, W), texture logits (N, textures, H, W) and image-level
        logits (N, shapes + textures) of the pooled bottleneck: the image's shape and texture, an
        auxiliary target in training."""
        h, w = images.shape[-2:]
        step = 2**self.depth
        pad_h, pad_w = -h % step, -w % step
        x = (
            F.pad(images * 2 - 1, (0, pad_w, 0, pad_h), mode="replicate")
            if pad_h or pad_w
            else images * 2 - 1
        )
        skips = []
        for i, block in enumerate(self.down):
            x = block(F.max_pool2d(x, 2) if i else x)
            skips.append(x)
        pooled = x.mean((2, 3))
        x = x + self.context(pooled)[:, :, None, None]  # the whole image, for every pixel
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        x = x[..., :h, :w]
        return self.shape_head(x), self.texture_head(x), self.image_head(pooled)

    @torch.no_grad()
    def concept_masks(self, images: torch.Tensor) -> torch.Tensor:
        """(N, len(concepts), H, W) bool masks of (N, channels, H, W) images in [0, 1], on the
        images' device: the shape head's argmax, and each texture on pixels it calls object."""
        shape_logits, texture_logits = self._logits(images)
        device = shape_logits.device
        shape, texture = shape_logits.argmax(1), texture_logits.argmax(1)
        shape_ids = torch.arange(1, 1 + len(self.shapes), device=device)[None, :, None, None]
        texture_ids = torch.arange(len(self.textures), device=device)[None, :, None, None]
        obj = (shape != 0)[:, None]
        masks = torch.cat([~obj, shape[:, None] == shape_ids, obj & (texture[:, None] == texture_ids)], 1)
        return masks.to(images.device)

    def concept_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(N, len(concepts), H, W) soft masks, differentiable in the images: the shape head's
        softmax, and each texture's probability times the probability of "object". Their argmax
        per head gives :meth:`concept_masks` (for interventions that optimise a concept's area)."""
        shape_logits, texture_logits = self._logits(images)
        shape = shape_logits.softmax(1)
        texture = texture_logits.softmax(1) * (1 - shape[:, :1])
        return torch.cat([shape, texture], 1).to(images.device)

    def _logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shape and texture logits of checked images, computed in eval mode (modes restored)."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images: expected a float tensor (N, {self.channels}, H, W), got {got}")
        if images.shape[1] != self.channels:
            raise ValueError(
                f"images: the segmenter takes {self.channels}-channel images (shapes data), got "
                f"{images.shape[1]} channels in {tuple(images.shape)}"
            )
        low, high = float(images.detach().min()), float(images.detach().max())
        if low < -1e-3 or high > 1 + 1e-3:
            raise ValueError(
                f"images: expected values in [0, 1], got [{low:.3g}, {high:.3g}] "
                "(map [-1, 1] images with (x + 1) / 2)"
            )
        modes = [(m, m.training) for m in self.modules()]
        try:
            self.eval()
            device = next(self.parameters()).device
            shape_logits, texture_logits, _ = self(images.to(device, torch.float32))
        finally:
            for module, training in modes:
                module.training = training
        return shape_logits, texture_logits


# --- training -----------------------------------------------------------------------------------


@dataclass
class SegmenterConfig:
    """How the shapes segmenter is trained (saved as the run's ``config.yaml``)."""

    size: int = 32  # image side of the training images
    images: int = 6000  # training images (the held-out ones come from the test stream)
    iterations: int = 3000
    batch_size: int = 32
    lr: float = 3e-3  # Adam's, decayed to 0 as a cosine
    width: int = 16
    depth: int = 3
    texture_weight: float = 1.0  # weight of the texture loss (object pixels) against the shape loss
    image_weight: float = 1.0  # weight of the auxiliary image-level shape + texture loss
    shapes: list[str] = field(default_factory=lambda: list(SHAPES))
    eval_images: int = 1000  # held-out images for the mIoU
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_int(self.size, "size", minimum=8)
        check_positive_int(self.images, "images")
        check_positive_int(self.iterations, "iterations")
        check_positive_int(self.batch_size, "batch_size")
        check_in_range(self.lr, "lr", 0.0, 1.0, closed=False)
        check_positive_int(self.width, "width")
        check_positive_int(self.depth, "depth")
        check_in_range(self.texture_weight, "texture_weight", 0.0, 100.0)
        check_in_range(self.image_weight, "image_weight", 0.0, 100.0)
        check_positive_int(self.eval_images, "eval_images")
        check_positive_int(self.seed, "seed", minimum=0)
        if self.images < self.batch_size:
            raise ValueError(
                f"images: {self.images} training images are fewer than one batch of {self.batch_size}"
            )
        self.shapes = _check_shapes(self.shapes)


class SegmenterStep(TrainStep):
    """One Adam step on per-pixel cross-entropy: shape classes on every pixel, plus
    ``texture_weight`` x texture classes on object pixels, plus ``image_weight`` x the image's shape
    and texture from the pooled bottleneck (auxiliary supervision of the global context, as
    PSPNet's auxiliary loss: without it the shape classes are learnt several times slower); the
    learning rate decays as a cosine."""

    columns = ("loss", "shape_loss", "texture_loss", "image_loss")
    resume_ignores = ("eval_images",)

    def __init__(self, cfg: SegmenterConfig) -> None:
        self.config = cfg

    @property
    def total_iterations(self) -> int:
        return self.config.iterations

    def build(self, loop: Loop) -> None:
        cfg = self.config
        net = ShapesSegmenter(cfg.shapes, width=cfg.width, depth=cfg.depth)
        self.net = loop.add_model(
            "segmenter", net, torch.optim.Adam(net.parameters(), lr=cfg.lr), counts=True
        )

    def collate(self, items: list[Any]) -> tuple[torch.Tensor, ...]:
        """Images, per-pixel shape targets (0 = background), texture targets (-100 off the object)
        and the images' shape and texture labels."""
        images = torch.stack([item[0] for item in items])
        labels = torch.tensor([item[1] for item in items])
        masks = torch.stack([item[2][0] for item in items])
        textures = torch.tensor([item[3]["texture"] for item in items])
        shape_target = torch.where(masks, labels[:, None, None] + 1, 0)
        texture_target = torch.where(masks, textures[:, None, None], -100)
        return images, shape_target, texture_target, labels, textures

    def __call__(self, loop: Loop, batch: tuple[torch.Tensor, ...]) -> None:
        images, shape_target, texture_target, labels, textures = batch
        cfg = self.config
        shape_logits, texture_logits, image_logits = self.net(images)
        shape_loss = F.cross_entropy(shape_logits, shape_target)
        texture_loss = F.cross_entropy(texture_logits, texture_target, ignore_index=-100)
        shapes = len(cfg.shapes)
        image_loss = F.cross_entropy(image_logits[:, :shapes], labels) + F.cross_entropy(
            image_logits[:, shapes:], textures
        )
        loss = shape_loss + cfg.texture_weight * texture_loss + cfg.image_weight * image_loss
        loop.log_value("loss", loss)
        loop.log_value("shape_loss", shape_loss)
        loop.log_value("texture_loss", texture_loss)
        loop.log_value("image_loss", image_loss)
        progress = min(loop.units / self.config.iterations, 1.0)
        for group in loop.models["segmenter"].optimizer.param_groups:  # cosine decay to 0
            group["lr"] = self.config.lr * 0.5 * (1 + math.cos(math.pi * progress))
        loop.optimize("segmenter", loss)


def train_segmenter(
    out: str | Path, cfg: SegmenterConfig | None = None, *, cpu: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train the shapes segmenter in ``out`` (resuming its checkpoints), score it on held-out images
    and write ``out/segmenter.safetensors`` (weights + config) and ``out/segmenter.json`` (mIoU).

    Returns the loop's summary with ``evaluation`` (per-concept IoU and mIoU, see
    :func:`evaluate_segmenter`) once training has finished; an interrupted run (SIGTERM, Ctrl-C)
    keeps its checkpoint and resumes when called again.
    """
    cfg = cfg if cfg is not None else SegmenterConfig()
    data = ShapesDataset(cfg.images, cfg.size, cfg.seed, shapes=cfg.shapes, attributes=True)
    loop_cfg = LoopConfig(
        run_dir=out,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        log_every=max(1, min(50, cfg.iterations // 10)),
        checkpoint_every=max(cfg.iterations // 2, 1),
        cpu=cpu,
        progress=progress,
    )
    loop = Loop(SegmenterStep(cfg), loop_cfg, data)
    summary = loop.fit()
    if loop.is_main and summary["status"] == "finished":
        net = loop.unwrap("segmenter")
        checkpoint.write_weights(out, WEIGHTS, net.state_dict(), net.config)
        evaluation = evaluate_segmenter(
            net, images=cfg.eval_images, size=cfg.size, seed=cfg.seed, batch_size=max(cfg.batch_size, 100)
        )
        summary = {**summary, "evaluation": evaluation, "config": asdict(cfg)}
        (Path(out) / f"{WEIGHTS}.json").write_text(json.dumps(summary, indent=2))
    return summary


@torch.no_grad()
def evaluate_segmenter(
    segmenter: Segmenter,
    *,
    images: int = 1000,
    size: int = 32,
    seed: int = 0,
    batch_size: int = 100,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Per-concept IoU of ``segmenter`` on held-out shapes images (the test stream of ``seed``).

    Intersections and unions are summed over all images (streamed, ``batch_size`` at a time);
    ``miou`` is their mean over the concepts present. Works for any segmenter whose concepts are
    shapes concepts (:func:`shapes_concepts`).
    """
    concepts = check_segmenter(segmenter)
    check_positive_int(images, "images")
    check_positive_int(batch_size, "batch_size")
    shapes = [c for c in concepts if c in SHAPES] or list(SHAPES)
    truth_names = shapes_concepts(shapes)
    unknown = [c for c in concepts if c not in truth_names]
    if unknown:
        raise ValueError(f"segmenter: concepts {unknown} are not shapes concepts ({', '.join(truth_names)})")
    if device is None and isinstance(segmenter, nn.Module):
        device = next(segmenter.parameters()).device
    order = torch.tensor([truth_names.index(c) for c in concepts])
    inter = torch.zeros(len(concepts), dtype=torch.float64)
    union = torch.zeros(len(concepts), dtype=torch.float64)
    data_seed = 2 * seed + 1  # ShapesDataset(train=False)
    for start in range(0, images, batch_size):
        n = min(batch_size, images - start)
        x, labels, masks, attrs = generate_shapes_with_attributes(
            n, size, data_seed, start=start, shapes=shapes, device=device
        )
        truth = shapes_concept_masks(labels, masks, attrs["texture"], len(shapes))[:, order.to(labels.device)]
        pred = check_concept_masks(segmenter.concept_masks(x), x, concepts).to(truth.device)
        inter += (pred & truth).sum((0, 2, 3)).double().cpu()
        union += (pred | truth).sum((0, 2, 3)).double().cpu()
    present = union > 0
    iou = torch.where(present, inter / union.clamp_min(1), torch.nan)
    return {
        "iou": {c: float(v) for c, v in zip(concepts, iou.tolist())},
        "miou": float(iou[present].mean()) if bool(present.any()) else float("nan"),
        "images": images,
        "size": size,
    }


def load_segmenter(path: str | Path, device: torch.device | str = "cpu") -> ShapesSegmenter:
    """A :class:`ShapesSegmenter` from a training folder (``DIR/segmenter.safetensors``, else its
    newest checkpoint) or a ``.safetensors`` file written with its config."""
    path = Path(path)
    if path.suffix == ".safetensors":
        folder, name = path.parent, path.stem
    else:
        folder, name = path, WEIGHTS
        if not (path / f"{WEIGHTS}.safetensors").is_file():
            last = checkpoint.latest(path / "checkpoints")
            folder = last if last is not None else path
    if not (Path(folder) / f"{name}.safetensors").is_file():
        raise FileNotFoundError(
            f"segmenter: no {name}.safetensors in {folder}; train one with `genxai train-segmenter --out DIR`"
        )
    try:
        return checkpoint.load_module(folder, name, ShapesSegmenter, device).eval()
    except (TypeError, RuntimeError, KeyError) as err:
        raise ValueError(
            f"segmenter: {folder}/{name}.safetensors is not a shapes segmenter ({err})"
        ) from None


__all__ = [
    "Segmenter",
    "SegmenterConfig",
    "SegmenterStep",
    "ShapesSegmenter",
    "check_concept_masks",
    "check_segmenter",
    "evaluate_segmenter",
    "load_segmenter",
    "shapes_concept_groups",
    "shapes_concept_masks",
    "shapes_concepts",
    "train_segmenter",
]
