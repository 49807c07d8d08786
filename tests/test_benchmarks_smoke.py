"""The benchmark scripts still run (tiny sizes, one repeat); their numbers are not checked."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))  # the scripts import their shared `measure` helpers
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.peers
def test_diffusion_benchmark_runs(capsys):
    pytest.importorskip("diffusers")
    argv = "--device cpu --size 8 --base 32 --mults 1,2 --batch 2 --d-base 8 --repeats 1 --no-memory"
    bench = load("diffusion")
    results = bench.main(argv.split())
    out = capsys.readouterr().out
    (unet,) = results["unet"]
    assert unet["params"][0] == unet["params"][1] and math.isfinite(unet["ratio"])
    # baseline Process1; per variant: (own Process1,) phase A, saliency, phase B
    assert len(results["guided"]) == 1 + 3 + 4 + 4
    assert all(math.isfinite(row["per_process_rel"]) for row in results["guided"])
    assert "| fp32 | noise+hierarchical | phase B: Process1 + saliency + w + Process2 | 2 |" in out
    assert bench.peak_memory_mib(lambda: torch.ones(4 << 20), torch.device("cpu")) >= 0


def test_attribution_benchmark_runs(capsys):
    bench = load("attribution")
    bench.main(
        ["--size", "32", "--batch", "2", "--repeats", "1", "--no-memory", "--methods", "saliency,gradcam"]
    )
    table = capsys.readouterr().out
    assert "| saliency | captum |" in table and "| gradcam | pytorch-grad-cam |" in table
