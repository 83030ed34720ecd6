"""Selecting N training images from a candidate pool: random, greedy farthest-point, threshold decay.

Selectors take vectors (pixel or feature space) and return pool indices in selection order, never images, so
every run records exactly which samples were chosen. Distances are Euclidean; every decision that compares two
distances, or a distance with a threshold, is taken on exact float64 squared distances computed from
differences, so the fast paths here make exactly the choices of the straightforward definitions:

* greedy: start from a seeded random pool index; repeatedly add the pool point whose distance to its nearest
  selected point is largest; ties go to the lowest pool index.
* threshold: visit the pool in a seeded random order; accept a point if its squared distance to every accepted
  point is greater than tau^2; after each full pass multiply tau by `decay`; stop at N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from model_collapse.errors import UserError
from model_collapse.progress import Progress, or_silent
from model_collapse.rng import numpy_rng


@dataclass(frozen=True)
class Selection:
    indices: np.ndarray  # int64 pool indices, in selection order
    method: str
    seed: int
    params: dict = field(default_factory=dict)  # what decided the choice (tau0, decay, order, ...)


# ---------------------------------------------------------------------------------------------- random


def select_random(x: np.ndarray, n: int, seed: int, **_) -> Selection:
    """N pool indices drawn uniformly without replacement (the vanilla loop)."""
    order = numpy_rng(seed, "random").permutation(len(x))
    return Selection(order[:n].astype(np.int64), "random", seed)


# ---------------------------------------------------------------------------------------------- greedy


def greedy_start(m: int, seed: int) -> int:
    return int(numpy_rng(seed, "greedy-start").integers(m))


def _sq_to(x: torch.Tensor, rows: torch.Tensor | None, c: torch.Tensor) -> torch.Tensor:
    """Exact float64 squared distances from a centre to some rows (all rows when rows is None)."""
    sub = x if rows is None else x[rows]
    return ((sub.double() - c.double()) ** 2).sum(1)


def select_greedy(x: np.ndarray, n: int, seed: int, *, projection_dim: int = 16,
                  progress: Progress | None = None, **_) -> Selection:
    """Greedy farthest-point selection (Gonzalez 1985), exact, with pruning that skips most of the pool.

    Each pool point p keeps its distance to the nearest selected centre and that centre a[p]. When centre c is
    added, p can only get closer if d(c, p) < d(a[p], p); by the triangle inequality
    d(c, p) >= d(c, a[p]) - d(a[p], p), and d(c, a[p]) is bounded from below by the distance between the two
    centres' projections on the pool's top principal directions (an orthogonal projection never lengthens a
    vector). So one projected distance per centre rules out most of the pool in a few vectorised operations;
    the projection then bounds d(c, p) itself, and only the points that remain get exact float64 distances. The
    arg-max (lowest index among ties) is taken over exact values, as in the definition.
    """
    m = len(x)
    # exact distances from the inputs as given (float32 inputs are exact in float64); centring only for bounds
    X = torch.as_tensor(np.ascontiguousarray(x))
    if not X.is_floating_point():
        X = X.double()
    if not torch.isfinite(X).all():
        raise UserError("selection input contains NaN or inf")
    q = int(min(projection_dim, X.shape[1], m))
    Xc = X.double() - X.double().mean(0, keepdim=True)
    sample = Xc[torch.as_tensor(numpy_rng(seed, "greedy-pca").permutation(m)[:4096])]
    _, _, vh = torch.linalg.svd(sample - sample.mean(0), full_matrices=False)
    P = vh[:q].T.contiguous()  # (d, q), orthonormal columns
    Z = Xc @ P  # (m, q); |Z_a - Z_b| <= |X_a - X_b|
    del Xc
    slack = 1e-9

    start = greedy_start(m, seed)
    chosen = [start]
    mind = _sq_to(X, None, X[start])  # squared distance to the nearest chosen centre; -1 once chosen
    mind[start] = -1.0
    own = mind.clamp_min(0).sqrt()  # that distance (0 for chosen points)
    assign = torch.zeros(m, dtype=torch.int64)  # position in `chosen` of that centre
    centres_z = torch.empty((n, q), dtype=torch.float64)
    centres_z[0] = Z[start]
    touched = m
    progress = or_silent(progress)
    progress.start(f"greedy selection, {n} of {m}", n)
    for t in range(1, n):
        if t % 256 == 0:
            progress.advance(256)
        c = int(torch.argmax(mind))  # first maximum: ties go to the lowest index
        chosen.append(c)
        mind[c], own[c] = -1.0, 0.0  # own = 0: never tested again
        # p can only get closer if d(c, p) < own[p]; d(c, p) >= d(c, a[p]) - own[p] >= lb(c, a[p]) - own[p]
        lb = (centres_z[:t] - Z[c]).pow(2).sum(1).sqrt()
        test = torch.nonzero(lb[assign] * (1 - slack) < 2 * own).squeeze(1)
        assign[c] = t
        centres_z[t] = Z[c]
        if test.numel():  # the projection bounds d(c, p) itself
            test = test[(Z[test] - Z[c]).pow(2).sum(1).sqrt() * (1 - slack) < own[test]]
        if test.numel():
            touched += test.numel()
            d2 = _sq_to(X, test, X[c])
            closer = d2 < mind[test]
            moved = test[closer]
            mind[moved] = d2[closer]
            own[moved] = d2[closer].sqrt()
            assign[moved] = t
    progress.advance(n - (n - 1) // 256 * 256)  # picks 0..255 reported at t = 256, ...
    progress.close()
    return Selection(np.asarray(chosen, dtype=np.int64), "greedy", seed,
                     {"start": start, "distances_computed": int(touched)})


# ---------------------------------------------------------------------------------------------- threshold


def default_tau0(x: np.ndarray, seed: int = 0, sample: int = 2048, progress: Progress | None = None) -> float:
    """tau0 default: twice the median distance of a pool point to its nearest other pool point, the median taken
    over a seeded sample of (at most) 2,048 pool points, each with its exact nearest neighbour in the whole pool.

    A first pass at that radius keeps only points well apart from each other; each further pass lowers tau by
    `decay` until N points are accepted, so the result starts as sparse as the pool allows.
    """
    from model_collapse.neighbours import knn

    if len(x) <= sample:
        return 2.0 * float(np.median(knn(x, None, 1, progress=progress).distances[:, 0]))
    pick = np.sort(numpy_rng(seed, "tau0-sample").choice(len(x), sample, replace=False))
    # a pool point's first neighbour in the pool is itself, at distance 0
    d = knn(x[pick], x, 2, progress=progress).distances
    return 2.0 * float(np.median(d[:, 1]))


def _gamma32(d: int) -> float:
    nu = (d + 4) * 2.0**-24
    return 2.0 * nu / (1.0 - nu)


def select_threshold(
    x: np.ndarray, n: int, seed: int, *, tau0: float | None = None, decay: float = 0.95, chunk: int = 1024,
    progress: Progress | None = None, **_
) -> Selection:
    """Threshold decay filter, batched: exactly the sequential definition, a chunk of the visiting order at a time.

    For each chunk, distances to the points accepted so far come from one float32 matrix product, with a
    rigorous rounding bound; only pairs within that bound of tau^2 are recomputed exactly. Survivors are then
    resolved in visiting order among themselves (the first survivor is accepted and removes the survivors
    within tau of it, and so on), which is what the sequential loop does.
    """
    m, d = x.shape
    if not 0.0 < decay < 1.0:
        raise UserError(f"decay must lie in (0, 1), got {decay}")
    X64 = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float64)  # exact distances from these
    Xc = X64 - X64.mean(0, keepdim=True)  # centred, for the approximate pass only
    X = Xc.float()
    sq = (Xc**2).sum(1)
    norms = sq.sqrt()
    gamma = _gamma32(d)
    n_distinct = len(np.unique(np.ascontiguousarray(x), axis=0))
    if n_distinct < n:
        raise UserError(f"threshold selection: the pool has only {n_distinct} distinct images, fewer than N = {n}")
    progress = or_silent(progress)
    if tau0 is None:
        tau0 = default_tau0(x, seed, progress=progress)
    if not tau0 > 0:
        raise UserError(f"tau0 must be > 0, got {tau0}")
    order = numpy_rng(seed, "threshold-order").permutation(m)
    accepted: list[int] = []
    is_acc = np.zeros(m, dtype=bool)
    acc_buf = torch.empty((n, d), dtype=torch.float32)
    acc_sq = torch.empty(n, dtype=torch.float64)
    acc_norm = torch.empty(n, dtype=torch.float64)
    # per point: approximate squared distance to the nearest accepted point among the first upto[p] accepted.
    # The accepted set only grows and tau only shrinks, so this is carried from pass to pass and only the
    # points accepted since are folded in: about one M x N product in all, not one per pass.
    near = torch.full((m,), math.inf, dtype=torch.float64)
    upto = np.zeros(m, dtype=np.int64)
    tau = float(tau0)
    passes = 0
    progress.start(f"threshold selection, {n} of {m}", n)
    while len(accepted) < n:
        passes += 1
        t2 = tau * tau
        for a in range(0, m, chunk):
            idx = order[a : a + chunk]
            idx = idx[~is_acc[idx]]
            if not len(idx):
                continue
            it = torch.as_tensor(idx)
            k = len(accepted)
            lo = int(upto[idx].min())
            if k > lo:
                approx = torch.addmm(sq[it].float()[:, None] + acc_sq[lo:k].float()[None], X[it], acc_buf[lo:k].T,
                                     alpha=-2.0).double()
                near[it] = torch.minimum(near[it], approx.min(1).values)
                upto[idx] = k
            alive = torch.ones(len(idx), dtype=torch.bool)
            if k:
                err = gamma * (norms[it] + acc_norm[:k].max()) ** 2  # bounds every pair of this point
                alive &= ~(near[it] + err <= t2)  # surely within tau of an accepted point
                amb = alive & (near[it] - err <= t2)  # near tau: decide on exact distances
                if amb.any():
                    rows = it[amb]
                    close = _exact_close(X, X64, sq, norms, rows, acc_buf[:k], acc_sq[:k], acc_norm[:k],
                                         torch.as_tensor(accepted), t2, gamma)
                    alive[torch.nonzero(amb).squeeze(1)[close]] = False
            surv = it[alive]
            if not surv.numel():
                continue
            # resolve among survivors in visiting order, on exact distances
            conflict = _conflicts(X, X64, sq, norms, surv, t2, gamma)
            live = np.ones(len(surv), dtype=bool)
            surv_list = surv.tolist()
            before = len(accepted)
            for i in range(len(surv_list)):
                if not live[i]:
                    continue
                p = surv_list[i]
                acc_buf[len(accepted)] = X[p]
                acc_sq[len(accepted)] = sq[p]
                acc_norm[len(accepted)] = norms[p]
                accepted.append(p)
                is_acc[p] = True
                if len(accepted) == n:
                    break
                live &= ~conflict[i]
            progress.advance(len(accepted) - before)
            if len(accepted) == n:
                break
        else:
            tau *= decay
    progress.close()
    return Selection(np.asarray(accepted, dtype=np.int64), "threshold", seed,
                     {"tau0": float(tau0), "decay": float(decay), "tau_final": tau, "passes": passes,
                      "order": order.astype(np.int64)})


def _exact_close(X, X64, sq, norms, rows, acc, acc_sq, acc_norm, acc_idx, t2: float, gamma: float) -> torch.Tensor:
    """For each row: is some accepted point within tau (exact squared distance <= tau^2)?"""
    approx = torch.addmm(sq[rows].float()[:, None] + acc_sq.float()[None], X[rows], acc.T, alpha=-2.0).double()
    err = gamma * (norms[rows][:, None] + acc_norm[None]) ** 2
    close = (approx + err <= t2).any(1)
    amb = (approx - err <= t2) & (approx + err > t2) & ~close[:, None]
    if amb.any():
        r, c = torch.nonzero(amb, as_tuple=True)
        hit = ((X64[rows[r]] - X64[acc_idx[c]]) ** 2).sum(1) <= t2
        close[r[hit]] = True
    return close


def _conflicts(X, X64, sq, norms, surv, t2: float, gamma: float) -> np.ndarray:
    """conflict[i, j]: survivors i and j lie within tau (exact squared distance <= tau^2).

    One float32 matrix product with the rounding bound; only pairs within the bound of tau^2 are recomputed
    exactly from differences."""
    approx = torch.addmm(sq[surv].float()[:, None] + sq[surv].float()[None], X[surv], X[surv].T, alpha=-2.0).double()
    err = gamma * (norms[surv][:, None] + norms[surv][None]) ** 2
    out = approx + err <= t2
    amb = (approx - err <= t2) & ~out
    if amb.any():
        r, c = torch.nonzero(amb, as_tuple=True)
        out[r, c] = ((X64[surv[r]] - X64[surv[c]]) ** 2).sum(1) <= t2
    return out.numpy()


# ---------------------------------------------------------------------------------------------- registry

SELECTORS: dict[str, Callable[..., Selection]] = {
    "random": select_random,
    "greedy": select_greedy,
    "threshold": select_threshold,
}


def check_method(method: str) -> None:
    if method not in SELECTORS:
        raise UserError(f"unknown selection method {method!r}; choose one of: {', '.join(SELECTORS)}")


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
    progress: Progress | None = None,
) -> Selection:
    """Choose N of the pool's rows with a registered method; with per_class, each class keeps its pool share.

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
    if not np.isfinite(x).all():
        raise UserError("selection input contains NaN or inf")
    if not per_class or labels is None:
        return SELECTORS[method](x, n, seed, tau0=tau0, decay=decay, progress=progress)
    quotas = class_quotas(labels, n)
    parts, params = [], {"per_class": True, "quotas": {int(c): int(q) for c, q in quotas.items()}}
    for c, q in quotas.items():
        if q == 0:
            continue
        where = np.flatnonzero(labels == c)
        sub = SELECTORS[method](x[where], q, seed + 7919 * (int(c) + 1), tau0=tau0, decay=decay,
                                progress=progress)
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
