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

import json

import torch

from sddit import code_version
from sddit.diffusion import edm_loss_weight
from bench.probe_loop import parse_probe_args, probe_main, probe_parser, set_up, train_and_measure
from pipelines.study_plan import arm_overrides

PROBE_SIGMAS = (0.1, 1.0, 5.0)      # the denoising probe's noise levels; the stream is probed at the middle one


def parse_args(argv=None):
    # min_probe_images: a pair distance needs two images
    parser = probe_parser(__doc__, probe_images=64, min_probe_images=2,
                          set_help="overrides after the arm's, e.g. --set optim.lr=1e-4")
    parser.add_argument("--arm", default="DiT-Dispersive", help="a study arm (pipelines/study_plan.py ARMS)")
    parser.add_argument("--label", default=None, help="name of this probe in the records (default: arm + overrides)")
    return parse_probe_args(parser, argv)


def probe(args) -> list[dict]:
    run = set_up(args, lambda base: arm_overrides(args.arm, base.model.name))
    config = run.config
    label = args.label or " ".join([args.arm, *args.overrides])
    depth = config.model.depth
    version = code_version()                        # two git calls: once per probe, not once per point
    print(f"residual_probe {label!r}: {args.steps} steps of {config.model.name} at batch {config.optim.batch_size}, "
          f"lr {config.optim.lr} (warm-up {config.optim.warmup_steps})", flush=True)

    def measure(step: int) -> dict:
        point = {"code_version": version}
        for sigma_value in PROBE_SIGMAS:
            sigma = run.x.new_full((run.x.shape[0], 1, 1, 1), sigma_value)
            denoised, _, hidden = run.model.denoiser.denoise(run.x + sigma * run.noise, sigma, run.y,
                                                             taps=tuple(range(1, depth + 1)))
            point[f"denoise_error_sigma{sigma_value:g}"] = float(
                (edm_loss_weight(sigma, config.model.sigma_data) * (denoised - run.x) ** 2).mean())
            if sigma_value == PROBE_SIGMAS[1]:
                point["token_rms"] = [float(hidden[d].pow(2).mean().sqrt()) for d in range(1, depth + 1)]
                last = hidden[depth].flatten(1)
                point["pair_distance_per_dim"] = float(torch.pdist(last).pow(2).mean() / last.shape[1])
        return point

    def describe(p: dict) -> str:
        return (f"token rms {' '.join(f'{v:.1f}' for v in p['token_rms'])}, pair distance "
                f"{p['pair_distance_per_dim']:.1f}, denoise "
                + " ".join(f"{p[f'denoise_error_sigma{s:g}']:.3f}" for s in PROBE_SIGMAS))

    return train_and_measure(args, run, label, measure, describe)


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
    return probe_main(argv, parse_args, probe, table)


if __name__ == "__main__":
    main()
