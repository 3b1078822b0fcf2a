"""Codecs between images and what the diffusion model sees.

`pixel`: no autoencoder; shards hold the uint8 pixels, the model sees them in [-1, 1].
`sd-vae`: diffusers' AutoencoderKL (default `stabilityai/sd-vae-ft-ema`); shards hold the
posterior mean and std (float16), the model sees (mean + std * eps) * scaling_factor.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from sddit.errors import UserError

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
SD_VAE_SCALING = 0.18215


class CodecError(UserError, RuntimeError):
    """A codec asset is missing or unusable; the message says which and how to provide it."""


def images_to_unit(images) -> torch.Tensor:
    """uint8 NHWC (array or tensor) -> float32 NCHW in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images))
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def stored_to_latent(stored: torch.Tensor, column: str, scaling_factor: float, generator=None) -> torch.Tensor:
    """A shard's stored column -> what the model sees, without loading any autoencoder.

    pixels: uint8 -> [-1, 1]. moments: a fresh sample z = (mean + std * eps) * scaling every call.
    """
    if column == "pixels":
        return stored.float() / 127.5 - 1.0
    mean, std = stored.float().chunk(2, dim=1)
    eps = torch.randn(mean.shape, generator=generator, device=mean.device)
    return (mean + std * eps) * scaling_factor


class PixelCodec:
    name = "pixel"
    scaling_factor = 1.0
    column = "pixels"
    stored_dtype = "uint8"
    channels = 3

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        return (self.channels, resolution, resolution)

    def stored_shape(self, resolution: int) -> tuple[int, int, int]:
        return self.latent_shape(resolution)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 NHWC -> the stored column: uint8 NCHW (exact, 2x smaller than float16)."""
        return np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2))

    def to_latent(self, stored: torch.Tensor, generator=None) -> torch.Tensor:
        return stored_to_latent(stored, self.column, self.scaling_factor, generator)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return latent.clamp(-1, 1)


class VAECodec:
    """Any diffusers AutoencoderKL; `sd-vae` is this with the SD VAE and its 0.18215 scaling."""

    name = "sd-vae"
    column = "moments"
    stored_dtype = "float16"

    def __init__(self, vae, source: str):
        self.vae = vae.eval().requires_grad_(False)
        self.source = source
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", SD_VAE_SCALING))
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def device(self):
        return next(self.vae.parameters()).device

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        side = resolution // self.downsample
        return (self.latent_channels, side, side)

    def stored_shape(self, resolution: int) -> tuple[int, int, int]:
        c, h, w = self.latent_shape(resolution)
        return (2 * c, h, w)

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 NHWC -> posterior [mean, std] stacked on channels, float16 [N, 2C, h, w]."""
        param = next(self.vae.parameters())
        x = images_to_unit(images).to(device=param.device, dtype=param.dtype)
        posterior = self.vae.encode(x).latent_dist
        moments = torch.cat([posterior.mean, posterior.std], dim=1)
        return moments.to(torch.float16).cpu().numpy()

    def to_latent(self, stored: torch.Tensor, generator=None) -> torch.Tensor:
        return stored_to_latent(stored, self.column, self.scaling_factor, generator)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        param = next(self.vae.parameters())
        x = self.vae.decode((latent / self.scaling_factor).to(device=param.device, dtype=param.dtype)).sample
        return x.float().clamp(-1, 1)


def load_vae(source: str = DEFAULT_VAE, *, device="cpu", dtype=torch.float32):
    """AutoencoderKL from a local directory or a hub id (local cache first, then the hub).

    Fails at once, naming the source and how to provide it, when it cannot be loaded.
    """
    from diffusers import AutoencoderKL

    how = (f"Download it where there is network, e.g. `huggingface-cli download {source} --local-dir DIR`, "
           f"then pass that directory (--vae DIR)")
    if Path(source).is_dir():
        try:
            return AutoencoderKL.from_pretrained(source).to(device=device, dtype=dtype)
        except Exception as error:  # a directory that is not a diffusers VAE
            raise CodecError(f"cannot load a diffusers AutoencoderKL from directory {source!r}: {error}") from error
    if Path(source).exists() or source.startswith((".", "/")):
        raise CodecError(f"VAE directory {source!r} does not exist. {how}.")
    try:
        return AutoencoderKL.from_pretrained(source, local_files_only=True).to(device=device, dtype=dtype)
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise CodecError(f"VAE {source!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1. {how}.")
    try:
        return AutoencoderKL.from_pretrained(source).to(device=device, dtype=dtype)
    except Exception as error:
        raise CodecError(f"cannot download VAE {source!r} from the Hugging Face hub ({type(error).__name__}). "
                         f"{how}.") from error


def make_codec(name: str, vae: str = DEFAULT_VAE, *, device="cpu", dtype=torch.float32):
    if name == "pixel":
        return PixelCodec()
    if name == "sd-vae":
        return VAECodec(load_vae(vae, device=device, dtype=dtype), vae)
    raise CodecError(f"unknown codec {name!r}; expected 'sd-vae' or 'pixel'")
