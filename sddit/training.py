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
    """Fused AdamW over the student's trainable parameters (never the teacher's, never fixed embeddings).

    Fused, on CPU too, because its `found_inf` input lets `train_step` skip a bad update on the
    device instead of asking the host whether the loss was finite.
    """
    params = [p for p in unwrap(model).student_parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=config.optim.lr, betas=config.optim.betas,
                             weight_decay=config.optim.weight_decay, fused=True)


def autocast(config: Config, device: torch.device):
    if config.optim.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class StepResult:
    applied: torch.Tensor                   # 0-d bool on the device; False: non-finite, nothing was updated
    parts: dict[str, torch.Tensor]          # detached scalars on the device
    grad_norm: torch.Tensor


def train_step(model, optimizer, generation_ema, x0, labels, *, step: int, config: Config,
               schedules: Schedules, generator: torch.Generator | None = None) -> StepResult:
    """One optimiser step on a batch of clean latents x0 [N, C, H, W] with labels [N].

    Nothing here waits for the device: callers read `parts` / `applied` when they log.
    """
    # forward and backward
    with autocast(config, x0.device):
        out = training_loss(model, x0, labels, diffusion=config.diffusion, disc=config.disc,
                            teacher_temp=float(schedules.teacher_temp[step]), generator=generator)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()

    # gradient norm (clipped if asked); a non-finite loss or norm marks the step as skipped
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if config.optim.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip, foreach=True)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    applied = torch.isfinite(out.loss) & torch.isfinite(grad_norm)

    # update parameters (fused AdamW leaves everything untouched where found_inf = 1), then
    # teacher EMA, centres and generation EMA, gated the same way
    optimizer.found_inf = (~applied).to(torch.float32)
    optimizer.step()
    after_step(model, generation_ema, out, teacher_momentum=float(schedules.teacher_momentum[step]),
               centre_momentum=config.disc.centre_momentum, generation_decay=schedules.generation_decay(step),
               applied=applied)
    return StepResult(applied, out.parts, grad_norm.detach())


def compile_model(model) -> None:
    """torch.compile student, head, teacher and loss in place (nn.Module.compile), so parameter
    names and checkpoints stay the same as without compilation."""
    for module in (model.denoiser.net, model.head, model.teacher, model.disc):
        if module is not None:
            module.compile()


def build_training(config: Config, device: torch.device | str = "cpu"):
    """(model, optimizer, generation EMA, schedules) for a config, on a device."""
    model = build_from_config(config.model).to(device)
    if config.train.compile:
        compile_model(model)
    return model, make_optimizer(model, config), make_generation_ema(model), Schedules(config)
