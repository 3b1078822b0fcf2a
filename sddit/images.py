"""Image helpers: DiT's uint8 quantisation and sample grids."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] images [N, C, H, W] -> uint8 NHWC, quantised as DiT does: clamp(127.5 x + 128, 0, 255)."""
    return (127.5 * x.float() + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid_image(x: torch.Tensor, nrow: int, scale: int = 1, padding: int = 1) -> Image.Image:
    """Tile [-1, 1] images [N, C, H, W] into rows of `nrow` on a grey background (so images that fill
    their frame stay apart), optionally upscaled (nearest)."""
    images = to_uint8(x)
    n, h, w, c = images.shape
    rows = -(-n // nrow)
    cell_h, cell_w = h + padding, w + padding
    grid = np.full((rows * cell_h + padding, nrow * cell_w + padding, c), 128, dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, nrow)
        top, left = padding + r * cell_h, padding + col * cell_w
        grid[top:top + h, left:left + w] = image
    picture = Image.fromarray(grid[..., 0] if c == 1 else grid)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    return picture


def save_grid(x: torch.Tensor, path: str | Path, nrow: int, scale: int = 1, padding: int = 1) -> Path:
    """`grid_image` written as a PNG."""
    picture = grid_image(x, nrow, scale, padding)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path
