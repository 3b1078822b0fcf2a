"""What a study's finished runs learned, read from their final checkpoints: where along the noise levels the
generation EMA denoises better or worse, how input-dependent its predictions stay, and how much of the class its
encoder's tokens hold without the label.

    python bench/checkpoint_probe.py --study fmnist-cls-signal-256 --data runs/data/fmnist32/test \\
        --out bench/results/checkpoint_probe.jsonl
    python bench/checkpoint_probe.py --table bench/results/checkpoint_probe.jsonl

Each run of the study (a folder study-NAME-ARM-seedS-DIGEST in --storage) is probed at its last checkpoint, on
the same --images held-out images and the same noise, at each of --sigmas:
- denoise error: the EDM-weighted squared error of D(x0 + sigma n; y), as the training loss weighs it;
- output spread: the within-class standard deviation of D over the images, divided by that of the clean images.
  Near 1 at small sigma; as sigma grows an ideal denoiser's prediction moves to the class mean and the spread
  falls. At a given sigma, a lower spread than another model's means predictions closer to a class prototype
  (less of the noisy input kept), which sampling turns into less diverse images (recall);
- class accuracy of the encoder's mean patch token with the null label (the class from the image alone):
  nearest class mean, fitted on one half of the images and scored on the other (sddit.diagnostics).
One JSON line per run is appended to --out.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from sddit import code_version
from sddit.checkpoint import generator_of, load_checkpoint
from sddit.data import Manifest
from sddit.diagnostics import nearest_class_mean_accuracy
from sddit.diffusion import edm_loss_weight
from sddit.loader import LatentLoader
from bench.records import append_record
from pipelines.common import at_least
from pipelines.study import newest_checkpoint_folder
from pipelines.study_plan import ARMS, slug

RUN_FOLDER = re.compile(r"(?P<arm>.+)-seed(?P<seed>\d+)-[0-9a-f]{8}")     # after study-STUDY-
NOISE_SEED = 1234


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default=None, help="study name (pipelines/study.py --name) whose runs to probe")
    parser.add_argument("--arms", default=None, help="comma-separated arms to probe (default: every arm found)")
    parser.add_argument("--storage", default="runs/ray", help="the study's storage (default runs/ray)")
    parser.add_argument("--data", default=None, help="held-out dataset written by pipelines/encode.py at the "
                                                     "runs' resolution (required to probe)")
    parser.add_argument("--images", type=at_least(4), default=512,
                        help="held-out images probed, the same for every run (default 512; at least 4: the class "
                             "probe splits them in halves)")
    parser.add_argument("--sigmas", default="0.05,0.2,0.5,1,2,5,20", help="noise levels, comma-separated")
    parser.add_argument("--token-sigma", type=float, default=0.5,
                        help="noise level of the encoder-token class probe (default 0.5)")
    parser.add_argument("--out", default=None, help="JSON-lines file, one line per run")
    parser.add_argument("--table", default=None, metavar="JSONL",
                        help="instead of probing: the Markdown table of the runs recorded in this file, by arm")
    args = parser.parse_args(argv)
    if not args.table and not (args.study and args.data):
        parser.error("give --study NAME and --data DIR to probe, or --table JSONL to summarise earlier probes")
    try:
        args.sigmas = [float(s) for s in args.sigmas.split(",")]
    except ValueError:
        parser.error(f"--sigmas {args.sigmas!r}: comma-separated numbers, e.g. 0.5,1,2")
    return args


def study_runs(storage: Path, study: str) -> list[dict]:
    """{arm, seed, checkpoint} of each run of `study` in `storage` that left a checkpoint, by arm and seed. Runs
    are told by their folder, study-STUDY-ARM-seedS-DIGEST, with ARM a built-in arm: a study whose name extends
    this one's (fmnist-x-256 for fmnist-x) leaves folders that would otherwise read as arm '256-...'."""
    arms = {slug(arm): arm for arm in ARMS}
    runs = []
    for folder in sorted(storage.glob(f"study-{study}-*")):
        match = RUN_FOLDER.fullmatch(folder.name[len(f"study-{study}-"):])
        checkpoint = newest_checkpoint_folder(folder)
        if match and match["arm"] in arms and checkpoint:
            runs.append({"arm": arms[match["arm"]], "seed": int(match["seed"]), "checkpoint": checkpoint})
    return sorted(runs, key=lambda run: (run["arm"], run["seed"]))


def within_class_std(values: torch.Tensor, labels: torch.Tensor) -> float:
    """The per-pixel standard deviation over the images of each class, averaged over pixels and classes."""
    return float(torch.stack([values[labels == c].std(dim=0).mean() for c in labels.unique()]).mean())


@torch.no_grad()
def probe_run(ema, config, x0, y, noise, sigmas, token_sigma: float) -> dict:
    point, clean_spread = {}, within_class_std(x0, y)
    for value in sigmas:
        sigma = x0.new_full((x0.shape[0], 1, 1, 1), value)
        denoised = ema(x0 + sigma * noise, sigma, y)
        point[f"denoise_error_sigma{value:g}"] = float(
            (edm_loss_weight(sigma, config.model.sigma_data) * (denoised - x0) ** 2).mean())
        point[f"output_spread_sigma{value:g}"] = within_class_std(denoised, y) / clean_spread
    null = torch.full_like(y, config.model.num_classes)
    _, tokens = ema.denoise(x0 + token_sigma * noise, token_sigma, null)[:2]
    patches = tokens[:, ema.net.encoder.num_extra_tokens:].float().mean(dim=1)        # [N, D]
    point["token_class_accuracy"] = nearest_class_mean_accuracy(patches, y)
    return point


def probe(args) -> list[dict]:
    manifest = Manifest.read(args.data)
    fixed = LatentLoader(args.data, rank=0, world_size=1, batch_size=args.images, seed=NOISE_SEED, device="cpu")
    x0, y, _ = fixed.batch(0)
    fixed.close()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(NOISE_SEED))
    runs = study_runs(Path(args.storage), args.study)
    if args.arms:
        runs = [run for run in runs if run["arm"] in args.arms.split(",")]
    if not runs:
        raise SystemExit(f"checkpoint_probe: no run of study {args.study!r} with a checkpoint in {args.storage}")
    version, records = code_version(), []
    for run in runs:
        payload = load_checkpoint(run["checkpoint"])
        config = payload["config"]
        if tuple(payload["dataset"]["latent_shape"]) != tuple(manifest.latent_shape):
            raise SystemExit(f"checkpoint_probe: {run['checkpoint']} was trained on {payload['dataset']['latent_shape']}"
                             f" latents; {args.data} holds {manifest.latent_shape}")
        point = probe_run(generator_of(payload), config, x0, y, noise, args.sigmas, args.token_sigma)
        record = {"kind": "checkpoint", "study": args.study, "arm": run["arm"], "seed": run["seed"],
                  "step": payload["step"], "data": args.data, "images": args.images, "sigmas": args.sigmas,
                  "token_sigma": args.token_sigma, "code_version": version, **point}
        append_record(args.out, record)
        records.append(record)
        print(f"{run['arm']} seed {run['seed']} (step {payload['step']}): token class accuracy "
              f"{point['token_class_accuracy']:.3f}; denoise error / output spread by sigma "
              + ", ".join(f"{s:g}: {point[f'denoise_error_sigma{s:g}']:.4f} / {point[f'output_spread_sigma{s:g}']:.3f}"
                          for s in args.sigmas), flush=True)
    return records


def table(path: str) -> str:
    """Per study and arm, the mean over its seeds of each measurement (the records must share their sigmas)."""
    rows = [row for line in open(path) if line.strip() and (row := json.loads(line)).get("kind") == "checkpoint"]
    sigmas = rows[0]["sigmas"] if rows else []
    if any(row["sigmas"] != sigmas for row in rows):
        raise SystemExit(f"checkpoint_probe: {path} holds probes at different --sigmas; one table needs the same")
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["study"], row["arm"]), []).append(row)
    lines = ["| study | arm | seeds | token class accuracy | "
             + " | ".join(f"sigma {s:g}: error / spread" for s in sigmas) + " |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in sigmas) + " |"]
    for (study, arm), group in groups.items():
        def mean(key):
            return sum(row[key] for row in group) / len(group)
        lines.append(f"| {study} | {arm} | {len(group)} | {mean('token_class_accuracy'):.3f} | "
                     + " | ".join(f"{mean(f'denoise_error_sigma{s:g}'):.4f} / {mean(f'output_spread_sigma{s:g}'):.3f}"
                                  for s in sigmas) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.table:
        print(table(args.table))
        return None
    return probe(args)


if __name__ == "__main__":
    main()
