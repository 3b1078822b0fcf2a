"""Per-iteration schedules (precomputed, DINO style) and exponential moving averages."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from sddit.config import Config


def cosine_schedule(start: float, end: float, steps: int) -> np.ndarray:
    """start -> end over `steps` iterations along a half cosine."""
    progress = np.arange(steps, dtype=np.float64) / max(steps - 1, 1)
    return end + (start - end) * 0.5 * (1 + np.cos(math.pi * progress))


def warmup_schedule(start: float, end: float, warmup_steps: int, steps: int) -> np.ndarray:
    """Linear start -> end over `warmup_steps`, then constant at `end`."""
    ramp = np.linspace(start, end, warmup_steps, dtype=np.float64) if warmup_steps > 0 else np.empty(0)
    return np.concatenate([ramp, np.full(max(steps - warmup_steps, 0), end)])[:steps]


class Schedules:
    """Everything that changes per iteration, indexed by the step about to be taken."""

    def __init__(self, config: Config):
        steps = config.train.steps
        warmup = config.optim.warmup_steps
        self.lr = config.optim.lr * np.minimum((np.arange(steps) + 1) / max(warmup, 1), 1.0)
        self.teacher_temp = warmup_schedule(config.disc.teacher_temp_start, config.disc.teacher_temp_end,
                                            config.disc.teacher_temp_warmup_steps, steps)
        self.teacher_momentum = cosine_schedule(config.ema.teacher_momentum_start,
                                                config.ema.teacher_momentum_end, steps)
        # masked pre-training, then the unmasked fine-tuning phase (MaskDM), as a pure function of the step
        self.mask_ratio = np.where(np.arange(steps) < config.train.unmasked_from, config.model.mask_ratio, 0.0)
        self._generation_decay = config.ema.generation_decay
        self._generation_warmup = config.ema.generation_warmup

    def generation_decay(self, step: int) -> float:
        if self._generation_warmup:
            return min(self._generation_decay, (1 + step) / (10 + step))
        return self._generation_decay


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, decay: float, gate: torch.Tensor | None = None) -> None:
    """target <- decay * target + (1 - decay) * source, over parameters (same architecture).

    `gate` (a 0-d 0/1 tensor on the device) scales the update without a host sync: 0 leaves
    `target` exactly as it was.
    """
    targets = list(target.parameters())
    sources = [p.detach() for p in source.parameters()]
    if gate is None:
        torch._foreach_lerp_(targets, sources, 1.0 - decay)
        return
    steps = torch._foreach_sub(sources, targets)
    torch._foreach_mul_(steps, gate * (1.0 - decay))
    torch._foreach_add_(targets, steps)
