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


def select_greedy(x: np.ndarray, n: int, seed: int, *, projection_dim: int = 16, **_) -> Selection:
    """Greedy farthest-point selection (Gonzalez 1985), exact, with pruning that skips most of the pool.

    Each pool point p keeps its squared distance mind[p] to the nearest selected centre and that centre a[p];
    each centre s keeps an upper bound r[s] on the distance of its points. When centre c is added, p can only get
    closer if d(c, p) < d(a[p], p); by the triangle inequality d(c, p) >= d(c, a[p]) - d(a[p], p), so every
    point of a centre s with d(c, s) >= 2 r[s] is skipped without touching it. d(c, s) itself is first bounded
    from below by the distance between projections on the pool's top principal directions (an orthogonal
    projection never lengthens a vector), so most centres are skipped from a few numbers too. Points that remain
    get exact distances; the arg-max (lowest index among ties) is taken over exact values, as in the definition.
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
    mind = _sq_to(X, None, X[start])
    mind[start] = -1.0  # selected
    assign = torch.full((m,), 0, dtype=torch.int64)  # position of the centre in `chosen`
    centres_z = torch.empty((n, q), dtype=torch.float64)
    centres_z[0] = Z[start]
    radius = torch.empty(n, dtype=torch.float64)
    radius[0] = mind.clamp_min(0).max().sqrt()
    touched = 0
    for t in range(1, n):
        c = int(torch.argmax(mind))  # first maximum: ties go to the lowest index
        chosen.append(c)
        # centres whose points might move: projected lower bound first, exact centre distance second
        lb = (centres_z[:t] - Z[c]).pow(2).sum(1).sqrt()
        maybe = torch.nonzero(lb * (1 - slack) < 2 * radius[:t]).squeeze(1)
        cand_centres = torch.tensor([], dtype=torch.int64)
        if maybe.numel():
            cent_idx = torch.as_tensor([chosen[i] for i in maybe.tolist()], dtype=torch.int64)
            dcs = _sq_to(X, cent_idx, X[c]).sqrt()
            keep = dcs * (1 - slack) < 2 * radius[maybe]
            cand_centres, dcs = maybe[keep], dcs[keep]
        mind[c] = -1.0
        assign[c] = t
        centres_z[t] = Z[c]
        radius[t] = 0.0
        if cand_centres.numel():
            dist_of_centre = torch.full((t,), math.inf, dtype=torch.float64)
            dist_of_centre[cand_centres] = dcs
            is_cand = torch.zeros(t + 1, dtype=torch.bool)
            is_cand[cand_centres] = True
            members = torch.nonzero(is_cand[assign] & (mind >= 0)).squeeze(1)
            own = mind[members].sqrt()
            # per-point bounds: triangle inequality through its centre, and the projection
            alive = dist_of_centre[assign[members]] * (1 - slack) < 2 * own
            pts = members[alive]
            if pts.numel():
                lbp = (Z[pts] - Z[c]).pow(2).sum(1).sqrt()
                pts = pts[lbp * (1 - slack) < own[alive]]
            if pts.numel():
                touched += pts.numel()
                d2 = _sq_to(X, pts, X[c])
                closer = d2 < mind[pts]
                moved = pts[closer]
                mind[moved] = d2[closer]
                assign[moved] = t
                if moved.numel():
                    radius[t] = mind[moved].max().sqrt()
            # exact radii of the candidate groups (members that did not move stay in them)
            stay = members[assign[members] != t]
            new_r = torch.zeros(t, dtype=torch.float64)
            if stay.numel():
                new_r.scatter_reduce_(0, assign[stay], mind[stay].sqrt(), reduce="amax", include_self=True)
            radius[cand_centres] = new_r[cand_centres]
    return Selection(np.asarray(chosen, dtype=np.int64), "greedy", seed,
                     {"start": start, "distances_computed": int(touched) + m})


# ---------------------------------------------------------------------------------------------- threshold


def default_tau0(x: np.ndarray) -> float:
    """tau0 default: twice the median distance of a pool point to its nearest other pool point.

    A first pass at that radius keeps only points well apart from each other; each further pass lowers tau by
    `decay` until N points are accepted, so the result starts as sparse as the pool allows.
    """
    from model_collapse.neighbours import knn

    return 2.0 * float(np.median(knn(x, None, 1).distances[:, 0]))


def _gamma32(d: int) -> float:
    nu = (d + 4) * 2.0**-24
    return 2.0 * nu / (1.0 - nu)


def select_threshold(
    x: np.ndarray, n: int, seed: int, *, tau0: float | None = None, decay: float = 0.95, chunk: int = 1024, **_
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
    if tau0 is None:
        tau0 = default_tau0(x)
    if not tau0 > 0:
        raise UserError(f"tau0 must be > 0, got {tau0}")
    order = numpy_rng(seed, "threshold-order").permutation(m)
    accepted: list[int] = []
    is_acc = np.zeros(m, dtype=bool)
    acc_buf = torch.empty((n, d), dtype=torch.float32)
    acc_sq = torch.empty(n, dtype=torch.float64)
    acc_norm = torch.empty(n, dtype=torch.float64)
    tau = float(tau0)
    passes = 0
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
            alive = torch.ones(len(idx), dtype=torch.bool)
            if k:
                approx = torch.addmm(sq[it].float()[:, None] + acc_sq[:k].float()[None], X[it], acc_buf[:k].T,
                                     alpha=-2.0).double()
                err = gamma * (norms[it][:, None] + acc_norm[:k][None]) ** 2
                surely_close = (approx + err <= t2).any(1)
                alive &= ~surely_close
                amb = (approx - err <= t2) & (approx + err > t2) & alive[:, None]
                if amb.any():
                    r, c = torch.nonzero(amb, as_tuple=True)
                    acc_idx = torch.as_tensor(accepted, dtype=torch.int64)[c]
                    exact = ((X64[it[r]] - X64[acc_idx]) ** 2).sum(1)
                    close = torch.zeros(len(idx), dtype=torch.bool)
                    close[r[exact <= t2]] = True
                    alive &= ~close
            surv = it[alive]
            if not surv.numel():
                continue
            # resolve among survivors in visiting order, on exact distances
            S = X64[surv]
            conflict = ((S[:, None, :] - S[None, :, :]) ** 2).sum(-1) <= t2 if len(surv) <= 256 else \
                _conflicts_blocked(S, t2)
            live = torch.ones(len(surv), dtype=torch.bool)
            for i in range(len(surv)):
                if not live[i]:
                    continue
                p = int(surv[i])
                acc_buf[len(accepted)] = X[p]
                acc_sq[len(accepted)] = sq[p]
                acc_norm[len(accepted)] = norms[p]
                accepted.append(p)
                is_acc[p] = True
                if len(accepted) == n:
                    break
                live &= ~conflict[i]
            if len(accepted) == n:
                break
        else:
            tau *= decay
    return Selection(np.asarray(accepted, dtype=np.int64), "threshold", seed,
                     {"tau0": float(tau0), "decay": float(decay), "tau_final": tau, "passes": passes,
                      "order": order.astype(np.int64)})


def _conflicts_blocked(S: torch.Tensor, t2: float, block: int = 256) -> torch.Tensor:
    out = torch.empty((len(S), len(S)), dtype=torch.bool)
    for a in range(0, len(S), block):
        out[a : a + block] = ((S[a : a + block, None, :] - S[None, :, :]) ** 2).sum(-1) <= t2
    return out


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
        return SELECTORS[method](x, n, seed, tau0=tau0, decay=decay)
    quotas = class_quotas(labels, n)
    parts, params = [], {"per_class": True, "quotas": {int(c): int(q) for c, q in quotas.items()}}
    for c, q in quotas.items():
        if q == 0:
            continue
        where = np.flatnonzero(labels == c)
        sub = SELECTORS[method](x[where], q, seed + 7919 * (int(c) + 1), tau0=tau0, decay=decay)
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
