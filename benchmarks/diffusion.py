"""XAI-guided diffusion's training costs, side by side in one process: steps/s, ratios, peak memory.

    python benchmarks/diffusion.py                        # CPU: 16 px, base 32, batch 16
    python benchmarks/diffusion.py --device cuda          # GPU: DDPM's CIFAR-10 UNet (35.7M), batch 128
    python benchmarks/diffusion.py --precision fp32,bf16 --repeats 10 --parts unet
    python benchmarks/diffusion.py --parts diffusers --threads 1   # guided vs plain step on a diffusers UNet
    python benchmarks/diffusion.py --quick                # smoke run of every case (seconds)

1. UNet training step (forward, eps loss, backward, Adam step) of our UNet against diffusers'
   UNet2DModel configured as DDPM: the same widths, 2 ResNet blocks per level, single-head
   attention at the same resolution (AttnDownBlock2D / AttnUpBlock2D), 32 norm groups, the same
   dropout. Both parameter counts are printed. Ratio: ours / diffusers' steps/s (> 1: ours faster).
2. What XAI guidance costs per Process, measured with the Trainer's own step functions
   (``process``, ``discriminator_step``, ``saliency_and_weight``) on a fixed batch: Process1 of the
   baseline variant (the plain DDPM step: grad clipping and EMA included), then per guided variant
   a phase-A iteration (Process1 + D update: 1 Process), the saliency of D on x0_hat + the noise
   weight alone, and a phase-B iteration (Process1 + saliency + noise weight + Process2: 2
   Processes). "x Process1" is the cost per Process (for the saliency row: per call) over the plain
   step's; peak memory is compared the same way. Targets (GPU): at most 1.10x per Process, 1.15x
   peak memory.
3. The same steps fine-tuning a diffusers UNet2DModel (table 1's twin, saved to a folder and
   trained with ``model.diffusers=DIR``): the saliency maps enter its ResNet blocks through the
   core's hooks; the "Process1 (all-ones map)" row over the plain diffusers Process1 is the cost of
   the hooks (target: at most 1.10x, on the CPU and on a GPU).

``--quick`` is a smoke run (8 px, tiny widths, one round, no memory): it checks that every case
runs, and its numbers mean nothing.

Every case is warmed up once; then ``--repeats`` rounds run all cases in turn (so a change in the
machine's load during the run hits every case alike) and each case reports its median. On a CPU shared with other jobs, ``--threads 1`` avoids
the stalls of oversubscribed OpenMP threads. Peak memory, measured after all timing: the CUDA
allocator's peak on the GPU; on the CPU the peak resident-set growth (VmHWM, reset before each
call) with every allocation over 64 KiB mapped on its own (mallopt), so that it follows the live
tensors rather than the heap's fragmentation. Random-init weights and data: speed does not
depend on them.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from genxai.diffusion.config import load_experiment
from genxai.diffusion.trainer import Trainer
from genxai.diffusion.unet import UNet, count_parameters
from measure import exact_cpu_accounting, median, peak_memory_mib, sync

NORM_GROUPS = 32
GUIDED_VARIANTS = ("noise", "noise+same", "noise+hierarchical")


@dataclass
class Case:
    name: str
    fn: Callable[[], object]
    precision: str
    variant: str = ""
    processes: int = 1  # UNet optimiser steps per call (0: a part of an iteration)
    times: list[float] = field(default_factory=list)  # seconds of each timed round
    peak_mib: float = float("nan")

    @property
    def seconds(self) -> float:
        return median(self.times)


# -- measuring ---------------------------------------------------------------------------------------
def time_side_by_side(cases: Sequence[Case], device: torch.device, repeats: int) -> None:
    """Seconds per call of every case: one warm-up call each, then ``repeats`` rounds of all in turn."""
    for case in cases:
        case.fn()
        case.times = []
    sync(device)
    for _ in range(repeats):
        for case in cases:
            start = time.perf_counter()
            case.fn()
            sync(device)
            case.times.append(time.perf_counter() - start)


# -- 1. our UNet against diffusers' UNet2DModel ------------------------------------------------------
def unet_config(args: argparse.Namespace) -> dict:
    return {
        "image_size": args.size,
        "base_channels": args.base,
        "channel_mults": tuple(args.mults),
        "num_res_blocks": 2,
        "attention_resolutions": (args.attention,),
        "dropout": args.dropout,
    }


def diffusers_twin(config: dict, in_channels: int = 3):
    """diffusers' UNet2DModel configured as DDPM's UNet (as in tests/diffusion/test_unet.py)."""
    from diffusers import UNet2DModel

    chans = [config["base_channels"] * m for m in config["channel_mults"]]
    attn = [config["image_size"] // 2**i in config["attention_resolutions"] for i in range(len(chans))]
    return UNet2DModel(
        sample_size=config["image_size"],
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=tuple(chans),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        layers_per_block=config["num_res_blocks"],
        attention_head_dim=None,  # one head over all channels, as DDPM
        norm_num_groups=NORM_GROUPS,
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=1,
        dropout=config["dropout"],
    )


def train_step(
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    x_t: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    bf16: bool,
) -> Callable[[], None]:
    """One DDPM training step: forward (optionally under bf16 autocast), eps MSE, backward, Adam."""

    def step() -> None:
        with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=bf16):
            pred = forward(x_t, t)
        loss = F.mse_loss(pred.float(), eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def unet_cases(args: argparse.Namespace, device: torch.device) -> tuple[list[Case], tuple[int, int]]:
    """A training step of our UNet and of diffusers' twin per precision, and both parameter counts."""
    config = unet_config(args)
    torch.manual_seed(0)
    ours = UNet(**config, norm_groups=NORM_GROUPS).to(device).train()
    theirs = diffusers_twin(config).to(device).train()
    x_t = torch.randn(args.batch, 3, args.size, args.size, device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    eps = torch.randn_like(x_t)
    opt_ours = torch.optim.Adam(ours.parameters(), lr=2e-4)
    opt_theirs = torch.optim.Adam(theirs.parameters(), lr=2e-4)

    def theirs_fn(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return theirs(x, s, return_dict=False)[0]

    cases = []
    for precision in args.precision:
        bf16 = precision == "bf16"
        cases += [
            Case("genxai", train_step(ours, opt_ours, x_t, t, eps, bf16), precision),
            Case("diffusers", train_step(theirs_fn, opt_theirs, x_t, t, eps, bf16), precision),
        ]
    return cases, (count_parameters(ours), count_parameters(theirs))


def print_unet(cases: list[Case], params: tuple[int, int]) -> list[dict]:
    n_ours, n_theirs = params
    same = "equal" if n_ours == n_theirs else "DIFFERENT"
    print("\n## 1. UNet training step (forward + eps loss + backward + Adam), ours vs diffusers UNet2DModel")
    print(f"parameters: ours {n_ours:,}, diffusers {n_theirs:,} ({same}); ratio = ours / diffusers steps/s\n")
    print("| precision | genxai steps/s | diffusers steps/s | ratio | genxai peak MiB | diffusers peak MiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for a, b in zip(cases[::2], cases[1::2]):
        ratio = b.seconds / a.seconds
        print(
            f"| {a.precision} | {1 / a.seconds:.2f} | {1 / b.seconds:.2f} | {ratio:.2f} "
            f"| {a.peak_mib:.0f} | {b.peak_mib:.0f} |"
        )
        rows.append(
            {
                "precision": a.precision,
                "ours_s": a.seconds,
                "diffusers_s": b.seconds,
                "ratio": ratio,
                "ours_peak_mib": a.peak_mib,
                "diffusers_peak_mib": b.peak_mib,
                "params": params,
            }
        )
    return rows


# -- 2. the cost of XAI guidance per Process, with the Trainer's own steps ---------------------------
def make_trainer(
    args: argparse.Namespace,
    variant: str,
    precision: str,
    out_dir: str,
    device: torch.device,
    extra: Sequence[str] = (),
) -> Trainer:
    """A Trainer of ``variant`` at the benchmark's sizes, on random data (nothing is written);
    ``extra``: more overrides (``model.diffusers=DIR``: fine-tune that diffusers UNet instead)."""
    overrides = [
        f"variant={variant}",
        f"out_dir={out_dir}",
        f"name={variant}-{precision}",
        "data.name=shapes",
        f"data.image_size={args.size}",
        "data.channels=3",
        f"model.base_channels={args.base}",
        f"model.channel_mults=[{','.join(map(str, args.mults))}]",
        "model.num_res_blocks=2",
        f"model.attention_resolutions=[{args.attention}]",
        f"model.dropout={args.dropout}",
        f"discriminator.base_channels={args.d_base}",
        f"train.batch_size={args.batch}",
        f"train.cpu={str(device.type == 'cpu').lower()}",
        "train.progress=false",
        "eval.num_samples=0",
        *extra,
    ]
    if precision == "bf16":  # the default is "no" (which the override syntax would read as false)
        overrides.append("train.mixed_precision=bf16")
    cfg = load_experiment(None, overrides)
    data = TensorDataset(torch.rand(args.batch, 3, args.size, args.size))
    return Trainer(cfg, dataset=data, resume=False)


def phase_a(trainer: Trainer, x0: torch.Tensor) -> Callable[[], None]:
    """Process1, then one D update on its x0_hat (as ``GuidedDiffusionStep`` in phase A)."""

    def step() -> None:
        _, t, x0_hat = trainer.step.process(x0)
        trainer.step.discriminator_step(x0, x0_hat, t)

    return step


def phase_b(trainer: Trainer, x0: torch.Tensor) -> Callable[[], None]:
    """Process1, saliency + noise weight on its x0_hat, Process2 (as ``GuidedDiffusionStep`` in phase B)."""

    def step() -> None:
        _, t, x0_hat = trainer.step.process(x0)
        s, w = trainer.step.saliency_and_weight(x0_hat, t)
        maps = s if trainer.cfg.attention_maps != "none" else None
        trainer.step.process(x0, weight=w, saliency_map=maps)

    return step


def saliency_only(trainer: Trainer, x0: torch.Tensor) -> Callable[[], None]:
    """The saliency of D on a fixed x0_hat and its noise weight (the guidance machinery alone)."""
    t = torch.randint(0, trainer.cfg.saliency_max_t + 1, (x0.shape[0],), device=x0.device)
    x0_hat = (x0 + 0.1 * torch.randn_like(x0)).clamp(-1, 1)
    return lambda: trainer.step.saliency_and_weight(x0_hat, t)


def guided_cases(
    args: argparse.Namespace, device: torch.device, out_dir: str, extra: Sequence[str] = ()
) -> list[Case]:
    """Per precision: the baseline's Process1 (the reference), then each guided variant's steps."""
    cases = []
    for precision in args.precision:
        base = make_trainer(args, "baseline", precision, out_dir, device, extra)
        x0 = torch.rand(args.batch, 3, args.size, args.size, device=base.device) * 2 - 1
        cases.append(
            Case("Process1 (plain DDPM step)", partial(base.step.process, x0), precision, "baseline")
        )
        for variant in args.variants:
            tr = make_trainer(args, variant, precision, out_dir, device, extra)
            if tr.cfg.attention_maps != "none":  # its UNet differs from the baseline's
                cases.append(
                    Case("Process1 (all-ones map)", partial(tr.step.process, x0), precision, variant)
                )
            cases += [
                Case("phase A: Process1 + D update", phase_a(tr, x0), precision, variant),
                Case("saliency + noise weight", saliency_only(tr, x0), precision, variant, processes=0),
                Case("phase B: Process1 + saliency + w + Process2", phase_b(tr, x0), precision, variant, 2),
            ]
    return cases


def print_guided(cases: list[Case], args: argparse.Namespace, title: str | None = None) -> list[dict]:
    print(
        title
        or "\n## 2. Cost of XAI guidance per Process (GuidedDiffusionStep.process / discriminator_step / saliency_and_weight)"
    )
    print(
        f"D base {args.d_base}; 'x Process1' = time per Process (saliency row: per call) over the "
        "baseline's Process1; peak likewise\n"
    )
    print(
        "| precision | variant | step | Processes | ms/call | ms/Process | x Process1 | peak MiB | peak x Process1 |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    refs = {c.precision: c for c in cases if c.variant == "baseline"}
    rows = []
    for case in cases:
        ref = refs[case.precision]
        per_call = 1 / max(case.processes, 1)
        per_txt = f"{1e3 * case.seconds * per_call:.1f}" if case.processes else "-"
        rel = case.seconds * per_call / ref.seconds
        mem_rel = case.peak_mib / ref.peak_mib if ref.peak_mib > 0 else float("nan")
        print(
            f"| {case.precision} | {case.variant} | {case.name} | {case.processes} | {1e3 * case.seconds:.1f} "
            f"| {per_txt} | {rel:.2f} | {case.peak_mib:.0f} | {mem_rel:.2f} |"
        )
        rows.append(
            {
                "precision": case.precision,
                "variant": case.variant,
                "step": case.name,
                "processes": case.processes,
                "seconds": case.seconds,
                "per_process_rel": rel,
                "peak_mib": case.peak_mib,
                "peak_rel": mem_rel,
            }
        )
    return rows


# -- the script ---------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=None, help="image size (default 32 GPU, 16 CPU)")
    parser.add_argument("--base", type=int, default=None, help="UNet base channels (default 128 GPU, 32 CPU)")
    parser.add_argument("--mults", default="1,2,2,2", help="channel multipliers (default DDPM's 1,2,2,2)")
    parser.add_argument("--attention", type=int, default=None, help="attention resolution (default size/2)")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 128 GPU, 16 CPU)")
    parser.add_argument("--d-base", type=int, default=None, help="D base channels (default 64 GPU, 32 CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 10 GPU, 5 CPU)")
    parser.add_argument("--precision", default=None, help="fp32,bf16 (default both on GPU, fp32 on CPU)")
    parser.add_argument("--variants", default=",".join(GUIDED_VARIANTS), help="guided variants of table 2")
    parser.add_argument(
        "--parts", default="unet,guided,diffusers", help="which tables: unet, guided, diffusers"
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 8 px, mults 1,2, batch 4, 1 round, no memory (numbers mean nothing)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.base, args.mults, args.batch = 8, 32, "1,2", 4
        args.d_base, args.repeats, args.memory = 8, 1, False
    gpu = args.device.startswith("cuda")
    args.size = args.size or (32 if gpu else 16)
    args.base = args.base or (128 if gpu else 32)
    args.batch = args.batch or (128 if gpu else 16)
    args.d_base = args.d_base or (64 if gpu else 32)
    args.repeats = args.repeats or (10 if gpu else 5)
    args.attention = args.attention or args.size // 2
    args.mults = [int(m) for m in args.mults.split(",")]
    args.precision = [p.strip() for p in (args.precision or ("fp32,bf16" if gpu else "fp32")).split(",")]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.parts = {p.strip() for p in args.parts.split(",")}
    if bad := [p for p in args.precision if p not in ("fp32", "bf16")]:
        parser.error(f"--precision: expected fp32 and/or bf16, got {bad}")
    if bad := [v for v in args.variants if v not in GUIDED_VARIANTS]:
        parser.error(f"--variants: expected some of {GUIDED_VARIANTS}, got {bad}")
    if bad := args.parts - {"unet", "guided", "diffusers"}:
        parser.error(f"--parts: expected some of unet, guided, diffusers, got {sorted(bad)}")
    if any(args.base * m % NORM_GROUPS for m in args.mults):
        parser.error(f"--base: base x each multiplier must be divisible by {NORM_GROUPS} norm groups")
    if args.size % 2 ** (len(args.mults) - 1):
        parser.error(
            f"--size: {args.size} is not divisible by 2 ** {len(args.mults) - 1} (one halving per level)"
        )
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """Run the benchmark; returns the rows of both tables (also printed as markdown)."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    import diffusers

    print(
        f"# XAI-guided diffusion on {device.type} ({machine}), torch {torch.__version__}, "
        f"diffusers {diffusers.__version__}"
    )
    print(
        f"UNet: {args.size}x{args.size}, base {args.base}, mults {tuple(args.mults)}, 2 blocks/level, "
        f"attention at {args.attention}, dropout {args.dropout}, batch {args.batch}, "
        f"median of {args.repeats} after 1 warm-up"
    )
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as out_dir:
        unet, params = unet_cases(args, device) if "unet" in args.parts else ([], (0, 0))
        guided = guided_cases(args, device, out_dir) if "guided" in args.parts else []
        hooked = []
        if "diffusers" in args.parts:  # the same steps fine-tuning a diffusers UNet2DModel folder
            folder = f"{out_dir}/unet2d"
            diffusers_twin(unet_config(args)).save_pretrained(folder)
            hooked = guided_cases(args, device, out_dir, extra=[f"model.diffusers={folder}"])
        for cases in (unet, guided, hooked):  # every timing before any memory measurement
            if cases:
                time_side_by_side(cases, device, args.repeats)
        if args.memory:
            if device.type == "cpu":
                exact_cpu_accounting()
            for case in unet + guided + hooked:
                case.peak_mib = peak_memory_mib(case.fn, device)
    if unet:
        results["unet"] = print_unet(unet, params)
    if guided:
        results["guided"] = print_guided(guided, args)
    if hooked:
        title = (
            "\n## 3. The same on a diffusers UNet2DModel (model.diffusers=DIR): saliency maps enter through "
            "core hooks (genxai.diffusion.hooked); 'x Process1' over the plain diffusers step"
        )
        results["diffusers"] = print_guided(hooked, args, title)
    return results


if __name__ == "__main__":
    main()
