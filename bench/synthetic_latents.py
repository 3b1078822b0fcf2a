"""A dataset of latent shards with the encode stage's real schema and manifest, at any size, without encoding.

The SD-VAE column at 256 px is 8 x 32 x 32 float16 moments per row (16 KiB). Writing ImageNet-scale data
takes minutes per 100k rows and its size in disk, so `--unique-shards K` writes K distinct shards and
hard-links the rest to them: the reader opens and reads every listed file as it would distinct ones (its
memory and bytes read are the same), but repeated files can come from the page cache, so rows/s measured
on such a dataset is an upper bound for a disk that holds the real thing.

    python bench/synthetic_latents.py --out runs/synthetic-latents/1m --rows 1000000 --unique-shards 64
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from sddit.data import (EncodeSettings, Manifest, file_sha256, shard_schema, shard_table,
                        write_shard)


def write_latent_dataset(out: Path, rows: int, *, rows_per_shard: int = 2048, stored_shape=(8, 32, 32),
                         classes: int = 1000, unique_shards: int | None = None, seed: int = 0) -> Manifest:
    """`rows` rows of random float16 moments in shards of `rows_per_shard`; labels cycle over `classes`, so a
    row's label is its global index mod `classes` (tests use that to check which rows a reader returned)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    schema = shard_schema("moments", tuple(stored_shape), "float16")
    shards, written = [], []
    for index, start in enumerate(range(0, rows, rows_per_shard)):
        count = min(rows_per_shard, rows - start)
        name = f"part-{index:05d}.parquet"
        path = out / name
        same = [entry for entry in written if entry[1] == count]
        if unique_shards is None or index < unique_shards or not same:
            values = rng.standard_normal((count, *stored_shape), dtype=np.float32).astype(np.float16)
            ids = np.arange(start, start + count)
            table = shard_table(schema, values, ids % classes, np.zeros(count, bool), [f"{i}.JPEG" for i in ids], {})
            write_shard(path, table)
            written.append((path, count, file_sha256(path)))
        else:   # a link to a written shard with the same row count
            if path.exists():
                path.unlink()
            os.link(same[-1][0], path)
        shards.append({"file": name, "rows": count, "sha256": next(h for p, _, h in written if p.samefile(path))})
    settings = EncodeSettings(source="synthetic", codec="sd-vae", vae="synthetic", resolution=8 * stored_shape[-1],
                              flip=False, limit_per_class=None, rows_per_shard=rows_per_shard,
                              order="shuffled")                    # labels cycle over the classes in every shard
    manifest = Manifest(settings=settings, column="moments", scaling_factor=0.18215,
                        latent_shape=[stored_shape[0] // 2, *stored_shape[1:]], stored_shape=list(stored_shape),
                        num_rows=rows, shards=shards,
                        classes=[{"index": c, "wnid": f"n{c:08d}", "name": f"class {c}"} for c in range(classes)],
                        skipped=[])
    manifest.write(out)
    return manifest


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="dataset directory to write")
    parser.add_argument("--rows", type=int, required=True, help="rows in all")
    parser.add_argument("--rows-per-shard", type=int, default=2048, help="rows per shard (default 2048, as encode)")
    parser.add_argument("--stored-shape", default="8,32,32", help="the stored column's shape (default 8,32,32)")
    parser.add_argument("--classes", type=int, default=1000, help="classes (default 1000)")
    parser.add_argument("--unique-shards", type=int, default=None,
                        help="write this many distinct shards and hard-link the rest (default: all distinct)")
    args = parser.parse_args(argv)
    manifest = write_latent_dataset(Path(args.out), args.rows, rows_per_shard=args.rows_per_shard,
                                    stored_shape=tuple(int(v) for v in args.stored_shape.split(",")),
                                    classes=args.classes, unique_shards=args.unique_shards)
    print(f"{args.out}: {manifest.num_rows} rows in {len(manifest.shards)} shards")


if __name__ == "__main__":
    main()
