"""Encode throughput: the Ray Data pipeline vs. a plain single-process loop, same files and codec.

Both sides decode, centre-crop and encode every image (and its mirror image); the Ray side also
writes shards. Reports images/s of each and their ratio, and appends a JSON record to
bench/results/encode_throughput.jsonl.

    python bench/encode_throughput.py --data runs/demo/digits --codec pixel --resolution 16
    python bench/encode_throughput.py --data /shared/imagenet/train --limit-per-class 20 --vae DIR   # sd-vae
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from sddit.codecs import DEFAULT_VAE, make_codec
from sddit.image_folder import list_image_folder, load_image
from bench.records import append_record
from pipelines.common import at_least


def plain_loop(root: Path, items, codec, resolution: int, batch_size: int) -> float:
    """Images/s of read + crop + encode (image and mirror) in this process, in batches."""
    start = time.perf_counter()
    for i in range(0, len(items), batch_size):
        images = [load_image(os.path.join(root, path), resolution)[0] for path, _ in items[i:i + batch_size]]
        images = np.stack([image for image in images if image is not None])
        codec.encode(images)
        codec.encode(np.ascontiguousarray(images[:, :, ::-1]))
    return len(items) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="image folder ROOT/<class>/<images>")
    parser.add_argument("--codec", default="pixel", choices=["pixel", "sd-vae"], help="codec (default pixel)")
    parser.add_argument("--vae", default=DEFAULT_VAE, help="VAE hub id or local directory for sd-vae")
    parser.add_argument("--resolution", type=int, default=16, help="crop size (default 16)")
    parser.add_argument("--limit-per-class", type=at_least(1), default=None, help="first N images per class")
    parser.add_argument("--batch-size", type=at_least(1), default=16, help="images per encoder call on both sides")
    parser.add_argument("--address", default=None, help="Ray address (default: local)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "encode_throughput.jsonl"))
    args = parser.parse_args()

    from pipelines.encode import main as encode
    root = Path(args.data)
    _, items = list_image_folder(root, args.limit_per_class)
    plain = plain_loop(root, items, make_codec(args.codec, args.vae), args.resolution, args.batch_size)
    scratch = Path(tempfile.mkdtemp(prefix="encode-bench-"))
    try:
        common = ["--data", str(root), "--codec", args.codec, "--vae", args.vae, "--resolution", str(args.resolution),
                  "--batch-size", str(args.batch_size), "--run-dir", str(scratch / "runs")]
        if args.limit_per_class:
            common += ["--limit-per-class", str(args.limit_per_class)]
        if args.address:
            common += ["--address", args.address]
        encode(common + ["--out", str(scratch / "warm")])      # Ray start-up and actor pools, untimed
        start = time.perf_counter()
        encode(common + ["--out", str(scratch / "timed")])
        ray_rate = len(items) / (time.perf_counter() - start)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "data": str(root), "codec": args.codec,
              "resolution": args.resolution, "images": len(items), "plain_img_per_s": plain,
              "ray_img_per_s": ray_rate, "ray_over_plain": ray_rate / plain}
    print(f"{len(items)} images, {args.codec} at {args.resolution}px: plain loop {plain:.0f} img/s, "
          f"Ray Data pipeline {ray_rate:.0f} img/s (x{ray_rate / plain:.2f}, incl. shard writing and manifest)")
    append_record(args.out, record)


if __name__ == "__main__":
    main()
