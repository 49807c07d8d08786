"""Discriminator Guidance (Kim et al., 2023) on a finished baseline run: the ablation's ``baseline+dg``.

    evaluate_dg(baseline_cfg, dataset)   # -> baseline_run/dg/: D, its checkpoints, result.json

The paper's recipe on our pieces: draw ``ablation.dg_fakes`` samples from the baseline's EMA model,
train a time-aware D (``genxai.diffusion.Discriminator`` with t as input) to tell noised real
images from noised samples at the same t ~ U{0..T-1}, through the one training loop (checkpoints,
exact resume), then sample with ``eps - sqrt(1 - abar_t) w grad log(D/(1-D))``
(:class:`~genxai.diffusion.guidance.DiscriminatorGuidance`, ``on="x_t"``) and evaluate with the
same metrics, seed and sample count as the training evaluation. Its cost (sampling, D training,
the extra D backward at every sampling step) is recorded beside the result.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from genxai.diffusion.config import ExperimentConfig, build_discriminator, build_schedule
from genxai.diffusion.discriminator import d_loss
from genxai.diffusion.guidance import discriminator_guidance
from genxai.diffusion.pipeline import load_run, sample_run
from genxai.evaluation.fid import reference_fid
from genxai.training import Loop, LoopConfig, TrainStep
from genxai.training.step import BOOKKEEPING

EVAL_SEED_OFFSET = 12345  # the training evaluation's sampling seed is cfg.seed + this


def dg_dir(cfg: ExperimentConfig) -> Path:
    return cfg.run_dir / "dg"


class DGDiscriminatorStep(TrainStep):
    """One D update on noised real images against noised samples of the baseline, same t."""

    columns = ("loss_d",)
    resume_ignores = BOOKKEEPING

    def __init__(self, cfg: ExperimentConfig, fakes: torch.Tensor) -> None:
        self.cfg = copy.deepcopy(cfg)
        self.cfg.discriminator.time_aware = True
        self.config = self.cfg
        self.fakes = fakes  # (N, C, H, W) in [-1, 1]
        self.schedule = build_schedule(self.cfg)

    @property
    def total_iterations(self) -> int:
        return self.cfg.ablation.dg_iterations

    def build(self, loop: Loop) -> None:
        d = self.cfg.discriminator
        net = build_discriminator(self.cfg, self.fakes.shape[1])
        opt = torch.optim.Adam(net.parameters(), lr=d.lr, betas=(d.beta1, d.beta2))
        self.discriminator = loop.add_model("discriminator", net, opt, counts=True)
        self.schedule = self.schedule.to(loop.device)
        self.fakes = self.fakes.to(loop.device)

    def __call__(self, loop: Loop, batch: torch.Tensor) -> None:
        real = batch.float() * 2 - 1
        n = real.shape[0]
        pick = torch.randint(0, len(self.fakes), (n,), device=loop.device, generator=loop.generator)
        t = self.schedule.sample_timesteps(n, device=loop.device, generator=loop.generator)
        noise = torch.randn((2, *real.shape), device=loop.device, generator=loop.generator)
        x_real = self.schedule.q_sample(real, t, noise[0])
        x_fake = self.schedule.q_sample(self.fakes[pick], t, noise[1])
        loss = d_loss(self.discriminator, x_real, x_fake, t)
        loop.log_value("loss_d", loss)
        loop.optimize("discriminator", loss)


def _fakes(cfg: ExperimentConfig, loaded: Any, folder: Path) -> torch.Tensor:
    """The baseline's samples D learns to reject, generated once (seeded) and kept for resumes."""
    path = folder / "fakes.safetensors"
    if path.is_file():
        return load_file(path)["fakes"]
    batches = sample_run(
        cfg, loaded.unet, loaded.schedule, num_images=cfg.ablation.dg_fakes, seed=cfg.seed + 777
    )
    fakes = torch.cat([b.cpu() for b in batches]) * 2 - 1
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"fakes": fakes.contiguous()}, tmp)
    tmp.replace(path)
    return fakes


def evaluate_dg(cfg: ExperimentConfig, dataset: Dataset) -> dict[str, Any]:
    """Train the DG discriminator of the finished baseline run ``cfg`` and evaluate the guided
    sampler; resumable (fakes, D checkpoints and the result are kept in ``run_dir/dg``)."""
    folder = dg_dir(cfg)
    result_file = folder / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    loaded = load_run(cfg.run_dir, device="cpu" if cfg.train.cpu or not torch.cuda.is_available() else "cuda")
    start = time.perf_counter()
    fakes = _fakes(cfg, loaded, folder)
    step = DGDiscriminatorStep(cfg, fakes)
    loop_cfg = LoopConfig.from_config(cfg)
    loop_cfg.run_dir = folder
    loop_cfg.checkpoint_every = max(1, cfg.ablation.dg_iterations // 2)
    loop = Loop(step, loop_cfg, dataset)
    summary = loop.fit()
    if summary["status"] != "finished":
        return {"status": summary["status"]}
    d_time = time.perf_counter() - start
    d = loop.unwrap("discriminator").eval().requires_grad_(False)
    e = cfg.eval
    metric = reference_fid(cfg, dataset, loop.device, cfg.run_dir)
    metric.reset_fake()
    guide = discriminator_guidance(d, schedule=loaded.schedule.to(loop.device), weight=cfg.ablation.dg_weight)
    start = time.perf_counter()
    grid = None
    for batch in sample_run(
        cfg,
        loaded.unet.to(loop.device),
        loaded.schedule.to(loop.device),
        num_images=e.num_samples,
        seed=cfg.seed + EVAL_SEED_OFFSET,
        batch_size=e.batch_size,
        guidance=guide,
    ):
        grid = batch[:64] if grid is None else grid
        metric.update(batch, real=False)
    sample_time = time.perf_counter() - start
    from torchvision.utils import save_image

    save_image(grid, folder / "samples.png", nrow=8)
    result = {
        "status": "finished",
        "metrics": metric.compute(),
        "weight": cfg.ablation.dg_weight,
        "d_iterations": cfg.ablation.dg_iterations,
        "d_fakes": cfg.ablation.dg_fakes,
        "d_train_time_s": d_time,
        "eval_sampling_time_s": sample_time,
    }
    tmp = result_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(result_file)
    return result


def dg_summary(cfg: ExperimentConfig, base: dict[str, Any]) -> dict[str, Any] | None:
    """The ablation's run summary of ``baseline+dg`` from the baseline run ``cfg``'s summary
    ``base`` (None: not evaluated yet)."""
    result_file = dg_dir(cfg) / "result.json"
    if not result_file.is_file():
        return None
    result = json.loads(result_file.read_text())
    train_time = base["train_time_s"] + result["d_train_time_s"]
    record = {
        "iteration": None,
        "processes": base["processes"],
        "train_time_s": train_time,
        "metrics": result["metrics"],
    }
    return {
        **base,
        "run_dir": str(dg_dir(cfg)),
        "train_time_s": train_time,
        "evals": [record],
        "final": result["metrics"],
        "sample_grids": [str(dg_dir(cfg) / "samples.png")],
        "snapshots": [],
        "dg": {k: v for k, v in result.items() if k != "metrics"},
    }
