"""Array helpers shared by the kernels: principal directions (the report's projections), a finite check by tiles."""

from __future__ import annotations

import numpy as np

from model_collapse.rng import numpy_rng

SAMPLE = 4096  # points the directions are estimated from


def principal_directions(x: np.ndarray, q: int, seed: int, name: str = "pca") -> tuple[np.ndarray, np.ndarray]:
    """(mean, P): the mean of x (float64) and its top q principal directions as orthonormal columns (d, q),
    estimated from a seeded sample of at most 4,096 rows.

    Wide data gets the directions from a seeded randomized SVD (Halko et al. 2011: a Gaussian sketch, two power
    iterations): a full SVD of the sample takes tens of seconds at d = 3,072."""
    mean = x.mean(0, dtype=np.float64)
    sample = x[np.sort(numpy_rng(seed, name).permutation(len(x))[:SAMPLE])].astype(np.float64) - mean
    sample -= sample.mean(0)
    width = q + 10
    if min(sample.shape) <= 2 * width:
        _, _, vh = np.linalg.svd(sample, full_matrices=False)
    else:
        basis = np.linalg.qr(sample @ numpy_rng(seed, f"{name}-sketch").normal(size=(sample.shape[1], width)))[0]
        for _ in range(2):
            basis = np.linalg.qr(sample @ np.linalg.qr(sample.T @ basis)[0])[0]
        _, _, vh = np.linalg.svd(basis.T @ sample, full_matrices=False)
    return mean, np.ascontiguousarray(vh[:q].T)


def first_nonfinite_row(x: np.ndarray, tile: int = 65536) -> int | None:
    """The first row of x holding NaN or inf, or None; a tile of rows at a time, so that a memory-mapped pool is
    never read (or a boolean copy of it made) whole."""
    for a in range(0, len(x), tile):
        bad = ~np.isfinite(x[a : a + tile]).reshape(len(x[a : a + tile]), -1).all(1)
        if bad.any():
            return a + int(np.argmax(bad))
    return None


def abs_max(x: np.ndarray, tile: int = 65536) -> float:
    """The largest |value| of x, a tile of rows at a time (as first_nonfinite_row)."""
    return max((float(np.abs(x[a : a + tile]).max()) for a in range(0, len(x), tile)), default=0.0)
