"""The training reader at ImageNet scale: peak memory, start-up and rows/s per rank, for dataset sizes and
worker counts, on synthetic shards of the real schema (bench/synthetic_latents.py).

Each (size, W) is measured in a fresh process as rank 0 of W: start-up (reading the manifest, the first
batch) in seconds and bytes read (/proc/self/io rchar), then `--steps` batches in a row for rows/s, then as
many again with the latent draw (mean + std * eps, on the device in training) left out, then the process's
peak RSS. The bytes a rank reads over a whole epoch are the sizes of the shards it owns.

    python bench/loader_scale.py --sizes 100000,1000000,2500000 --workers 1,2,4 --unique-shards 64 \\
        --data-root runs/loader-bench --out bench/results/loader_scale
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.records import append_record
from pipelines.common import at_least

ROOT = Path(__file__).resolve().parents[1]


def bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def measure(data: Path, world_size: int, steps: int, batch_size: int) -> dict:
    """One rank (0 of `world_size`) in this process."""
    import torch

    from sddit.loader import LatentLoader
    torch.set_num_threads(1)
    before, start = bytes_read(), time.perf_counter()
    loader = LatentLoader(data, rank=0, world_size=world_size, batch_size=batch_size, seed=0, device="cpu")
    loader.batch(0)
    startup_s, startup_bytes = time.perf_counter() - start, bytes_read() - before
    start = time.perf_counter()
    for step in range(1, steps + 1):
        loader.batch(step)
    rows_per_s = steps * batch_size / (time.perf_counter() - start)
    # the same again without the latent draw (mean + std * eps), which a GPU worker runs on its device
    import sddit.loader as loader_module
    loader_module.stored_to_latent = lambda stored, *args: stored
    start = time.perf_counter()
    for step in range(steps + 1, 2 * steps + 1):
        loader.batch(step)
    read_rows_per_s = steps * batch_size / (time.perf_counter() - start)
    loader._plan_epoch(0)
    owned = {int(b) for group in loader._groups for b in loader.blocks[group, 0]}
    epoch_bytes = sum((data / loader.manifest.shards[s]["file"]).stat().st_size for s in owned)
    total_bytes = sum((data / shard["file"]).stat().st_size for shard in loader.manifest.shards)
    loader.close()
    return {"rows": loader.manifest.num_rows, "world_size": world_size, "startup_s": round(startup_s, 3),
            "startup_bytes": startup_bytes, "epoch_bytes_per_rank": epoch_bytes, "dataset_bytes": total_bytes,
            "epoch_share": round(epoch_bytes / total_bytes, 4), "rows_per_s": round(rows_per_s),
            "rows_per_s_without_draw": round(read_rows_per_s),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "steps": steps, "batch_size": batch_size}


def markdown(rows: list[dict], command: str) -> str:
    lines = ["# Training reader at scale (rank 0 of W, synthetic SD-VAE shards of 2,048 rows)", "",
             f"`{command}` on {platform.node() or 'this machine'} ({platform.processor() or platform.machine()}).", "",
             "| rows | W | peak RSS (MiB) | start-up (s) | start-up read (MiB) | share of the data read per epoch | "
             "rows/s | rows/s without the latent draw |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['rows']:,} | {r['world_size']} | {r['peak_rss_mib']:.0f} | {r['startup_s']:.2f} | "
                     f"{r['startup_bytes'] / 2**20:.0f} | {r['epoch_share']:.3f} (1/W = {1 / r['world_size']:.3f}) | "
                     f"{r['rows_per_s']:,} | {r.get('rows_per_s_without_draw', 0):,} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000,2500000", help="dataset rows, comma-separated")
    parser.add_argument("--workers", default="1,2,4", help="world sizes, comma-separated")
    parser.add_argument("--unique-shards", type=int, default=64,
                        help="distinct shards per dataset, the rest hard links (default 64; see synthetic_latents)")
    parser.add_argument("--data-root", default="runs/loader-bench", help="where the datasets are written (kept)")
    parser.add_argument("--steps", type=at_least(1), default=200, help="batches timed per measurement (default 200)")
    parser.add_argument("--batch-size", type=at_least(1), default=256, help="rows per batch (default 256)")
    parser.add_argument("--out", default="bench/results/loader_scale", help="writes OUT.jsonl and OUT.md")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)      # internal: one rank, one process
    parser.add_argument("--world-size", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(Path(args.measure), args.world_size, args.steps, args.batch_size)))
        return

    from bench.synthetic_latents import write_latent_dataset

    from sddit.data import FORMAT_VERSION, Manifest
    results = []
    for size in (int(v) for v in args.sizes.split(",")):
        data = Path(args.data_root) / f"rows-{size}"
        if (data / "manifest.json").exists() and Manifest.read(data).format_version != FORMAT_VERSION:
            shutil.rmtree(data)                     # written by an older encoder: measure the current format
        if not (data / "manifest.json").exists():
            start = time.time()
            write_latent_dataset(data, size, unique_shards=args.unique_shards)
            print(f"wrote {data} in {time.time() - start:.0f} s", flush=True)
        for world_size in (int(v) for v in args.workers.split(",")):
            output = subprocess.run([sys.executable, __file__, "--measure", str(data), "--world-size", str(world_size),
                                     "--steps", str(args.steps), "--batch-size", str(args.batch_size)],
                                    check=True, capture_output=True, text=True).stdout
            row = json.loads(output.strip().splitlines()[-1])
            print(row, flush=True)
            results.append(row)
            out = Path(args.out)
            append_record(out.with_suffix(".jsonl"), {**row, "time": time.strftime("%Y-%m-%d %H:%M")})
            out.with_suffix(".md").write_text(markdown(results, "python bench/loader_scale.py " + " ".join(
                argv if argv is not None else sys.argv[1:])))


if __name__ == "__main__":
    main()
