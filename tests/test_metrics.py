import math
import warnings

import numpy as np
import pytest
import torch
from cleanfid import fid as cleanfid

from sddit import metrics
from sddit.metrics import (StreamingStats, fid_from_features, fid_from_stats, frechet_distance, inception_score,
                           precision_recall, sfid_features)


def random_cov(rng, d, n=None):
    x = rng.standard_normal((n or 4 * d, d)) @ rng.standard_normal((d, d))
    return np.cov(x, rowvar=False)


def reference_trace_sqrt(s1, s2):
    """tr sqrt(s1^1/2 s2 s1^1/2) through symmetric eigendecompositions, exact for singular PSD matrices."""
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root @ s2 @ root
    return np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()


# --- Fréchet distance -------------------------------------------------------------------------------------------

def test_frechet_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(16), random_cov(rng, 16)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("m, a, b", [(0.0, 1.0, 1.0), (2.0, 1.0, 4.0), (-0.5, 0.3, 7.0), (3.0, 0.0, 2.0)])
def test_frechet_one_dimensional_closed_form(m, a, b):
    expected = m ** 2 + a + b - 2 * math.sqrt(a * b)
    assert frechet_distance(0.0, a, m, b) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert frechet_distance([0.0], [[a]], [m], [[b]]) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_frechet_diagonal_covariances():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    a, b = rng.uniform(0.1, 3.0, 8), rng.uniform(0.1, 3.0, 8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_zero_covariances():
    d = 5
    mu1, mu2 = np.zeros(d), np.arange(d, dtype=float)
    zeros = np.zeros((d, d))
    assert frechet_distance(mu1, zeros, mu2, zeros) == pytest.approx(np.sum(mu2 ** 2), abs=1e-12)
    sigma = random_cov(np.random.default_rng(2), d)
    assert frechet_distance(mu1, zeros, mu2, sigma) == pytest.approx(np.sum(mu2 ** 2) + np.trace(sigma), rel=1e-12)


def test_frechet_rank_one_covariances():
    # sigma = u u^T and v v^T: tr sqrt(s1 s2) = |u . v|, so FD = |dmu|^2 + |u|^2 + |v|^2 - 2 |u . v|.
    rng = np.random.default_rng(3)
    u, v, dmu = rng.standard_normal(6), rng.standard_normal(6), rng.standard_normal(6)
    expected = dmu @ dmu + u @ u + v @ v - 2 * abs(u @ v)
    got = frechet_distance(np.zeros(6), np.outer(u, u), dmu, np.outer(v, v))
    # The five zero eigenvalues come out as ~1e-16 noise whose square roots add ~1e-8 each.
    assert got == pytest.approx(expected, rel=1e-6)
    # Orthogonal directions: the product is the zero matrix and nothing cancels.
    e1, e2 = np.eye(3)[0] * 2.0, np.eye(3)[1] * 3.0
    assert frechet_distance(np.zeros(3), np.outer(e1, e1), np.zeros(3), np.outer(e2, e2)) == pytest.approx(13.0)


@pytest.mark.parametrize("u, v", [
    ([[2], [1], [0]], [[-2], [1], [-2]]),
    ([[0], [-1], [2]], [[1, -1], [2, 1], [-2, 0]]),
    ([[-1], [1], [-2], [1]], [[0, -1], [-2, 1], [-2, 0], [1, 2]]),
    ([[1], [-2], [1], [1]], [[2, 1], [1, -1], [-2, 2], [-2, 0]]),
])
def test_frechet_exactly_singular_products_stay_finite_and_close(u, v):
    # Integer low-rank factors give exactly singular products on which SciPy's sqrtm returns inf/nan or a
    # root with a large imaginary part; the eps retry must then land within its O(sqrt(eps)) error.
    u, v = np.array(u, dtype=float), np.array(v, dtype=float)
    s1, s2 = u @ u.T, v @ v.T
    expected = np.trace(s1) + np.trace(s2) - 2 * reference_trace_sqrt(s1, s2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = frechet_distance(np.zeros(len(u)), s1, np.zeros(len(u)), s2)
    assert math.isfinite(got)
    assert got == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("d", [2, 4, 32])  # clean-fid itself breaks on d=1 with SciPy 1.17
def test_frechet_matches_cleanfid(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_cov(rng, d), random_cov(rng, d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # clean-fid passes sqrtm's deprecated disp=False
        expected = cleanfid.frechet_distance(mu1=mu1, sigma1=s1, mu2=mu2, sigma2=s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(float(expected), rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(float(expected), rel=1e-9)


def test_frechet_not_psd_raises():
    # A negative "variance" makes the root genuinely imaginary, with or without the eps offset.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError, match="imaginary"):
            frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))


def test_frechet_drops_small_imaginary_part_and_raises_on_large(monkeypatch):
    sigma = np.diag([1.0, 4.0])
    monkeypatch.setattr(metrics, "_sqrtm", lambda m: np.diag([1.0, 4.0]) + 1e-6j)
    assert frechet_distance(np.zeros(2), sigma, np.zeros(2), sigma) == pytest.approx(0.0, abs=1e-12)
    monkeypatch.setattr(metrics, "_sqrtm", lambda m: np.diag([1.0, 4.0]) + 0.5j)
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), sigma, np.zeros(2), sigma)


def test_frechet_retries_with_eps_on_both_covariances(monkeypatch):
    seen = []

    def fake_sqrtm(matrix):
        seen.append(matrix)
        return np.full_like(matrix, np.nan) if len(seen) == 1 else np.diag([1.0, 2.0])

    monkeypatch.setattr(metrics, "_sqrtm", fake_sqrtm)
    s1, s2 = np.diag([1.0, 2.0]), np.diag([3.0, 5.0])
    with pytest.warns(RuntimeWarning, match="retrying"):
        got = frechet_distance(np.zeros(2), s1, np.ones(2), s2, eps=0.25)
    np.testing.assert_array_equal(seen[1], (s1 + 0.25 * np.eye(2)) @ (s2 + 0.25 * np.eye(2)))
    # The traces use the covariances without the offset (as ADM does).
    assert got == pytest.approx(2.0 + 3.0 + 8.0 - 2 * 3.0)


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))


def test_fid_helpers_agree():
    rng = np.random.default_rng(4)
    real, fake = rng.standard_normal((200, 6)), rng.standard_normal((150, 6)) * 1.3 + 0.2
    expected = frechet_distance(real.mean(0), np.cov(real, rowvar=False), fake.mean(0), np.cov(fake, rowvar=False))
    assert fid_from_features(real, fake) == pytest.approx(expected, rel=1e-12)
    stats_real, stats_fake = StreamingStats().update(real), StreamingStats().update(fake)
    assert fid_from_stats(stats_real, stats_fake) == pytest.approx(expected, rel=1e-9)
    assert expected > 0.1


# --- Inception Score --------------------------------------------------------------------------------------------

def one_hot_logits(classes, num_classes, scale=1000.0):
    return scale * np.eye(num_classes)[np.asarray(classes)]


def test_inception_score_uniform_is_one():
    assert inception_score(np.zeros((20, 7))) == pytest.approx(1.0, abs=1e-12)


def test_inception_score_confident_and_balanced_is_num_classes():
    logits = one_hot_logits(np.arange(40) % 8, 8)
    assert inception_score(logits) == pytest.approx(8.0, rel=1e-12)
    assert np.isfinite(inception_score(logits * 1e3))  # huge logits: log-softmax keeps it finite


def test_inception_score_splits_include_partial_last():
    # Split 1: a single class (IS 1); split 2: 5 classes, 2 each (IS 5); partial split 3: 3 classes (IS 3).
    classes = [0] * 10 + [0, 1, 2, 3, 4] * 2 + [5, 6, 7] * 2
    logits = one_hot_logits(classes, 8)
    assert inception_score(logits, split_size=10) == pytest.approx((1 + 5 + 3) / 3, rel=1e-12)
    # One split over everything: for one-hot predictions IS = exp(entropy of the class histogram).
    p = np.bincount(classes) / len(classes)
    assert inception_score(logits, split_size=100) == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-12)


def test_inception_score_matches_direct_formula_on_soft_predictions():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((30, 6)) * 2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = [np.exp(np.mean(np.sum(part * (np.log(part) - np.log(part.mean(0))), 1)))
              for part in (p[:12], p[12:24], p[24:])]
    assert inception_score(logits, split_size=12) == pytest.approx(np.mean(scores), rel=1e-12)


# --- precision / recall -----------------------------------------------------------------------------------------

def brute_force_precision_recall(real, fake, k):
    def dist(a, b):
        return np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))

    real_radii = np.sort(dist(real, real), axis=1)[:, k]
    fake_radii = np.sort(dist(fake, fake), axis=1)[:, k]
    cross = dist(real, fake)
    return (cross <= real_radii[:, None]).any(0).mean(), (cross <= fake_radii[None]).any(1).mean()


def test_precision_recall_identical_sets():
    x = np.random.default_rng(6).standard_normal((50, 4))
    assert precision_recall(x, x.copy()) == (1.0, 1.0)


def test_precision_recall_far_apart_sets():
    x = np.random.default_rng(7).standard_normal((50, 4))
    assert precision_recall(x, x + 1000.0) == (0.0, 0.0)


def test_precision_recall_hand_built_1d():
    real = np.array([[0.0], [1.0], [3.0], [7.0]])
    fake = np.array([[-1.0], [-1.5], [5.0], [6.0]])
    # k=1 radii (nearest *other* point): real [1, 1, 2, 4], fake [0.5, 0.5, 1, 1]. With the self-distance
    # counted every radius would be 0 and both numbers 0.
    # Precision: -1 sits exactly on the boundary of 0's ball (1 <= 1), 5 and 6 are inside 7's ball, -1.5 is out.
    # Recall: only 7 is covered, exactly on the boundary of 6's ball (1 <= 1). A strict < gives (0.5, 0).
    assert precision_recall(real, fake, k=1) == (0.75, 0.25)
    assert precision_recall(fake, real, k=1) == (0.25, 0.75)
    # k=2 radii: real [3, 2, 3, 6] cover every fake point; fake [6, 6.5, 6, 7] cover every real point.
    assert precision_recall(real, fake, k=2) == (1.0, 1.0)


def test_precision_recall_block_size_invariant_and_matches_brute_force():
    rng = np.random.default_rng(8)
    real, fake = rng.standard_normal((300, 16)), rng.standard_normal((200, 16)) * 1.1 + 0.15
    results = {block: precision_recall(real, fake, k=3, block_size=block) for block in (7, 64, 10000)}
    assert len(set(results.values())) == 1
    precision, recall = results[10000]
    assert (precision, recall) == pytest.approx(brute_force_precision_recall(real, fake, 3), abs=1e-12)
    assert 0.0 < precision < 1.0 and 0.0 < recall < 1.0


def test_precision_recall_rejects_too_few_points():
    with pytest.raises(ValueError):
        precision_recall(np.zeros((3, 2)), np.ones((10, 2)), k=3)


# --- streaming statistics ---------------------------------------------------------------------------------------

def offset_features(seed=9, n=1000, d=6):
    rng = np.random.default_rng(seed)
    return 1e6 + rng.standard_normal((n, d)) @ rng.standard_normal((d, d))


def assert_matches_one_pass(stats, x):
    assert stats.count == len(x)
    np.testing.assert_allclose(stats.mean(), np.mean(x, axis=0), rtol=1e-14)
    # The naive sum-of-squares formula is off by ~1e-4 here (1e12-sized terms cancelling).
    np.testing.assert_allclose(stats.covariance(), np.cov(x, rowvar=False), rtol=0, atol=1e-9)


def test_streaming_matches_one_pass_with_large_offset():
    x = offset_features()
    stats = StreamingStats()
    for lo, hi in [(0, 1), (1, 7), (7, 7), (7, 257), (257, 260), (260, 1000)]:
        stats.update(x[lo:hi])
    assert_matches_one_pass(stats, x)


def test_streaming_merge_and_torch_input():
    x = offset_features(seed=10)
    a = StreamingStats().update(x[:333]).update(torch.from_numpy(x[333:400]))
    b = StreamingStats().update(x[400:])
    assert_matches_one_pass(a.merge(b).merge(StreamingStats()), x)
    assert_matches_one_pass(StreamingStats().merge(a), x)


def test_streaming_save_load_round_trip(tmp_path):
    x = offset_features(seed=11)
    stats = StreamingStats().update(x[:600])
    path = tmp_path / "ref_stats.npz"
    stats.save(path)
    with np.load(path) as data:
        assert set(data.files) == {"mu", "sigma", "count"}
        assert int(data["count"]) == 600
    loaded = StreamingStats.load(path)
    np.testing.assert_array_equal(loaded.mean(), stats.mean())
    np.testing.assert_allclose(loaded.covariance(), stats.covariance(), rtol=1e-14)
    assert_matches_one_pass(loaded.update(x[600:]), x)


def test_streaming_rejects_bad_input():
    stats = StreamingStats()
    with pytest.raises(ValueError):
        stats.mean()
    stats.update(np.zeros((1, 3)))
    with pytest.raises(ValueError):
        stats.covariance()
    with pytest.raises(ValueError):
        stats.update(np.zeros((2, 4)))


# --- sFID features ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("as_torch", [False, True])
def test_sfid_features_layout(as_torch):
    n, c, h, w = np.meshgrid(np.arange(2), np.arange(192), np.arange(17), np.arange(17), indexing="ij")
    x = n * 1e6 + c * 1e4 + h * 100 + w  # each value encodes its (n, c, h, w)
    out = sfid_features(torch.from_numpy(x.astype(np.float32)) if as_torch else x)
    assert out.shape == (2, 2023) and out.dtype == np.float64
    j = np.arange(2023)
    # TF flattens NHWC [17, 17, 7]: column j holds h = j // 119, w = (j // 7) % 17, c = j % 7.
    for sample in range(2):
        np.testing.assert_array_equal(out[sample], sample * 1e6 + (j % 7) * 1e4 + (j // 119) * 100 + (j // 7) % 17)


def test_sfid_features_rejects_nhwc():
    with pytest.raises(ValueError):
        sfid_features(np.zeros((2, 17, 17, 192)))
