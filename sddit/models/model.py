"""The trainable model: a preconditioned DiT student, its projection head and its EMA teacher, REPA's
projector and SRA's head.

Parameters under `teacher.` are the teacher's (updated only by EMA); all others are the student's.
"""
from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import nn

from sddit.diffusion import EDMPrecond
from sddit.discrimination import DiscriminativeLoss
from sddit.models.dit import Backbone, initialize_backbone
from sddit.models.head import ProjectionHead
from sddit.models.registry import ModelConfig


class StudentOutput(NamedTuple):
    denoised: torch.Tensor                  # D(x) [N, C, H, W]
    logits: torch.Tensor | None             # head on CLS + visible tokens [N, 1 + K, out], if discriminative
    aligned: torch.Tensor | None = None     # projected visible tokens at the REPA tap [N, K, feature dim], if REPA
    regressed: torch.Tensor | None = None   # SRA's head on the visible tokens at its student block [N, K, D], if SRA
    hidden: dict[int, torch.Tensor] | None = None   # {depth: visible patch tokens after that block [N, K, D]}, the
                                            # depths the self-supervision terms read (ModelConfig.tapped_depths)


class Projector(nn.Module):
    """REPA's projector: a 3-layer MLP with SiLU from the encoder's width to the external features' (PyTorch's
    default Linear initialisation, as REPA's)."""

    def __init__(self, in_size: int, hidden_size: int, out_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size),
                                 nn.SiLU(), nn.Linear(hidden_size, out_size))

    def forward(self, h):                                   # h: [N, K, D]
        return self.mlp(h)                                  # [N, K, feature dim]


class Teacher(nn.Module):
    """EMA copy of the student encoder and head; sees every token of a nearly clean input."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.head = copy.deepcopy(head).requires_grad_(False)

    def forward(self, x, t, y):                             # x: c_in * x_teacher [N, C, H, W]
        """-> (encoder tokens [N, 1 + L, D], head logits [N, 1 + L, out])."""
        tokens = self.encoder(x, t, y)[0]
        return tokens, self.head(tokens)


class DiffusionModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        backbone = Backbone(config)
        initialize_backbone(backbone)
        self.denoiser = EDMPrecond(backbone, config.sigma_data)
        self.head = self.teacher = self.disc = None
        if config.disc_weight > 0:
            self.head = ProjectionHead(config.hidden_size, config.head_out_size,
                                       config.head_hidden_size, config.head_bottleneck_size)
            self.teacher = Teacher(backbone.encoder, self.head)
            self.disc = DiscriminativeLoss(config.head_out_size)
        self.projector = None
        if config.repa_weight > 0:
            self.projector = Projector(config.hidden_size, config.repa_projector_size, config.repa_feature_dim)
        # SRA's head maps the student's early tokens into the space of the later block it regresses; REPA's
        # projector shape at the encoder's width
        self.sra_head = None
        if config.sra_weight > 0:
            self.sra_head = Projector(config.hidden_size, config.hidden_size, config.hidden_size)

    @property
    def num_patches(self) -> int:
        return self.denoiser.net.encoder.x_embedder.num_patches

    def student_parameters(self):
        return [p for name, p in self.named_parameters() if not name.startswith("teacher.")]

    def forward(self, x, sigma, labels=None, ids_keep=None) -> StudentOutput:
        """The student's training pass (what DDP wraps); sampling uses `denoiser` directly."""
        denoised, tokens, hidden = self.denoiser.denoise(x, sigma, labels, ids_keep, taps=self.config.tapped_depths())
        logits = self.head(tokens) if self.head is not None else None
        aligned = self.projector(hidden[self.config.repa_depth]) if self.projector is not None else None
        regressed = self.sra_head(hidden[self.config.sra_blocks()[0]]) if self.sra_head is not None else None
        return StudentOutput(denoised, logits, aligned, regressed, hidden)
