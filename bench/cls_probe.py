"""Judge an SD-DiT recipe's CLS signal in minutes: train N steps without Ray and probe the EMA teacher's CLS.

    python bench/cls_probe.py --preset fashion-mnist --data runs/data/fmnist16/train --steps 1000 \\
        --set optim.warmup_steps=100 --label warmup100 --out bench/results/cls_probe.jsonl

The loop is the library's own (build_training, train_step, the streaming loader), so what the probe shows is
what a study's run does. Every --every steps it prints, for the same --probe-images held-fixed images: the
between-image std of the teacher's CLS token and CLS logits (with the class label and with the null label),
the entropy of the CLS targets (ln K: uniform, no signal), the nearest-class-mean accuracy of the CLS token,
a fixed-sigma denoising error of the generation EMA, and the training batch's losses. Each point is appended
to --out as a JSON line as it is measured, and a last line summarises the run (first, peak and last CLS logit
std, and whether the CLS term carried no signal).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from sddit import code_version
from sddit.config import apply_overrides, load_preset
from sddit.data import Manifest
from sddit.diagnostics import cls_carries_no_signal, probe_teacher_cls
from sddit.diffusion import edm_loss_weight
from sddit.loader import LatentLoader, step_generator
from sddit.training import build_training, fit_to_dataset, train_step
from pipelines.common import shared_options

PROBE_SEED = 12345                  # the fixed images' loader seed, apart from any training seed
DENOISE_SIGMA = 1.0                 # the fixed noise level of the denoising probe


def parse_args(argv=None):
    shared = shared_options("--set",
                            set="overrides of the preset (the recipe to judge); the model must be SD-DiT (a teacher)")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[shared])
    parser.add_argument("--preset", default="fashion-mnist", help="base config (a preset name or YAML path)")
    parser.add_argument("--data", default=None, help="dataset written by pipelines/encode.py (required to probe)")
    parser.add_argument("--table", default=None, metavar="JSONL",
                        help="instead of probing: print the Markdown table of the runs recorded in this file")
    parser.add_argument("--steps", type=int, default=1000, help="training steps (default 1000)")
    parser.add_argument("--every", type=int, default=50, help="probe every N steps (default 50; step 0 too)")
    parser.add_argument("--probe-images", type=int, default=256, help="fixed images the teacher is probed on")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--label", default=None, help="name of this recipe in the records (default: the overrides)")
    parser.add_argument("--out", default=None, help="JSON-lines file the points and the summary are appended to")
    args = parser.parse_args(argv)
    if not args.table and not args.data:
        parser.error("give --data DIR to probe, or --table JSONL to summarise earlier probes")
    for flag in ("steps", "every", "probe_images"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.probe_images < 4:
        parser.error("--probe-images must be >= 4 (the class-mean probe splits them in halves)")
    return args


def probe(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    manifest = Manifest.read(args.data)
    preset = apply_overrides(load_preset(args.preset), [f"data.codec={manifest.settings.codec}",
                                                        f"data.resolution={manifest.settings.resolution}"])
    config = apply_overrides(preset, [*args.overrides, f"train.steps={args.steps}"])
    config = fit_to_dataset(config, manifest, args.data)
    if config.model.disc_weight <= 0:
        raise SystemExit("cls_probe: the model has no discriminative branch (model.disc_weight = 0): nothing to probe")
    label = args.label or (" ".join(args.overrides) or "preset")
    torch.manual_seed(config.train.seed)
    model, optimizer, ema, schedules = build_training(config)
    loader = LatentLoader(args.data, rank=0, world_size=1, batch_size=config.optim.batch_size,
                          seed=config.train.seed, device="cpu")
    fixed = LatentLoader(args.data, rank=0, world_size=1, batch_size=args.probe_images, seed=PROBE_SEED, device="cpu")
    x_fixed, y_fixed, _ = fixed.batch(0)
    fixed.close()
    noise = torch.randn(x_fixed.shape, generator=torch.Generator().manual_seed(PROBE_SEED))
    ln_k = math.log(config.model.head_out_size)
    out = open(args.out, "a") if args.out else None
    print(f"cls_probe {label!r}: {args.steps} steps of {config.model.name} at batch {config.optim.batch_size}, "
          f"lr {config.optim.lr} (warm-up {config.optim.warmup_steps}), ln K = {ln_k:.4f}", flush=True)

    def measure(step: int, parts: dict) -> dict:
        teacher_temp = float(schedules.teacher_temp[min(step, args.steps - 1)])
        point = probe_teacher_cls(model, x_fixed, y_fixed, teacher_sigma=config.diffusion.teacher_sigma,
                                  teacher_temp=teacher_temp)
        with torch.no_grad():
            sigma = torch.full((x_fixed.shape[0], 1, 1, 1), DENOISE_SIGMA)
            denoised = ema(x_fixed + sigma * noise, sigma, y_fixed)
            point["denoise_error"] = float((edm_loss_weight(sigma, config.model.sigma_data)
                                            * (denoised - x_fixed) ** 2).mean())
        point.update({f"batch_{key}": float(value) for key, value in parts.items()})
        return {"kind": "point", "label": label, "step": step, **point}

    def emit(record: dict) -> None:
        if out:
            out.write(json.dumps(record) + "\n")
            out.flush()

    points, started = [], time.perf_counter()
    points.append(measure(0, {}))
    emit(points[-1])
    for step in range(args.steps):
        x0, labels, _ = loader.batch(step)
        result = train_step(model, optimizer, ema, x0, labels, step=step, config=config, schedules=schedules,
                            generator=step_generator(config.train.seed, 0, step, "cpu"))
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            points.append(measure(step + 1, result.parts))
            emit(points[-1])
            p = points[-1]
            print(f"step {step + 1}: CLS logit std {p['cls_logit_std']:.4f} (null label "
                  f"{p['cls_logit_std_null_label']:.4f}), token std {p['cls_token_std']:.4f}, target entropy "
                  f"{p['target_entropy_cls']:.4f} (ln K - {ln_k - p['target_entropy_cls']:.4f}), class accuracy "
                  f"{p['cls_class_accuracy']:.2f} / null {p['cls_class_accuracy_null_label']:.2f}, denoise "
                  f"{p['denoise_error']:.4f}, loss_cls {p['batch_loss_cls']:.4f}", flush=True)
    loader.close()
    stds = [p["cls_logit_std"] for p in points]
    summary = {"kind": "summary", "label": label, "preset": args.preset, "data": args.data,
               "overrides": args.overrides, "steps": args.steps, "code_version": code_version(),
               "seconds": round(time.perf_counter() - started, 1), "ln_k": ln_k,
               "cls_logit_std_first": stds[0], "cls_logit_std_peak": max(stds), "cls_logit_std_last": stds[-1],
               "cls_logit_std_null_label_last": points[-1]["cls_logit_std_null_label"],
               "target_entropy_cls_last": points[-1]["target_entropy_cls"],
               "cls_class_accuracy_last": points[-1]["cls_class_accuracy"],
               "cls_class_accuracy_null_label_last": points[-1]["cls_class_accuracy_null_label"],
               "denoise_error_last": points[-1]["denoise_error"],
               "no_signal": cls_carries_no_signal([p["batch_target_entropy_cls"] for p in points[1:]],
                                                  config.model.head_out_size)}
    summary["verdict"] = verdict_of(summary)
    emit(summary)
    if out:
        out.close()
    print(f"cls_probe {label!r}: CLS logit std {stds[0]:.4f} at step 0, peak {max(stds):.4f}, {stds[-1]:.4f} at "
          f"step {args.steps} ({summary['verdict']}); {summary['seconds']} s", flush=True)
    return summary


def verdict_of(summary: dict) -> str:
    """What happened to the teacher's CLS logit std over the run, in one word."""
    first, last = summary["cls_logit_std_first"], summary["cls_logit_std_last"]
    if summary["no_signal"]:
        return "no signal"
    if first < 1e-6:
        return "constant at init"
    return "amplified" if last >= first else "held" if last >= 0.5 * first else "erased"


TABLE_STEPS = (0, 50, 100, 250, 500, 1000)


def table(path) -> str:
    """A Markdown row per probed recipe in a JSON-lines file: the teacher's CLS logit std along the run, the last
    CLS target entropy below ln K, the CLS token's class accuracy with and without the label, the denoising error."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    summaries = [r for r in records if r["kind"] == "summary"]
    lines = ["| recipe | " + " | ".join(f"CLS logit std @{s}" for s in TABLE_STEPS) + " | ln K - H(targets) @end | "
             "class accuracy, label / null label @end | denoise error @end | verdict |",
             "| --- |" + " --- |" * (len(TABLE_STEPS) + 4)]
    for summary in summaries:
        at = {r["step"]: r for r in records if r["kind"] == "point" and r["label"] == summary["label"]}
        last = at[max(at)]
        stds = " | ".join(f"{at[s]['cls_logit_std']:.4f}" if s in at else "" for s in TABLE_STEPS)
        lines.append(f"| {summary['label']} | {stds} | {summary['ln_k'] - last['target_entropy_cls']:.3f} | "
                     f"{last['cls_class_accuracy']:.2f} / {last['cls_class_accuracy_null_label']:.2f} | "
                     f"{last['denoise_error']:.4f} | {summary.get('verdict') or verdict_of(summary)} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.table:
        print(table(args.table))
        return None
    return probe(args)


if __name__ == "__main__":
    main()
