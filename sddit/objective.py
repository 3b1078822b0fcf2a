"""One batch's training loss, and the updates that follow a successful optimiser step.

`training_loss` is the single place where DiT, MaskDiT and SD-DiT differ at training time, and
only through the model's configuration (mask ratio, mask token, MAE weight, discriminative weight,
REPA, LayerSync, Dispersive and SRA weights).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sddit.config import DiffusionConfig, DiscriminationConfig
from sddit.diffusion import edm_coefficients, edm_loss_weight, sample_sigma
from sddit.models.dit import gather_tokens, random_keep
from sddit.models.model import DiffusionModel
from sddit.schedules import ema_update


@dataclass
class LossOutput:
    loss: torch.Tensor                      # scalar to backpropagate
    parts: dict[str, torch.Tensor]          # detached scalars for logging: loss_gen, loss_mae, loss_cls, loss_patch,
                                            # target_entropy_{cls,patch}, agreement_{cls,patch},
                                            # teacher_cls_{token,logit}_std, loss_{repa,layersync,dispersive,sra},
                                            # sra_cosine
    teacher_cls: torch.Tensor | None = None    # detached teacher logits, for the centre update after the step
    teacher_patch: torch.Tensor | None = None


def unwrap(model) -> DiffusionModel:
    """The DiffusionModel inside a DistributedDataParallel (or compiled) wrapper."""
    while not isinstance(model, DiffusionModel):
        model = model.module if hasattr(model, "module") else model._orig_mod
    return model


def per_patch_mean(x, patch_size: int):                     # [N, C, H, W] -> [N, L]
    return F.avg_pool2d(x.mean(dim=1, keepdim=True), patch_size).flatten(1)


def mean_over_patches(err, chosen):                         # [N, L], [N, L] of 0/1 -> []
    """Each image's mean error over its chosen patches, averaged over the images."""
    return ((err * chosen).sum(dim=1) / chosen.sum(dim=1)).mean()


def patchify(x, patch_size: int):                           # [N, C, H, W] -> [N, L, p*p*C]
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // patch_size) * (w // patch_size), -1)


def mae_patch_loss(denoised, target_image, masked, patch_size: int):
    """MaskDiT's MAE term: per-patch-normalised target vs. prediction, mean over masked patches."""
    target = patchify(target_image, patch_size)
    target = (target - target.mean(dim=-1, keepdim=True)) / (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
    return mean_over_patches(((patchify(denoised, patch_size) - target) ** 2).mean(dim=-1), masked)


def on_token_grid(features, num_patches: int):             # [N, T, D] -> [N, L, D]
    """External features resampled (bilinear) onto the DiT's token grid when the two grids differ."""
    if features.shape[1] == num_patches:
        return features
    n, t, d = features.shape
    side, target = int(round(t ** 0.5)), int(round(num_patches ** 0.5))
    grid = features.transpose(1, 2).reshape(n, d, side, side)
    grid = F.interpolate(grid, size=(target, target), mode="bilinear", align_corners=False)
    return grid.reshape(n, d, num_patches).transpose(1, 2)


def mean_cosine(a, b):                                     # [..., D] each -> scalar
    """The cosine similarity of each pair of vectors along the last dimension, averaged (in float32)."""
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(dim=-1).mean()


def repa_loss(aligned, features, ids_keep=None):
    """REPA's term: minus the mean cosine similarity between each visible token's projection [N, K, D] and
    the external feature of the clean image at the same position [N, L, D]."""
    target = features if ids_keep is None else gather_tokens(features, ids_keep)
    return -mean_cosine(aligned, target)


def layersync_loss(shallow, deep):                         # [N, K, D] each
    """LayerSync's term: minus the mean cosine between each token of a shallow block and the same token of a
    deeper block, the deeper one a fixed target (no gradient reaches it through this term)."""
    return -mean_cosine(shallow, deep.detach())


def dispersive_loss(z, temperature: float = 1.0):            # z: [N, ...]
    """Dispersive Loss, InfoNCE-L2: log of the mean, over every ordered pair (i, j) of the batch's images, i = j
    included, of exp(-|z_i - z_j|^2 / (d tau)), d the flattened size. Lowest when the images' representations
    lie far apart; no positive pairs, so it does not pull against the regression target."""
    z = z.float().flatten(1)
    n = z.shape[0]
    distances = F.pdist(z).pow(2) / (z.shape[1] * temperature)       # [N (N - 1) / 2], the pairs i < j
    exponents = torch.cat([-distances, -distances, distances.new_zeros(n)])    # both orders, and i = j
    return torch.logsumexp(exponents, dim=0) - 2 * math.log(n)


def sra_teacher_sigma(sigma, shift: float, *, sigma_min: float = 0.002, generator=None):
    """SRA's lower noise level for the teacher, in EDM's terms. SRA draws the teacher's time as t - U(0, shift)
    on the linear path x_t = (1 - t) x0 + t n, whose noise-to-signal ratio is sigma = t / (1 - t); so t = sigma /
    (1 + sigma), shifted, kept at EDM's sigma_min at least (t = 0 would be no noise at all; a student already
    below it keeps its own level) and mapped back."""
    t = sigma / (1 + sigma)
    floor = torch.minimum(t, torch.full_like(t, sigma_min / (1 + sigma_min)))
    t = torch.maximum(t - shift * torch.rand(sigma.shape, device=sigma.device, generator=generator), floor)
    return t / (1 - t)


def sra_loss(regressed, target, kind: str = "smooth_l1"):  # [N, K, D] each; the target carries no gradient
    """SRA's term: the student's head output against the teacher's tokens, smooth L1 (beta 0.05) or 1 - cos."""
    regressed, target = regressed.float(), target.detach().float()
    if kind == "cosine":
        return 1 - mean_cosine(regressed, target)
    return F.smooth_l1_loss(regressed, target, beta=0.05)


def between_image_std(x):                                  # x: [N, D]
    """Standard deviation over the batch's images, averaged over channels: 0 when every image gets the same vector."""
    return x.float().std(dim=0).mean()


def training_loss(model, x0, labels, *, diffusion: DiffusionConfig, disc: DiscriminationConfig,
                  teacher_temp: float, generator: torch.Generator | None = None, features=None,
                  mask_ratio: float | None = None, generation_ema=None) -> LossOutput:
    """x0: clean latents [N, C, H, W]; labels: [N] int64 (ignored for unconditional models); features: the
    external encoder's features of the clean images [N, T, D] (REPA only); mask_ratio: this step's, when a
    schedule changes it (None: the model's); generation_ema: the EMA denoiser, SRA's teacher (SRA only)."""
    net = unwrap(model)
    cfg = net.config
    mask_ratio = cfg.mask_ratio if mask_ratio is None else mask_ratio
    n_batch, device = x0.shape[0], x0.device

    # noise the data: x = x0 + sigma n, with EDM's log-normal sigma
    sigma = diffusion.sigma_scale * sample_sigma(n_batch, diffusion.p_mean, diffusion.p_std, device=device,
                                                 generator=generator)
    n = torch.randn(x0.shape, device=device, generator=generator)
    x = x0 + sigma * n

    # drop labels to the null class for classifier-free guidance
    if cfg.num_classes > 0 and diffusion.label_dropout > 0:
        drop = torch.rand(n_batch, device=device, generator=generator) < diffusion.label_dropout
        labels = torch.where(drop, torch.full_like(labels, cfg.num_classes), labels)
    elif cfg.num_classes == 0:
        labels = None

    # choose the visible tokens, per sample (MDT: at a ratio drawn for the step)
    ids_keep = visible = None
    if mask_ratio > 0 and cfg.mask_ratio_spread > 0:
        mask_ratio += cfg.mask_ratio_spread * torch.rand((), device=device, generator=generator).item()
    if mask_ratio > 0:
        ids_keep = random_keep(n_batch, net.num_patches, mask_ratio, block_size=cfg.mask_block_size,
                               crop=cfg.mask_crop, device=device, generator=generator)
        visible = torch.zeros(n_batch, net.num_patches, device=device).scatter_(1, ids_keep, 1.0)  # [N, L]

    # student: denoise from the visible tokens, head on CLS + visible tokens
    out = model(x, sigma, labels, ids_keep)
    err = edm_loss_weight(sigma, cfg.sigma_data) * (out.denoised - x0) ** 2  # [N, C, H, W]
    parts = {}
    if ids_keep is not None and cfg.mask_token:
        # MaskDiT: denoising loss on visible patches, MAE loss on the masked ones
        loss_gen = mean_over_patches(per_patch_mean(err, cfg.patch_size), visible)
        # as MaskDiT's loss.py: the target is the noisy input x itself, normalised per patch, not x0
        parts["loss_mae"] = mae_patch_loss(out.denoised, x, 1.0 - visible, cfg.patch_size)
        loss = loss_gen + cfg.mae_weight * parts["loss_mae"]
    else:
        # DiT, SD-DiT and MDT: EDM loss over the full latent
        loss_gen = loss = err.mean()
    parts["loss_gen"] = loss_gen

    # MDT: the same step also denoises the whole image (the same noise level, noise of its own), and says how
    # well the side-interpolater's masked patches came out against the visible ones
    if cfg.unmasked_pass and ids_keep is not None:
        n_full = torch.randn(x0.shape, device=device, generator=generator)
        full = model(x0 + sigma * n_full, sigma, labels)
        parts["loss_unmasked"] = (edm_loss_weight(sigma, cfg.sigma_data) * (full.denoised - x0) ** 2).mean()
        loss = loss + parts["loss_unmasked"]
        with torch.no_grad():
            parts["loss_masked_patches"] = mean_over_patches(per_patch_mean(err, cfg.patch_size), 1 - visible)

    # discrimination: teacher on x0 + teacher sigma n (same n, no mask), gathered at the kept positions
    teacher_cls = teacher_patch = None
    if net.teacher is not None:
        with torch.no_grad():
            if diffusion.teacher_sigma_dist == "student":
                t_sigma = diffusion.sigma_scale * sample_sigma(n_batch, diffusion.p_mean, diffusion.p_std,
                                                               device=device, generator=generator)
            else:
                t_sigma = torch.full((n_batch, 1, 1, 1), diffusion.teacher_sigma, device=device)
            _, _, c_in, c_noise = edm_coefficients(t_sigma, cfg.sigma_data)
            t_labels = labels if disc.teacher_label or labels is None else torch.full_like(labels, cfg.num_classes)
            t_tokens, t_logits = net.teacher(c_in * (x0 + t_sigma * n), c_noise.flatten(), t_labels)
            teacher_cls, teacher_patch = t_logits[:, 0], t_logits[:, 1:]              # [N, K], [N, L, K]
            # whether the CLS term can carry a signal: how much the teacher's CLS varies between the batch's images
            parts["teacher_cls_token_std"] = between_image_std(t_tokens[:, 0])
            parts["teacher_cls_logit_std"] = between_image_std(teacher_cls)
            if ids_keep is not None:
                teacher_patch = gather_tokens(teacher_patch, ids_keep)
        terms = net.disc(out.logits[:, 0], out.logits[:, 1:], teacher_cls, teacher_patch,
                         student_temp=disc.student_temp, teacher_temp=teacher_temp)
        parts.update(terms)
        loss = loss + cfg.disc_weight * (disc.cls_weight * terms["loss_cls"] + disc.patch_weight * terms["loss_patch"])

    # representation alignment: the student's visible tokens at the tap vs. the clean image's external
    # features (with a mask, the encoder has no token at the other positions to align)
    if net.projector is not None:
        if features is None:
            raise ValueError("model.repa_weight > 0 needs the external features of the batch")
        parts["loss_repa"] = repa_loss(out.aligned, on_token_grid(features, net.num_patches), ids_keep)
        loss = loss + cfg.repa_weight * parts["loss_repa"]

    # self-supervision inside the encoder, from the student's own forward: LayerSync pulls a shallow block towards
    # a deeper one; Dispersive Loss spreads one block's representations over the batch
    if cfg.layersync_weight > 0:
        shallow, deep = cfg.layersync_blocks()
        parts["loss_layersync"] = layersync_loss(out.hidden[shallow], out.hidden[deep])
        loss = loss + cfg.layersync_weight * parts["loss_layersync"]
    if cfg.dispersive_weight > 0:
        parts["loss_dispersive"] = dispersive_loss(out.hidden[cfg.dispersive_block()], cfg.dispersive_temp)
        loss = loss + cfg.dispersive_weight * parts["loss_dispersive"]

    # SRA: the student's early tokens regress the generation EMA's later tokens at a lower noise level
    if net.sra_head is not None:
        if generation_ema is None:
            raise ValueError("model.sra_weight > 0 needs the generation EMA, SRA's teacher")
        with torch.no_grad():
            s_sigma = sra_teacher_sigma(sigma, cfg.sra_time_shift, generator=generator)
            _, _, c_in, c_noise = edm_coefficients(s_sigma, cfg.sigma_data)
            depth = cfg.sra_blocks()[1]
            target = generation_ema.net.encoder(c_in * (x0 + s_sigma * n), c_noise.flatten(), labels,
                                                taps=(depth,))[3][depth]                    # [N, L, D]
            if ids_keep is not None:
                target = gather_tokens(target, ids_keep)
        parts["loss_sra"] = sra_loss(out.regressed, target, cfg.sra_loss)
        parts["sra_cosine"] = mean_cosine(out.regressed.detach(), target)
        loss = loss + cfg.sra_weight * parts["loss_sra"]

    parts = {key: value.detach() for key, value in parts.items()}
    parts["loss"] = loss.detach()
    return LossOutput(loss, parts, teacher_cls, teacher_patch)


@torch.no_grad()
def after_step(model, generation_ema, out: LossOutput, *, teacher_momentum: float, cls_centre_momentum: float,
               patch_centre_momentum: float, generation_decay: float, applied: torch.Tensor | None = None) -> None:
    """Teacher EMA, centre update, generation EMA. `applied` (0-d bool on the device) gates all
    three, so a skipped optimiser step changes nothing here either, without a host sync."""
    net = unwrap(model)
    gate = None if applied is None else applied.to(torch.float32)
    if net.teacher is not None:
        ema_update(net.teacher.encoder, net.denoiser.net.encoder, teacher_momentum, gate)
        ema_update(net.teacher.head, net.head, teacher_momentum, gate)
        net.disc.update_centres(out.teacher_cls, out.teacher_patch, cls_centre_momentum, patch_centre_momentum, applied)
    if generation_ema is not None:
        ema_update(generation_ema, net.denoiser, generation_decay, gate)


def make_generation_ema(model):
    """A frozen copy of the student's preconditioned encoder + decoder, used for sampling."""
    return copy.deepcopy(unwrap(model).denoiser).requires_grad_(False).eval()
