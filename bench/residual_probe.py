"""What a loss term does to the encoder's residual stream, step by step: train a study arm N steps without Ray
and probe the student on fixed images.

    python bench/residual_probe.py --arm DiT-Dispersive --data runs/data/fmnist16/train --steps 1000 \\
        --out bench/results/residual_probe.jsonl
    python bench/residual_probe.py --table bench/results/residual_probe.jsonl

The loop is the library's own (build_training, train_step, the streaming loader) on the arm's config as the
study builds it (the preset, the arm's family and switches, then --set). Every --every steps, on --probe-images
fixed images and noise: the root-mean-square of the patch tokens after each encoder block, the mean squared
distance between two images' flattened last-block tokens per dimension (what Dispersive Loss's exp(-d) sees;
about 1 or less keeps its gradient alive, tens and more leave it at its floor, -ln of the batch size), and the
student's EDM-weighted denoising error at three fixed noise levels, with the training batch's losses. Each point
is appended to --out as a JSON line as it is measured.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from sddit import code_version
from sddit.config import apply_overrides, load_preset
from sddit.data import Manifest
from sddit.diffusion import edm_loss_weight
from sddit.loader import LatentLoader, step_generator
from sddit.training import build_training, fit_to_dataset, train_step
from pipelines.common import shared_options
from pipelines.study_plan import arm_overrides

PROBE_SEED = 12345                  # the fixed images' loader seed and their noise, apart from any training seed
PROBE_SIGMAS = (0.1, 1.0, 5.0)      # the denoising probe's noise levels; the stream is probed at the middle one


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[shared_options("--set", set="overrides after the arm's, e.g. "
                                                                          "--set optim.lr=1e-4")])
    parser.add_argument("--arm", default="DiT-Dispersive", help="a study arm (pipelines/study_plan.py ARMS)")
    parser.add_argument("--preset", default="fashion-mnist", help="base config (a preset name or YAML path)")
    parser.add_argument("--data", default=None, help="dataset written by pipelines/encode.py (required to probe)")
    parser.add_argument("--table", default=None, metavar="JSONL",
                        help="instead of probing: print the Markdown table of the probes recorded in this file")
    parser.add_argument("--steps", type=int, default=1000, help="training steps (default 1000)")
    parser.add_argument("--every", type=int, default=50, help="probe every N steps (default 50; step 0 too)")
    parser.add_argument("--probe-images", type=int, default=64, help="fixed images probed (default 64)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--label", default=None, help="name of this probe in the records (default: arm + overrides)")
    parser.add_argument("--out", default=None, help="JSON-lines file the points are appended to")
    args = parser.parse_args(argv)
    if not args.table and not args.data:
        parser.error("give --data DIR to probe, or --table JSONL to summarise earlier probes")
    for flag in ("steps", "every", "probe_images"):
        if getattr(args, flag) < 2:
            parser.error(f"--{flag.replace('_', '-')} must be >= 2, got {getattr(args, flag)}")
    return args


def probe(args) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    manifest = Manifest.read(args.data)
    base = apply_overrides(load_preset(args.preset), [f"data.codec={manifest.settings.codec}",
                                                      f"data.resolution={manifest.settings.resolution}"])
    config = apply_overrides(base, [*arm_overrides(args.arm, base.model.name), *args.overrides,
                                    f"train.steps={args.steps}"])
    config = fit_to_dataset(config, manifest, args.data)
    label = args.label or " ".join([args.arm, *args.overrides])
    torch.manual_seed(config.train.seed)
    model, optimizer, ema, schedules = build_training(config)
    loader = LatentLoader(args.data, rank=0, world_size=1, batch_size=config.optim.batch_size,
                          seed=config.train.seed, device="cpu")
    fixed = LatentLoader(args.data, rank=0, world_size=1, batch_size=args.probe_images, seed=PROBE_SEED, device="cpu")
    x_fixed, y_fixed, _ = fixed.batch(0)
    fixed.close()
    noise = torch.randn(x_fixed.shape, generator=torch.Generator().manual_seed(PROBE_SEED))
    depth = config.model.depth
    out = open(args.out, "a") if args.out else None
    print(f"residual_probe {label!r}: {args.steps} steps of {config.model.name} at batch {config.optim.batch_size}, "
          f"lr {config.optim.lr} (warm-up {config.optim.warmup_steps})", flush=True)

    @torch.no_grad()
    def measure(step: int, parts: dict) -> dict:
        point = {"kind": "point", "label": label, "step": step}
        for sigma_value in PROBE_SIGMAS:
            sigma = torch.full((x_fixed.shape[0], 1, 1, 1), sigma_value)
            denoised, _, hidden = model.denoiser.denoise(x_fixed + sigma * noise, sigma, y_fixed,
                                                         taps=tuple(range(1, depth + 1)))
            point[f"denoise_error_sigma{sigma_value:g}"] = float(
                (edm_loss_weight(sigma, config.model.sigma_data) * (denoised - x_fixed) ** 2).mean())
            if sigma_value == PROBE_SIGMAS[1]:
                point["token_rms"] = [float(hidden[d].pow(2).mean().sqrt()) for d in range(1, depth + 1)]
                last = hidden[depth].flatten(1)
                point["pair_distance_per_dim"] = float(torch.pdist(last).pow(2).mean() / last.shape[1])
        point.update({f"batch_{key}": float(value) for key, value in parts.items()})
        point.update(code_version=code_version(), seconds=round(time.perf_counter() - started, 1))
        if out:
            out.write(json.dumps(point) + "\n")
            out.flush()
        return point

    started = time.perf_counter()
    points = [measure(0, {})]
    for step in range(args.steps):
        x0, labels, _ = loader.batch(step)
        result = train_step(model, optimizer, ema, x0, labels, step=step, config=config, schedules=schedules,
                            generator=step_generator(config.train.seed, 0, step, "cpu"))
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            points.append(measure(step + 1, result.parts))
            p = points[-1]
            print(f"step {step + 1}: token rms {' '.join(f'{v:.1f}' for v in p['token_rms'])}, pair distance "
                  f"{p['pair_distance_per_dim']:.1f}, denoise " + " ".join(
                      f"{p[f'denoise_error_sigma{s:g}']:.3f}" for s in PROBE_SIGMAS), flush=True)
    loader.close()
    if out:
        out.close()
    return points


def table(path: str, steps=(0, 50, 100, 200, 300, 400, 600, 1000)) -> str:
    """One row per recorded probe and step: the last block's token RMS, the pair distance, the denoising errors."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    lines = ["| probe | step | last-block token RMS | pair distance / dim | " +
             " | ".join(f"denoise error, sigma {s:g}" for s in PROBE_SIGMAS) + " |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in PROBE_SIGMAS) + " |"]
    for row in rows:
        if row.get("kind") == "point" and row["step"] in steps:
            lines.append(f"| {row['label']} | {row['step']} | {row['token_rms'][-1]:.1f} | "
                         f"{row['pair_distance_per_dim']:.1f} | " +
                         " | ".join(f"{row[f'denoise_error_sigma{s:g}']:.3f}" for s in PROBE_SIGMAS) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.table:
        print(table(args.table))
        return None
    return probe(args)


if __name__ == "__main__":
    main()
