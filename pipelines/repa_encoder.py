"""Train the small external encoder REPA aligns with on the small built-in datasets (`local-vit`).

    python pipelines/repa_encoder.py --data runs/data/fmnist16/train --out runs/data/fmnist16-vit.pt \\
        --held-out runs/data/fmnist16/test
    python pipelines/encode.py --data runs/data/fmnist/train --out runs/data/fmnist16-repa/train --codec pixel \\
        --resolution 16 --repa-encoder local-vit --repa-encoder-weights runs/data/fmnist16-vit.pt

A ViT classifier of the dataset's classes, trained on the dataset's own images (a pixel dataset written
by encode.py, mirrored rows included) at its own resolution. Give it the training split: the FID judge
is trained on the held-out split, so the two never see the same images, and the judge is a CNN, not a
ViT (see sddit/representations.py for what that does and does not rule out). ImageNet runs use DINOv2
instead (--repa-encoder timm:vit_base_patch14_dinov2 in the encode stage).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from sddit.data import DataError, Manifest
from sddit.reference import dataset_codec, dataset_images
from sddit.representations import LOCAL_VIT, load_external_encoder, save_local_vit, train_local_vit
from pipelines.common import at_least, run_cli


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a pixel dataset written by pipelines/encode.py (the training split)")
    parser.add_argument("--out", required=True, help="the weights file to write (for encode.py --repa-encoder-weights)")
    parser.add_argument("--held-out", default=None, help="a pixel dataset to report the classifier's accuracy on")
    parser.add_argument("--steps", type=at_least(1), default=2000, help="optimiser steps (default 2000)")
    parser.add_argument("--batch-size", type=at_least(1), default=128, help="images per step (default 128)")
    parser.add_argument("--patch-size", type=at_least(1), default=2, help="ViT patch size: the feature grid is side / patch "
                                                                 "(default 2: 8x8 at 16 px, the DiT's grid)")
    parser.add_argument("--width", type=at_least(1), default=64, help="ViT embedding width = the feature dimension (default 64)")
    parser.add_argument("--depth", type=at_least(1), default=4, help="ViT blocks (default 4)")
    parser.add_argument("--heads", type=at_least(1), default=4, help="attention heads (default 4)")
    parser.add_argument("--seed", type=int, default=1, help="seed (default 1; the FID judge uses 0)")
    args = parser.parse_args(argv)
    return args


def images_of(directory) -> tuple[np.ndarray, np.ndarray]:
    manifest = Manifest.read(directory)
    if manifest.settings.codec != "pixel":
        raise DataError(f"{Path(directory) / 'manifest.json'}: codec {manifest.settings.codec!r}; the local encoder "
                        f"is for pixel datasets (use timm:vit_base_patch14_dinov2 for SD-VAE latents)")
    parts = list(dataset_images(directory, dataset_codec(directory)))
    return np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])


def main(argv=None) -> dict:
    args = parse_args(argv)
    images, labels = images_of(args.data)
    num_classes = Manifest.read(args.data).num_classes
    print(f"repa_encoder: training a {args.depth}x{args.width} ViT (patch {args.patch_size}) on {len(images)} "
          f"images of {args.data}", flush=True)
    start, last = time.time(), [0.0]

    def progress(step, loss):
        if time.time() - last[0] > 30 or step == args.steps:
            last[0] = time.time()
            print(f"repa_encoder: step {step}/{args.steps}, loss {loss:.3f}", flush=True)

    net, info = train_local_vit(images, labels, num_classes=num_classes, patch_size=args.patch_size,
                                embed_dim=args.width, depth=args.depth, num_heads=args.heads, steps=args.steps,
                                batch_size=args.batch_size, seed=args.seed, progress=progress)
    info.update(data=str(Path(args.data).resolve()), seconds=time.time() - start)
    if args.held_out:
        import torch
        held_images, held_labels = images_of(args.held_out)
        with torch.no_grad():
            x = torch.from_numpy(held_images).permute(0, 3, 1, 2).float() / 255.0
            predicted = torch.cat([net((x[i:i + 512] - 0.5) / 0.5).argmax(1) for i in range(0, len(x), 512)])
        info["held_out"] = str(Path(args.held_out).resolve())
        info["held_out_accuracy"] = float((predicted.numpy() == held_labels).mean())
    path = save_local_vit(args.out, net, info)
    shape = load_external_encoder(LOCAL_VIT, path, resolution=images.shape[1]).feature_shape()
    print(f"repa_encoder: wrote {path} (features {shape[0]} tokens x {shape[1]}; "
          + ", ".join(f"{k} {v:.3f}" for k, v in info.items() if "accuracy" in k) + ")", flush=True)
    print(json.dumps({k: v for k, v in info.items() if k != "architecture"}), flush=True)
    return info


def cli():
    """The console script (`pyproject.toml`): a user error is one line, not a traceback."""
    run_cli("repa_encoder", main)


if __name__ == "__main__":
    cli()
