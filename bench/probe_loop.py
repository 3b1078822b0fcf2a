"""What the probes (cls_probe, residual_probe) share: their command line, their set-up and their loop.

A probe trains a config N steps with the library's own loop (build_training, train_step, the streaming loader),
without Ray, and measures the model on a fixed batch of images and noise at step 0 and every few steps, so a
recipe can be judged in minutes and what it shows is what a study's run does. Each point is appended to a
JSON-lines file as it is measured, so a stopped probe keeps what it measured.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Callable

import torch

from sddit.config import Config, apply_overrides, load_preset
from sddit.data import Manifest
from sddit.loader import LatentLoader, step_generator
from sddit.training import build_training, fit_to_dataset, train_step
from pipelines.common import at_least, shared_options
from bench.records import append_record

PROBE_SEED = 12345                  # the fixed images' loader seed and their noise, apart from any training seed


def probe_parser(description: str, *, set_help: str, probe_images: int,
                 min_probe_images: int) -> argparse.ArgumentParser:
    """The flags every probe has; a probe adds its own before parsing with parse_probe_args."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[shared_options("--set", set=set_help)])
    parser.add_argument("--preset", default="fashion-mnist", help="base config (a preset name or YAML path)")
    parser.add_argument("--data", default=None, help="dataset written by pipelines/encode.py (required to probe)")
    parser.add_argument("--table", default=None, metavar="JSONL",
                        help="instead of probing: print the Markdown table of the probes recorded in this file")
    parser.add_argument("--steps", type=at_least(1), default=1000, help="training steps (default 1000)")
    parser.add_argument("--every", type=at_least(1), default=50, help="probe every N steps (default 50; step 0 too)")
    parser.add_argument("--probe-images", type=at_least(min_probe_images), default=probe_images,
                        help=f"fixed images the model is probed on (default {probe_images}; at least {min_probe_images})")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=None, help="JSON-lines file the points are appended to as they are measured")
    return parser


def parse_probe_args(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if not args.table and not args.data:
        parser.error("give --data DIR to probe, or --table JSONL to summarise earlier probes")
    return args


@dataclass
class Probe:
    """A config ready to train, with the fixed images (x, y) and noise it is measured on."""
    config: Config
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: torch.nn.Module
    schedules: object
    x: torch.Tensor
    y: torch.Tensor
    noise: torch.Tensor


def set_up(args, overrides: Callable[[Config], list[str]] = lambda base: []) -> Probe:
    """The preset fitted to --data's manifest, then overrides(base), then --set and --steps; built and seeded."""
    if args.threads:
        torch.set_num_threads(args.threads)
    manifest = Manifest.read(args.data)
    base = apply_overrides(load_preset(args.preset), [f"data.codec={manifest.settings.codec}",
                                                      f"data.resolution={manifest.settings.resolution}"])
    config = apply_overrides(base, [*overrides(base), *args.overrides, f"train.steps={args.steps}"])
    config = fit_to_dataset(config, manifest, args.data)
    torch.manual_seed(config.train.seed)
    model, optimizer, ema, schedules = build_training(config)
    fixed = LatentLoader(args.data, rank=0, world_size=1, batch_size=args.probe_images, seed=PROBE_SEED, device="cpu")
    x, y, _ = fixed.batch(0)
    fixed.close()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(PROBE_SEED))
    return Probe(config, model, optimizer, ema, schedules, x, y, noise)


def train_and_measure(args, probe: Probe, label: str, measure: Callable[[int], dict],
                      describe: Callable[[dict], str]) -> list[dict]:
    """Train args.steps steps; at step 0, every args.every steps and the last, measure(step) (no gradient) is
    stamped with the label, the step, the training batch's losses and the seconds so far, appended to args.out
    and printed as describe(point)."""
    config = probe.config
    loader = LatentLoader(args.data, rank=0, world_size=1, batch_size=config.optim.batch_size,
                          seed=config.train.seed, device="cpu")
    started, points = time.perf_counter(), []

    def record(step: int, parts: dict) -> None:
        with torch.no_grad():
            measured = measure(step)
        point = {"kind": "point", "label": label, "step": step, **measured,
                 **{f"batch_{key}": float(value) for key, value in parts.items()},
                 "seconds": round(time.perf_counter() - started, 1)}
        append_record(args.out, point)
        points.append(point)
        if step:
            print(f"step {step}: {describe(point)}", flush=True)

    record(0, {})
    for step in range(args.steps):
        x0, labels, _ = loader.batch(step)
        result = train_step(probe.model, probe.optimizer, probe.ema, x0, labels, step=step, config=config,
                            schedules=probe.schedules, generator=step_generator(config.train.seed, 0, step, "cpu"))
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            record(step + 1, result.parts)
    loader.close()
    return points


def probe_main(argv, parse_args, probe, table):
    """A probe's entry point: with --table, the Markdown table of the records in that file; otherwise a probe."""
    args = parse_args(argv)
    if args.table:
        print(table(args.table))
        return None
    return probe(args)
