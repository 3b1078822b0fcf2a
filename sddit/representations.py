"""External encoders for REPA: frozen image encoders whose patch tokens the DiT's hidden tokens align with.

The encode stage runs them once per image (and per mirrored image) and stores their features in the
shards, so training never runs them. Two kinds:

- `timm:<architecture>`: a timm ViT, e.g. `timm:vit_base_patch14_dinov2` (DINOv2 ViT-B/14, REPA's
  default), loaded from a local weights file only. Images are resized (bicubic) to 224 px per 256 px
  of input, as REPA does, and normalised with ImageNet's mean and std; the features are the final
  normed patch tokens (CLS and register tokens dropped): [256, 768] for ViT-B/14 at 224 px.
- `local-vit`: a small ViT trained here (`train_local_vit`, `pipelines/repa_encoder.py`) for the small
  built-in datasets, at the dataset's own resolution. Train it on the training split, which the FID
  judge (trained on the held-out split) never sees; it is a ViT, the judge a CNN. It is still a
  classifier of the same classes as the judge, so a gain in domain FID from aligning with it is
  weaker evidence than one measured with an unrelated metric network.
"""
from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sddit.data import file_sha256, write_atomically
from sddit.errors import UserError

LOCAL_VIT = "local-vit"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TIMM_WEIGHTS_HINT = ("download it once on a machine with internet, e.g. the model.safetensors of the Hugging Face "
                     "repository timm/vit_base_patch14_dinov2.lvd142m for timm:vit_base_patch14_dinov2")


class ExternalEncoderError(UserError, RuntimeError):
    """The external encoder cannot be loaded; the message names the file and where to get it."""


class ExternalEncoder:
    """A frozen ViT and how images reach it; `features` gives its patch tokens as float16 [N, T, D]."""

    def __init__(self, net, *, name: str, weights_sha256: str, input_size: int, mean, std, channels: int):
        self.net = net.eval().requires_grad_(False)
        self.name, self.weights_sha256 = name, weights_sha256
        self.input_size, self.channels = input_size, channels
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    @property
    def device(self):
        return next(self.net.parameters()).device

    def to(self, device) -> ExternalEncoder:
        self.net.to(device)
        return self

    @torch.no_grad()
    def features(self, images: np.ndarray, dtype=torch.float32) -> np.ndarray:
        """uint8 images [N, H, W, C] -> the final normed patch tokens, float16 [N, T, D]."""
        x = torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float() / 255.0   # a copy: Ray's arrays are read-only
        if x.shape[1] != self.channels:
            if x.shape[1] != 1:
                raise ExternalEncoderError(f"{self.name} takes {self.channels}-channel images, got {x.shape[1]}")
            x = x.expand(-1, self.channels, -1, -1)             # greyscale to the encoder's RGB
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False,
                              antialias=True)
        x = ((x - self.mean) / self.std).to(self.device)
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            tokens = self.net.forward_features(x)               # [N, prefix + T, D]
        return tokens[:, self.net.num_prefix_tokens:].float().cpu().numpy().astype(np.float16)

    def feature_shape(self) -> list[int]:
        probe = np.zeros((1, self.input_size, self.input_size, self.channels), dtype=np.uint8)
        return list(self.features(probe).shape[1:])


def load_external_encoder(name: str, weights: str | Path | None, *, resolution: int, device="cpu") -> ExternalEncoder:
    """The encoder `name` (timm:<architecture> or local-vit) from its local weights file; nothing is downloaded."""
    if weights is None:
        raise ExternalEncoderError(f"the REPA encoder {name!r} needs its weights file (--repa-encoder-weights); "
                                   + (TIMM_WEIGHTS_HINT if name.startswith("timm:") else
                                      "write one with pipelines/repa_encoder.py"))
    path = Path(weights)
    if not path.is_file():
        raise ExternalEncoderError(f"REPA encoder weights {path} do not exist; "
                                   + (TIMM_WEIGHTS_HINT if name.startswith("timm:") else
                                      "write them with pipelines/repa_encoder.py"))
    if name.startswith("timm:"):
        import timm
        size = 224 * max(resolution // 256, 1)
        try:
            net = timm.create_model(name.removeprefix("timm:"), pretrained=True, num_classes=0, img_size=size,
                                    pretrained_cfg_overlay={"file": str(path)})
        except (RuntimeError, ValueError, OSError) as error:
            raise ExternalEncoderError(f"{path}: not loadable as {name} ({error})") from error
        return ExternalEncoder(net, name=name, weights_sha256=file_sha256(path), input_size=size,
                               mean=IMAGENET_MEAN, std=IMAGENET_STD, channels=3).to(device)
    if name == LOCAL_VIT:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            net = local_vit(**payload["architecture"])
            net.load_state_dict(payload["state_dict"])
        except (RuntimeError, KeyError, TypeError, OSError, EOFError, pickle.UnpicklingError) as error:
            raise ExternalEncoderError(f"{path}: not a {LOCAL_VIT} weights file from pipelines/repa_encoder.py "
                                       f"({error})") from error
        architecture = payload["architecture"]
        return ExternalEncoder(net, name=name, weights_sha256=file_sha256(path), input_size=architecture["img_size"],
                               mean=(0.5,) * architecture["in_chans"], std=(0.5,) * architecture["in_chans"],
                               channels=architecture["in_chans"]).to(device)
    raise ExternalEncoderError(f"unknown REPA encoder {name!r}; expected timm:<architecture> or {LOCAL_VIT}")


# ---------------------------------------------------------------------------------------------
# The small encoder trained here
# ---------------------------------------------------------------------------------------------

def local_vit(*, img_size: int, patch_size: int, in_chans: int, num_classes: int, embed_dim: int, depth: int,
              num_heads: int):
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                             embed_dim=embed_dim, depth=depth, num_heads=num_heads, global_pool="token")


def train_local_vit(images: np.ndarray, labels: np.ndarray, *, num_classes: int, patch_size: int = 2,
                    embed_dim: int = 64, depth: int = 4, num_heads: int = 4, steps: int = 2000, batch_size: int = 128,
                    lr: float = 1e-3, seed: int = 1, progress=None) -> tuple[torch.nn.Module, dict]:
    """A small ViT classifier of uint8 images [N, H, W, C] at their own size; its patch tokens are the target.
    Returns the network and what to record about it (architecture, steps, training accuracy on the last batches)."""
    n, size, _, channels = images.shape
    architecture = {"img_size": size, "patch_size": patch_size, "in_chans": channels, "num_classes": num_classes,
                    "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = local_vit(**architecture)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    generator = torch.Generator().manual_seed(seed)
    correct = seen = 0
    net.train()
    for step in range(steps):
        idx = torch.randint(n, (min(batch_size, n),), generator=generator)
        logits = net((x[idx].float() / 255.0 - 0.5) / 0.5)
        loss = F.cross_entropy(logits, y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step >= steps - 50:
            correct += int((logits.argmax(1) == y[idx]).sum())
            seen += len(idx)
        if progress is not None:
            progress(step + 1, loss.item())
    info = {"architecture": architecture, "steps": steps, "batch_size": batch_size, "seed": seed, "rows": n,
            "train_accuracy_last_50_steps": correct / max(seen, 1)}
    return net.eval(), info


def save_local_vit(path: str | Path, net, info: dict) -> Path:
    payload = {"architecture": info["architecture"], "info": info,
               "state_dict": {k: v.cpu() for k, v in net.state_dict().items()}}
    return write_atomically(Path(path), lambda f: torch.save(payload, f))
