"""Ray Train overhead: img/s through Ray Train (1 worker) vs. the bare loop, same config, one run.

Also measures the data reader (rows/s of `LatentLoader.batch`) against what training consumes.
Throughput is taken between log points after a warm-up, so start-up, sampling and checkpoints
are excluded from both sides. The two sides alternate `--repeats` times and the overhead is the
median of the per-round ratios, so a machine whose speed drifts (shared VMs) does not bias one side.
The first Ray round also runs while the local Ray runtime it starts is still busy starting up in the
background (on 2 cores that cost it 16% in two measurements, against 1% and -0.4% in later rounds),
so one round alone overstates the steady-state overhead; hence 3 rounds by default.
`--threads` sets torch's CPU threads on both sides (default: every CPU). Appends a JSON record
to bench/results/train_overhead.jsonl.

    python bench/train_overhead.py --data runs/datasets/pixel-8 --preset demo --steps 120
    python bench/train_overhead.py --data runs/datasets/pixel-8 --preset demo --threads 1 --repeats 2
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from sddit.config import apply_overrides, load_preset
from sddit.data import Manifest
from sddit.loader import LatentLoader
from sddit.training import LoopHooks, fit_to_dataset, train_loop
from bench.records import append_record
from pipelines.common import at_least


class Rates(LoopHooks):
    def __init__(self):
        self.rates = []

    def log(self, step, metrics, checkpoint_follows=False):
        self.rates.append(metrics["images_per_s"])


def steady(rates: list[float]) -> float:
    """Median over log intervals, dropping the first (warm-up) and the last (sampling, checkpoint)."""
    return float(np.median(rates[1:-1] if len(rates) > 2 else rates))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="dataset directory (pipelines/encode.py output)")
    parser.add_argument("--preset", default="demo", help="preset name or YAML path (default demo)")
    parser.add_argument("--steps", type=at_least(1), default=120, help="steps per side (default 120)")
    parser.add_argument("--log-every", type=int, default=10, help="steps per throughput interval (default 10)")
    parser.add_argument("--use-gpu", action="store_true", help="train on GPU (both sides)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads per side (default: all)")
    parser.add_argument("--repeats", type=at_least(1), default=3, help="alternating bare/Ray rounds (default 3)")
    parser.add_argument("--run-dir", default="runs/bench", help="scratch directory for the Ray run")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_overhead.jsonl"))
    args = parser.parse_args()
    overrides = [f"train.steps={args.steps}", f"train.log_every={args.log_every}",
                 f"train.sample_every={args.steps}", f"train.checkpoint_every={args.steps}"]
    config = apply_overrides(load_preset(args.preset), overrides)
    device = "cuda" if args.use_gpu else "cpu"

    import torch
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import tracking_uri
    from pipelines.train import main as train_main
    torch.set_num_threads(args.threads)
    bare_rates, ray_rates = [], []
    for round_index in range(args.repeats):
        # bare loop
        bare = Rates()
        train_loop(config, args.data, device=device, hooks=bare)
        bare_rates.append(steady(bare.rates))

        # the same through Ray Train, 1 worker; its MLflow history holds the same images_per_s metric
        name = f"overhead-{int(time.time())}-{round_index}"
        result = train_main(["--data", args.data, "--preset", args.preset, "--num-workers", "1", "--name", name,
                             "--run-dir", args.run_dir, "--cpus-per-worker", str(args.threads), "--set", *overrides]
                            + (["--use-gpu"] if args.use_gpu else []))
        history = MlflowClient(tracking_uri(args.run_dir)).get_metric_history(result["mlflow_run_id"], "images_per_s")
        ray_rates.append(steady([m.value for m in sorted(history, key=lambda m: m.step)]))

    # data reader alone
    fitted = fit_to_dataset(config, Manifest.read(args.data), args.data)
    loader = LatentLoader(args.data, rank=0, world_size=1, batch_size=fitted.optim.batch_size, seed=0, device=device)
    start = time.perf_counter()
    for step in range(200):
        loader.batch(step)
    reader_rows_per_s = 200 * fitted.optim.batch_size / (time.perf_counter() - start)

    overheads = [1 - r / b for b, r in zip(bare_rates, ray_rates)]
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "preset": args.preset, "device": device,
              "threads": args.threads, "steps": args.steps, "repeats": args.repeats,
              "bare_img_per_s": float(np.median(bare_rates)), "ray_img_per_s": float(np.median(ray_rates)),
              "ray_overhead": float(np.median(overheads)), "ray_overhead_rounds": overheads,
              "reader_rows_per_s": reader_rows_per_s}
    record["reader_over_training"] = reader_rows_per_s / record["bare_img_per_s"]
    print(f"bare loop {record['bare_img_per_s']:.1f} img/s, Ray Train (1 worker) {record['ray_img_per_s']:.1f} img/s "
          f"({args.threads} threads each): overhead {100 * record['ray_overhead']:.1f}% (median of "
          f"{', '.join(f'{100 * o:.1f}%' for o in overheads)}; target <= 5%)")
    print(f"data reader {reader_rows_per_s:.0f} rows/s = {record['reader_over_training']:.0f}x what training consumes")
    append_record(args.out, record)


if __name__ == "__main__":
    main()
