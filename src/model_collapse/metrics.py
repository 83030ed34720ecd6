"""Collapse metrics: pure functions of feature vectors.

Every distance here comes from the shared exact kNN kernel (`neighbours.knn`). Training sets are first reduced to
their distinct rows: an exact duplicate has a nearest-neighbour distance of zero, which sends the
Kozachenko-Leonenko estimate to minus infinity, and hiding it behind log(r + eps) would make the number
meaningless. Duplicates are counted and reported instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import digamma, gammaln

from model_collapse.neighbours import knn, rounding_gamma


@dataclass(frozen=True)
class EntropyResult:
    entropy: float  # nats, on the distinct rows
    k: int
    n: int  # distinct rows the estimate uses
    dim: int
    duplicates: int  # rows dropped as exact copies of an earlier row
    mean_nn: float  # mean distance of a distinct row to its nearest other row (the set's spacing)
    nn: np.ndarray | None = None  # (n,) each distinct row's nearest-neighbour distance

    def as_dict(self) -> dict:
        return {"entropy": self.entropy, "k": self.k, "n": self.n, "dim": self.dim,
                "duplicates": self.duplicates, "mean_nn": self.mean_nn}


def _row_keys(x: np.ndarray) -> list:
    """Every row of x as bytes, -0.0 as 0.0 (equal values, equal bytes): keys of a hash table of images (sorting
    rows, as np.unique(axis=0) does, takes seconds on wide rows)."""
    x = np.ascontiguousarray(x.reshape(len(x), -1))
    if x.dtype.kind == "f":
        x = x + x.dtype.type(0)  # -0.0 + 0.0 is 0.0
    return x.view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))).ravel().tolist()


def distinct_index(x: np.ndarray) -> np.ndarray:
    """Indices of the first appearance of every distinct row of x, in order: rows compared as bytes, in one hash
    table; -0.0 counts as 0.0."""
    first: dict = {}
    for i, row in enumerate(_row_keys(x)):
        first.setdefault(row, i)
    return np.fromiter(first.values(), dtype=np.int64, count=len(first))


def image_ids(x: np.ndarray) -> np.ndarray:
    """For every row of x, the number of its image (distinct row, as `distinct_index` tells them apart) in order of
    first appearance."""
    ids: dict = {}
    return np.fromiter((ids.setdefault(row, len(ids)) for row in _row_keys(x)), dtype=np.int64, count=len(x))


def distinct_rows(x: np.ndarray) -> tuple[np.ndarray, int]:
    """The distinct rows of x in order of first appearance, and how many rows were exact copies."""
    keep = distinct_index(x)
    return x[keep], len(x) - len(keep)


def log_unit_ball_volume(d: int) -> float:
    """log c_d, the volume of the unit d-ball: (d/2) log(pi) - log Gamma(d/2 + 1)."""
    return 0.5 * d * math.log(math.pi) - float(gammaln(0.5 * d + 1.0))


def kl_entropy_from_distances(r_k: np.ndarray, d: int, k: int) -> float:
    """Kozachenko-Leonenko: H = psi(n) - psi(k) + log c_d + (d/n) sum_i log r_k(i), in nats."""
    n = len(r_k)
    return float(digamma(n) - digamma(k) + log_unit_ball_volume(d) + d * np.mean(np.log(r_k)))


def kl_entropy(x: np.ndarray, k: int = 1, **knn_kw) -> EntropyResult:
    """Kozachenko-Leonenko kNN differential entropy of the distinct rows of x (N, d), with duplicates counted."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"expected (N, d) vectors, got shape {x.shape}")
    u, dup = distinct_rows(x)
    if len(u) <= k:  # a collapsed set: the estimate's limit is minus infinity; recorded, not refused
        nn = knn(u, None, 1, **knn_kw).distances[:, 0] if len(u) > 1 else np.full(len(u), math.nan)
        return EntropyResult(-math.inf, k, len(u), u.shape[1], dup, float(np.mean(nn)), nn)
    res = knn(u, None, k, **knn_kw)
    r_k = res.distances[:, k - 1]
    return EntropyResult(kl_entropy_from_distances(r_k, u.shape[1], k), k, len(u), u.shape[1], dup,
                         float(res.distances[:, 0].mean()), res.distances[:, 0])


@dataclass(frozen=True)
class ScoreResult:
    gen_score: float  # mean distance of a generated sample to its nearest training sample
    gen_score_ratio: float  # gen_score / the training set's own mean nearest-neighbour distance
    mem_fraction: float  # share of samples with d1 / d2 < mem_ratio
    copy_fraction: float  # share of samples with d1 < copy_ratio * the training set's median NN distance
    train_spacing: float  # the training set's mean nearest-neighbour distance
    train_median_nn: float
    n_generated: int
    n_train: int  # distinct training rows
    nearest: np.ndarray  # (n_generated,) index of the nearest distinct training row
    d1: np.ndarray  # (n_generated,) nearest distance
    d2: np.ndarray  # (n_generated,) second-nearest distance

    def as_dict(self) -> dict:
        return {"gen_score": self.gen_score, "gen_score_ratio": self.gen_score_ratio,
                "mem_fraction": self.mem_fraction, "copy_fraction": self.copy_fraction,
                "train_spacing": self.train_spacing, "n_generated": self.n_generated, "n_train": self.n_train}


def generalization_score(
    generated: np.ndarray,
    train: np.ndarray,
    *,
    mem_ratio: float = 1.0 / 3.0,
    copy_ratio: float = 1.0 / 3.0,
    train_nn: np.ndarray | None = None,
    **knn_kw,
) -> ScoreResult:
    """Generalization score (mean nearest-training distance of generated samples), its ratio to the training set's
    own spacing, the nearest/second-nearest memorization test (d1/d2 < 1/3), and a copy test normalised by the
    training set's spacing (d1 below a third of its median nearest-neighbour distance).

    The training set is reduced to distinct rows first (a copy of a duplicated image would otherwise have d2 = d1).
    `train_nn` may pass the distinct training rows' nearest-neighbour distances when already known.
    """
    generated, train = np.asarray(generated), np.asarray(train)
    if generated.ndim != 2 or train.ndim != 2 or generated.shape[1] != train.shape[1]:
        raise ValueError(f"generated {generated.shape} and training {train.shape} sets must be (N, d) of one d")
    u, _ = distinct_rows(train)
    if len(u) < 2:  # a collapsed training set: one image; distances to it, no second neighbour or spacing
        d1 = knn(generated, u, 1, **knn_kw).distances[:, 0]
        return ScoreResult(float(d1.mean()), math.nan, math.nan, math.nan, math.nan, math.nan, len(generated), 1,
                           np.zeros(len(generated), dtype=np.int64), d1, np.full(len(generated), math.inf))
    res = knn(generated, u, 2, **knn_kw)
    d1, d2 = res.distances[:, 0], res.distances[:, 1]
    if train_nn is None:
        train_nn = knn(u, None, 1, **knn_kw).distances[:, 0]
    spacing = float(np.mean(train_nn))
    median_nn = float(np.median(train_nn))
    gs = float(d1.mean())
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(d2 > 0, d1 / d2, 1.0)
    return ScoreResult(
        gen_score=gs,
        gen_score_ratio=gs / spacing if spacing > 0 else math.nan,
        mem_fraction=float(np.mean(ratio < mem_ratio)),
        copy_fraction=float(np.mean(d1 < copy_ratio * median_nn)),
        train_spacing=spacing,
        train_median_nn=median_nn,
        n_generated=len(generated),
        n_train=len(u),
        nearest=res.indices[:, 0],
        d1=d1,
        d2=d2,
    )


def total_variance(x: np.ndarray) -> float:
    """Trace of the sample covariance (the older, variance-based view of collapse)."""
    x = np.asarray(x, dtype=np.float64)
    return float(x.var(axis=0, ddof=1).sum())


def gaussian_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of feature vectors, float64."""
    x = np.asarray(x, dtype=np.float64)
    return x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """Frechet distance between Gaussians: |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2), a
    symmetric positive semi-definite matrix with the same spectrum as S1 S2: stable, and no complex sqrtm.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(s1, np.float64), np.asarray(s2, np.float64)
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r1 @ s2 @ r1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = float(np.sqrt(np.clip(ev, 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


def frechet_distance_features(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


KID_WHOLE = 2048  # sets up to this size: the kernel matrices once (3 x 32 MiB at most), each subset's sums from them


def kernel_inception_distance(a: np.ndarray, b: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3, averaged over
    random subsets; returns (mean, std).

    Sets of at most KID_WHOLE rows: the three kernel matrices are computed once and every subset's sums come from
    them as products with the subsets' indicator vectors (the same subsets, the same sums up to float64 rounding
    order; at the demo's 512 generated against 512 real images, 100 subsets of 256, 0.08 s per stage instead of
    0.5 s). Larger sets: each subset's kernels on their own."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = a.shape[1]
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    picks = [(rng.choice(len(a), m, replace=False), rng.choice(len(b), m, replace=False)) for _ in range(subsets)]
    pairs = m * (m - 1)
    if max(len(a), len(b)) <= KID_WHOLE:
        ia, ib = np.zeros((len(a), subsets)), np.zeros((len(b), subsets))
        for s, (x, y) in enumerate(picks):
            ia[x, s], ib[y, s] = 1.0, 1.0
        kxx, kyy, kxy = ((a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3)
        sxx = ((kxx @ ia) * ia).sum(0) - np.diag(kxx) @ ia
        syy = ((kyy @ ib) * ib).sum(0) - np.diag(kyy) @ ib
        sxy = ((kxy @ ib) * ia).sum(0)
        vals = sxx / pairs + syy / pairs - 2 * sxy / (m * m)
    else:
        vals = []
        for x, y in picks:
            x, y = a[x], b[y]
            kxx = (x @ x.T / d + 1) ** 3
            kyy = (y @ y.T / d + 1) ** 3
            kxy = (x @ y.T / d + 1) ** 3
            vals.append((kxx.sum() - np.trace(kxx)) / pairs + (kyy.sum() - np.trace(kyy)) / pairs - 2 * kxy.mean())
    return float(np.mean(vals)), float(np.std(vals))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 5, *, real_radii: np.ndarray | None = None,
                     **knn_kw) -> dict:
    """Improved precision/recall (Kynkaanniemi et al. 2019) and density/coverage (Naeem et al. 2020).

    Each set's k-NN radii come from the shared exact kernel (`real_radii` may pass the real set's when already
    known). Membership (distance to a point of the other set at most its radius) is decided tile by tile (no
    n x m matrix in memory) from one float64 product per tile with a rigorous rounding bound; the pairs within
    that bound of a radius, such as copies of a point whose radius is zero, are decided on exact distances
    computed like the kernel's."""
    real, fake = np.asarray(real, np.float32), np.asarray(fake, np.float32)
    r_real = knn(real, None, k, **knn_kw).distances[:, k - 1] if real_radii is None else real_radii
    r_fake = knn(fake, None, k, **knn_kw).distances[:, k - 1]
    prec_hits = np.zeros(len(fake), bool)
    density_count = np.zeros(len(fake))
    cov_hits = np.zeros(len(real), bool)
    rec_hits = np.zeros(len(real), bool)
    gamma = rounding_gamma(real.shape[1] + 4, np.float64)
    block = 1024
    for a in range(0, len(fake), block):
        f = fake[a : a + block].astype(np.float64)
        for b in range(0, len(real), block):
            tile = DistanceTile(f, real[b : b + block].astype(np.float64), gamma)
            inside_real = tile.within(r_real[None, b : b + block])
            prec_hits[a : a + block] |= inside_real.any(1)
            density_count[a : a + block] += inside_real.sum(1)
            cov_hits[b : b + block] |= inside_real.any(0)
            rec_hits[b : b + block] |= tile.within(r_fake[a : a + block, None]).any(0)
    return {"precision": float(prec_hits.mean()), "recall": float(rec_hits.mean()),
            "density": float(density_count.mean() / k), "coverage": float(cov_hits.mean())}


class DistanceTile:
    """Squared distances between two blocks of rows from one float64 product, and its rounding bound."""

    def __init__(self, f: np.ndarray, r: np.ndarray, gamma: float):
        fsq, rsq = (f**2).sum(1), (r**2).sum(1)
        self.f, self.r = f, r
        self.sq = fsq[:, None] + rsq[None] - 2 * f @ r.T
        self.err = gamma * (np.sqrt(fsq)[:, None] + np.sqrt(rsq)[None]) ** 2

    def within(self, radius: np.ndarray) -> np.ndarray:
        """Is |f_i - r_j| <= radius (broadcast to the tile), decided exactly."""
        rad = np.broadcast_to(radius, self.sq.shape)
        r2 = rad * rad
        out = self.sq <= r2
        amb = np.abs(self.sq - r2) <= self.err + 2.0**-50 * r2  # also covers the rounding of r2
        if amb.any():
            i, j = np.nonzero(amb)
            d = ((torch.from_numpy(self.r[j]) - torch.from_numpy(self.f[i])) ** 2).sum(-1).sqrt().numpy()
            out[i, j] = d <= rad[i, j]
        return out
