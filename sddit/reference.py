"""What evaluation metrics compare against, in plain PyTorch / NumPy (no Ray): a dataset read back as
images, its extractors, and reference statistics from a dataset or an ADM reference batch, cached next to it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sddit.codecs import make_codec
from sddit.data import Manifest, file_sha256, read_shard, read_tensor_column, write_atomically
from sddit.extractors import DomainExtractor, InceptionExtractor
from sddit.images import to_uint8
from sddit.metrics import StreamingStats
from sddit.sampling import EvaluationError

# ADM's reference batches hold 10,000 images; precision/recall compare against that many real features.
PR_REFERENCE_SIZE = 10_000
# The domain classifier is for small datasets; on a big one it trains on a seeded subset of this many rows.
DOMAIN_MAX_ROWS = 50_000


# ---------------------------------------------------------------------------------------------
# Reading a dataset back as images
# ---------------------------------------------------------------------------------------------

def dataset_codec(directory: str | Path, device="cpu"):
    """The codec a dataset was encoded with, from its manifest (the SD VAE is loaded when it is one)."""
    settings = Manifest.read(directory).settings
    return make_codec(settings.codec, settings.vae, device=device)


def dataset_images(directory: str | Path, codec, *, rows=None, batch_size: int = 64):
    """Yield (global row indices, uint8 NHWC images, labels, image ids) for the selected rows
    (a boolean mask over all rows; None: all), shard by shard, decoded through the codec and quantised
    like samples. A VAE latent is drawn as in training (mean + std * eps), seeded by the shard index."""
    directory = Path(directory)
    manifest = Manifest.read(directory)
    device = getattr(codec, "device", "cpu")
    start = 0
    for shard_index, shard in enumerate(manifest.shards):
        count = shard["rows"]
        selected = np.ones(count, dtype=bool) if rows is None else np.asarray(rows[start:start + count])
        if selected.any():
            table = read_shard(directory / shard["file"], [manifest.column, "label", "image_id"])
            take = np.flatnonzero(selected)
            stored = read_tensor_column(table, manifest.column)[take]
            labels = table.column("label").to_numpy()[take]
            ids = np.asarray(table.column("image_id").to_pylist(), dtype=object)[take]
            generator = torch.Generator().manual_seed(shard_index)
            for i in range(0, len(take), batch_size):
                latent = codec.to_latent(torch.from_numpy(stored[i:i + batch_size].astype(np.float32)),
                                         generator=generator)
                images = to_uint8(codec.decode(latent.to(device)))
                yield start + take[i:i + batch_size], images, labels[i:i + batch_size], ids[i:i + batch_size]
        start += count


def hashed_subset(directory: Path, manifest: Manifest, candidates: np.ndarray, count: int, seed: int) -> np.ndarray:
    """A boolean mask of `count` of the `candidates` rows: those whose (seed, image id, flip) hashes lowest, so the
    same images are chosen however the shards order them."""
    ids = np.concatenate([read_shard(directory / s["file"], ["image_id"]).column("image_id")
                          .to_numpy(zero_copy_only=False) for s in manifest.shards])
    flipped = _flipped_mask(directory, manifest)
    rows = np.flatnonzero(candidates)
    keys = {row: hashlib.sha256(f"{seed}|{ids[row]}|{int(flipped[row])}".encode()).digest() for row in rows}
    chosen = np.zeros(len(candidates), dtype=bool)
    chosen[sorted(rows, key=keys.__getitem__)[:count]] = True
    return chosen


def _flipped_mask(directory: Path, manifest: Manifest) -> np.ndarray:
    return np.concatenate([read_shard(directory / s["file"], ["flipped"]).column("flipped")
                           .to_numpy(zero_copy_only=False) for s in manifest.shards]).astype(bool)


# ---------------------------------------------------------------------------------------------
# Extractors for a dataset
# ---------------------------------------------------------------------------------------------

def make_extractor(name: str, *, dataset_dir: str | Path | None = None, codec=None, inception_weights=None,
                   device="cpu", seed: int = 0):
    """'inception': the FID Inception from its weights file; 'domain': the dataset's own classifier
    (trained on first use and cached next to its shards; `codec` decodes them, default: the manifest's)."""
    if name == "inception":
        return InceptionExtractor.from_file(inception_weights).to(device)
    if name == "domain":
        if dataset_dir is None:
            raise EvaluationError("the domain extractor needs the dataset directory (from the checkpoint)")
        directory = Path(dataset_dir)
        manifest = Manifest.read(directory)

        def load_rows():
            rows = None
            if manifest.num_rows > DOMAIN_MAX_ROWS:
                rows = hashed_subset(directory, manifest, np.ones(manifest.num_rows, dtype=bool), DOMAIN_MAX_ROWS, seed)
            parts = list(dataset_images(directory, codec or dataset_codec(directory, device), rows=rows))
            return (np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]),
                    np.concatenate([p[3] for p in parts]))

        return DomainExtractor.for_dataset(directory, [s["sha256"] for s in manifest.shards], load_rows,
                                           num_classes=manifest.num_classes, seed=seed, device=device)
    raise EvaluationError(f"unknown extractor {name!r}; expected 'inception' or 'domain'")


# ---------------------------------------------------------------------------------------------
# Reference statistics
# ---------------------------------------------------------------------------------------------

@dataclass
class Reference:
    """What metrics compare against: pool mean/covariance (FID), spatial ones (sFID, optional) and a set
    of real pool features (precision/recall, optional)."""
    source: str
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    features: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def save(self, path: Path) -> None:
        arrays = {"meta": np.array(json.dumps(self.meta, sort_keys=True))}
        for key in ("mu", "sigma", "mu_s", "sigma_s", "features"):
            if getattr(self, key) is not None:
                arrays[key] = getattr(self, key)
        write_atomically(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: Path, source: str) -> Reference:
        with np.load(path) as data:
            return cls(source=source, meta=json.loads(str(data["meta"])),
                       **{k: (data[k] if k in data else None) for k in ("mu", "sigma", "mu_s", "sigma_s", "features")})


def _cached(path: Path, meta: dict, source: str, compute) -> Reference:
    """The reference in `path` if it was computed with exactly `meta`, else compute() and cache it there."""
    meta = json.loads(json.dumps(meta, sort_keys=True))
    if path.is_file():
        reference = Reference.load(path, source)
        if reference.meta == meta:
            return reference
    reference = compute()
    reference.meta = meta
    try:
        reference.save(path)
    except OSError as error:                # a read-only reference location: correct, just slower next time
        print(f"evaluate: could not cache reference statistics at {path} ({error})", flush=True)
    return reference


class FeatureAccumulator:
    """Streams extractor outputs into pool / spatial statistics and keeps the pool features of chosen rows."""

    def __init__(self):
        self.pool, self.spatial = StreamingStats(), StreamingStats()
        self.kept = []

    def add(self, outputs: dict, keep: np.ndarray | None = None) -> None:
        self.pool.update(outputs["pool"])
        if outputs["spatial"] is not None:
            self.spatial.update(outputs["spatial"])
        if keep is None or keep.any():
            self.kept.append(outputs["pool"] if keep is None else outputs["pool"][keep])

    def reference(self, source: str) -> Reference:
        spatial = self.spatial.count > 1
        return Reference(source=source, mu=self.pool.mean(), sigma=self.pool.covariance(),
                         mu_s=self.spatial.mean() if spatial else None,
                         sigma_s=self.spatial.covariance() if spatial else None,
                         features=np.concatenate(self.kept).astype(np.float32) if self.kept else None)


def reference_from_dataset(directory: str | Path, extractor, *, codec=None, device="cpu",
                           pr_size: int = PR_REFERENCE_SIZE, seed: int = 0) -> Reference:
    """Statistics of a dataset's images (its unflipped rows: flips are augmentation, not data), decoded
    through `codec` (default: the manifest's); precision/recall features of a seeded subset of pr_size of them.
    Cached at <directory>/reference-<extractor>-<weights checksum>.npz, recomputed if the shards change."""
    directory = Path(directory)
    manifest = Manifest.read(directory)
    meta = {"extractor": extractor.name, "weights_sha256": extractor.weights_checksum,
            "shard_sha256": [s["sha256"] for s in manifest.shards], "rows": "unflipped",
            "pr_size": pr_size, "seed": seed}
    path = directory / f"reference-{extractor.name}-{extractor.weights_checksum[:16]}.npz"

    def compute() -> Reference:
        unflipped = ~_flipped_mask(directory, manifest)
        if unflipped.sum() < 2:
            raise EvaluationError(f"{directory}: {unflipped.sum()} unflipped rows; need >= 2 for reference statistics")
        chosen = hashed_subset(directory, manifest, unflipped, pr_size, seed)
        accumulator = FeatureAccumulator()
        for rows, images, *_ in dataset_images(directory, codec or dataset_codec(directory, device), rows=unflipped):
            accumulator.add(extractor.extract(images), keep=chosen[rows])
        return accumulator.reference(str(directory))

    return _cached(path, meta, str(directory), compute)


def reference_from_npz(path: str | Path, extractor, *, batch_size: int = 500) -> Reference:
    """An ADM reference batch (VIRTUAL_imagenet256_labeled.npz & co.): arr_0 uint8 images, and mu / sigma /
    mu_s / sigma_s from the TF Inception. With the real Inception those statistics are used as they are, so
    FID matches published tables; any other extractor gets them from arr_0. arr_0 always goes through the
    extractor for precision/recall; what that gives is cached next to the file."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"reference file {path} does not exist")
    with np.load(path) as data:
        keys = set(data.files)
        file_stats = ({k: data[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in keys}
                      if extractor.name == "inception" else {})
    if "arr_0" in keys:
        meta = {"extractor": extractor.name, "weights_sha256": extractor.weights_checksum,
                "reference_sha256": file_sha256(path)}
        cache = path.with_name(f"{path.stem}.{extractor.name}-{extractor.weights_checksum[:16]}.features.npz")

        def compute() -> Reference:
            accumulator = FeatureAccumulator()
            with np.load(path) as data:
                images = data["arr_0"]
            for i in range(0, len(images), batch_size):
                accumulator.add(extractor.extract(images[i:i + batch_size]))
            return accumulator.reference(str(path))

        reference = _cached(cache, meta, str(path), compute)
    elif {"mu", "sigma"} <= file_stats.keys():
        print(f"evaluate: {path} has no arr_0 images: precision and recall are skipped", flush=True)
        reference = Reference(source=str(path), mu=file_stats["mu"], sigma=file_stats["sigma"])
    else:
        raise EvaluationError(f"{path} has no arr_0 images (keys: {sorted(keys)}); the {extractor.name!r} "
                              f"extractor needs images to compute reference statistics")
    for key, value in file_stats.items():
        setattr(reference, key, value)
    return reference


def load_reference(spec: str | Path | None, extractor, *, dataset_dir: str | Path | None = None, codec=None,
                   device="cpu") -> Reference:
    """An ADM reference .npz, a dataset directory (shards + manifest), or (None) the checkpoint's dataset,
    which `codec` decodes (other directories are decoded with their manifest's codec)."""
    if spec is None:
        if dataset_dir is None:
            raise EvaluationError("no reference: pass an ADM reference .npz or a dataset directory")
        return reference_from_dataset(dataset_dir, extractor, codec=codec, device=device)
    if Path(spec).is_dir():
        same = dataset_dir is not None and Path(spec).resolve() == Path(dataset_dir).resolve()
        return reference_from_dataset(spec, extractor, codec=codec if same else None, device=device)
    if str(spec).endswith(".npz"):
        return reference_from_npz(spec, extractor)
    raise EvaluationError(f"reference {str(spec)!r} is neither a dataset directory nor an .npz file")
