"""Self-distillation loss (DINO on the CLS token, iBOT on patch tokens) with its centres as buffers.

Centres live in module buffers, so a checkpoint of the model carries them without extra code.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def distillation_cross_entropy(student_logits, teacher_logits, centre, student_temp, teacher_temp):
    """Mean over tokens of H(softmax((t - centre) / tau_t), softmax(s / tau_s)); logits: [..., K]."""
    return distillation_terms(student_logits, teacher_logits, centre, student_temp, teacher_temp)[0]


def distillation_terms(student_logits, teacher_logits, centre, student_temp, teacher_temp):
    """(cross-entropy, mean entropy of the teacher's targets, fraction of tokens where the student's and the
    teacher's most likely prototype agree). A target entropy near ln K means uniform targets: no signal."""
    targets = torch.softmax((teacher_logits - centre) / teacher_temp, dim=-1)
    log_probs = torch.log_softmax(student_logits / student_temp, dim=-1)
    cross_entropy = -(targets * log_probs).sum(dim=-1).mean()
    with torch.no_grad():
        entropy = -(targets * torch.log(targets.clamp_min(1e-30))).sum(dim=-1).mean()
        agreement = (targets.argmax(-1) == log_probs.argmax(-1)).float().mean()
    return cross_entropy, entropy, agreement


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over the leading dims of `x`, averaged across data-parallel ranks when distributed."""
    mean = x.reshape(-1, x.shape[-1]).float().mean(dim=0)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(mean)
        mean /= dist.get_world_size()
    return mean


class DiscriminativeLoss(nn.Module):
    def __init__(self, out_size: int):
        super().__init__()
        self.register_buffer("centre_cls", torch.zeros(out_size))
        self.register_buffer("centre_patch", torch.zeros(out_size))

    def forward(self, student_cls, student_patch, teacher_cls, teacher_patch, *, student_temp, teacher_temp):
        """student/teacher_cls: [N, K]; student/teacher_patch: [N, T, K] at the same positions.
        -> {loss_cls, loss_patch} and the diagnostics {target_entropy_*, agreement_*} of each."""
        parts = {}
        for kind, student, teacher, centre in (("cls", student_cls, teacher_cls, self.centre_cls),
                                               ("patch", student_patch, teacher_patch, self.centre_patch)):
            loss, entropy, agreement = distillation_terms(student.float(), teacher.float(), centre,
                                                          student_temp, teacher_temp)
            parts.update({f"loss_{kind}": loss, f"target_entropy_{kind}": entropy, f"agreement_{kind}": agreement})
        return parts

    @torch.no_grad()
    def update_centres(self, teacher_cls, teacher_patch, cls_momentum: float, patch_momentum: float,
                       gate: torch.Tensor | None = None) -> None:
        """EMA of the teacher's batch-mean logits; where the 0-d bool `gate` is False, nothing changes."""
        for centre, logits, momentum in ((self.centre_cls, teacher_cls, cls_momentum),
                                         (self.centre_patch, teacher_patch, patch_momentum)):
            updated = momentum * centre + (1 - momentum) * global_mean(logits)
            centre.copy_(updated if gate is None else torch.where(gate, updated, centre))
