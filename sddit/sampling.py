"""Sampling for evaluation, in plain PyTorch / NumPy (no Ray): which sample gets which label and noise, and
the sample files.

The protocol follows DiT / MaskDiT / SD-DiT: N samples from the generation EMA with the EDM Heun
sampler, classifier-free guidance on all channels, labels balanced over the classes, images
quantised as DiT does and stored in ADM's `samples.npz` layout (scored by sddit.evaluation). The
conventions other papers report with are options of the plan, recorded with the samples: guidance only
inside a sigma interval, guidance on the first channels only (DiT's released numbers), exactly N/K
samples per class or uniformly random labels; and how the network runs (bf16 autocast, torch.compile).

Reproducibility: sample i is drawn from its own seed (seed, i) and gets label i mod K, so a sample
does not depend on which worker drew it or on how many batches came before; each finished batch is
written atomically to samples/batch-NNNNN.npz and a rerun only draws the batches that are missing.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from sddit.data import write_atomically
from sddit.diffusion import edm_sample
from sddit.errors import UserError
from sddit.images import to_uint8

SAMPLES_DIR = "samples"
SAMPLES_NPZ = "samples.npz"
PROTOCOL_FILE = "protocol.json"
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
