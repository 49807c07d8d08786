"""Training a DCGAN on the project's one training loop.

    cfg = load_gan_config("gan-shapes", ["name=short", "train.iterations=500"])
    summary = GANTrainer(cfg).fit()
    g = load_generator(cfg.run_dir)            # the EMA generator, ready to dissect

The method is :class:`GANStep`, a :class:`~genxai.training.TrainStep`: each iteration draws one
batch of latents, makes fakes once, then takes one D step (non-saturating loss on reals against
the detached fakes, optional R1 on the reals) and one G step (non-saturating loss through the
just-updated D, whose parameters are frozen meanwhile so no gradient accumulates in them). G's
optimiser steps are the run's units; G has an EMA (:class:`genxai.training.EMA`). The loop
(:class:`genxai.training.Loop`) brings Accelerate, exact resume, SIGTERM save, the NaN stop, logs
and the progress bar.

Run folder: ``config.yaml``, ``metrics.csv`` (losses, R1, D's mean probabilities of real and fake),
``evals.jsonl`` (FID when ``eval.num_samples`` > 0), ``tb/``, ``checkpoints/`` (``generator``,
``generator_ema``, ``discriminator``), ``samples/`` (grids of fixed latents over training).
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision.utils import save_image

from genxai.data.config import check_images_match
from genxai.evaluation.fid import FID, reference_fid
from genxai.gan.config import GANConfig, build_dataset, build_discriminator, build_generator
from genxai.gan.losses import discriminator_loss, generator_loss
from genxai.gan.models import Generator
from genxai.gan.pipeline import DISCRIMINATOR, GENERATOR, sample
from genxai.training import EMA, Event, Loop, LoopConfig, NonFiniteLossError, TrainStep
from genxai.training.step import BOOKKEEPING

__all__ = ["GANStep", "GANTrainer", "NonFiniteLossError"]

EVAL_SEED_OFFSET = 12345  # FID samples use seed + this, the grids the run's seed


@contextmanager
def frozen(module: nn.Module):
    """Parameters of ``module`` without gradients inside the block (restored after)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


class GANStep(TrainStep):
    """A DCGAN with the non-saturating loss, R1 and an EMA of G, as a training step."""

    unit = "G step"
    units = "g_steps"
    columns = ("loss_d", "loss_g", "r1", "d_real", "d_fake")
    # Settings a resumed run may change: where things are, how often it reports, how long it runs
    # (nothing in training depends on the total), how it samples and evaluates.
    resume_ignores = (*BOOKKEEPING, "train.iterations")

    def __init__(self, cfg: GANConfig) -> None:
        self.cfg = self.config = copy.deepcopy(cfg)
        self._fid: FID | None = None

    @property
    def total_iterations(self) -> int:
        return self.cfg.train.iterations

    def describe(self, iteration: int) -> str:
        return "GAN"

    # -- models ----------------------------------------------------------------------------------
    def build(self, loop: Loop) -> None:
        cfg, tr = self.cfg, self.cfg.train
        self.loop = loop
        check_images_match(cfg.data, loop.dataset)
        g = build_generator(cfg, cfg.data.channels)
        d = build_discriminator(cfg, cfg.data.channels)
        betas = (float(tr.betas[0]), float(tr.betas[1]))
        self.ema = EMA(g, tr.ema_decay, warmup=tr.ema_warmup)
        g_opt = torch.optim.Adam(g.parameters(), lr=tr.lr_g, betas=betas)
        d_opt = torch.optim.Adam(d.parameters(), lr=tr.lr_d, betas=betas)
        self.generator = loop.add_model(
            GENERATOR, g, g_opt, ema=self.ema, grad_clip=tr.grad_clip, counts=True
        )
        self.discriminator = loop.add_model(DISCRIMINATOR, d, d_opt, grad_clip=tr.grad_clip)

    @property
    def sampling_generator(self) -> Generator:
        """The generator grids and evaluations sample: the EMA copy unless ``sample.use_ema`` is off."""
        return self.ema.module if self.cfg.sample.use_ema else self.loop.unwrap(GENERATOR)

    # -- one iteration ---------------------------------------------------------------------------
    def __call__(self, loop: Loop, batch: torch.Tensor) -> None:
        cfg = self.cfg
        real = batch.float() * 2 - 1
        if cfg.data.random_flip:
            flip = torch.rand(real.shape[0], device=loop.device, generator=loop.generator) < 0.5
            real = torch.where(flip.view(-1, 1, 1, 1), real.flip(-1), real)
        z = torch.randn(real.shape[0], cfg.model.latent_dim, device=loop.device, generator=loop.generator)
        fake = self.generator(z)

        d_out = discriminator_loss(self.discriminator, real, fake, r1_weight=cfg.train.r1_weight)
        loop.optimize(DISCRIMINATOR, d_out.loss)
        with frozen(loop.unwrap(DISCRIMINATOR)) as d:  # not the DDP wrapper: no gradient sync for D
            loss_g = generator_loss(d, fake)
        loop.optimize(GENERATOR, loss_g)

        loop.log_value("loss_d", d_out.loss)
        loop.log_value("loss_g", loss_g)
        if d_out.r1 is not None:
            loop.log_value("r1", d_out.r1)
        loop.log_value("d_real", torch.sigmoid(d_out.real_logits).mean())
        loop.log_value("d_fake", torch.sigmoid(d_out.fake_logits).mean())

    # -- events: sample grids and evaluation -----------------------------------------------------
    def events(self) -> list[Event]:
        tr = self.cfg.train
        events = [Event("samples", tr.sample_every, self.sample_grid, at_end=True)]
        if self.cfg.eval.num_samples:
            events.append(Event("eval", tr.eval_every, self.evaluate, at_end=True))
        return events

    def before_fit(self, loop: Loop) -> None:
        if self.cfg.eval.num_samples:
            self.reference()  # missing FID weights fail now, not after training

    def sample_grid(self) -> None:
        """Save ``samples/iter_XXXXXXXX.png``: the images of the same seeded latents at every call
        (run through :meth:`Loop.on_main`)."""
        cfg, loop = self.cfg, self.loop
        count = min(64, cfg.sample.num_images)
        grid = torch.cat(list(sample(self.sampling_generator, count, seed=cfg.seed, batch_size=count)))
        folder = loop.run_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        nrow = max(1, int(math.sqrt(count) + 0.5))
        save_image(grid, folder / f"iter_{loop.iteration:08d}.png", nrow=nrow)

    def reference(self) -> FID:
        """The FID metric holding the real images' statistics (computed once)."""
        if self._fid is None:
            self._fid = reference_fid(self.cfg, self.loop.dataset, self.loop.device, self.loop.run_dir)
        return self._fid

    def evaluate(self) -> dict[str, float]:
        """FID (and IS where available) of ``eval.num_samples`` samples against the data."""
        e = self.cfg.eval
        if not e.num_samples:
            raise ValueError("eval.num_samples: expected the number of images to evaluate (> 0), got 0")
        fid = self.reference()
        fid.reset_fake()
        seed = self.cfg.seed + EVAL_SEED_OFFSET
        for batch in sample(self.sampling_generator, e.num_samples, seed=seed, batch_size=e.batch_size):
            fid.update(batch, real=False)
        return fid.compute()


class GANTrainer(Loop):
    """Trains the GAN of a :class:`GANConfig`: the training loop with a :class:`GANStep`; resumes
    from the run folder's newest checkpoint.

    Args:
        cfg: the run (``cfg.run_dir`` is the run folder).
        dataset: images in [0, 1] (items ``(image, label[, mask])`` or bare images); default: the
            configured one from :func:`genxai.data.get_dataset`.
        resume: continue from the newest checkpoint in the run folder when there is one.
    """

    def __init__(self, cfg: GANConfig, *, dataset: Dataset | None = None, resume: bool = True):
        if not isinstance(cfg, GANConfig):
            raise TypeError(f"cfg: expected a GANConfig, got {type(cfg).__name__}")
        config = LoopConfig.from_config(cfg)
        data = dataset if dataset is not None else build_dataset(cfg)
        super().__init__(GANStep(cfg), config, data, resume=resume)

    @property
    def cfg(self) -> GANConfig:
        return self.step.cfg

    @property
    def g(self) -> Generator:
        """G as trained, without its distributed wrapper (``generator`` is the loop's RNG)."""
        return self.unwrap(GENERATOR)

    @property
    def ema_generator(self) -> Generator:
        """The EMA of G (what the run samples and :func:`load_generator` returns)."""
        return self.step.ema.module

    @property
    def discriminator(self) -> nn.Module:
        return self.unwrap(DISCRIMINATOR)

    @property
    def g_steps(self) -> int:
        return self.units

    def sample_grid(self) -> None:
        """Save a sample grid now (main process)."""
        self.on_main(self.step.sample_grid)

    def evaluate(self) -> dict[str, float] | None:
        """FID now (main process; None on the others)."""
        return self.on_main(self.step.evaluate)
