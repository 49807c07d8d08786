"""Streaming GAN Dissection against a hold-everything implementation, side by side in one process.

    python benchmarks/dissection.py                          # CPU: 250..2000 samples
    python benchmarks/dissection.py --device cuda            # GPU: a wider generator, 64 px
    python benchmarks/dissection.py --quick                  # a few seconds: the smoke test

Both sides dissect the same layer of the same DCGAN generator (random init: speed and memory do
not depend on the weights) on the same seeded samples against the same segmenter (brightness bands,
mutually exclusive, cheap, so the dissection itself is measured). Ours: ``genxai.dissection.dissect``
(two passes, per-unit histograms: memory does not grow with the samples). Naive: generate once,
hold every upsampled activation map and every concept mask, then per unit sort its values and read
exact quantiles and counts (what one writes when the data fit in memory). Per sample count: images/s
of each side and their ratio (ours / naive, > 1: ours faster), peak memory of each (the CUDA
allocator's peak; on the CPU the peak resident-set growth, every allocation over 64 KiB mapped on
its own, measured after all timing), and agreement: the share of units with the same best concept
and the largest IoU difference (ours reads thresholds at histogram bin edges, within one bin of
the exact quantile).
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F

from genxai.core.hooks import Trace
from genxai.dissection import SeededLatents, default_levels, dissect
from genxai.dissection.statistics import overlap_scores
from genxai.gan.models import Generator
from measure import exact_cpu_accounting, peak_memory_mib, timed


class Bands:
    """Concepts: ``bands`` brightness bands of the pixel's mean intensity (every pixel in one)."""

    def __init__(self, bands: int = 8) -> None:
        self.bands = bands
        self.concepts = [f"band{k}" for k in range(bands)]

    def concept_masks(self, images: torch.Tensor) -> torch.Tensor:
        level = (images.mean(1) * self.bands).long().clamp(0, self.bands - 1)
        return F.one_hot(level, self.bands).permute(0, 3, 1, 2).bool()


def naive_dissect(g, layer, seg, n, batch, levels, iqr_bar=0.01):
    """Hold every upsampled map and mask; per unit sort and read exact quantiles and counts.
    Returns (U, C) IoU at the IQR-best level and (U,) each unit's best concept (same rule as ours)."""
    latents = SeededLatents(g.latents, 0, next(g.parameters()).device)
    acts, masks = [], []
    with torch.no_grad(), Trace(g, layer, detach=True) as trace:
        for start in range(0, n, batch):
            images = ((g(latents.rows(start, min(start + batch, n))) + 1) / 2).clamp(0, 1)
            acts.append(trace.output.float())
            masks.append(seg.concept_masks(images))
    size = masks[0].shape[-2:]
    maps = F.interpolate(torch.cat(acts), size=size, mode="bilinear", align_corners=False)  # (N, U, H, W)
    concept = torch.cat(masks).permute(1, 0, 2, 3).reshape(len(seg.concepts), -1)  # (C, P)
    pixels = concept.shape[1]
    concept_pixels = concept.sum(1).double()
    levels = levels.to(maps.device, torch.float64)
    iou_all, iqr_all = [], []
    for u in range(maps.shape[1]):
        values, order = maps[:, u].flatten().sort()
        below = concept[:, order].double().cumsum(1)  # concept pixels at or below each rank
        k = (levels * pixels).ceil().long().clamp(1, pixels) - 1  # the exact q-quantile's rank
        ranks = torch.searchsorted(values, values[k], right=True)  # values <= the threshold
        mask = (pixels - ranks).double()  # |r > t|
        inside = concept_pixels[:, None] - below[:, ranks - 1]  # |r > t & s_c|, (C, L)
        iou, iqr, positive = overlap_scores(mask[None], inside, concept_pixels[:, None], pixels)
        ranked = torch.where(positive, iqr, torch.full_like(iqr, -1.0))
        best = ranked.argmax(1, keepdim=True)
        none = ~positive.any(1)
        iou_all.append(torch.where(none, 0.0, iou.gather(1, best)[:, 0]))
        iqr_all.append(torch.where(none, 0.0, iqr.gather(1, best)[:, 0]))
    iou, iqr = torch.stack(iou_all).float(), torch.stack(iqr_all).float()
    return iou, torch.where(iqr > iqr_bar, iou, iou - 2).argmax(1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", default=None, help="comma-separated sample counts")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--layer", default=None, help="default blocks.2 (blocks.1 with --quick)")
    parser.add_argument("--bins", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: the smoke test")
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    size, width = (64, 64) if gpu else (32, 32)
    if args.quick:
        size, width, args.bins = 16, 4, 64
    args.layer = args.layer or ("blocks.1" if args.quick else "blocks.2")
    default = "32,64" if args.quick else ("1000,2000,4000,8000" if gpu else "250,500,1000,2000")
    counts = [int(s) for s in (args.samples or default).split(",")]
    batch = args.batch or (16 if args.quick else (256 if gpu else 64))
    torch.manual_seed(0)
    g = Generator(latent_dim=64, image_size=size, base_channels=width).to(device).eval()
    seg = Bands()
    levels = default_levels()
    machine = (
        torch.cuda.get_device_name(device)
        if gpu
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(
        f"# DCGAN {size}x{size} (width {width}), layer {args.layer}, {len(seg.concepts)} concepts, "
        f"{args.bins} bins, batch {batch} on {device.type} ({machine}), torch {torch.__version__}"
    )

    def ours(n):
        return lambda: dissect(g, args.layer, seg, num_samples=n, batch_size=batch, bins=args.bins, top_k=1)

    def naive(n):
        return lambda: naive_dissect(g, args.layer, seg, n, batch, levels)

    rows = []
    print("| samples | genxai img/s | naive img/s | ratio | same concept | max IoU diff |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in counts:
        result = ours(n)()
        iou, concept = naive(n)()
        same = float((result.unit_concept == concept.cpu()).float().mean())
        diff = float((result.unit_iou - iou.cpu().gather(1, result.unit_concept[:, None])[:, 0]).abs().max())
        t_ours, t_naive = timed(ours(n), device, args.repeats), timed(naive(n), device, args.repeats)
        row = {"samples": n, "ours_ips": n / t_ours, "naive_ips": n / t_naive, "same": same, "iou_diff": diff}
        rows.append(row)
        print(
            f"| {n} | {row['ours_ips']:.1f} | {row['naive_ips']:.1f} | {t_naive / t_ours:.2f} | "
            f"{same:.2f} | {diff:.4f} |",
            flush=True,
        )
    if args.memory:  # after all timing: exact accounting slows allocation down
        if not gpu:
            exact_cpu_accounting()
        print("\n| samples | genxai peak MiB | naive peak MiB | ratio |")
        print("| ---: | ---: | ---: | ---: |")
        for row in rows:
            n = row["samples"]
            row["ours_mib"] = peak_memory_mib(ours(n), device)
            row["naive_mib"] = peak_memory_mib(naive(n), device)
            ratio = row["ours_mib"] / row["naive_mib"] if row["naive_mib"] > 0 else float("nan")
            print(f"| {n} | {row['ours_mib']:.0f} | {row['naive_mib']:.0f} | {ratio:.2f} |", flush=True)
    return {"rows": rows}


if __name__ == "__main__":
    main()
