"""One measurement rule: from (training set, generated set, real reference) in one feature space to metrics.

`run` (every arm and iteration), `fid`, `score` and `probe` all measure through these functions, so one rule
decides every number:

* memorization: Kozachenko-Leonenko entropy and spacing of the training set's distinct rows, the generalization
  score of the generated set against them, the ratio and copy tests (`metrics.generalization_score`);
* quality against real data: the Frechet distance against the statistics of the *whole* reference; precision,
  recall, density and coverage (k = PR_K) and KID against a seeded subset of the reference with as many images as
  the generated set (k-NN manifolds of equal sample sizes; KID is unbiased at any size where the Frechet distance
  is not); KID over KID_SUBSETS seeded subsets of half the samples (at most 1,000), so the spread over subsets
  says something (subsets as large as the sets would all be the whole set).

The KID subsets derive from the measurement seed alone: every arm and iteration of a study is measured on the same
subset positions (common random numbers), which makes paired comparisons between arms less noisy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model_collapse.metrics import (
    frechet_distance,
    gaussian_stats,
    generalization_score,
    kernel_inception_distance,
    kl_entropy,
    precision_recall,
    total_variance,
)
from model_collapse.neighbours import knn
from model_collapse.rng import derive_seed, numpy_rng

PR_K = 5  # neighbours that define the real and generated manifolds of precision/recall, density/coverage
KID_SUBSETS = 100
KID_MAX_SUBSET = 1000


@dataclass(frozen=True)
class Reference:
    """The real data a generated set is compared with, in one space."""

    mu: np.ndarray  # mean and covariance of the whole reference (Frechet distance)
    sigma: np.ndarray
    features: np.ndarray  # the size-matched seeded subset (precision/recall, KID)
    radii: np.ndarray | None  # its PR_K-th nearest-neighbour radii; None when it has too few points


def reference_indices(n_reference: int, n_generated: int, seed: int) -> np.ndarray:
    """Sorted indices of the seeded reference subset: as many images as are measured (at most all of them)."""
    n = min(n_generated, n_reference)
    return np.sort(numpy_rng(seed, "pr-reference").choice(n_reference, n, replace=False))


def reference_radii(features: np.ndarray, device: str | None = None) -> np.ndarray | None:
    if len(features) <= PR_K:
        return None
    return knn(features, None, PR_K, device=device).distances[:, -1]


def make_reference(all_features: np.ndarray, n_generated: int, seed: int, device: str | None = None) -> Reference:
    """A Reference from the features of every reference image (what `fid` has at hand)."""
    mu, sigma = gaussian_stats(all_features)
    sub = all_features[reference_indices(len(all_features), n_generated, seed)]
    return Reference(mu, sigma, sub, reference_radii(sub, device))


def quality(generated: np.ndarray, ref: Reference, seed: int, device: str | None = None) -> dict:
    """fd, and where the sets are large enough precision/recall/density/coverage and kid, kid_std."""
    m = {"fd": frechet_distance(*gaussian_stats(generated), ref.mu, ref.sigma)}
    n = min(len(generated), len(ref.features))
    if n > PR_K:
        m.update(precision_recall(ref.features, generated, k=PR_K, real_radii=ref.radii, device=device))
    if n >= 4:
        m["kid"], m["kid_std"] = kernel_inception_distance(
            generated, ref.features, subsets=KID_SUBSETS, subset_size=min(KID_MAX_SUBSET, n // 2),
            seed=derive_seed(seed, "kid"))
    return m


@dataclass(frozen=True)
class MemorizationSettings:
    entropy_k: int = 1
    mem_ratio: float = 1.0 / 3.0
    copy_ratio: float = 1.0 / 3.0
    device: str | None = None


def memorization(train: np.ndarray, generated: np.ndarray, s: MemorizationSettings = MemorizationSettings(),
                 progress=None, precision: str = "float32"):
    """Training-set entropy and spacing, and the generated set's generalization score and copy tests.

    Returns (metrics, score) where score is the `metrics.ScoreResult` with every sample's neighbours."""
    kw = {"device": s.device, "progress": progress, "precision": precision}
    ent = kl_entropy(train, s.entropy_k, **kw)
    sc = generalization_score(generated, train, mem_ratio=s.mem_ratio, copy_ratio=s.copy_ratio, train_nn=ent.nn,
                              **kw)
    # collapsed: k or fewer distinct images, entropy minus infinity (stored as null: the flag keeps the fact)
    m = {"train_entropy": ent.entropy, "train_collapsed": bool(ent.n <= s.entropy_k),
         "train_duplicates": ent.duplicates, "train_spacing": sc.train_spacing,
         "gen_score": sc.gen_score, "gen_score_ratio": sc.gen_score_ratio, "mem_fraction": sc.mem_fraction,
         "copy_fraction": sc.copy_fraction}
    return m, sc


def measure_space(train: np.ndarray, generated: np.ndarray, ref: Reference, seed: int,
                  s: MemorizationSettings = MemorizationSettings()):
    """Every metric of one space for one (arm, iteration); returns (metrics, score) as `memorization`."""
    m, sc = memorization(train, generated, s)
    m["variance"] = total_variance(generated)
    m.update(quality(generated, ref, seed, device=s.device))
    return m, sc


def row_keys(metrics: dict, space: str) -> dict:
    """A space's metrics as metrics-row keys: `<name>_<space>`; the pixel duplicate count keeps its historic
    key `train_duplicates`."""
    out = {}
    for k, v in metrics.items():
        out[k if (k == "train_duplicates" and space == "pixel") else f"{k}_{space}"] = v
    return out
