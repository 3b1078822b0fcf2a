"""The SD-VAE's architecture (stabilityai/sd-vae-ft-ema's config) with random weights, for speed only.

Encoding speed does not depend on the weights, so the GPU benchmarks run the real architecture without
downloading it; `--out DIR` writes it as a diffusers directory that `pipelines/encode.py --vae DIR` and
`bench/encode_throughput.py --vae DIR` load like the real one (the latents are meaningless).

    python bench/random_sd_vae.py --out runs/random-sd-vae
"""
from __future__ import annotations

import argparse

SD_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256,
    scaling_factor=0.18215,
)


def random_sd_vae(seed: int = 0):
    import torch
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(**SD_VAE_CONFIG)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory to write the diffusers AutoencoderKL to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = parser.parse_args()
    random_sd_vae(args.seed).save_pretrained(args.out)
    print(f"random SD-VAE (sd-vae-ft-ema architecture) written to {args.out}")


if __name__ == "__main__":
    main()
