"""Timing and peak-memory helpers shared by the benchmark scripts."""

from __future__ import annotations

import ctypes
import gc
import time
from collections.abc import Callable, Sequence

import torch

_libc = ctypes.CDLL("libc.so.6")
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median(values: Sequence[float]) -> float:
    return sorted(values)[len(values) // 2]


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of one call after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return median(times)


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak extra memory of one call: the CUDA allocator's peak, or the peak resident-set growth on the CPU."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    gc.collect()
    _libc.malloc_trim(0)  # hand freed heap memory back, so earlier calls do not hide this one's peak
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM, the peak resident set, to the current RSS
        f.write("5")
    base = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - base) / 1024


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def exact_cpu_accounting() -> None:
    """Give every allocation over 64 KiB a mapping of its own, unmapped when freed, so the resident
    set follows the live tensors (glibc's heap keeps freed memory, and its peak then depends on
    fragmentation more than on the call). Allocation gets slower: call it after all timing."""
    if _libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024) != 1:
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed")
