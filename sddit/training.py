"""The optimiser step shared by every training loop (bare, Ray Train, benchmarks).

A step is: loss, backward, a finiteness check, optional clipping, AdamW, then the after-step
updates. A non-finite loss or gradient skips the update entirely (parameters, EMAs, centres).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from sddit.config import Config
from sddit.models import build_from_config
from sddit.objective import after_step, make_generation_ema, training_loss, unwrap
from sddit.schedules import Schedules


def make_optimizer(model, config: Config) -> torch.optim.AdamW:
    """AdamW over the student's trainable parameters (never the teacher's, never fixed embeddings)."""
    params = [p for p in unwrap(model).student_parameters() if p.requires_grad]
    device = params[0].device
    return torch.optim.AdamW(params, lr=config.optim.lr, betas=config.optim.betas,
                             weight_decay=config.optim.weight_decay, fused=device.type == "cuda")


def autocast(config: Config, device: torch.device):
    if config.optim.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class StepResult:
    applied: bool                           # False: non-finite loss or gradient, nothing was updated
    parts: dict[str, torch.Tensor]
    grad_norm: torch.Tensor


def train_step(model, optimizer, generation_ema, x0, labels, *, step: int, config: Config,
               schedules: Schedules, generator: torch.Generator | None = None) -> StepResult:
    """One optimiser step on a batch of clean latents x0 [N, C, H, W] with labels [N]."""
    # forward and backward
    with autocast(config, x0.device):
        out = training_loss(model, x0, labels, diffusion=config.diffusion, disc=config.disc,
                            teacher_temp=float(schedules.teacher_temp[step]), generator=generator)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()

    # clip (or just measure) the gradient norm; skip the whole update if anything is non-finite
    params = [p for group in optimizer.param_groups for p in group["params"]]
    max_norm = config.optim.grad_clip if config.optim.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if not bool(torch.isfinite(out.loss) & torch.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(False, out.parts, grad_norm.detach())

    # update parameters, then teacher EMA, centres and generation EMA
    optimizer.step()
    after_step(model, generation_ema, out, teacher_momentum=float(schedules.teacher_momentum[step]),
               centre_momentum=config.disc.centre_momentum, generation_decay=schedules.generation_decay(step))
    return StepResult(True, out.parts, grad_norm.detach())


def build_training(config: Config, device: torch.device | str = "cpu"):
    """(model, optimizer, generation EMA, schedules) for a config, on a device."""
    model = build_from_config(config.model).to(device)
    return model, make_optimizer(model, config), make_generation_ema(model), Schedules(config)
