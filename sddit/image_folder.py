"""The encode stage's input: an ImageFolder tree, its files decoded and centre-cropped as ADM / DiT do.

Plain Python / PIL / NumPy; `load_image` never raises for a bad file, so one cannot take down its neighbours.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from sddit.data import DataError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff")


# ---------------------------------------------------------------------------------------------
# Input: an ImageFolder tree, labels in sorted class-folder order
# ---------------------------------------------------------------------------------------------

def list_image_folder(root: str | Path, limit_per_class: int | None = None):
    """(class folder names in label order, [(path relative to root, label), ...] sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"input root {str(root)!r} is not a directory")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DataError(f"input root {str(root)!r} has no class folders (expected ROOT/<class>/<image files>)")
    items = []
    for label, name in enumerate(classes):
        files = sorted(
            os.path.relpath(os.path.join(dirpath, f), root)
            for dirpath, _, filenames in os.walk(root / name)
            for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS)
        )
        items += [(path, label) for path in files[:limit_per_class]]
    return classes, items


def find_class_names(root: Path, classes: list[str]) -> dict[str, str]:
    """WNID -> human name from ImageNet's LOC_synset_mapping.txt, if one sits at or above the root."""
    for folder in [root, *root.resolve().parents][:5]:
        mapping = folder / "LOC_synset_mapping.txt"
        if mapping.is_file():
            names = dict(line.strip().split(" ", 1) for line in mapping.read_text().splitlines() if " " in line)
            return {c: names[c] for c in classes if c in names}
    return {}


# ---------------------------------------------------------------------------------------------
# Decoding and the ADM / DiT centre crop
# ---------------------------------------------------------------------------------------------

def center_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM's crop: BOX-halve while the short side is >= 2x the target, BICUBIC to the target, centre crop."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """RGB image and the name of the conversion applied (None if it was RGB already)."""
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: PIL's convert() would clip at 255, so rescale the full range to 8 bits
        arr = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if arr.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.round(arr / peak * 255).clip(0, 255).astype(np.uint8), mode="L")
    elif mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        span = max(arr.max(initial=0) - arr.min(initial=0), 1e-12)
        image = Image.fromarray(np.round((arr - arr.min()) / span * 255).astype(np.uint8), mode="L")
    elif mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        # composite on white, as a viewer shows it, instead of exposing undefined colours under alpha 0
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB"), mode.lower()


def load_image(path: str | Path, resolution: int) -> tuple[np.ndarray | None, str | None, str | None]:
    """(uint8 [R, R, 3] or None, skip reason or None, conversion or None) for one file.

    Never raises for a bad file: corrupt, truncated, non-image or decompression-bomb inputs come
    back as a reason, so one bad file cannot take down its neighbours.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        return None, f"unreadable: {error.strerror or error}", None
    if not data:
        return None, "empty file", None
    try:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            rgb, conversion = to_rgb(image)
            if min(rgb.size) < resolution:
                conversion = (conversion + "+upsampled") if conversion else "upsampled"
            return center_crop(rgb, resolution), None, conversion
    except UnidentifiedImageError:
        return None, "not an image (unrecognised format)", None
    except Image.DecompressionBombError as error:
        return None, f"decompression bomb: {error}", None
    except (OSError, SyntaxError, ValueError) as error:
        reason = "truncated image" if "truncated" in str(error).lower() else f"corrupt image: {error}"
        return None, reason, None
