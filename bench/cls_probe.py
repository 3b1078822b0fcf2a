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

import json
import math
from pathlib import Path

from sddit import code_version
from sddit.diagnostics import cls_carries_no_signal, probe_teacher_cls
from sddit.diffusion import edm_loss_weight
from bench.probe_loop import parse_probe_args, probe_main, probe_parser, set_up, train_and_measure
from bench.records import append_record

DENOISE_SIGMA = 1.0                 # the fixed noise level of the denoising probe


def parse_args(argv=None):
    # min_probe_images: the class-mean probe splits the images in halves
    parser = probe_parser(__doc__, probe_images=256, min_probe_images=4,
                          set_help="overrides of the preset (the recipe to judge); the model must be SD-DiT (a teacher)")
    parser.add_argument("--label", default=None, help="name of this recipe in the records (default: the overrides)")
    return parse_probe_args(parser, argv)


def probe(args) -> dict:
    run = set_up(args)
    config = run.config
    if config.model.disc_weight <= 0:
        raise SystemExit("cls_probe: the model has no discriminative branch (model.disc_weight = 0): nothing to probe")
    label = args.label or (" ".join(args.overrides) or "preset")
    ln_k = math.log(config.model.head_out_size)
    print(f"cls_probe {label!r}: {args.steps} steps of {config.model.name} at batch {config.optim.batch_size}, "
          f"lr {config.optim.lr} (warm-up {config.optim.warmup_steps}), ln K = {ln_k:.4f}", flush=True)

    def measure(step: int) -> dict:
        teacher_temp = float(run.schedules.teacher_temp[min(step, args.steps - 1)])
        point = probe_teacher_cls(run.model, run.x, run.y, teacher_sigma=config.diffusion.teacher_sigma,
                                  teacher_temp=teacher_temp)
        sigma = run.x.new_full((run.x.shape[0], 1, 1, 1), DENOISE_SIGMA)
        denoised = run.ema(run.x + sigma * run.noise, sigma, run.y)
        point["denoise_error"] = float((edm_loss_weight(sigma, config.model.sigma_data)
                                        * (denoised - run.x) ** 2).mean())
        return point

    def describe(p: dict) -> str:
        return (f"CLS logit std {p['cls_logit_std']:.4f} (null label {p['cls_logit_std_null_label']:.4f}), token "
                f"std {p['cls_token_std']:.4f}, target entropy {p['target_entropy_cls']:.4f} (ln K - "
                f"{ln_k - p['target_entropy_cls']:.4f}), class accuracy {p['cls_class_accuracy']:.2f} / null "
                f"{p['cls_class_accuracy_null_label']:.2f}, denoise {p['denoise_error']:.4f}, loss_cls "
                f"{p['batch_loss_cls']:.4f}")

    points = train_and_measure(args, run, label, measure, describe)
    stds = [p["cls_logit_std"] for p in points]
    summary = {"kind": "summary", "label": label, "preset": args.preset, "data": args.data,
               "overrides": args.overrides, "steps": args.steps, "code_version": code_version(),
               "seconds": points[-1]["seconds"], "ln_k": ln_k,
               "cls_logit_std_first": stds[0], "cls_logit_std_peak": max(stds), "cls_logit_std_last": stds[-1],
               "cls_logit_std_null_label_last": points[-1]["cls_logit_std_null_label"],
               "target_entropy_cls_last": points[-1]["target_entropy_cls"],
               "cls_class_accuracy_last": points[-1]["cls_class_accuracy"],
               "cls_class_accuracy_null_label_last": points[-1]["cls_class_accuracy_null_label"],
               "denoise_error_last": points[-1]["denoise_error"],
               "no_signal": cls_carries_no_signal([p["batch_target_entropy_cls"] for p in points[1:]],
                                                  config.model.head_out_size)}
    summary["verdict"] = verdict_of(summary)
    append_record(args.out, summary)
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
    return probe_main(argv, parse_args, probe, table)


if __name__ == "__main__":
    main()
