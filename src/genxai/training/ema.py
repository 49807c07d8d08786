"""Exponential moving average of a model's weights (DDPM samples with EMA weights, decay 0.9999).

    ema = EMA(unet, decay=0.9999)
    ...optimizer.step(); ema.update(unet)
    images = sample(ema.module, ...)

The average lives in a frozen copy of the model in float32, so it can be sampled from, saved and
loaded like any module. ``warmup`` uses decay ``min(decay, (1 + n) / (10 + n))`` after n updates,
so a short run's average is not dominated by the random initialisation.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from genxai.core.checks import check_in_range


class EMA:
    """A frozen float32 copy of ``model`` updated as ``ema <- decay * ema + (1 - decay) * model``."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, *, warmup: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.decay = check_in_range(decay, "decay", 0.0, 1.0)
        self.warmup = warmup
        self.num_updates = 0
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s current weights; buffers are copied as they are."""
        decay = self.current_decay()
        ema_params = list(self.module.parameters())
        if len(ema_params) != sum(1 for _ in model.parameters()):
            raise ValueError("model: its parameters do not match the EMA copy's")
        params = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params)]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for ema_buf, buf in zip(self.module.buffers(), model.buffers()):
            ema_buf.copy_(buf)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights (parameters and buffers) as a flat tensor dict."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        self.module.load_state_dict(state)
        self.num_updates = int(num_updates)

    def to(self, device: torch.device | str) -> EMA:
        self.module.to(device)
        return self
