"""Selecting N training images from a candidate pool: the registry of selectors and its entry point `select`.

Selectors take vectors (pixel or feature space) and return pool indices in selection order, never images, so
every run records exactly which samples were chosen. `spread` holds the methods that maximise spread (random,
greedy farthest-point, threshold decay); `curation` those that keep spread on the data manifold, measured
against a reference set (gated, herding, capped).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from model_collapse import registry
from model_collapse.curation import select_capped, select_gated, select_herding
from model_collapse.errors import UserError
from model_collapse.farthest import greedy_start  # noqa: F401 - the selection API in one place
from model_collapse.linalg import first_nonfinite_row
from model_collapse.progress import Progress
from model_collapse.registry import check_name
from model_collapse.spread import (  # noqa: F401 - the selection API in one place
    Selection,
    default_tau0,
    select_greedy,
    select_random,
    select_threshold,
)

NEEDS_REFERENCE = ("gated", "herding", "capped")


# ---------------------------------------------------------------------------------------------- registry

SELECTORS: dict[str, Callable[..., Selection]] = {
    "random": select_random,
    "greedy": select_greedy,
    "threshold": select_threshold,
    "gated": select_gated,
    "herding": select_herding,
    "capped": select_capped,
}


assert tuple(SELECTORS) == registry.SELECTORS, "selection.SELECTORS and registry.SELECTORS must agree"


def check_method(method: str) -> None:
    check_name("selection method", method, registry.SELECTORS)


def select(
    x: np.ndarray,
    n: int,
    method: str = "greedy",
    seed: int = 0,
    *,
    labels: np.ndarray | None = None,
    per_class: bool = False,
    tau0: float | None = None,
    decay: float = 0.95,
    decay_when: str = "every_pass",
    reference: np.ndarray | None = None,
    reference_labels: np.ndarray | None = None,
    progress: Progress | None = None,
) -> Selection:
    """Choose N of the pool's rows with a registered method; with per_class, each class keeps its pool share
    (and a reference-based method compares each class with that class's reference points, when the reference has
    labels). `reference`: the reference vectors of the `gated`, `herding` and `capped` methods (NEEDS_REFERENCE).

    Returns pool indices in selection order (class by class with per_class).
    """
    check_method(method)
    x = np.asarray(x)
    if x.ndim != 2:
        raise UserError(f"selection expects (M, d) vectors, got shape {x.shape}")
    if n <= 0:
        raise UserError(f"N must be > 0, got {n}")
    if len(x) < n:
        raise UserError(f"the pool has {len(x)} images, fewer than N = {n}")
    if first_nonfinite_row(x) is not None:
        raise UserError("selection input contains NaN or inf")
    if method in NEEDS_REFERENCE and reference is None:
        raise UserError(f"the {method} selector needs a reference set (select --reference, or the loop's)")
    kw = dict(tau0=tau0, decay=decay, decay_when=decay_when, progress=progress)
    if not per_class or labels is None:
        return SELECTORS[method](x, n, seed, reference=reference, **kw)
    quotas = class_quotas(labels, n)
    parts, params = [], {"per_class": True, "quotas": {int(c): int(q) for c, q in quotas.items()}}
    for c, q in quotas.items():
        if q == 0:
            continue
        where = np.flatnonzero(labels == c)
        ref = reference
        if reference is not None and reference_labels is not None and (reference_labels == c).sum() > 5:
            ref = reference[reference_labels == c]
        sub = SELECTORS[method](x[where], q, seed + 7919 * (int(c) + 1), reference=ref, **kw)
        parts.append(where[sub.indices])
    return Selection(np.concatenate(parts).astype(np.int64), method, seed, params)


def class_quotas(labels: np.ndarray, n: int) -> dict[int, int]:
    """Split N over classes in proportion to their pool counts (largest remainder; ties to the lower label)."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / counts.sum()
    base = np.floor(exact).astype(int)
    rest = n - base.sum()
    frac_order = sorted(range(len(classes)), key=lambda i: (-(exact[i] - base[i]), classes[i]))
    for i in frac_order[:rest]:
        base[i] += 1
    return {int(c): int(min(b, cnt)) for c, b, cnt in zip(classes, base, counts)}
