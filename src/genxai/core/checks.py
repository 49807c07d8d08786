"""Input checks shared by every method: each error names the argument and says what was expected."""

from __future__ import annotations

from typing import Any

import torch


def check_images(x: Any, name: str = "x", *, channels: int | None = None) -> torch.Tensor:
    """A finite floating-point image batch of shape (N, C, H, W)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (N, C, H, W), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name}: expected a floating-point tensor, got dtype {x.dtype} (convert with .float())"
        )
    if x.ndim != 4:
        hint = " (add a batch dimension with x.unsqueeze(0))" if x.ndim == 3 else ""
        raise ValueError(f"{name}: expected shape (N, C, H, W), got {tuple(x.shape)}{hint}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: the batch is empty")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name}: expected {channels} channels, got {x.shape[1]} in shape {tuple(x.shape)}")
    check_finite(x, name)
    return x


def model_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter (else buffer); None when it has none."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def check_model_dtype(x: torch.Tensor, model: torch.nn.Module, name: str = "x") -> torch.Tensor:
    """``x`` in a dtype the model computes in: float64 only for a float64 model, and a float64
    model only with float64 input (torch would fail with "expected scalar type Double")."""
    dtype = model_dtype(model)
    if dtype is None or (x.dtype == torch.float64) == (dtype == torch.float64):
        return x
    if x.dtype == torch.float64:
        raise ValueError(
            f"{name}: expected float32, bfloat16 or float16 for a model with {dtype} weights, got "
            f"float64; convert with {name}.float() (or the model with model.double())"
        )
    raise ValueError(
        f"{name}: expected float64 for a model with float64 weights, got {x.dtype}; convert with "
        f"{name}.double() (or the model with model.float())"
    )


def check_finite(x: torch.Tensor, name: str) -> torch.Tensor:
    """Reject NaN and infinity with the count of bad values."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        raise ValueError(f"{name}: contains {int(bad.sum())} NaN or infinite values")
    return x


def check_positive_int(value: Any, name: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def check_in_range(value: Any, name: str, low: float, high: float, *, closed: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = low <= value <= high if closed else low < value < high
    if not ok:
        brackets = "[]" if closed else "()"
        raise ValueError(
            f"{name}: expected a number in {brackets[0]}{low}, {high}{brackets[1]}, got {value!r}"
        )
    return float(value)


def check_choice(value: Any, name: str, choices: tuple[str, ...] | list[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_maps(maps: Any, x: torch.Tensor, name: str = "maps") -> torch.Tensor:
    """A saliency map batch matching ``x``: (N, 1 or C, H, W) or (N, H, W); returned as (N, 1|C, H, W)."""
    if not isinstance(maps, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(maps).__name__}")
    if maps.ndim == 3:
        maps = maps.unsqueeze(1)
    if maps.ndim != 4 or maps.shape[0] != x.shape[0] or maps.shape[-2:] != x.shape[-2:]:
        raise ValueError(
            f"{name}: expected shape (N, 1, H, W) matching x {tuple(x.shape)}, got {tuple(maps.shape)}"
        )
    if maps.shape[1] not in (1, x.shape[1]):
        raise ValueError(f"{name}: expected 1 or {x.shape[1]} channels, got {maps.shape[1]}")
    check_finite(maps, name)
    return maps.float()


def baseline_like(baseline: float | torch.Tensor, x: torch.Tensor, name: str = "baseline") -> torch.Tensor:
    """A number or a tensor broadcastable to ``x``, as a tensor of x's shape, dtype and device."""
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(x, float(baseline))
    if not isinstance(baseline, torch.Tensor):
        raise TypeError(f"{name}: expected a number or a tensor, got {type(baseline).__name__}")
    try:
        base = torch.broadcast_to(baseline.to(x.device, x.dtype), x.shape).contiguous()
    except RuntimeError as err:
        raise ValueError(
            f"{name}: shape {tuple(baseline.shape)} does not broadcast to x {tuple(x.shape)}"
        ) from err
    return check_finite(base, name)
