"""The whole 512 px path once, on synthetic data: encode -> shards -> train (imagenet512-XL2) -> sample -> metrics.

What it checks is shapes, sizes and memory at 512 px, not quality or speed: a VAE with the SD-VAE's layout
(4 levels, 8x downsampling, 4 latent channels, so latents are 4 x 64 x 64 as with the real one) but 16 channels
wide and random weights, so the CPU can run it; the imagenet512-XL2 preset with its model swapped for
SD-DiT-S/2 (`--model`, the same 64 x 64 latents, 1,024 tokens) for a few steps; the evaluation stage with the
dataset as its reference (decoded at 512 px) and the domain extractor; and the FID Inception (random weights)
on 512 px reference images, the path an ADM `VIRTUAL_imagenet512.npz` takes. Writes OUT.json and OUT.md.

    python bench/path_512.py --work runs/path-512 --out bench/results/path_512
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from pipelines.common import at_least

ROOT = Path(__file__).resolve().parents[1]


def narrow_sd_vae(directory: Path) -> Path:
    """The SD-VAE's layout (4 levels: 8x down, 4 latent channels) at 16 channels, random weights."""
    import torch
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                  block_out_channels=(16, 16, 16, 16), norm_num_groups=8,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  sample_size=512, scaling_factor=0.18215).save_pretrained(directory)
    return directory


def peak_rss_mib() -> float:
    """The peak resident memory of this process or of any finished child (Ray workers are not children)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, children) / 1024, 1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/path-512", help="scratch directory (replaced)")
    parser.add_argument("--out", default="bench/results/path_512", help="writes OUT.json and OUT.md")
    parser.add_argument("--classes", type=int, default=4, help="synthetic classes (default 4)")
    parser.add_argument("--per-class", type=int, default=8, help="images per class (default 8)")
    parser.add_argument("--steps", type=at_least(1), default=4, help="training steps (default 4)")
    parser.add_argument("--samples", type=int, default=8, help="samples evaluated (default 8)")
    args = parser.parse_args(argv)

    import torch

    from pipelines import encode, evaluate, train
    from sddit.checkpoint import load_checkpoint
    from sddit.reference import reference_from_npz
    from sddit.extractors import InceptionExtractor
    from sddit.loader import LatentLoader
    from bench.synthetic_images import write_images

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    result, timings = {"resolution": 512}, {}

    # 1. encode: ImageNet-like JPEG sizes, the ADM crop to 512, the VAE's posterior moments as shards
    write_images(work / "images", args.classes, args.per_class, min_size=520, max_size=900)
    vae = narrow_sd_vae(work / "vae")
    start = time.time()
    manifest = encode.main(["--data", str(work / "images"), "--out", str(work / "data"), "--vae", str(vae),
                            "--resolution", "512", "--run-dir", str(work / "runs")])
    timings["encode_s"] = round(time.time() - start, 1)
    shard_bytes = sum((work / "data" / s["file"]).stat().st_size for s in manifest.shards)
    result["shards"] = {"stored_shape": manifest.stored_shape, "latent_shape": manifest.latent_shape,
                        "rows": manifest.num_rows, "files": len(manifest.shards),
                        "rows_per_shard": manifest.settings.rows_per_shard,
                        "bytes_per_row": round(shard_bytes / manifest.num_rows),
                        "imagenet_1k_with_flips_gb": round(2 * 1_281_167 * shard_bytes / manifest.num_rows / 1e9, 1)}

    # 2. the training reader on those shards: one batch's latents, and what a window holds
    loader = LatentLoader(work / "data", rank=0, world_size=1, batch_size=4, seed=0, device="cpu")
    batch = loader.batch(0)
    window = loader._window(0)
    result["reader"] = {"x0_shape": list(batch.x0.shape), "window_rows": len(window.stored),
                        "window_mib": round(window.stored.nbytes / 2**20, 1)}
    loader.close()

    # 3. train: the 512 preset (sigma scale 2, 64 x 64 latents) with a small model, through Ray Train
    start = time.time()
    train.main(["--data", str(work / "data"), "--preset", "imagenet512-XL2", "--model", "SD-DiT-S/2",
                "--steps", str(args.steps), "--batch-size", "4", "--checkpoint-every", str(args.steps),
                "--num-workers", "1", "--cpus-per-worker", "2", "--set", "train.sample_count=4",
                "--name", "path-512", "--run-dir", str(work / "runs")])
    timings["train_s"] = round(time.time() - start, 1)
    checkpoint = max((work / "runs").rglob("checkpoint.pt"), key=lambda p: p.stat().st_mtime)
    state = load_checkpoint(checkpoint)
    config = state["config"]
    result["train"] = {"step": int(state["step"]), "model": config.model.name, "input_size": config.model.input_size,
                       "hidden_size": config.model.hidden_size, "sigma_scale": config.diffusion.sigma_scale,
                       "pos_embed_tokens": int(next(v for k, v in state["model"].items() if k.endswith("pos_embed")).shape[1])}

    # 4. evaluate: samples decoded at 512 px, the dataset (decoded at 512 px) as the reference
    start = time.time()
    metrics = evaluate.main(["--checkpoint", str(checkpoint), "--num-samples", str(args.samples), "--steps", "3",
                             "--batch-size", "4", "--extractor", "domain", "--out", str(work / "eval"),
                             "--run-dir", str(work / "runs")])
    timings["evaluate_s"] = round(time.time() - start, 1)
    with np.load(work / "eval" / "samples.npz") as samples:
        sample_shape = list(samples["arr_0"].shape)
    result["evaluate"] = {"samples_shape": sample_shape,
                          "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}

    # 5. an ADM-style reference batch of 512 px images through the FID Inception (random weights)
    images = np.stack([np.asarray(__import__("PIL.Image").Image.open(p).convert("RGB").resize((512, 512)))
                       for p in sorted((work / "images").rglob("*.JPEG"))[:8]])
    np.savez(work / "VIRTUAL_reference512.npz", arr_0=images)
    reference = reference_from_npz(work / "VIRTUAL_reference512.npz", InceptionExtractor.random(seed=0, batch_size=4))
    result["inception_reference"] = {"images_shape": list(images.shape), "mu_shape": list(reference.mu.shape)}

    result["timings"] = timings
    result["peak_rss_mib"] = peak_rss_mib()
    result["machine"] = f"{platform.node()} ({platform.machine()}), torch {torch.__version__}"
    result["command"] = "python bench/path_512.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(json.dumps(result, indent=2))
    return result


def markdown(r: dict) -> str:
    s, t = r["shards"], r["timings"]
    return "\n".join([
        "# The 512 px path on synthetic data", "",
        f"`{r['command']}` on {r['machine']}.", "",
        f"- encode ({t['encode_s']} s): {s['rows']} rows in {s['files']} shard(s) of up to {s['rows_per_shard']} rows, "
        f"stored {s['stored_shape']} float16, {s['bytes_per_row']:,} bytes per row on disk; at that size ImageNet-1k "
        f"with flips is {s['imagenet_1k_with_flips_gb']} GB",
        f"- reader: batch x0 {r['reader']['x0_shape']}, one window {r['reader']['window_rows']} rows = "
        f"{r['reader']['window_mib']} MiB",
        f"- train ({t['train_s']} s): {r['train']['model']} at input {r['train']['input_size']}, sigma scale "
        f"{r['train']['sigma_scale']}, {r['train']['pos_embed_tokens']} position embeddings, step {r['train']['step']}",
        f"- evaluate ({t['evaluate_s']} s): samples {r['evaluate']['samples_shape']}, metrics "
        f"{', '.join(f'{k} {v:.4g}' for k, v in r['evaluate']['metrics'].items())}",
        f"- FID Inception on a 512 px reference batch {r['inception_reference']['images_shape']}: "
        f"mu {r['inception_reference']['mu_shape']}",
        f"- peak RSS (this process or a child): {r['peak_rss_mib']} MiB", ""])


if __name__ == "__main__":
    main()
