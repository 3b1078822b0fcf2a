"""An ImageNet-style folder of random JPEGs (ROOT/<class>/<n>.JPEG) for throughput measurements.

Speed, not content: decoding, cropping and encoding cost the same for noise as for photos of the same
size. Image sides vary between --min-size and --max-size like ImageNet's.

    python bench/synthetic_images.py --out runs/synthetic --classes 10 --per-class 200
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image


def write_images(out: Path, classes: int, per_class: int, min_size: int, max_size: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = out / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(min_size, max_size + 1, 2))
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
            (folder / f"{i:06d}.JPEG").write_bytes(buffer.getvalue())
    return classes * per_class


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="root folder to write")
    parser.add_argument("--classes", type=int, default=10, help="class folders (default 10)")
    parser.add_argument("--per-class", type=int, default=100, help="images per class (default 100)")
    parser.add_argument("--min-size", type=int, default=300, help="smallest image side (default 300)")
    parser.add_argument("--max-size", type=int, default=500, help="largest image side (default 500)")
    args = parser.parse_args()
    count = write_images(Path(args.out), args.classes, args.per_class, args.min_size, args.max_size)
    print(f"{count} images in {args.classes} classes under {args.out}")


if __name__ == "__main__":
    main()
