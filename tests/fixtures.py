"""Offline stand-ins: a generated ImageNet-layout tree with bad files, a tiny AutoencoderKL, a tiny preset."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

WNIDS = ("n01440764", "n01443537", "n01484850")
# a preset whose SD-DiT trains 8 steps on the 8 px pixel datasets in seconds (a pipeline test's --preset)
TINY = {
    "model": {"name": "SD-DiT-S/2", "hidden_size": 32, "depth": 2, "num_heads": 2, "decoder_depth": 1,
              "decoder_hidden_size": 16, "decoder_num_heads": 2, "head_hidden_size": 32,
              "head_bottleneck_size": 16, "head_out_size": 64},
    "optim": {"batch_size": 8, "lr": 1.0e-3},
    "disc": {"teacher_temp_warmup_steps": 4},
    "train": {"steps": 8, "log_every": 2, "sample_every": 4, "checkpoint_every": 3, "max_bad_steps": 3},
    "data": {"codec": "pixel", "resolution": 8},
}
GOOD_PER_CLASS = 6


def _jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def make_image_tree(root: Path, seed: int = 0) -> dict:
    """ROOT/<wnid>/*.JPEG with good images, convertible oddities and files that must be skipped.

    Returns {"good": [relative paths that must yield rows], "bad": {relative path: reason keyword}}.
    """
    rng = np.random.default_rng(seed)
    good, bad = [], {}
    for c, wnid in enumerate(WNIDS):
        folder = root / wnid
        folder.mkdir(parents=True)
        for i in range(GOOD_PER_CLASS):
            h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            pixels[..., c] = 255                            # class-coloured, so labels can be checked by eye
            (folder / f"{wnid}_{i}.JPEG").write_bytes(_jpeg_bytes(Image.fromarray(pixels)))
            good.append(f"{wnid}/{wnid}_{i}.JPEG")
    odd = root / WNIDS[0]
    gray = Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8), mode="L")
    gray.save(odd / "gray.png")
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).convert("CMYK").save(odd / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 256, (48, 48, 4), dtype=np.uint8), mode="RGBA").save(odd / "rgba.png")
    sixteen = np.full((48, 48), 65535, dtype=np.uint16)
    sixteen[:30, :20] = 0                                   # asymmetric, so its mirror image differs
    Image.fromarray(sixteen).save(odd / "sixteen_bit.png")
    Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(odd / "tiny.JPEG")
    good += [f"{WNIDS[0]}/{name}" for name in ("gray.png", "cmyk.jpg", "rgba.png", "sixteen_bit.png", "tiny.JPEG")]
    broken = root / WNIDS[1]
    valid = _jpeg_bytes(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    (broken / "truncated.JPEG").write_bytes(valid[: len(valid) // 2])
    (broken / "garbage.JPEG").write_bytes(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
    (broken / "text.JPEG").write_text("this is not an image\n")
    (broken / "empty.JPEG").write_bytes(b"")
    (broken / "notes.txt").write_text("ignored: not an image extension\n")
    bad.update({f"{WNIDS[1]}/truncated.JPEG": "truncated", f"{WNIDS[1]}/garbage.JPEG": "not an image",
                f"{WNIDS[1]}/text.JPEG": "not an image", f"{WNIDS[1]}/empty.JPEG": "empty"})
    return {"good": sorted(good), "bad": bad}


def make_tiny_vae(directory: Path) -> Path:
    """A randomly initialised AutoencoderKL (2 levels: 8x8x... latents for 16 px) saved like a hub download."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                        block_out_channels=(32, 32), norm_num_groups=32,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=16, scaling_factor=0.18215)
    vae.save_pretrained(directory)
    return directory


# (image tree, resolution) -> the first encoding of it, kept pristine: later modules copy it (bytes the same)
_ENCODED: dict[tuple[str, int], Path] = {}


def encode_pixels(images: Path, out: Path, resolution: int, *extra: str) -> Path:
    """The image tree encoded by the encode stage as a pixel-codec dataset in 16-row shards (several of them,
    so workers have shards to split), its MLflow store beside it in out.parent / "runs". Without extra options
    into a new directory, the tree is encoded once per session at each resolution and copied from then on (the
    domain judge a test trains into a dataset is not copied)."""
    import atexit
    import shutil
    import tempfile

    from pipelines.encode import main as encode
    key = (str(images), resolution)
    fresh = not extra and not Path(out).exists()       # an existing directory is the encode stage's to judge
    if fresh and key in _ENCODED:
        shutil.copytree(_ENCODED[key], out)
        return out
    encode(["--data", str(images), "--out", str(out), "--codec", "pixel", "--resolution", str(resolution),
            "--rows-per-shard", "16", "--run-dir", str(Path(out).parent / "runs"), *extra])
    if fresh:
        pristine = tempfile.mkdtemp(prefix="sddit-pixels-")
        atexit.register(shutil.rmtree, pristine, True)
        _ENCODED[key] = Path(pristine) / "dataset"
        shutil.copytree(out, _ENCODED[key])
    return out
