"""The whole pipeline, end to end (work in progress: see README, "Status").

Today this runs what exists: the `sddit` core library trains the `demo` preset (a tiny SD-DiT) on
scikit-learn's bundled handwritten digits with a plain single-process loop, then samples one row
per digit with the EDM Heun sampler from the generation EMA and writes a grid PNG. The Ray stages
(encode, tune, train, evaluate) replace this loop as they land.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sddit.config import apply_overrides, load_preset  # noqa: E402
from sddit.diffusion import edm_sample  # noqa: E402
from sddit.images import save_grid  # noqa: E402
from sddit.training import build_training, train_step  # noqa: E402


def load_digits(resolution: int):
    """scikit-learn's 1,797 8x8 digits, upsampled to `resolution`, in [-1, 1]: ([N, 1, R, R], [N])."""
    from sklearn.datasets import load_digits as sklearn_digits
    digits = sklearn_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return x * 2 - 1, torch.tensor(digits.target, dtype=torch.long)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo", help="preset name or YAML path (default: demo)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's train.steps)")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="SECTION.FIELD=VALUE",
                        help="config overrides, e.g. --set model.mask_ratio=0.5 optim.lr=3e-4")
    parser.add_argument("--cfg-scale", type=float, default=3.0, help="classifier-free guidance scale for the grid")
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args()

    overrides = list(args.overrides) + ([f"train.steps={args.steps}"] if args.steps else [])
    config = apply_overrides(load_preset(args.preset), overrides)
    torch.manual_seed(args.seed)
    x_all, y_all = load_digits(config.model.input_size)
    model, optimizer, ema, schedules = build_training(config)
    batch = config.optim.batch_size

    # train: one readable loop, progress in images
    start = time.time()
    skipped = torch.zeros((), dtype=torch.long)
    bar = tqdm(range(config.train.steps), desc="train", unit="step")
    for step in bar:
        idx = torch.randint(0, len(x_all), (batch,))
        result = train_step(model, optimizer, ema, x_all[idx], y_all[idx], step=step, config=config, schedules=schedules)
        skipped += ~result.applied           # counted on the device: no per-step sync
        if step % config.train.log_every == 0:
            bar.set_postfix(loss=f"{result.parts['loss'].item():.3f}", gen=f"{result.parts['loss_gen'].item():.3f}")
    train_seconds = time.time() - start

    # sample: a row per digit from the generation EMA
    labels = torch.arange(10).repeat_interleave(10)
    noise = torch.randn(len(labels), config.model.in_channels, config.model.input_size, config.model.input_size,
                        generator=torch.Generator().manual_seed(args.seed))
    samples = edm_sample(ema, noise, labels, steps=18, cfg_scale=args.cfg_scale)
    grid = save_grid(samples.clamp(-1, 1), Path(args.out) / "samples.png", nrow=10, scale=4)
    print(f"trained {config.model.name} ({config.train.steps} steps, {config.train.steps * batch} images, "
          f"{skipped.item()} skipped) in {train_seconds:.0f} s; final loss {result.parts['loss'].item():.3f}")
    print(f"samples (row i = digit i, CFG {args.cfg_scale}): {grid}")


if __name__ == "__main__":
    main()
