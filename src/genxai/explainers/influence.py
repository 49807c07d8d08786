"""Influence: which training images most helped or hurt a prediction.

* Influence functions (Koh & Liang, ICML 2017): removing training point i from the objective
  ``mean_j L(z_j, theta) + l2/2 ||theta||^2`` changes the loss on a test point by about
  ``g_test^T H^{-1} g_i / n`` (H: the objective's Hessian, g: loss gradients). ``method="exact"``
  builds H (small models, or the last layers via ``params``); ``method="lissa"`` estimates
  ``H^{-1} g_test`` with LiSSA's stochastic recursion (Agarwal et al. 2017) from Hessian-vector
  products on mini-batches, never forming H.
* TracIn (Pruthi et al., NeurIPS 2020), TracInCP: ``sum_c lr_c g_c(test) . g_c(train)`` over saved
  checkpoints of the one training loop (:mod:`genxai.training.checkpoint`); lr_c is read from each
  checkpoint's optimiser state.

Both report *helpfulness*: positive when the training image lowered the test loss (a proponent),
negative when it raised it (an opponent). Per-sample gradients are ``torch.func.vmap(grad(...))``
over batches on the model's device (no Python loop over images), written by the project itself on
torch.func (no influence library is needed; pydvl is not installed here).

:class:`ClassifierStep` trains a :class:`~genxai.models.classifier.SmallResNet` on the training
loop, so the run's checkpoints (kept with ``keep_checkpoints``) are what TracIn reads.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, jvp, vmap

from genxai.core.checks import check_choice, check_positive_int
from genxai.core.modes import evaluation_mode
from genxai.explainers.examples import model_device
from genxai.models.classifier import ClassifierConfig, SmallResNet
from genxai.training import Loop, TrainStep
from genxai.training import checkpoint as ckpt

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss(outputs, labels) -> scalar`` (mean over the batch), e.g. ``F.cross_entropy``."""


class FlatModel:
    """A model as a function of one flat vector of the chosen parameters (the rest held fixed).

    ``params``: names or name prefixes of the parameters to differentiate (None: all trainable).
    """

    def __init__(self, model: nn.Module, params: Sequence[str] | None = None, loss_fn: LossFn | None = None):
        named = dict(model.named_parameters())
        if params is None:
            chosen = [n for n, p in named.items() if p.requires_grad]
        else:
            chosen = [n for n in named if any(n == p or n.startswith(p + ".") for p in params)]
            missing = [p for p in params if not any(n == p or n.startswith(p + ".") for n in named)]
            if missing:
                raise ValueError(
                    f"params: no parameters named {missing}; the model has {list(named)[:10]} ..."
                )
        if not chosen:
            raise ValueError("params: no trainable parameters selected")
        self.model, self.names = model, chosen
        self.shapes = [named[n].shape for n in chosen]
        self.sizes = [named[n].numel() for n in chosen]
        self.fixed = {n: p.detach() for n, p in named.items() if n not in chosen}
        self.fixed.update(dict(model.named_buffers()))
        self.loss_fn = loss_fn or F.cross_entropy

    @property
    def size(self) -> int:
        return sum(self.sizes)

    def vector(self) -> torch.Tensor:
        named = dict(self.model.named_parameters())
        return torch.cat([named[n].detach().flatten() for n in self.names])

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = theta.split(self.sizes)
        return {n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes)}

    def loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(self.model, {**self.fixed, **self.unflatten(theta)}, (x,))
        return self.loss_fn(out, y)

    def per_sample_grads(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, P) gradients of each image's loss, all at once (vmap over the batch)."""

        def one(t: torch.Tensor, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return self.loss(t, xi[None], yi[None])

        return vmap(grad(one), in_dims=(None, 0, 0))(theta, x, y)


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def per_sample_grads(
    flat: FlatModel, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """(N, P) per-image loss gradients, ``batch_size`` images per vmap call, on theta's device."""
    device = theta.device
    return torch.cat(
        [flat.per_sample_grads(theta, x[s].to(device), y[s].to(device)) for s in _batches(len(x), batch_size)]
    )


class InfluenceFunction:
    """Influence functions of a trained model on its training set.

    Args:
        model: the trained model (evaluated in eval mode).
        images, labels: the training set it was trained on.
        params: names or prefixes of the parameters to use (None: all; "fc" for the last layer).
        l2: the weight decay of the training objective (part of H).
        damping: added to H's diagonal (for non-convex models).
        method: "exact" (build H, P up to a few thousand) or "lissa".
        lissa_depth, lissa_scale, lissa_batch: LiSSA's recursion depth, the scale that must exceed
            H's largest eigenvalue (None: estimated by power iteration), and its mini-batch size.
    """

    def __init__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        params: Sequence[str] | None = None,
        loss_fn: LossFn | None = None,
        l2: float = 0.0,
        damping: float = 0.0,
        method: str = "exact",
        batch_size: int = 256,
        lissa_depth: int = 500,
        lissa_scale: float | None = None,
        lissa_batch: int = 128,
        seed: int = 0,
    ) -> None:
        check_choice(method, "method", ("exact", "lissa"))
        check_positive_int(batch_size, "batch_size")
        if len(images) == 0 or len(images) != len(labels):
            raise ValueError(
                f"labels: expected one label per training image, got {len(labels)} for {len(images)}"
            )
        self.model, self.images, self.labels = model, images, labels
        self.flat = FlatModel(model, params, loss_fn)
        self.theta = self.flat.vector()
        self.l2, self.damping, self.method, self.batch_size = float(l2), float(damping), method, batch_size
        self.lissa_depth, self.lissa_scale, self.lissa_batch, self.seed = (
            lissa_depth,
            lissa_scale,
            lissa_batch,
            seed,
        )
        if method == "exact" and self.flat.size > 20000:
            raise ValueError(
                f"method: the exact Hessian of {self.flat.size} parameters is too large; use method='lissa' "
                "or restrict params (e.g. params=['fc'])"
            )
        self._inverse: torch.Tensor | None = None

    def hessian(self) -> torch.Tensor:
        """(P, P) Hessian of the training objective (plus damping), accumulated over batches."""
        n, p = len(self.images), self.flat.size
        h = torch.zeros(p, p, device=self.theta.device, dtype=self.theta.dtype)
        with evaluation_mode(self.model):
            for s in _batches(n, self.batch_size):
                x, y = self.images[s].to(self.theta.device), self.labels[s].to(self.theta.device)
                h += hessian(self.flat.loss)(self.theta, x, y) * (len(x) / n)
        return h + (self.l2 + self.damping) * torch.eye(p, device=h.device, dtype=h.dtype)

    def _hvp(self, vectors: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(Q, P) products of the batch objective's Hessian with Q vectors (vmap over jvp of grad)."""
        g = grad(self.flat.loss)

        def one(v: torch.Tensor) -> torch.Tensor:
            return jvp(lambda t: g(t, x, y), (self.theta,), (v,))[1]

        return vmap(one)(vectors) + (self.l2 + self.damping) * vectors

    def _top_eigenvalue(self, x: torch.Tensor, y: torch.Tensor, iterations: int = 20) -> float:
        v = torch.randn(1, self.flat.size, device=self.theta.device, generator=self._generator()).to(
            self.theta.dtype
        )
        value = 1.0
        for _ in range(iterations):
            w = self._hvp(v / v.norm(), x, y)
            value, v = float(w.norm()), w
        return value

    def _generator(self) -> torch.Generator:
        return torch.Generator(self.theta.device).manual_seed(self.seed)

    def inverse_hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        """(Q, P) ``H^{-1} v`` for each row of ``vectors``."""
        with warnings.catch_warnings():  # torch's forward-mode AD scripts its decompositions once
            warnings.filterwarnings(
                "ignore", message=".*torch.jit.script.* is deprecated", category=FutureWarning
            )
            return self._inverse_hvp(vectors)

    def _inverse_hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        vectors = vectors.to(self.theta.device, self.theta.dtype)
        if self.method == "exact":
            if self._inverse is None:
                self._inverse = torch.linalg.inv(self.hessian())
            return vectors @ self._inverse.T
        n, gen = len(self.images), self._generator()
        with evaluation_mode(self.model):
            pick = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))[: self.lissa_batch]
            scale = self.lissa_scale or 1.2 * self._top_eigenvalue(
                self.images[pick].to(self.theta.device), self.labels[pick].to(self.theta.device)
            )
            h = vectors.clone()
            for _ in range(self.lissa_depth):  # h <- v + (I - H_batch / scale) h
                pick = torch.randperm(n, generator=gen, device=gen.device)[: self.lissa_batch].cpu()
                x, y = self.images[pick].to(self.theta.device), self.labels[pick].to(self.theta.device)
                h = vectors + h - self._hvp(h, x, y) / scale
        return h / scale

    def scores(self, test_images: torch.Tensor, test_labels: torch.Tensor) -> torch.Tensor:
        """(Q, N) helpfulness of each training image for each test image's loss.

        ``scores[q, i]`` is the predicted *increase* of test loss q when training image i is left
        out (``g_q^T H^{-1} g_i / n``): positive means it helped.
        """
        with evaluation_mode(self.model):
            test = per_sample_grads(self.flat, self.theta, test_images, test_labels.long(), self.batch_size)
            solved = self.inverse_hvp(test)
            n = len(self.images)
            out = []
            for s in _batches(n, self.batch_size):
                train = self.flat.per_sample_grads(
                    self.theta,
                    self.images[s].to(self.theta.device),
                    self.labels[s].to(self.theta.device).long(),
                )
                out.append(solved @ train.T / n)
        return torch.cat(out, dim=1)


# --- TracIn --------------------------------------------------------------------------------------


def checkpoint_lr(folder: str | Path, name: str) -> float:
    """The learning rate of model ``name``'s optimiser saved in a training-loop checkpoint."""
    state = ckpt.read_state(folder, "trainer")
    try:
        return float(state["optimizers"][name]["param_groups"][0]["lr"])
    except (KeyError, IndexError, TypeError):
        raise ValueError(
            f"checkpoints: {folder} holds no optimiser state for a model named {name!r}"
        ) from None


def resolve_checkpoints(checkpoints: str | Path | Sequence[str | Path]) -> list[Path]:
    """A run's checkpoint folders (a run folder, its ``checkpoints`` folder, or a list of them)."""
    if isinstance(checkpoints, (str, Path)):
        root = Path(checkpoints)
        found = ckpt.all_checkpoints(root) or ckpt.all_checkpoints(root / "checkpoints")
        if not found:
            raise FileNotFoundError(f"checkpoints: no training-loop checkpoints (ckpt-*) in {root}")
        return found
    return [Path(c) for c in checkpoints]


def tracin(
    model: nn.Module,
    checkpoints: str | Path | Sequence[str | Path],
    images: torch.Tensor,
    labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    name: str = "classifier",
    lrs: Sequence[float] | None = None,
    params: Sequence[str] | None = None,
    loss_fn: LossFn | None = None,
    batch_size: int = 256,
    normalize: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """(Q, N) TracInCP scores ``sum_c lr_c g_c(test_q) . g_c(train_i)`` over saved checkpoints.

    Args:
        model: a module of the trained architecture (its weights are not changed: a copy is loaded).
        checkpoints: a run folder or a list of at least two checkpoint folders of the training loop.
        name: the model's name in the checkpoints (``NAME.safetensors``).
        lrs: one learning rate per checkpoint (None: read from each checkpoint's optimiser state).
        normalize: gradients scaled to unit length per checkpoint (cosine similarity): the ranking
            is then not dominated by high-loss images and noisy checkpoints (a common variant; the
            paper's TracInCP is ``normalize=False``).
    """
    paths = resolve_checkpoints(checkpoints)
    if len(paths) < 2:
        raise ValueError(
            f"checkpoints: TracIn sums over the training trajectory and needs at least 2 checkpoints, got "
            f"{len(paths)}; save more often (train.checkpoint_every) and keep them (train.keep_checkpoints)"
        )
    if lrs is not None and len(lrs) != len(paths):
        raise ValueError(f"lrs: expected one learning rate per checkpoint ({len(paths)}), got {len(lrs)}")
    if len(images) != len(labels) or len(test_images) != len(test_labels):
        raise ValueError("labels: expected one label per image (training and test)")
    check_positive_int(batch_size, "batch_size")
    work = copy.deepcopy(model).eval()
    device = model_device(work)
    scores = torch.zeros(len(test_images), len(images), device=device)
    bar = _progress(len(paths) * len(range(0, len(images), batch_size)), progress)
    for c, path in enumerate(paths):
        work.load_state_dict(ckpt.read_weights(path, name, device))
        lr = lrs[c] if lrs is not None else checkpoint_lr(path, name)
        flat = FlatModel(work, params, loss_fn)
        theta = flat.vector()
        test = per_sample_grads(flat, theta, test_images, test_labels.long(), batch_size)
        test = F.normalize(test, dim=1) if normalize else test
        for s in _batches(len(images), batch_size):
            train = flat.per_sample_grads(theta, images[s].to(device), labels[s].to(device).long())
            train = F.normalize(train, dim=1) if normalize else train
            scores[:, s] += lr * (test @ train.T)
            bar.update(1)
    bar.close()
    return scores


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="TracIn", disable=not enabled, leave=False)


def top_examples(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per test image: the ``k`` most helpful (largest) and most harmful (smallest) training indices."""
    k = min(k, scores.shape[1])
    return scores.topk(k, dim=1).indices, scores.topk(k, dim=1, largest=False).indices


# --- a classifier on the training loop (the checkpoints TracIn reads) ---------------------------


@dataclass
class ClassifierRunConfig:
    """A :class:`SmallResNet` trained with SGD on the training loop."""

    classes: int = 3
    channels: int = 3
    image_size: int = 32
    width: int = 8
    lr: float = 0.05
    momentum: float = 0.0
    iterations: int = 200
    class_names: list[str] = field(default_factory=list)


class ClassifierStep(TrainStep):
    """Cross-entropy on (image, label) batches; the model is registered as ``classifier``."""

    columns = ("loss",)
    resume_ignores = ("iterations",)  # a run may be continued for more steps

    def __init__(self, cfg: ClassifierRunConfig) -> None:
        self.config = cfg

    @property
    def total_iterations(self) -> int:
        return self.config.iterations

    def build(self, loop: Loop) -> None:
        c = self.config
        net = _network(c)
        opt = torch.optim.SGD(net.parameters(), lr=c.lr, momentum=c.momentum)
        self.net = loop.add_model("classifier", net, opt, counts=True)

    def collate(self, items: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([i[0] for i in items]), torch.as_tensor([int(i[1]) for i in items])

    def __call__(self, loop: Loop, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        loop.log_value("loss", loss)
        loop.optimize("classifier", loss)


def load_run_classifier(
    folder: str | Path, cfg: ClassifierRunConfig, device: str | torch.device = "cpu"
) -> SmallResNet:
    """The classifier of a loop checkpoint folder, in eval mode."""
    net = _network(cfg)
    net.load_state_dict(ckpt.read_weights(folder, "classifier"))
    return net.to(device).eval()


def _network(c: ClassifierRunConfig) -> SmallResNet:
    return SmallResNet(
        ClassifierConfig(
            classes=c.classes,
            channels=c.channels,
            width=c.width,
            image_size=c.image_size,
            class_names=list(c.class_names),
        )
    )
