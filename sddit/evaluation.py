"""Sampling for evaluation and the metrics of a sample set, in plain PyTorch / NumPy (no Ray).

The protocol follows DiT / MaskDiT / SD-DiT: N samples from the generation EMA with the EDM Heun
sampler, classifier-free guidance on all channels, labels balanced over the classes, images
quantised as DiT does and stored in ADM's `samples.npz` layout, then FID / sFID / IS / precision /
recall against a reference with ADM's conventions (see sddit.metrics). The conventions other papers
report with are options of the plan, recorded with the samples: guidance only inside a sigma
interval, guidance on the first channels only (DiT's released numbers), exactly N/K samples per
class or uniformly random labels; and how the network runs (bf16 autocast, torch.compile).

Reproducibility: sample i is drawn from its own seed (seed, i) and gets label i mod K, so a sample
does not depend on which worker drew it or on how many batches came before; each finished batch is
written atomically to samples/batch-NNNNN.npz and a rerun only draws the batches that are missing.
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from sddit.codecs import make_codec
from sddit.data import Manifest, file_sha256, read_shard, read_tensor_column, write_atomically
from sddit.diffusion import edm_sample
from sddit.errors import UserError
from sddit.extractors import DomainExtractor, InceptionExtractor
from sddit.images import to_uint8
from sddit.metrics import StreamingStats, frechet_distance, inception_score, precision_recall

SAMPLES_DIR = "samples"
SAMPLES_NPZ = "samples.npz"
PROTOCOL_FILE = "protocol.json"
# ADM's reference batches hold 10,000 images; precision/recall compare against that many real features.
PR_REFERENCE_SIZE = 10_000
PR_NEIGHBOURS = 3
# The domain classifier is for small datasets; on a big one it trains on a seeded subset of this many rows.
DOMAIN_MAX_ROWS = 50_000
IS_SPLIT_SIZE = 5000
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)     # fixed entry time: the same samples give a bitwise-identical samples.npz


class EvaluationError(UserError, RuntimeError):
    """An evaluation input is unusable or inconsistent; the message names the file or field and the fix."""


# ---------------------------------------------------------------------------------------------
# The sampling plan: which sample gets which label and noise
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplingPlan:
    num_samples: int
    batch_size: int
    num_classes: int                        # 0: unconditional
    latent_shape: tuple[int, ...]           # [C, H, W] the model sees
    steps: int = 40
    cfg_scale: float = 1.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    seed: int = 0
    label_mode: str = "balanced"            # see LABEL_MODES
    guidance_interval: tuple[float, float] | None = None   # guide only at lo < sigma <= hi
    guidance_channels: int | None = None    # guide only the first k channels (None: all)
    guidance_factor: float = 1.0            # the scale used is 1 + factor (cfg_scale - 1) (resolution transfer)
    precision: str = "fp32"                 # fp32 | bf16 (autocast around the network)
    compile: bool = False                   # torch.compile the network

    def __post_init__(self):
        object.__setattr__(self, "latent_shape", tuple(int(s) for s in self.latent_shape))
        if self.guidance_interval is not None:
            object.__setattr__(self, "guidance_interval", tuple(float(v) for v in self.guidance_interval))
        for name in ("num_samples", "batch_size", "steps"):
            if getattr(self, name) < 1:
                raise EvaluationError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 0:
            raise EvaluationError(f"num_classes must be >= 0, got {self.num_classes}")
        if self.cfg_scale < 0:
            raise EvaluationError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.guidance_factor < 0:
            raise EvaluationError(f"guidance_factor must be >= 0, got {self.guidance_factor}")
        if self.label_mode not in LABEL_MODES:
            raise EvaluationError(f"label_mode {self.label_mode!r}: expected one of {', '.join(LABEL_MODES)}")
        if self.label_mode == "exact" and self.num_classes and self.num_samples % self.num_classes:
            raise EvaluationError(f"label_mode 'exact' needs num_samples divisible by the {self.num_classes} "
                                  f"classes, got {self.num_samples}")
        interval = self.guidance_interval
        if interval is not None and (len(interval) != 2 or not 0 <= interval[0] < interval[1]):
            raise EvaluationError(f"guidance_interval must be (lo, hi) with 0 <= lo < hi, got {interval}")
        if self.guidance_channels is not None and not 1 <= self.guidance_channels <= self.latent_shape[0]:
            raise EvaluationError(f"guidance_channels must be in 1..{self.latent_shape[0]} (the latent's channels), "
                                  f"got {self.guidance_channels}")
        if self.precision not in ("fp32", "bf16"):
            raise EvaluationError(f"precision {self.precision!r}: expected fp32 or bf16")

    @property
    def guidance_scale(self) -> float:
        """The scale the sampler uses: lambda' = 1 + s (lambda - 1), the law Berrada et al. (2024) give for
        carrying a guidance scale tuned at one resolution to another; s = 1 leaves it as given."""
        return 1.0 + self.guidance_factor * (self.cfg_scale - 1.0)

    @property
    def num_batches(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def batch_indices(self, batch_index: int) -> np.ndarray:
        if not 0 <= batch_index < self.num_batches:
            raise EvaluationError(f"batch {batch_index} out of range: the plan has {self.num_batches} batches")
        start = batch_index * self.batch_size
        return np.arange(start, min(start + self.batch_size, self.num_samples))

    def labels(self, indices: np.ndarray) -> np.ndarray | None:
        if self.label_mode == "random" and self.num_classes:
            return np.array([np.random.default_rng([self.seed, int(i), LABEL_STREAM]).integers(self.num_classes)
                             for i in indices], dtype=np.int64)
        return balanced_labels(indices, self.num_classes)

    def noise(self, indices: np.ndarray) -> torch.Tensor:
        """Standard normal latents, each from its own generator seeded by (seed, sample index), on the CPU so
        every device starts from the same numbers."""
        return torch.stack([torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(
            sample_seed(self.seed, int(i)))) for i in indices])

    def to_dict(self) -> dict:
        data = asdict(self)
        data["latent_shape"] = list(self.latent_shape)
        if self.guidance_interval is not None:
            data["guidance_interval"] = list(self.guidance_interval)
        return data


LABEL_MODES = {
    "balanced": "sample i asks for class i mod K (every prefix of the samples covers the classes evenly)",
    "exact": "as balanced, and N must be a multiple of K: exactly N/K samples per class (REPA-E, LightningDiT)",
    "random": "labels drawn uniformly at random per sample (ADM's and DiT's sample_ddp)",
}
LABEL_STREAM = 1                            # random labels draw from (seed, i, 1); the noise from (seed, i)


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed per (run seed, sample index), well mixed so neighbouring samples are unrelated."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def balanced_labels(indices, num_classes: int) -> np.ndarray | None:
    """Sample i asks for class i mod K: every class equally often when K divides N, and any prefix of the
    samples (a grid, a partial run) covers the classes evenly too. None when unconditional (K = 0)."""
    return None if num_classes == 0 else (np.asarray(indices) % num_classes).astype(np.int64)


def sampling_network(ema, plan: SamplingPlan):
    """The generation EMA as the plan runs it: under torch.compile and bf16 autocast when it says so.
    Make it once per process and pass it to `sample_batch`: compiling is the expensive part."""
    network = torch.compile(ema, dynamic=False) if plan.compile else ema
    if plan.precision == "fp32":
        return network

    def bf16(x, sigma, labels):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return network(x, sigma, labels)
    return bf16


@torch.no_grad()
def sample_batch(network, codec, batch_index: int, plan: SamplingPlan, device="cpu"):
    """(uint8 NHWC images, labels or None) of one batch: Heun sampling, decoding, DiT's quantisation.
    `network` is the generation EMA or what `sampling_network` made of it. Guided steps run the
    conditional and unconditional halves as one batch, the null class being the label embedder's
    extra row (index K)."""
    indices = plan.batch_indices(batch_index)
    labels = plan.labels(indices)
    y = None if labels is None else torch.from_numpy(labels).to(device)
    latent = edm_sample(network, plan.noise(indices).to(device), y, steps=plan.steps, sigma_min=plan.sigma_min,
                        sigma_max=plan.sigma_max, rho=plan.rho, cfg_scale=plan.guidance_scale,
                        guidance_interval=plan.guidance_interval, guidance_channels=plan.guidance_channels,
                        null_label=plan.num_classes or None)
    return to_uint8(codec.decode(latent.float())), labels


# ---------------------------------------------------------------------------------------------
# Sample files: one atomic npz per batch, then ADM's samples.npz
# ---------------------------------------------------------------------------------------------

def batch_path(out: str | Path, batch_index: int) -> Path:
    return Path(out) / SAMPLES_DIR / f"batch-{batch_index:05d}.npz"


def write_batch(out: str | Path, batch_index: int, images: np.ndarray, labels: np.ndarray | None) -> Path:
    """Temp file, then rename: a batch file is whole or absent, so its presence means 'done'."""
    path = batch_path(out, batch_index)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"images": images} if labels is None else {"images": images, "labels": labels}
    write_atomically(path, lambda f: np.savez(f, **arrays))
    return path


def read_batch(out: str | Path, batch_index: int) -> tuple[np.ndarray, np.ndarray | None]:
    with np.load(batch_path(out, batch_index)) as data:
        return data["images"], (data["labels"] if "labels" in data else None)


def finished_batches(out: str | Path, plan: SamplingPlan) -> set[int]:
    return {b for b in range(plan.num_batches) if batch_path(out, b).is_file()}


def iter_sample_batches(out: str | Path, plan: SamplingPlan):
    """(images, labels) of every batch in order, read one at a time."""
    for b in range(plan.num_batches):
        yield read_batch(out, b)


def check_protocol(out: str | Path, protocol: dict) -> None:
    """Record what the samples in `out` are; refuse to mix them with samples drawn another way."""
    out = Path(out)
    path = out / PROTOCOL_FILE
    if path.is_file():
        previous = json.loads(path.read_text())
        # a protocol written before an option existed was drawn with that option's default
        defaults = {f.name: f.default for f in fields(SamplingPlan) if f.default is not MISSING}
        previous = {**{k: v for k, v in defaults.items() if k not in previous}, **previous}
        changed = {k: (previous.get(k), v) for k, v in protocol.items() if previous.get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: existing {old!r} vs requested {new!r}" for k, (old, new) in changed.items())
            raise EvaluationError(f"{out} holds samples drawn with another protocol ({detail}); "
                                  f"use another --out or delete {out}")
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(protocol, indent=2))


def _write_npy_entry(zf: zipfile.ZipFile, name: str, dtype, shape, chunks) -> None:
    info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
    with zf.open(info, "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})
        for chunk in chunks:
            f.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())


def assemble_samples(out: str | Path, plan: SamplingPlan) -> Path:
    """<out>/samples.npz as ADM's evaluator reads it: arr_0 uint8 [N, H, W, C] (+ arr_1 int64 labels when
    conditional). Streamed batch by batch, so 50k ImageNet samples never sit in memory at once."""
    out = Path(out)
    missing = sorted(set(range(plan.num_batches)) - finished_batches(out, plan))
    if missing:
        raise EvaluationError(f"cannot assemble {out / SAMPLES_NPZ}: batches {missing[:10]} are not in "
                              f"{out / SAMPLES_DIR}")
    first, _ = read_batch(out, 0)
    shape = (plan.num_samples, *first.shape[1:])
    path = out / SAMPLES_NPZ

    def write(f):
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            _write_npy_entry(zf, "arr_0", np.uint8, shape, (images for images, _ in iter_sample_batches(out, plan)))
            if plan.num_classes:
                _write_npy_entry(zf, "arr_1", np.int64, (plan.num_samples,),
                                 (labels for _, labels in iter_sample_batches(out, plan)))

    write_atomically(path, write)
    return path


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


class _Accumulator:
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
        accumulator = _Accumulator()
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
            accumulator = _Accumulator()
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


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

def _image_batches(images, batch_size: int):
    if isinstance(images, (np.ndarray, torch.Tensor)):
        for i in range(0, len(images), batch_size):
            yield images[i:i + batch_size]
    else:
        yield from images


def compute_metrics(extractor, sample_images, reference: Reference, labels=None, *,
                    batch_size: int = 500) -> dict[str, float]:
    """FID, sFID (when both sides have spatial features), IS, precision and recall (when the reference has
    real features), and, for a classifier of the dataset's classes given the requested labels, the
    fraction of samples classified as their label. Keys end in the extractor's name.

    sample_images: uint8 NHWC array, or an iterable of such batches (streamed, e.g. iter over batch files).
    """
    suffix = extractor.name
    accumulator, logits, predicted = _Accumulator(), [], []
    for images in _image_batches(sample_images, batch_size):
        outputs = extractor.extract(images)
        accumulator.add(outputs)
        logits.append(outputs["logits"])
        if "predicted" in outputs:
            predicted.append(outputs["predicted"])
    fake = accumulator.pool
    metrics = {f"fid_{suffix}": frechet_distance(reference.mu, reference.sigma, fake.mean(), fake.covariance())}
    if reference.mu_s is not None and accumulator.spatial.count > 1:
        metrics[f"sfid_{suffix}"] = frechet_distance(reference.mu_s, reference.sigma_s,
                                                     accumulator.spatial.mean(), accumulator.spatial.covariance())
    metrics[f"is_{suffix}"] = inception_score(np.concatenate(logits), split_size=IS_SPLIT_SIZE)
    if reference.features is not None and min(len(reference.features), fake.count) > PR_NEIGHBOURS:
        precision, recall = precision_recall(reference.features, np.concatenate(accumulator.kept), k=PR_NEIGHBOURS)
        metrics[f"precision_{suffix}"], metrics[f"recall_{suffix}"] = precision, recall
    elif reference.features is not None:
        print(f"evaluate: precision/recall need more than {PR_NEIGHBOURS} real and generated images; skipped",
              flush=True)
    if predicted and labels is not None:
        predicted, labels = np.concatenate(predicted), np.asarray(labels)
        if len(predicted) != len(labels):
            raise EvaluationError(f"{len(labels)} labels for {len(predicted)} samples")
        metrics[f"class_agreement_{suffix}"] = float((predicted == labels).mean())
    return {key: float(value) for key, value in metrics.items()}
