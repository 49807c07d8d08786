"""TracIn (TracInCP) against Captum's TracInCP: training images scored per second, same checkpoints.

    python benchmarks/explainers.py                    # CPU: SmallResNet width 16, 32x32, 128 images, 3 checkpoints
    python benchmarks/explainers.py --device cuda      # GPU: more training images
    python benchmarks/explainers.py --quick            # a smoke run (tiny sizes, one repeat)

Both sides score the same training images against the same test images over the same checkpoint
folders of the training loop (``genxai.training.checkpoint``, random-init weights: speed does not
depend on them) with the same loss. genxai: per-sample gradients by ``torch.func.vmap(grad)`` per
batch; Captum's default (``sample_wise_grads_per_batch=False``) takes one ``autograd.grad`` per
image. The row "captum sample-wise" is Captum's vectorised option, which supports Linear and Conv2d
layers only, so both sides are then restricted to those layers' parameters (BatchNorm excluded).
pydvl is not installed in this environment and is not measured. Do not record timings on a busy
machine (``uptime`` load >= 1.5 on the shared 2-core box): the script warns.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import torch
from torch import nn

from genxai.explainers.influence import tracin
from genxai.models.classifier import SmallResNet
from genxai.training import checkpoint as ckpt
from measure import timed


def make_checkpoints(model: nn.Module, root: Path, count: int, lr: float = 0.1) -> list[Path]:
    """``count`` loop-style checkpoint folders (weights + the optimiser lr), weights perturbed."""
    paths = []
    g = torch.Generator().manual_seed(0)
    for c in range(count):
        state = {
            k: v + 0.01 * c * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in model.state_dict().items()
        }
        tmp = ckpt.begin(root, c + 1)
        ckpt.write_weights(tmp, "classifier", state)
        ckpt.write_state(tmp, "trainer", {"optimizers": {"classifier": {"param_groups": [{"lr": lr}]}}})
        paths.append(ckpt.commit(tmp))
    return paths


def conv_linear(model: nn.Module) -> tuple[list[str], list[str]]:
    """Module names and parameter names of the model's Conv2d and Linear layers."""
    mods = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    params = [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[0] in mods]
    return mods, params


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--train", type=int, default=None, help="training images scored")
    parser.add_argument("--test", type=int, default=8, help="test images")
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (a smoke run)")
    parser.add_argument("--no-sample-wise", dest="sample_wise", action="store_false")
    args = parser.parse_args(argv)
    if args.quick:
        args.train, args.test, args.size, args.width, args.repeats, args.batch = 16, 2, 8, 4, 1, 8
    device = torch.device(args.device)
    n_train = args.train or (2048 if device.type == "cuda" else 128)
    load = os.getloadavg()[0]
    if load >= 1.5 and not args.quick:
        print(
            f"warning: load average {load:.2f} >= 1.5: the machine is busy, these timings are not fit to record"
        )
    torch.manual_seed(0)
    model = SmallResNet(classes=10, channels=3, width=args.width, image_size=args.size).to(device).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n_train, 3, args.size, args.size, generator=g).to(device)
    y = torch.randint(10, (n_train,), generator=g).to(device)
    xt = torch.rand(args.test, 3, args.size, args.size, generator=g).to(device)
    yt = torch.randint(10, (args.test,), generator=g).to(device)
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(
        f"TracInCP, SmallResNet width {args.width} at {args.size}x{args.size}, {n_train} training images, "
        f"{args.test} test images, {args.checkpoints} checkpoints, batch {args.batch}, {where}, load {load:.2f}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_checkpoints(model.cpu(), Path(tmp), args.checkpoints)
        model.to(device)

        def ours(params=None):
            return lambda: tracin(model, paths, x, y, xt, yt, params=params, batch_size=args.batch)

        def peer(layers=None, sample_wise=False):
            from captum.influence import TracInCP

            def load_fn(m, path):
                m.load_state_dict(ckpt.read_weights(path, "classifier", device))
                m.eval()
                return ckpt.read_state(path, "trainer")["optimizers"]["classifier"]["param_groups"][0]["lr"]

            loss = nn.CrossEntropyLoss(reduction="sum" if sample_wise else "none")
            tr = TracInCP(
                model,
                torch.utils.data.TensorDataset(x, y),
                [str(p) for p in paths],
                load_fn,
                layers=layers,
                loss_fn=loss,
                batch_size=args.batch,
                sample_wise_grads_per_batch=sample_wise,
            )
            return lambda: tr.influence((xt, yt))

        cases = [("all parameters", ours(), "captum", peer())]
        if args.sample_wise:
            mods, params = conv_linear(model)
            cases.append(("conv + linear", ours(params), "captum sample-wise", peer(mods, True)))
        print("| parameters | peer | genxai train img/s | peer train img/s | ratio |")
        print("| --- | --- | ---: | ---: | ---: |")
        for what, mine, name, theirs in cases:
            a = n_train / timed(mine, device, args.repeats)
            b = n_train / timed(theirs, device, args.repeats)
            rows.append({"parameters": what, "peer": name, "ours": a, "peer_ips": b, "ratio": a / b})
            print(f"| {what} | {name} | {a:.1f} | {b:.1f} | {a / b:.2f} |", flush=True)
        check = torch.allclose(mine(), theirs(), rtol=1e-3, atol=1e-5)
        print(f"scores agree with the peer: {check}")
    return {"rows": rows, "agree": check}


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    main()
