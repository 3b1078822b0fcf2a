"""GPU throughput and model-FLOPs utilisation (MFU) for training, SD-VAE encoding and Heun sampling.

Plain PyTorch (no Ray). For DiT, MaskDiT and SD-DiT at each size: img/s, peak memory, and
MFU = counted training FLOPs per step / (step time x this GPU's dense bf16 matmul throughput,
measured in the same run). Writes bench/results/gpu-<device>.json and .md.

    python bench/gpu.py                                   # all sizes, bf16 + compile, on cuda
    python bench/gpu.py --device cpu --sizes S/8 --batch-size 4 --input-size 16 --no-compile   # a CPU check
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from bench.step_time import FAMILIES, count_flops_and_activations, device_name, measure_training, synchronize

from sddit.diffusion import edm_sample
from sddit.models import build
from sddit.sampling import SamplingPlan, sampling_network
from pipelines.common import at_least


def matmul_tflops(device, size: int, dtype, repeats: int = 20) -> float:
    """Dense matmul throughput: the denominator of MFU."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size ** 3 * repeats / (time.perf_counter() - start) / 1e12


def sd_vae_encode(device, batch_size: int, resolution: int, dtype, repeats: int = 5) -> dict:
    """The SD VAE's architecture (sd-vae-ft-ema config) with random weights: encoder speed only."""
    try:
        from bench.random_sd_vae import random_sd_vae
        vae = random_sd_vae().to(device=device, dtype=dtype).eval()
    except ImportError as error:
        return {"skipped": f"diffusers not importable: {error}"}
    images = torch.rand(batch_size, 3, resolution, resolution, device=device, dtype=dtype) * 2 - 1
    with torch.no_grad():
        vae.encode(images)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            posterior = vae.encode(images).latent_dist
            posterior.mean, posterior.std
        synchronize(device)
    seconds = (time.perf_counter() - start) / repeats
    return {"batch_size": batch_size, "resolution": resolution, "dtype": str(dtype).split(".")[-1],
            "img_per_s": batch_size / seconds}


def heun_sampling(name: str, device, batch_size: int, input_size: int, steps: int, cfg_scale: float,
                  precision: str, compile: bool, batched: bool) -> dict:
    """Heun sampling img/s through the evaluate stage's own path (sampling_network, edm_sample), and the
    MFU that gives: counted forward FLOPs per image x network evaluations x img/s / peak."""
    model = build(name, input_size=input_size, num_classes=1000).to(device).eval().requires_grad_(False)
    plan = SamplingPlan(batch_size, batch_size, 1000, [4, input_size, input_size], steps=steps, cfg_scale=cfg_scale,
                        precision=precision, compile=compile)
    network = sampling_network(model.denoiser, plan)
    noise = plan.noise(range(batch_size)).to(device)
    labels = torch.from_numpy(plan.labels(range(batch_size))).to(device)
    sigma = torch.tensor(1.0, dtype=torch.float64, device=device)
    one_image = lambda: model.denoiser(noise[:1].double(), sigma, labels[:1])  # noqa: E731
    flops_per_image, _ = count_flops_and_activations(one_image, model)

    def run(n):
        return edm_sample(network, noise, labels, steps=n, cfg_scale=cfg_scale, null_label=1000 if batched else None)

    run(2)                                                  # compilation happens here
    synchronize(device)
    start = time.perf_counter()
    run(steps)
    synchronize(device)
    seconds = time.perf_counter() - start
    evaluations = (2 * steps - 1) * (2 if cfg_scale != 1 else 1)
    torch.compiler.reset()
    return {"model": name, "batch_size": batch_size, "steps": steps, "cfg_scale": cfg_scale, "precision": precision,
            "compile": compile, "cfg_batched": batched, "network_evaluations": evaluations,
            "img_per_s": batch_size / seconds, "gflops_per_forward_image": flops_per_image / 1e9,
            "tflops": flops_per_image * evaluations * batch_size / seconds / 1e12}


def markdown(report: dict) -> str:
    lines = [f"# GPU benchmark: {report['device']}", "",
             f"`{report['command']}` on {report['time']}, torch {report['torch']}.", "",
             f"Measured dense matmul: bf16 {report['matmul_tflops']['bf16']:.0f} TFLOP/s, "
             f"fp32 {report['matmul_tflops']['fp32']:.0f} TFLOP/s (the MFU denominator is the {report['precision']} figure).", "",
             "| model | batch | precision | compile | img/s | steps/s | GFLOPs/img | MFU | peak mem (GiB) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in report["training"]:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['batch_size']} | | | {row['error']} | | | | |")
            continue
        lines.append(f"| {row['model']} | {row['batch_size']} | {row['precision']} | {row['compile']} | "
                     f"{row['img_per_s']:.1f} | {row['steps_per_s']:.2f} | {row['gflops_per_image']:.1f} | "
                     f"{100 * row['mfu']:.1f}% | {row.get('peak_mem_gib', 0):.1f} |")
    lines += ["", "SD-DiT / DiT step-time ratio (paper, 8 A100 fp32 batch 256: SD-DiT-S/2 9.2 steps/s vs "
              "DiT-S/2 5.03, i.e. 0.55x):", ""]
    lines += [f"- {size}: {ratio:.2f}x" for size, ratio in report["sddit_over_dit"].items()]
    vae = report["vae_encode"]
    lines += ["", "SD-VAE encode (real architecture, random weights): " +
              (vae["skipped"] if "skipped" in vae else
               f"{vae['img_per_s']:.0f} img/s at {vae['resolution']}px, batch {vae['batch_size']}, {vae['dtype']}")]
    lines += ["", "Heun sampling through the evaluate stage's path (MFU against the training precision's peak):", "",
              "| model | batch | steps | evaluations/img | precision | compile | CFG halves | img/s | TFLOP/s | MFU |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    peak = report["matmul_tflops"][report["precision"]]
    for row in report["sampling"]:
        lines.append(f"| {row['model']} | {row['batch_size']} | {row['steps']} | {row['network_evaluations']} | "
                     f"{row['precision']} | {row['compile']} | {'one batch' if row['cfg_batched'] else 'two calls'} | "
                     f"{row['img_per_s']:.1f} | {row['tflops']:.1f} | {100 * row['tflops'] / peak:.1f}% |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a quick check")
    parser.add_argument("--sizes", default="S/2,B/2,XL/2", help="comma-separated sizes (default S/2,B/2,XL/2)")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated families")
    parser.add_argument("--batch-size", default="S/2=256,B/2=256,XL/2=128",
                        help="per-GPU batch per size (SIZE=N,...) or one number for all")
    parser.add_argument("--input-size", type=int, default=32, help="latent side length (32 = ImageNet 256)")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="training precision")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    parser.add_argument("--steps", type=at_least(1), default=10, help="timed training steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model (compilation happens here)")
    parser.add_argument("--matmul-size", type=int, default=8192, help="side of the square matmul for peak throughput")
    parser.add_argument("--vae-batch-size", type=int, default=64, help="images per SD-VAE encode call")
    parser.add_argument("--vae-resolution", type=int, default=256, help="SD-VAE input resolution")
    parser.add_argument("--sample-model", default="SD-DiT-XL/2", help="model for the sampling benchmark")
    parser.add_argument("--sample-batch-size", type=int, default=256, help="images per sampling batch")
    parser.add_argument("--sample-steps", type=int, default=18, help="Heun steps for the sampling benchmark")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"), help="where JSON and Markdown go")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    sizes = args.sizes.split(",")
    if "=" in args.batch_size:
        batch_sizes = dict(item.split("=") for item in args.batch_size.split(","))
    else:
        batch_sizes = {size: args.batch_size for size in sizes}

    report = {"device": device_name(device), "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "command": "python bench/gpu.py " + " ".join(sys.argv[1:]), "precision": args.precision,
              "matmul_tflops": {"bf16": matmul_tflops(device, args.matmul_size, torch.bfloat16),
                                "fp32": matmul_tflops(device, args.matmul_size, torch.float32)}}
    peak = report["matmul_tflops"][args.precision] * 1e12
    print(f"{report['device']}: matmul bf16 {report['matmul_tflops']['bf16']:.0f}, "
          f"fp32 {report['matmul_tflops']['fp32']:.0f} TFLOP/s", flush=True)

    report["training"], report["sddit_over_dit"] = [], {}
    for size in sizes:
        step_s = {}
        for family in args.families.split(","):
            name = f"{family}-{size}"
            batch_size = int(batch_sizes[size])
            try:
                row = measure_training(name, batch_size=batch_size, device=device, precision=args.precision,
                                       compile=args.compile, input_size=args.input_size, steps=args.steps,
                                       warmup=args.warmup)
                row["mfu"] = row["flops_per_step"] / (row["step_s"] * peak)
                step_s[family] = row["step_s"]
                print(f"{name}: {row['img_per_s']:.1f} img/s, MFU {100 * row['mfu']:.1f}%, "
                      f"{row.get('peak_mem_gib', 0):.1f} GiB", flush=True)
            except torch.OutOfMemoryError:
                row = {"model": name, "batch_size": batch_size, "error": "out of memory"}
                print(f"{name}: out of memory at batch {batch_size}", flush=True)
            report["training"].append(row)
            torch.cuda.empty_cache() if device.type == "cuda" else None
            torch.compiler.reset()
        if "DiT" in step_s and "SD-DiT" in step_s:
            report["sddit_over_dit"][size] = step_s["SD-DiT"] / step_s["DiT"]

    vae_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report["vae_encode"] = sd_vae_encode(device, args.vae_batch_size, args.vae_resolution, vae_dtype)
    print(f"SD-VAE encode: {report['vae_encode']}", flush=True)
    # the old path (eager fp32, two calls per guided step) against the fast one the evaluate stage offers
    report["sampling"] = []
    for precision, compile, batched in (("fp32", False, False), (args.precision, args.compile, True)):
        row = heun_sampling(args.sample_model, device, args.sample_batch_size, args.input_size, args.sample_steps,
                            1.5, precision, compile, batched)
        report["sampling"].append(row)
        print(f"sampling: {row}", flush=True)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "gpu-" + re.sub(r"[^A-Za-z0-9]+", "-", report["device"]).strip("-").lower()
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out_dir / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
