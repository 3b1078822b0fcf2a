"""The optimiser step shared by every training loop (bare, Ray Train, benchmarks).

A step is: loss, backward, a finiteness check, optional clipping, AdamW, then the after-step
updates. A non-finite loss or gradient skips the update entirely (parameters, EMAs, centres).
"""
from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sddit.checkpoint import rng_state, save_checkpoint, set_rng_state
from sddit.config import Config
from sddit.data import DataError, Manifest
from sddit.diffusion import edm_sample
from sddit.errors import ConfigError
from sddit.loader import LatentLoader, step_generator
from sddit.models import build_from_config
from sddit.objective import after_step, make_generation_ema, training_loss, unwrap
from sddit.schedules import Schedules
from sddit.transfer import load_weights, transfer_config


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
               schedules: Schedules, generator: torch.Generator | None = None, features=None) -> StepResult:
    """One optimiser step on a batch of clean latents x0 [N, C, H, W] with labels [N] (and, for REPA, the
    external features of the clean images [N, T, D]).

    Nothing here waits for the device: callers read `parts` / `applied` when they log.
    """
    # forward and backward
    with autocast(config, x0.device):
        out = training_loss(model, x0, labels, diffusion=config.diffusion, disc=config.disc,
                            teacher_temp=float(schedules.teacher_temp[step]), generator=generator, features=features,
                            mask_ratio=float(schedules.mask_ratio[step]), generation_ema=generation_ema)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()

    # gradient norm (clipped if asked); a non-finite loss or norm marks the step as skipped
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if config.optim.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip, foreach=True)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    applied = torch.isfinite(out.loss) & torch.isfinite(grad_norm)

    # update parameters at this step's lr (fused AdamW leaves everything untouched where found_inf = 1), then
    # teacher EMA, centres and generation EMA, gated the same way
    optimizer.found_inf = (~applied).to(torch.float32)
    for group in optimizer.param_groups:
        group["lr"] = float(schedules.lr[step])
    optimizer.step()
    after_step(model, generation_ema, out, teacher_momentum=float(schedules.teacher_momentum[step]),
               cls_centre_momentum=config.disc.cls_centre_momentum,
               patch_centre_momentum=config.disc.patch_centre_momentum, generation_decay=schedules.generation_decay(step),
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


# ---------------------------------------------------------------------------------------------
# The training loop (one function, EDM style) and what it needs around it
# ---------------------------------------------------------------------------------------------

class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps: the run stops; checkpoints on disk stay the last good ones."""


def fit_to_dataset(config: Config, manifest: Manifest, directory) -> Config:
    """Check the dataset matches the config (codec, resolution) and take shapes and classes from it."""
    where = f"{Path(directory) / 'manifest.json'}"
    if manifest.settings.codec != config.data.codec:
        raise DataError(f"{where}: dataset codec {manifest.settings.codec!r} but the config expects "
                        f"data.codec={config.data.codec!r}")
    if manifest.settings.resolution != config.data.resolution:
        raise DataError(f"{where}: dataset resolution {manifest.settings.resolution} but the config expects "
                        f"data.resolution={config.data.resolution}")
    channels, size, _ = manifest.latent_shape
    repa = {}
    if config.model.repa_weight > 0:
        if manifest.features is None:
            raise DataError(f"{where}: model.repa_weight > 0 but the dataset has no external features; encode it "
                            f"with pipelines/encode.py --repa-encoder {config.model.repa_encoder} (or set "
                            f"model.repa_weight=0)")
        if manifest.features["encoder"] != config.model.repa_encoder:
            raise DataError(f"{where}: the dataset's features come from {manifest.features['encoder']!r} but the "
                            f"config aligns with model.repa_encoder={config.model.repa_encoder!r}")
        repa = {"repa_feature_dim": manifest.features["shape"][1]}
    config.model = dataclasses.replace(config.model, in_channels=channels, input_size=size,
                                       num_classes=manifest.num_classes, **repa).validate()
    return config


def dataset_info(manifest: Manifest, directory) -> dict:
    """What a checkpoint records about its data, so sampling and evaluation need nothing else."""
    return {"dir": str(Path(directory).resolve()), "codec": manifest.settings.codec, "vae": manifest.settings.vae,
            "column": manifest.column, "scaling_factor": manifest.scaling_factor,
            "latent_shape": manifest.latent_shape, "num_classes": manifest.num_classes,
            "resolution": manifest.settings.resolution, "class_names": [c["name"] for c in manifest.classes]}


def sample_grid_latents(ema, config: Config, count: int = 64, seed: int = 0) -> torch.Tensor:
    """Fixed noise and labels (class i % K) so grids from different steps are comparable."""
    device = next(ema.parameters()).device
    c, size = config.model.in_channels, config.model.input_size
    noise = torch.randn(count, c, size, size, generator=torch.Generator().manual_seed(seed)).to(device)
    labels = (torch.arange(count) % config.model.num_classes).to(device) if config.model.num_classes else None
    return edm_sample(ema, noise, labels, steps=18, cfg_scale=config.train.sample_cfg_scale).float()


class LoopHooks:
    """Where the loop's outputs go. The default keeps everything in memory; pipelines override."""

    def log(self, step: int, metrics: dict, checkpoint_follows: bool = False) -> None:
        """`checkpoint_follows`: this step's `checkpoint` call comes next, with the same metrics."""

    def samples(self, step: int, latents: torch.Tensor) -> None:
        pass

    def evaluate(self, step: int, ema) -> dict:
        """Extra metrics from the generation EMA at a log step, on rank 0 (e.g. a proxy FID)."""
        return {}

    def checkpoint(self, step: int, save, metrics: dict) -> None:
        """`save(directory)` writes checkpoint.pt there."""

    def finished(self, step: int, metrics: dict) -> None:
        """The run was resumed from its final checkpoint and trains no step: `metrics` are that checkpoint's.
        Whoever waits for the run may have died between that checkpoint and its report (a sweep killed just as
        a trial ended), so a pipeline reports them again here; nothing is saved, so the checkpoint stays the
        same file and what was computed from it (an evaluation) stays valid."""


class LocalHooks(LoopHooks):
    """Bare-loop outputs: checkpoints under run_dir/checkpoints (the last `keep`), log lines on stdout."""

    def __init__(self, run_dir, keep: int = 3, verbose: bool = True):
        self.root = Path(run_dir) / "checkpoints"
        self.keep, self.verbose = keep, verbose

    def log(self, step, metrics, checkpoint_follows=False):
        if self.verbose:
            print(f"step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)

    def checkpoint(self, step, save, metrics):
        save(self.root / f"step-{step:08d}")
        for old in sorted(self.root.glob("step-*"))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        found = sorted(self.root.glob("step-*/checkpoint.pt"))
        return found[-1].parent if found else None


def train_loop(config: Config, data_dir, *, device="cpu", rank: int = 0, world_size: int = 1,
               hooks: LoopHooks | None = None, wrap_model=None, resume: dict | None = None,
               init_from: dict | None = None) -> dict:
    """Train `config` on the shards in `data_dir` until config.train.steps; returns the last metrics.

    `resume` (a loaded checkpoint) continues exactly; `init_from` only takes its weights.
    `wrap_model` wraps the model for data parallelism (e.g. DDP); progress is counted in images.
    """
    hooks = hooks or LoopHooks()
    device = torch.device(device)
    per_rank_batch, remainder = divmod(config.optim.batch_size, world_size)
    if remainder:
        raise ConfigError("optim.batch_size", f"{config.optim.batch_size} is not divisible by {world_size} workers")

    # load data: this rank's share of the shards, with the model shaped after the dataset
    loader = LatentLoader(data_dir, rank=rank, world_size=world_size, batch_size=per_rank_batch,
                          seed=config.train.seed, device=device, features=config.model.repa_weight > 0)
    config = fit_to_dataset(config, loader.manifest, data_dir)
    source = resume if resume is not None else init_from
    if source is not None:                                  # perhaps trained at another resolution
        config = transfer_config(config, source["config"])

    # build the model, optimiser and EMAs; take a checkpoint's weights, or all its state if resuming
    torch.manual_seed(config.train.seed)                    # same initial weights on every rank
    model, optimizer, ema, schedules = build_training(config, device)
    step = 0
    if init_from is not None:
        load_weights(model, init_from["model"])
        load_weights(ema, init_from["generation_ema"])
    if resume is not None:
        model.load_state_dict(resume["model"])
        ema.load_state_dict(resume["generation_ema"])
        optimizer.load_state_dict(resume["optimizer"])
        step = resume["step"]
        set_rng_state(resume["rng"])
    net = wrap_model(model) if wrap_model is not None else model

    def save(directory):
        save_checkpoint(directory, config=config, model=model, generation_ema=ema, optimizer=optimizer, step=step,
                        images_seen=step * config.optim.batch_size, data_position=loader.position(step),
                        rng=rng_state(), dataset=dataset_info(loader.manifest, data_dir), metrics=metrics)

    bad_streak = torch.zeros((), dtype=torch.long, device=device)
    worst_streak = torch.zeros_like(bad_streak)
    skipped = torch.zeros_like(bad_streak)
    # training time is the optimiser steps' alone: logging, proxy evaluations, sample grids and checkpoints
    # between them (`bookkeeping`) are left out of both step_seconds and images_per_s
    window_start, window_step, bookkeeping = time.perf_counter(), step, 0.0
    step_seconds = 0.0                                      # in optimiser steps, in this process
    metrics: dict = {}
    if resume is not None and step >= config.train.steps:
        metrics = resume.get("metrics", {})
        hooks.finished(step, metrics)
    while step < config.train.steps:
        # one optimiser step (gradient, AdamW, teacher EMA, centres, generation EMA), all on the device
        x0, labels, features = loader.batch(step)
        result = train_step(net, optimizer, ema, x0, labels, step=step, config=config, schedules=schedules,
                            generator=step_generator(config.train.seed, rank, step, device), features=features)
        bad_streak = torch.where(result.applied, torch.zeros_like(bad_streak), bad_streak + 1)
        worst_streak = torch.maximum(worst_streak, bad_streak)
        skipped += ~result.applied
        step += 1
        finished = step == config.train.steps
        checkpointing = step % config.train.checkpoint_every == 0 or finished
        log_now = step % config.train.log_every == 0 or finished
        # the only place the host waits for the device, so the steps' time ends after it
        parts = {key: float(value) for key, value in result.parts.items()} if log_now else {}
        paused = time.perf_counter()

        # log
        if log_now:
            if int(worst_streak) >= config.train.max_bad_steps:
                raise NonFiniteError(f"{int(worst_streak)} consecutive steps with a non-finite loss or gradient "
                                     f"before step {step} (train.max_bad_steps={config.train.max_bad_steps}); "
                                     f"the last checkpoint holds the last good state")
            seconds = max(paused - window_start - bookkeeping, 1e-9)
            step_seconds += seconds
            metrics = dict(parts, grad_norm=float(result.grad_norm), lr=optimizer.param_groups[0]["lr"],
                           teacher_temp=float(schedules.teacher_temp[step - 1]),
                           teacher_momentum=float(schedules.teacher_momentum[step - 1]),
                           mask_ratio=float(schedules.mask_ratio[step - 1]),     # 0 from the unmasked phase on
                           skipped_steps=float(skipped), epoch=float(loader.position(step)["epoch"]),
                           images_per_s=(step - window_step) * config.optim.batch_size / seconds,
                           step_seconds=step_seconds)
            window_start, window_step, bookkeeping = paused, step, 0.0
            if rank == 0:
                metrics.update(hooks.evaluate(step, ema))
            hooks.log(step, metrics, checkpoint_follows=checkpointing)

        # sample a grid from the generation EMA (rank 0)
        if rank == 0 and config.train.sample_count and (step % config.train.sample_every == 0 or finished):
            hooks.samples(step, sample_grid_latents(ema, config, count=config.train.sample_count))

        # save snapshot
        if checkpointing:
            hooks.checkpoint(step, save, metrics)
        bookkeeping += time.perf_counter() - paused
    loader.close()
    return metrics
