"""Time one full training step (forward, backward, AdamW, EMA updates) of DiT, MaskDiT and SD-DiT.

Same backbone size for all three; prints img/s, counted FLOPs per image (torch.utils.flop_counter)
and the SD-DiT / DiT step-time ratio, and appends a JSON record to bench/results/step_time.jsonl.

    python bench/step_time.py --size S/2 --batch-size 8 --steps 5          # CPU
    python bench/step_time.py --size S/2 --batch-size 256 --device cuda    # GPU
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sddit.config import Config  # noqa: E402
from sddit.models import model_config  # noqa: E402
from sddit.training import build_training, train_step  # noqa: E402

FAMILIES = ("DiT", "MaskDiT", "SD-DiT")


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(family: str, args, device) -> dict:
    config = Config()
    config.model = model_config(f"{family}-{args.size}", input_size=args.input_size, num_classes=1000)
    config.optim.batch_size = args.batch_size
    config.optim.precision = args.precision
    config.train.steps = args.warmup + args.steps + 1
    torch.manual_seed(0)
    model, optimizer, ema, schedules = build_training(config, device)
    x0 = torch.randn(args.batch_size, 4, args.input_size, args.input_size, device=device)
    labels = torch.randint(0, 1000, (args.batch_size,), device=device)

    def step(i):
        return train_step(model, optimizer, ema, x0, labels, step=i, config=config, schedules=schedules)

    with FlopCounterMode(display=False) as counter:         # one counted step (also a warm-up)
        step(0)
    flops_per_image = counter.get_total_flops() / args.batch_size
    for i in range(1, args.warmup):
        step(i)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    result = {
        "model": f"{family}-{args.size}", "step_s": seconds, "img_per_s": args.batch_size / seconds,
        "steps_per_s": 1 / seconds, "gflops_per_image": flops_per_image / 1e9,
        "student_params_m": sum(p.numel() for p in model.student_parameters()) / 1e6,
    }
    if device.type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del model, optimizer, ema
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="S/2", help="backbone size/patch shared by the three models (default S/2)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default 8 on CPU, 256 on GPU)")
    parser.add_argument("--input-size", type=int, default=32, help="latent side length (32 = ImageNet 256 via SD-VAE)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first, the first one counted for FLOPs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="fp32 or bf16 autocast")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_time.jsonl"),
                        help="JSON-lines file the record is appended to")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.batch_size is None:
        args.batch_size = 256 if device.type == "cuda" else 8
    args.warmup = max(args.warmup, 1)

    rows = [measure(family, args, device) for family in FAMILIES]
    by_name = {row["model"].split("-" + args.size)[0]: row for row in rows}
    ratio = by_name["SD-DiT"]["step_s"] / by_name["DiT"]["step_s"]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {device_name}  batch {args.batch_size}  precision {args.precision}  threads {torch.get_num_threads()}")
    print(f"{'model':<14}{'img/s':>10}{'steps/s':>10}{'GFLOPs/img':>12}{'params (M)':>12}")
    for row in rows:
        print(f"{row['model']:<14}{row['img_per_s']:>10.1f}{row['steps_per_s']:>10.2f}"
              f"{row['gflops_per_image']:>12.1f}{row['student_params_m']:>12.1f}")
    flop_ratio = by_name["SD-DiT"]["gflops_per_image"] / by_name["DiT"]["gflops_per_image"]
    print(f"SD-DiT / DiT step time: {ratio:.2f}x (FLOPs {flop_ratio:.2f}x; paper: 5.03/9.2 = 0.55x)")
    record = {"device": device_name, "batch_size": args.batch_size, "precision": args.precision,
              "size": args.size, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "sddit_over_dit_step_time": ratio,
              "sddit_over_dit_flops": flop_ratio, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
