"""Training checkpoints: everything needed to continue exactly, written atomically.

A checkpoint is one `checkpoint.pt` (inside a directory when Ray Train manages it) holding:
config, student + teacher + centres (`model`), generation EMA, optimiser, step, images seen,
every RNG state, the data position, and what the dataset was (codec, shapes, classes), so the
evaluate stage needs nothing else.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sddit import code_version
from sddit.config import Config, config_from_dict
from sddit.data import write_atomically
from sddit.diffusion import EDMPrecond
from sddit.errors import UserError
from sddit.models.dit import Backbone

CHECKPOINT_FILE = "checkpoint.pt"


def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def save_checkpoint(path: str | Path, *, config: Config, model, generation_ema, optimizer, step: int,
                    images_seen: int, data_position: dict, rng: dict, dataset: dict,
                    metrics: dict | None = None) -> Path:
    """Write atomically (temp file + rename): a reader sees the old checkpoint or the new one, never half.
    `metrics`: those reported with this checkpoint, to report again if a finished run is resumed."""
    path = Path(path)
    if path.suffix != ".pt":
        path = path / CHECKPOINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": config.to_dict(), "model": model.state_dict(), "generation_ema": generation_ema.state_dict(),
        "optimizer": optimizer.state_dict(), "step": step, "images_seen": images_seen,
        "data_position": data_position, "rng": rng, "dataset": dataset, "code_version": code_version(),
        "metrics": metrics or {},
    }
    return write_atomically(path, lambda f: torch.save(payload, f))


def resolve(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (expected a {CHECKPOINT_FILE} or a directory holding one)")
    return path


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file is unreadable or incomplete; the message names the file."""


REQUIRED_KEYS = ("config", "model", "generation_ema", "optimizer", "step", "dataset")


def load_checkpoint(path: str | Path, map_location="cpu") -> dict[str, Any]:
    path = resolve(path)
    try:
        # weights_only=False: the payload holds numpy / python RNG states; only load checkpoints you wrote
        payload = torch.load(path, map_location=map_location, weights_only=False, mmap=True)
    except Exception as error:              # torch / zipfile / pickle each raise their own kind
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise CheckpointError(f"{path}: unreadable checkpoint, truncated or not a torch file "
                              f"({type(error).__name__}: {reason})") from None
    missing = [key for key in REQUIRED_KEYS if not isinstance(payload, dict) or key not in payload]
    if missing:
        raise CheckpointError(f"{path}: not an sddit checkpoint (missing {', '.join(missing)})")
    # written before model.cls_gate existed: its CLS was gated like the patch tokens
    model = payload["config"].get("model") if isinstance(payload["config"], dict) else None
    if isinstance(model, dict):
        model.setdefault("cls_gate", "zero")
    payload["config"] = config_from_dict(payload["config"])
    return payload


def load_generator(path: str | Path, device="cpu") -> tuple[Config, EDMPrecond, dict]:
    """(config, generation-EMA denoiser in eval mode, dataset info) for sampling."""
    payload = load_checkpoint(path)
    return payload["config"], generator_of(payload, device), payload["dataset"]


def generator_of(payload: dict, device="cpu") -> EDMPrecond:
    """The generation-EMA denoiser of a loaded checkpoint, in eval mode."""
    config = payload["config"]
    ema = EDMPrecond(Backbone(config.model), config.model.sigma_data)   # no head or teacher needed to sample
    ema.load_state_dict(payload["generation_ema"])
    return ema.to(device).eval().requires_grad_(False)
