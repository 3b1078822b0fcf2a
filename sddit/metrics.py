"""Statistics behind FID, sFID, Inception Score and improved precision/recall.

The numbers follow the conventions of OpenAI's ADM (guided-diffusion) TensorFlow evaluator, which DiT, MaskDiT
and SD-DiT report, so results stay comparable with published tables. Feature extraction (Inception-v3) lives
elsewhere: everything here takes features or logits and works in float64 NumPy, which ADM does only in part
(it keeps float32 activations and uses float16 distances for precision/recall).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from scipy.special import logsumexp

# ADM's tolerance for the imaginary part of sqrtm's diagonal; anything larger means the square root is wrong.
_MAX_IMAG = 1e-3


def _as_float64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    # SciPy warns on every singular product; rank-deficient covariances are routine here and the result is
    # checked by the caller, so the warning is noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        return scipy.linalg.sqrtm(matrix)


def _max_imag_on_diagonal(root: np.ndarray) -> float:
    return float(np.abs(np.diagonal(root).imag).max(initial=0.0)) if np.iscomplexobj(root) else 0.0


def frechet_distance(mu1, sigma1, mu2, sigma2, *, eps: float = 1e-6) -> float:
    """Fréchet distance ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2)) of two Gaussians.

    mu*: [d] means, sigma*: [d, d] covariances; scalars / 1x1 are accepted for d = 1. The argument order does
    not matter (the distance is symmetric). As in ADM, when sqrtm fails (non-finite result, typically from a
    singular product) it is retried with eps * I added to both covariances; unlike ADM, a retry also happens
    when the first root has a large imaginary part, since SciPy can return such a root for exactly singular
    products whose square root does exist. A root whose diagonal still has an imaginary part above 1e-3
    raises ValueError instead of returning a wrong number; smaller imaginary parts are rounding noise and are
    dropped.
    """
    mu1, mu2 = np.atleast_1d(_as_float64(mu1)), np.atleast_1d(_as_float64(mu2))
    sigma1, sigma2 = np.atleast_2d(_as_float64(sigma1)), np.atleast_2d(_as_float64(sigma2))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be vectors of equal length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be ({d}, {d}), got {sigma1.shape} and {sigma2.shape}")

    root = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(root).all() or _max_imag_on_diagonal(root) > _MAX_IMAG:
        warnings.warn(f"sqrtm of the covariance product failed; retrying with {eps} added to the diagonals",
                      RuntimeWarning, stacklevel=2)
        offset = eps * np.eye(d)
        root = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if not np.isfinite(root).all():
        raise ValueError("sqrtm of the covariance product is not finite, even with eps added to the diagonals")
    imag = _max_imag_on_diagonal(root)
    if imag > _MAX_IMAG:
        raise ValueError(f"sqrtm of the covariance product has an imaginary diagonal component of {imag:.3g} "
                         f"(> {_MAX_IMAG}); the covariances are probably not positive semi-definite")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(root.real))


def inception_score(logits, split_size: int = 5000) -> float:
    """Inception Score of [N, K] class logits, ADM style: the mean over splits of exp(E_x KL(p(y|x) || p(y))).

    The caller passes logits (ADM uses the 1008 Inception logits computed without the bias). Splits are
    contiguous runs of `split_size` rows and, as in ADM, a shorter last split counts as a full one in the mean.
    p(y) is the marginal within each split. Log-softmax in float64 keeps near-one-hot predictions finite.
    """
    logits = _as_float64(logits)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"logits must be a non-empty [N, K] array, got shape {logits.shape}")
    if split_size < 1:
        raise ValueError(f"split_size must be positive, got {split_size}")
    log_p = logits - logsumexp(logits, axis=1, keepdims=True)
    scores = []
    for start in range(0, len(log_p), split_size):
        part = log_p[start:start + split_size]
        log_marginal = logsumexp(part, axis=0) - np.log(len(part))
        kl = np.sum(np.exp(part) * (part - log_marginal), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


def _squared_distances(a: np.ndarray, a_sq: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    # Every distance (radii and cross comparisons alike) goes through this one expression, so a pair's value
    # does not depend on which call computed it and boundary ties resolve consistently. Rounding can push
    # the expansion of a zero distance slightly below zero, hence the clamp.
    out = a @ b.T
    out *= -2.0
    out += a_sq[:, None]
    out += b_sq[None, :]
    return np.maximum(out, 0.0, out=out)


def _knn_radii(x: np.ndarray, x_sq: np.ndarray, k: int, block_size: int) -> np.ndarray:
    # Squared distance to the k-th nearest other point: the (k+1)-th smallest including the zero self-distance.
    # Only the k+1 smallest candidates per row survive each column block, so memory stays O(block_size^2).
    radii = np.empty(len(x))
    for r0 in range(0, len(x), block_size):
        rows = slice(r0, r0 + block_size)
        nearest = np.empty((len(x[rows]), 0))
        for c0 in range(0, len(x), block_size):
            cols = slice(c0, c0 + block_size)
            nearest = np.concatenate([nearest, _squared_distances(x[rows], x_sq[rows], x[cols], x_sq[cols])],
                                     axis=1)
            if nearest.shape[1] > k + 1:
                nearest.partition(k, axis=1)
                nearest = nearest[:, :k + 1]
        radii[rows] = nearest.max(axis=1)
    return radii


def precision_recall(real_features, fake_features, k: int = 3, *, block_size: int = 10000) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with ADM's conventions.

    real_features: [N_real, d], ADM's reference batch; fake_features: [N_fake, d], ADM's sample batch.
    Each point's radius is the distance to its k-th nearest neighbour in its own set, itself excluded. A point
    lies on a set's manifold if it is within (<=) the radius of at least one point of that set.
    precision = fraction of fake points on the real manifold; recall = fraction of real points on the fake
    manifold. Distances are exact float64, computed in block_size x block_size tiles; the result does not
    depend on block_size.
    """
    real, fake = _as_float64(real_features), _as_float64(fake_features)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be [N, d] with the same d, got {real.shape} and {fake.shape}")
    if k < 1 or min(len(real), len(fake)) <= k:
        raise ValueError(f"need k >= 1 and more than k points per set, got k={k}, {len(real)} real, "
                         f"{len(fake)} fake")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    # Distances are translation invariant; centring both sets on the real mean shrinks the norms in the
    # expansion and with them its cancellation error.
    shift = real.mean(axis=0)
    real, fake = real - shift, fake - shift
    real_sq, fake_sq = np.einsum("ij,ij->i", real, real), np.einsum("ij,ij->i", fake, fake)
    real_radii = _knn_radii(real, real_sq, k, block_size)
    fake_radii = _knn_radii(fake, fake_sq, k, block_size)

    real_covered = np.zeros(len(real), dtype=bool)
    fake_covered = np.zeros(len(fake), dtype=bool)
    for r0 in range(0, len(real), block_size):
        rows = slice(r0, r0 + block_size)
        for f0 in range(0, len(fake), block_size):
            cols = slice(f0, f0 + block_size)
            dist = _squared_distances(real[rows], real_sq[rows], fake[cols], fake_sq[cols])
            fake_covered[cols] |= (dist <= real_radii[rows, None]).any(axis=0)
            real_covered[rows] |= (dist <= fake_radii[None, cols]).any(axis=1)
    return float(fake_covered.mean()), float(real_covered.mean())


class StreamingStats:
    """Running float64 mean and unbiased covariance of [n, d] feature batches, without keeping the features.

    Batches are combined with Chan et al.'s pairwise update of the mean and the co-moment matrix M2, so the
    result matches a one-pass np.mean / np.cov even when features carry a large common offset (where the
    sum-of-squares formula cancels catastrophically). merge() combines accumulators from parallel workers.
    """

    def __init__(self):
        self._count = 0
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None

    @property
    def count(self) -> int:
        """Number of feature vectors seen."""
        return self._count

    def _combine(self, count: int, mean: np.ndarray, m2: np.ndarray) -> None:
        if self._count == 0:
            self._count, self._mean, self._m2 = count, mean.copy(), m2.copy()
            return
        if mean.shape != self._mean.shape:
            raise ValueError(f"feature dimension {mean.shape[0]} does not match {self._mean.shape[0]}")
        total = self._count + count
        delta = mean - self._mean
        self._mean = self._mean + delta * (count / total)
        self._m2 = self._m2 + m2 + np.outer(delta, delta) * (self._count * count / total)
        self._count = total

    def update(self, batch) -> StreamingStats:
        """Add a [n, d] batch (NumPy or torch); returns self."""
        x = _as_float64(batch)
        if x.ndim != 2:
            raise ValueError(f"batch must be [n, d], got shape {x.shape}")
        if len(x):
            mean = x.mean(axis=0)
            centred = x - mean
            self._combine(len(x), mean, centred.T @ centred)
        return self

    def merge(self, other: StreamingStats) -> StreamingStats:
        """Fold another accumulator's features into this one; returns self."""
        if other.count:
            self._combine(other.count, other._mean, other._m2)
        return self

    def mean(self) -> np.ndarray:
        """[d] mean of everything seen."""
        if self._count == 0:
            raise ValueError("no features accumulated")
        return self._mean.copy()

    def covariance(self) -> np.ndarray:
        """[d, d] unbiased (ddof=1) covariance of everything seen."""
        if self._count < 2:
            raise ValueError(f"covariance needs at least 2 features, have {self._count}")
        return self._m2 / (self._count - 1)

    def to_dict(self) -> dict[str, np.ndarray]:
        """{'mu': [d], 'sigma': [d, d], 'count': scalar}, the layout of cached reference statistics."""
        return {"mu": self.mean(), "sigma": self.covariance(), "count": np.int64(self._count)}

    @classmethod
    def from_dict(cls, data) -> StreamingStats:
        """Inverse of to_dict (any mapping with 'mu', 'sigma', 'count', e.g. a loaded npz); can keep updating."""
        stats = cls()
        count = int(data["count"])
        if count < 2:
            raise ValueError(f"stored statistics need count >= 2, got {count}")
        stats._combine(count, _as_float64(data["mu"]), _as_float64(data["sigma"]) * (count - 1))
        return stats

    def save(self, path: str | Path) -> None:
        """Write to_dict() as an npz file (NumPy appends '.npz' when the name lacks it)."""
        np.savez(path, **self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> StreamingStats:
        """Read a file written by save()."""
        with np.load(path) as data:
            return cls.from_dict(data)


def fid_from_stats(stats_a: StreamingStats, stats_b: StreamingStats) -> float:
    """FID between two accumulated feature sets (the order does not matter)."""
    return frechet_distance(stats_a.mean(), stats_a.covariance(), stats_b.mean(), stats_b.covariance())


def fid_from_features(real, fake) -> float:
    """FID between two [N, d] feature arrays, with ADM's statistics: mean and np.cov (ddof=1)."""
    real, fake = _as_float64(real), _as_float64(fake)
    return frechet_distance(real.mean(axis=0), np.cov(real, rowvar=False),
                            fake.mean(axis=0), np.cov(fake, rowvar=False))


def sfid_features(mixed_6_conv) -> np.ndarray:
    """ADM's sFID features from Inception's mixed_6/conv output, given in PyTorch's NCHW layout.

    mixed_6_conv: [N, 192, 17, 17], the output of Mixed_6d.branch1x1 in a PyTorch Inception-v3. ADM keeps the
    first 7 channels of the TF tensor (NHWC) and flattens it, so the result is [N, 17 * 17 * 7 = 2023] in
    (h, w, c) order: column (h * 17 + w) * 7 + c holds channel c at (h, w).
    """
    shape = tuple(mixed_6_conv.shape)
    if len(shape) != 4 or shape[1:] != (192, 17, 17):
        raise ValueError(f"expected NCHW mixed_6/conv activations [N, 192, 17, 17], got {shape}")
    kept = _as_float64(mixed_6_conv[:, :7])
    return np.ascontiguousarray(kept.transpose(0, 2, 3, 1)).reshape(shape[0], -1)
