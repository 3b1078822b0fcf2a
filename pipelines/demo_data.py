"""The embedded demo dataset: scikit-learn's bundled handwritten digits as an ImageNet-style folder.

1,797 real 8x8 greyscale scans, 10 classes, written as ROOT/<digit>/<index>.png so the very same
reader and encode stage that handle ImageNet handle the demo. No download: the data ships inside
scikit-learn.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(root: str | Path) -> Path:
    """Write the digits once (idempotent: an existing complete folder is kept)."""
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    done = root / ".complete"
    if done.exists():
        return root
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.round(image / 16.0 * 255).astype(np.uint8)   # sklearn stores 0..16
        Image.fromarray(pixels, mode="L").save(folder / f"{index:04d}.png")
    done.write_text(f"{len(digits.images)} images\n")
    return root
