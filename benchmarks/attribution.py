"""genxai against its peers, side by side in one process: images/s, ratio and peak memory.

    python benchmarks/attribution.py                      # CPU: ResNet-18, 64x64, batch 8
    python benchmarks/attribution.py --device cuda        # GPU: ResNet-50, 224x224, batch 32
    python benchmarks/attribution.py --methods gradcam,ig --repeats 5

Peers: Captum, pytorch-grad-cam, zennit (``pip install genxai[peers]``). Floors (a bare forward,
a forward + backward to the input) are measured the same way. Each row times both sides on the same
model, input and settings; the ratio is ours / peer's throughput (> 1: genxai is faster). Peak
memory (a second table, measured after all timing) is the CUDA allocator's peak on the GPU and the
peak resident-set growth (VmHWM, reset before each call, every allocation over 64 KiB mapped on
its own so freed memory is returned) on the CPU. Random-init weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision

from genxai import attribution as A
from genxai.targets import ClassLogit
from measure import exact_cpu_accounting, peak_memory_mib, timed


@dataclass
class Case:
    method: str
    ours: Callable[[], object] | None
    peer_name: str
    peer: Callable[[], object] | None


def build_cases(model, x, labels, layer, args) -> list[Case]:
    """Every method both sides have, with equal settings."""
    target = ClassLogit(labels)
    cases: list[Case] = []

    def ours(name, call=None, **kwargs):
        if name not in A.METHODS:
            return None
        method = A.build(name, model, **kwargs)
        return lambda: method(x, target=target, **(call or {}))

    try:
        import captum.attr as captum
    except ImportError:
        captum = None
    try:
        import pytorch_grad_cam as gradcam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        gradcam = None
    try:
        import zennit.composites as zc
    except ImportError:
        zc = None

    layer_module = dict(model.named_modules())[layer]
    gc_targets = [ClassifierOutputTarget(int(c)) for c in labels] if gradcam else None

    def grad_cam_peer(cls, **kwargs):
        if gradcam is None:
            return None
        cam = getattr(gradcam, cls)(model=model, target_layers=[layer_module], **kwargs)
        return lambda: cam(input_tensor=x, targets=gc_targets)

    def floor_forward():
        with torch.no_grad():
            model(x)

    def floor_backward():
        xg = x.detach().requires_grad_(True)
        torch.autograd.grad(model(xg).gather(1, labels[:, None]).sum(), xg)

    cases.append(Case("floor: forward", floor_forward, "-", None))
    cases.append(Case("floor: forward+backward", floor_backward, "-", None))
    cases.append(
        Case(
            "saliency",
            ours("saliency"),
            "captum",
            captum and (lambda: captum.Saliency(model).attribute(x, target=labels, abs=True)),
        )
    )
    cases.append(Case("saliency vs floor", ours("saliency"), "fwd+bwd floor", floor_backward))
    steps = args.ig_steps
    cases.append(
        Case(
            f"integrated gradients {steps} steps",
            ours("ig", steps=steps, internal_batch_size=args.internal_batch),
            "captum",
            captum
            and (
                lambda: captum.IntegratedGradients(model).attribute(
                    x, target=labels, n_steps=steps, internal_batch_size=args.internal_batch
                )
            ),
        )
    )
    cases.append(
        Case(
            "gradcam",
            ours("gradcam", layer=layer),
            "captum LayerGradCam",
            captum
            and (
                lambda: captum.LayerAttribution.interpolate(
                    captum.LayerGradCam(model, layer_module).attribute(
                        x, target=labels, relu_attributions=True
                    ),
                    x.shape[-2:],
                    "bilinear",
                )
            ),
        )
    )
    cases.append(Case("gradcam", ours("gradcam", layer=layer), "pytorch-grad-cam", grad_cam_peer("GradCAM")))
    cases.append(
        Case(
            "gradcam++", ours("gradcam++", layer=layer), "pytorch-grad-cam", grad_cam_peer("GradCAMPlusPlus")
        )
    )
    cases.append(
        Case("layercam", ours("layercam", layer=layer), "pytorch-grad-cam", grad_cam_peer("LayerCAM"))
    )
    if args.scorecam:
        cases.append(
            Case(
                "scorecam",
                ours("scorecam", layer=layer, batch_size=args.internal_batch),
                "pytorch-grad-cam",
                grad_cam_peer("ScoreCAM")
                if gradcam is None
                else _scorecam_peer(gradcam, model, layer_module, x, gc_targets, args.internal_batch),
            )
        )
    window = max(2, x.shape[-1] // 7)
    stride = max(1, window // 2)
    cases.append(
        Case(
            f"occlusion {window}x{window} stride {stride}",
            ours("occlusion", window=window, stride=stride, batch_size=args.internal_batch),
            "captum",
            captum
            and (
                lambda: captum.Occlusion(model).attribute(
                    x,
                    target=labels,
                    sliding_window_shapes=(x.shape[1], window, window),
                    strides=(x.shape[1], stride, stride),
                    perturbations_per_eval=args.internal_batch,
                )
            ),
        )
    )
    segments = _grid_segments(x, 8)
    for name, peer_cls in (("lime", "Lime"), ("kernelshap", "KernelShap")):
        cases.append(
            Case(
                f"{name} {args.samples} samples",
                ours(name, {"segmentation": segments}, samples=args.samples, batch_size=args.internal_batch),
                "captum",
                captum
                and (
                    lambda peer_cls=peer_cls: getattr(captum, peer_cls)(model).attribute(
                        x,
                        target=labels,
                        feature_mask=segments[:, None].expand_as(x),
                        n_samples=args.samples,
                        perturbations_per_eval=args.internal_batch,
                    )
                ),
            )
        )
    masks = args.rise_masks

    def rise_floor():
        with torch.no_grad():
            for start in range(0, masks * x.shape[0], args.internal_batch):
                rows = min(args.internal_batch, masks * x.shape[0] - start)
                model(x[:1].expand(rows, -1, -1, -1))

    cases.append(
        Case(
            f"rise {masks} masks",
            ours("rise", masks=masks, batch_size=args.internal_batch),
            "forward floor",
            rise_floor,
        )
    )
    if zc is not None and "lrp" in A.METHODS:
        from genxai.attribution.lrp import LRP
        from genxai.attribution.lrp.composites import EpsilonPlus

        lrp_model = args.lrp_model
        ours_lrp = LRP(lrp_model, composite=EpsilonPlus())

        def zennit_lrp():
            xg = x.detach().requires_grad_(True)
            with zc.EpsilonPlus().context(lrp_model) as modified:
                out = modified(xg)
                seed = torch.zeros_like(out).scatter_(1, labels[:, None], 1.0) * out
                torch.autograd.grad(out, xg, seed)

        cases.append(
            Case(
                f"lrp epsilon-plus ({args.lrp_name})",
                lambda: ours_lrp(x, target=target),
                "zennit",
                zennit_lrp,
            )
        )
    return [c for c in cases if c.ours is not None]


def _scorecam_peer(gradcam, model, layer_module, x, targets, batch):
    cam = gradcam.ScoreCAM(model=model, target_layers=[layer_module])
    cam.batch_size = batch
    return lambda: cam(input_tensor=x, targets=targets)


def _grid_segments(x: torch.Tensor, cells: int) -> torch.Tensor:
    """A fixed cells x cells grid segmentation shared by both sides (SLIC cost left out)."""
    h, w = x.shape[-2:]
    rows = torch.arange(h, device=x.device) * cells // h
    cols = torch.arange(w, device=x.device) * cells // w
    return (rows[:, None] * cells + cols[None, :]).expand(x.shape[0], h, w).contiguous()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--model", default=None, help="torchvision model (default resnet18 on CPU, resnet50 on GPU)"
    )
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ig-steps", type=int, default=50)
    parser.add_argument("--samples", type=int, default=256, help="LIME / KernelSHAP samples")
    parser.add_argument("--rise-masks", type=int, default=None)
    parser.add_argument("--internal-batch", type=int, default=None)
    parser.add_argument("--no-scorecam", dest="scorecam", action="store_false")
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--no-timing", dest="timing", action="store_false")
    parser.add_argument("--methods", default="", help="comma-separated substrings of method names to run")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.model = args.model or ("resnet50" if gpu else "resnet18")
    args.size = args.size or (224 if gpu else 64)
    args.batch = args.batch or (32 if gpu else 8)
    args.rise_masks = args.rise_masks or (4000 if gpu else 500)
    args.internal_batch = args.internal_batch or (256 if gpu else 64)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None).to(device).eval()
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    labels = torch.randint(0, 1000, (args.batch,), device=device)
    args.lrp_name = "vgg16" if gpu else "vgg11"
    args.lrp_model = getattr(torchvision.models, args.lrp_name)(weights=None).to(device).eval()
    layer = "layer4"
    machine = (
        torch.cuda.get_device_name(device)
        if gpu
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(
        f"# {args.model} {args.size}x{args.size} batch {args.batch} on {device.type} ({machine}), torch {torch.__version__}"
    )
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    cases = [
        c
        for c in build_cases(model, x, labels, layer, args)
        if not wanted or any(w in c.method for w in wanted)
    ]
    if args.timing:
        print("| method | peer | genxai img/s | peer img/s | ratio |")
        print("| --- | --- | ---: | ---: | ---: |")
        for case in cases:
            ours_ips = args.batch / timed(case.ours, device, args.repeats)
            peer_ips = args.batch / timed(case.peer, device, args.repeats) if case.peer else None
            ratio = f"{ours_ips / peer_ips:.2f}" if peer_ips else "-"
            peer_txt = f"{peer_ips:.2f}" if peer_ips else "-"
            print(f"| {case.method} | {case.peer_name} | {ours_ips:.2f} | {peer_txt} | {ratio} |", flush=True)
    if args.memory:  # after all timing: exact accounting slows allocation down
        if not gpu:
            exact_cpu_accounting()
        print("\n| method | peer | genxai peak MiB | peer peak MiB | ratio |")
        print("| --- | --- | ---: | ---: | ---: |")
        for case in cases:
            ours_mem = peak_memory_mib(case.ours, device)
            peer_mem = peak_memory_mib(case.peer, device) if case.peer else float("nan")
            ratio = f"{ours_mem / peer_mem:.2f}" if case.peer and peer_mem > 0 else "-"
            print(
                f"| {case.method} | {case.peer_name} | {ours_mem:.0f} | {peer_mem:.0f} | {ratio} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
