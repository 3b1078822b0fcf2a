"""Stage 1, encode: an ImageNet-style folder of images -> Parquet latent shards + manifest.json.

    python pipelines/encode.py --data ILSVRC/Data/CLS-LOC/train --out /shared/latents/in256

Ray Data runs decoding + ADM centre crop as CPU tasks and encoding as a pool of actors (one per
GPU when the cluster has GPUs), so the two pipeline. The driver consumes the results in input
order and writes each shard atomically as soon as it is complete: a re-run with the same
arguments skips finished shards and produces exactly the rows an uninterrupted run would.
Bad inputs (corrupt, truncated, not images) are skipped one by one and listed in the manifest.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from sddit import code_version
from sddit.codecs import DEFAULT_VAE, make_codec
from sddit.data import (FEATURES_COLUMN, MANIFEST, DataError, EncodeSettings, Manifest, file_sha256,
                        read_shard_metadata, shard_name, shard_schema, shard_table, tensor_spec, write_shard)
from sddit.errors import ConfigError
from sddit.image_folder import find_class_names, list_image_folder, load_image
from pipelines.common import (Progress, init_ray, parse_options, quiet_ray_data_console, require_at_least,
                              run_cli, set_verbose, shared_options)

SETTINGS_FILE = "encode_settings.json"
SHARD_BYTES = 32 << 20              # the default shard's tensor bytes: the reader's two windows hold 8 shards
MAX_ROWS_PER_SHARD = 2048
# Test hook: hard-exit (like SIGKILL: no cleanup, no manifest) after writing this many shards.
CRASH_AFTER_ENV = "SDDIT_FAULT_ENCODE_EXIT_AFTER_SHARDS"


@dataclass
class EncodeOptions:
    """What one encoding does (the command line's flags, typed; checked here for every caller)."""
    data: str
    out: str
    codec: str = "sd-vae"
    vae: str = DEFAULT_VAE
    resolution: int = 256
    flip: bool = True
    limit_per_class: int | None = None
    rows_per_shard: int | None = None
    batch_size: int | None = None
    repa_encoder: str | None = None
    repa_encoder_weights: str | None = None
    address: str | None = None
    run_dir: str = "runs"
    verbose: bool = False

    def __post_init__(self):
        if self.codec not in ("sd-vae", "pixel"):
            raise ConfigError("--codec", f"must be sd-vae or pixel, got {self.codec!r}")
        if self.resolution < 8 or (self.codec == "sd-vae" and self.resolution % 8):
            raise ConfigError("--resolution", f"must be >= 8 (and a multiple of 8 for sd-vae), got {self.resolution}")
        require_at_least(self, rows_per_shard=2, limit_per_class=1)
        if self.repa_encoder_weights and not self.repa_encoder:
            raise ConfigError("--repa-encoder-weights", "needs --repa-encoder")


def parse_args(argv=None) -> EncodeOptions:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[shared_options("--address", "--run-dir", "--verbose")])
    parser.add_argument("--data", required=True, help="input root: ROOT/<class folder>/<images>, labels in sorted folder order")
    parser.add_argument("--out", required=True, help="output directory for part-NNNNN.parquet and manifest.json")
    parser.add_argument("--codec", default="sd-vae", choices=["sd-vae", "pixel"],
                        help="sd-vae: store the VAE posterior mean/std (float16); pixel: store the pixels (default sd-vae)")
    parser.add_argument("--vae", default=DEFAULT_VAE, help=f"hub id or local directory of a diffusers AutoencoderKL (default {DEFAULT_VAE})")
    parser.add_argument("--resolution", type=int, default=256, help="side of the ADM centre crop in pixels (default 256)")
    parser.add_argument("--no-flip", dest="flip", action="store_false", help="do not add a horizontally flipped row per image")
    parser.add_argument("--limit-per-class", type=int, default=None, help="take only the first N images (sorted) of each class")
    parser.add_argument("--rows-per-shard", type=int, default=None,
                        help="rows per Parquet shard, even with flips (default: as many as fit in "
                             f"{SHARD_BYTES >> 20} MiB, at most {MAX_ROWS_PER_SHARD}: {MAX_ROWS_PER_SHARD} for SD-VAE "
                             "latents at 256 px, 512 at 512 px, 80 with DINOv2 features; the training reader holds "
                             "8 shards per worker)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per encoder call (default 64 on GPU, 16 on CPU)")
    parser.add_argument("--repa-encoder", default=None,
                        help="also store an external encoder's patch tokens of each image and mirror image for REPA "
                             "(column repa_features): timm:<architecture> (e.g. timm:vit_base_patch14_dinov2, "
                             "REPA's DINOv2 ViT-B/14) or local-vit (trained by pipelines/repa_encoder.py) "
                             "(default: none)")
    parser.add_argument("--repa-encoder-weights", default=None,
                        help="its local weights file (nothing is downloaded; for DINOv2 the model.safetensors of "
                             "timm/vit_base_patch14_dinov2.lvd142m)")
    return parse_options(parser, EncodeOptions, argv)


# ---------------------------------------------------------------------------------------------
# Ray Data stages
# ---------------------------------------------------------------------------------------------

def decode_batch(batch: dict, root: str, resolution: int) -> dict:
    """CPU task: read, convert and centre-crop each file; a bad file becomes a reason, not an error."""
    images, ok, reasons, conversions = [], [], [], []
    for image_id in batch["image_id"]:
        image, reason, conversion = load_image(os.path.join(root, image_id), resolution)
        ok.append(image is not None)
        images.append(image if image is not None else np.zeros((resolution, resolution, 3), np.uint8))
        reasons.append(reason or "")
        conversions.append(conversion or "")
    return {**batch, "image": np.stack(images), "ok": np.array(ok), "reason": np.array(reasons, dtype=object),
            "conversion": np.array(conversions, dtype=object)}


class EncodeBatch:
    """Actor: holds the codec (the VAE on its GPU) and, for REPA, the external encoder; encodes each image and
    its mirror image with both."""

    def __init__(self, codec: str, vae: str, use_gpu: bool, repa: dict | None = None):
        import torch
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.codec = make_codec(codec, vae, device=device, dtype=self.dtype)
        self.repa = None
        if repa is not None:
            from sddit.representations import load_external_encoder
            self.repa = load_external_encoder(repa["encoder"], repa["weights"], resolution=repa["resolution"],
                                              device=device)
            self.features_shape = self.repa.feature_shape()

    def __call__(self, batch: dict) -> dict:
        images, ok = batch.pop("image"), batch["ok"].astype(bool)
        shape = self.codec.stored_shape(images.shape[1])
        for suffix, view in (("", images), ("_flipped", images[:, :, ::-1])):
            out = np.zeros((len(images), *shape), dtype=self.codec.stored_dtype)
            if ok.any():
                out[ok] = self.codec.encode(np.ascontiguousarray(view[ok]))
            batch["stored" + suffix] = out
            if self.repa is not None:
                features = np.zeros((len(images), *self.features_shape), dtype=np.float16)
                if ok.any():
                    features[ok] = self.repa.features(np.ascontiguousarray(view[ok]), dtype=self.dtype)
                batch["features" + suffix] = features
        return batch


def encode_without_weights(batch: dict, **encoder) -> dict:
    """CPU task for a codec without weights (pixels): the same encoding as the actor, built per batch."""
    return EncodeBatch(**encoder)(batch)


# ---------------------------------------------------------------------------------------------
# Driver: ordered results -> atomic shards
# ---------------------------------------------------------------------------------------------

class ShardWriter:
    """Collects the rows of one shard at a time (results arrive in input order) and writes it whole."""

    def __init__(self, out: Path, schema, flip: bool, crash_after: int | None):
        self.out, self.schema, self.flip, self.crash_after = out, schema, flip, crash_after
        self.shard, self.rows, self.skipped, self.conversions = None, [], [], {}
        self.written = 0
        self.bytes = 0

    def add(self, batch: dict) -> None:
        for i in range(len(batch["image_id"])):
            shard = int(batch["shard"][i])
            if shard != self.shard:
                self.flush()
                self.shard = shard
            image_id, label = str(batch["image_id"][i]), int(batch["label"][i])
            if not batch["ok"][i]:
                self.skipped.append({"image_id": image_id, "reason": str(batch["reason"][i])})
                continue
            if batch["conversion"][i]:
                kind = str(batch["conversion"][i])
                self.conversions[kind] = self.conversions.get(kind, 0) + 1
            features = batch["features"][i] if "features" in batch else None
            self.rows.append((batch["stored"][i], label, False, image_id, features))
            if self.flip:
                features = batch["features_flipped"][i] if "features" in batch else None
                self.rows.append((batch["stored_flipped"][i], label, True, image_id, features))

    def stacked(self, index: int, field) -> np.ndarray:
        """Item `index` of the collected rows as one array; an empty one of the field's shape when no row is."""
        dtype, shape = tensor_spec(field)
        return np.stack([r[index] for r in self.rows]) if self.rows else np.zeros((0, *shape), dtype)

    def flush(self) -> None:
        if self.shard is None:
            return
        values = self.stacked(0, self.schema.field(0))
        features = self.stacked(4, self.schema.field(FEATURES_COLUMN)) if FEATURES_COLUMN in self.schema.names else None
        metadata = {"skipped": self.skipped, "conversions": self.conversions}
        table = shard_table(self.schema, values, [r[1] for r in self.rows], [r[2] for r in self.rows],
                            [r[3] for r in self.rows], metadata, features)
        path = self.out / shard_name(self.shard)
        write_shard(path, table)
        self.bytes += path.stat().st_size
        self.written += 1
        self.shard, self.rows, self.skipped, self.conversions = None, [], [], {}
        if self.crash_after is not None and self.written >= self.crash_after:
            os._exit(137)


def check_output_dir(out: Path, settings: EncodeSettings) -> None:
    """Refuse a directory written with other settings (never mix); create it otherwise."""
    recorded = out / SETTINGS_FILE
    if recorded.is_file():
        previous = json.loads(recorded.read_text())
        # a setting added since the directory was written has its default's meaning there
        previous = {**{f.name: f.default for f in fields(EncodeSettings) if f.default is not MISSING}, **previous}
        mismatched = {k: (previous.get(k), v) for k, v in asdict(settings).items() if previous.get(k) != v}
        if mismatched:
            detail = ", ".join(f"{k}: existing {old!r} vs requested {new!r}" for k, (old, new) in mismatched.items())
            raise DataError(f"{out} already holds a dataset encoded with other settings ({detail}); "
                            f"use another --out or delete {out}")
    elif out.exists() and any(out.glob("part-*.parquet")) or (out / MANIFEST).exists():
        raise DataError(f"{out} holds shards but no {SETTINGS_FILE}: not written by this encoder; "
                        f"use another --out")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".part-*.tmp-*"):                 # a temp file left by a killed run
        stale.unlink()
    recorded.write_text(json.dumps(asdict(settings), indent=2))


SHARD_ORDER_SEED = 0


def default_rows_per_shard(row_bytes: int) -> int:
    """As many rows as fit in SHARD_BYTES, at most MAX_ROWS_PER_SHARD, even (an image and its mirror share a shard)."""
    return max(min(MAX_ROWS_PER_SHARD, SHARD_BYTES // row_bytes) // 2 * 2, 2)


def plan(items: list, rows_per_shard: int, flip: bool) -> list[dict]:
    """Deterministic shard assignment: contiguous runs of the file list in one fixed random order. The
    training reader shuffles rows only within a window of a few shards, so each shard must already be a
    sample of every class (runs of the class-sorted list would make a batch hold a handful of classes)."""
    per_shard = max(rows_per_shard // (2 if flip else 1), 1)
    order = np.random.default_rng(SHARD_ORDER_SEED).permutation(len(items))
    return [{"shard": i // per_shard, "image_id": items[k][0], "label": items[k][1]} for i, k in enumerate(order)]


def encode(args: EncodeOptions) -> Manifest:
    started = time.time()
    set_verbose(args.verbose)
    out = Path(args.out)
    root = Path(args.data)
    # fail before any cluster work: the VAE and the REPA encoder must load, the input and output must be usable
    codec = make_codec(args.codec, args.vae)
    repa = features = None
    if args.repa_encoder:
        from sddit.representations import load_external_encoder
        encoder = load_external_encoder(args.repa_encoder, args.repa_encoder_weights, resolution=args.resolution)
        repa = {"encoder": args.repa_encoder, "weights": str(Path(args.repa_encoder_weights).resolve()),
                "resolution": args.resolution}
        features = {"column": FEATURES_COLUMN, "encoder": args.repa_encoder,
                    "weights_sha256": encoder.weights_sha256, "shape": encoder.feature_shape()}
        del encoder
    schema = shard_schema(codec.column, codec.stored_shape(args.resolution), codec.stored_dtype,
                          features["shape"] if features else None)
    row_bytes = sum(f.type.byte_width for f in schema if tensor_spec(f) is not None)
    rows_per_shard = args.rows_per_shard or default_rows_per_shard(row_bytes)
    settings = EncodeSettings(source=str(root.resolve()), codec=args.codec,
                              vae=args.vae if args.codec == "sd-vae" else None, resolution=args.resolution,
                              flip=args.flip, limit_per_class=args.limit_per_class, rows_per_shard=rows_per_shard,
                              repa_encoder=args.repa_encoder,
                              repa_weights_sha256=features["weights_sha256"] if features else None, order="shuffled")
    classes, items = list_image_folder(root, args.limit_per_class)
    check_output_dir(out, settings)
    rows = plan(items, rows_per_shard, args.flip)
    num_shards = (rows[-1]["shard"] + 1) if rows else 0
    done = {i for i in range(num_shards) if (out / shard_name(i)).is_file()}
    todo = [row for row in rows if row["shard"] not in done]
    print(f"encode: {len(items)} images in {len(classes)} classes -> {num_shards} shards "
          f"({len(done)} already complete)", flush=True)

    ray = init_ray(args.address)
    from ray.data import ActorPoolStrategy, DataContext
    quiet_ray_data_console()

    writer = ShardWriter(out, schema, args.flip,
                         int(os.environ[CRASH_AFTER_ENV]) if os.environ.get(CRASH_AFTER_ENV) else None)
    start = time.time()
    if todo:
        DataContext.get_current().execution_options.preserve_order = True
        num_gpus = int(ray.cluster_resources().get("GPU", 0))
        use_gpu = num_gpus > 0 and (args.codec == "sd-vae" or repa is not None)
        batch_size = args.batch_size or (64 if use_gpu else 16)
        ds = ray.data.from_items(todo)
        ds = ds.map_batches(decode_batch, fn_kwargs={"root": str(root), "resolution": args.resolution},
                            batch_size=32, num_cpus=1)
        encoder = {"codec": args.codec, "vae": args.vae, "use_gpu": use_gpu, "repa": repa}
        if args.codec == "pixel" and repa is None:
            # nothing to load: plain tasks (fused with decoding), no actor pool to start and restart
            ds = ds.map_batches(encode_without_weights, fn_kwargs=encoder, batch_size=batch_size, num_cpus=1)
        else:
            ds = ds.map_batches(EncodeBatch, fn_constructor_kwargs=encoder,
                                compute=ActorPoolStrategy(size=max(num_gpus, 1) if use_gpu else 1),
                                batch_size=batch_size, num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1)
        progress = Progress(len(todo), "encode")
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            writer.add(batch)
            progress.update(len(batch["image_id"]))
        writer.flush()
        progress.close()
    seconds = time.time() - start

    # manifest: every shard with its row count and checksum, every skip with its reason
    shards, skipped, conversions = [], [], {}
    for i in range(num_shards):
        path = out / shard_name(i)
        metadata = read_shard_metadata(path)
        skipped += metadata["skipped"]
        for kind, n in metadata["conversions"].items():
            conversions[kind] = conversions.get(kind, 0) + n
        shards.append({"file": path.name, "rows": pq.ParquetFile(path).metadata.num_rows, "sha256": file_sha256(path)})
    names = find_class_names(root, classes)
    manifest = Manifest(
        settings=settings, column=codec.column, scaling_factor=codec.scaling_factor,
        latent_shape=list(codec.latent_shape(args.resolution)), stored_shape=list(codec.stored_shape(args.resolution)),
        num_rows=sum(s["rows"] for s in shards), shards=shards,
        classes=[{"index": i, "wnid": c, "name": names.get(c, c)} for i, c in enumerate(classes)],
        skipped=skipped, conversions=conversions, code_version=code_version(), features=features,
    )
    manifest.write(out)
    log_run(args, manifest, codec, images_done=len(todo), seconds=seconds, bytes_written=writer.bytes,
            started=started)
    print(f"encode: wrote {manifest.num_rows} rows in {num_shards} shards to {out} "
          f"({len(todo)} images in {seconds:.1f} s; {len(skipped)} skipped, listed in {out / MANIFEST})", flush=True)
    return manifest


def log_run(args: EncodeOptions, manifest: Manifest, codec, *, images_done: int, seconds: float, bytes_written: int,
            started: float) -> None:
    """The stage's MLflow run: parameters, throughput, skips, and decoded samples from the shards."""
    import mlflow

    from pipelines.tracking import stage_run
    from sddit.data import decode_preview
    # parameters say which dataset this is (a rerun that finds it done continues the same run); what this
    # invocation did goes into the metrics
    params = {**asdict(manifest.settings), "num_classes": manifest.num_classes, "code_version": manifest.code_version}
    with stage_run("encode", args.run_dir, params=params, started=started):
        total_bytes = sum((Path(args.out) / s["file"]).stat().st_size for s in manifest.shards)
        mlflow.log_metrics({"rows": manifest.num_rows, "skipped": len(manifest.skipped), "images_encoded_this_run": images_done,
                            "images_per_s": images_done / seconds if seconds > 0 else 0.0,
                            "total_bytes": total_bytes, "bytes_written_this_run": bytes_written})
        grid = decode_preview(Path(args.out), manifest, codec)
        if grid is not None:
            mlflow.log_image(grid, artifact_file="decoded_samples.png")
        mlflow.log_dict({"skipped": manifest.skipped}, "skipped.json")


def main(argv=None) -> Manifest:
    return encode(parse_args(argv))


def cli():
    """The console script (`pyproject.toml`): a user error is one line, not a traceback."""
    run_cli("encode", main)


if __name__ == "__main__":
    cli()
