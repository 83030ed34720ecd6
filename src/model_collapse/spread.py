"""The spread-maximising selectors: random, greedy farthest-point, threshold decay (`selection` is the entry).

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
from model_collapse.linalg import principal_directions
from model_collapse.neighbours import knn, rounding_gamma
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


def _sq_to(x: np.ndarray, rows: np.ndarray | None, c: int, chunk: int = 8192) -> np.ndarray:
    """Exact float64 squared distances, from differences, of some pool rows (all when rows is None) to row c."""
    centre = x[c].astype(np.float64)
    if rows is None:
        return np.concatenate([_sq_to(x, np.arange(a, min(a + chunk, len(x))), c) for a in range(0, len(x), chunk)])
    diff = x.take(rows, axis=0).astype(np.float64) - centre
    return np.einsum("ij,ij->i", diff, diff)


def select_greedy(x: np.ndarray, n: int, seed: int, *, projection_dim: int = 16,
                  progress: Progress | None = None, **_) -> Selection:
    """Greedy farthest-point selection (Gonzalez 1985), exact, with pruning that skips most of the pool.

    Every pool point p keeps its distance own[p] to the nearest selected centre a[p]; the points sharing a
    centre form its cluster. Distances between projections on the pool's top principal directions (written
    z(.,.)) bound true distances from below: an orthogonal projection never lengthens a vector. When centre c
    is added, p can only get closer if d(c, p) < own[p], and d(c, p) >= z(c, p) >= z(c, a[p]) - z(p, a[p]) by
    the triangle inequality. So with each point's zown[p] = z(p, a[p]) and each cluster's reach, the largest
    own + zown in it, a cluster needs opening only when z(c, centre) < reach: one small product with the
    centres' projections per step picks those few. Inside them a point is tested only when z(c, a[p]) <
    own[p] + zown[p], then against z(c, p) < own[p], and only the points that remain get exact float64
    distances. The arg-max (lowest index among ties) is taken over exact values, from each cluster's exact
    maximum, as in the definition. Every bound is made conservative for rounding.

    Where the bounds prune little (data of high intrinsic dimension), a step may reach most of the pool: then the
    pool is taken whole instead of cluster by cluster, and the many remaining points are first compared through
    one matrix-vector product in the input's precision with a rigorous rounding bound, so that only points that
    may move get exact distances.
    """
    m = len(x)
    X = np.ascontiguousarray(x)
    if X.dtype.kind != "f" or X.itemsize < 4:
        X = X.astype(np.float64 if X.dtype.kind != "f" else np.float32)  # half floats are exact in float32
    if not np.isfinite(X).all():
        raise UserError("selection input contains NaN or inf")
    Z, zslack = _projection(X, seed, int(min(projection_dim, X.shape[1], m)))
    rel = 1.0 - 1e-9  # lower bounds are shrunk by this factor and by zslack (rounding of the projection)

    start = greedy_start(m, seed)
    chosen = np.empty(n, dtype=np.int64)
    chosen[0] = start
    mind = _sq_to(X, None, start)  # squared distance to the nearest chosen centre; -1 once chosen
    mind[start] = -1.0
    own = np.sqrt(np.maximum(mind, 0.0))  # that distance (0 for chosen points)
    assign = np.zeros(m, dtype=np.int64)  # position in `chosen` of that centre
    zsq = np.einsum("ij,ij->i", Z, Z)
    zown = _zdist(Z, zsq, np.arange(m), start, zslack)[1]  # z(p, a[p]), rounded up
    members = [np.delete(np.arange(m), start)]  # each centre's cluster (unchosen points only)
    counts = np.zeros(n, dtype=np.int64)  # their sizes
    counts[0] = m - 1
    gram = _GramBound(X)
    reach = np.zeros(n)  # largest own + zown in the cluster
    cmax = np.full(n, -1.0)  # largest mind in the cluster, and its lowest-index point
    carg = np.zeros(n, dtype=np.int64)
    reach[0], cmax[0] = (own + zown).max(), mind.max()
    carg[0] = int(np.argmax(mind))
    cz = np.empty((n, Z.shape[1]))  # centres' projections and their squared norms
    csq = np.empty(n)
    cz[0], csq[0] = Z[start], zsq[start]
    touched = m
    progress = or_silent(progress)
    progress.start(f"greedy selection, {n} of {m}", n)
    for t in range(1, n):
        if t % 256 == 0:
            progress.advance(256)
        top = np.flatnonzero(cmax[:t] == cmax[:t].max())
        c = int(carg[top].min())  # the first maximum of mind over the whole pool
        chosen[t] = c
        home = int(assign[c])
        mind[c], own[c], assign[c] = -1.0, 0.0, t
        zc = Z[c]
        # projected centre distances from the Gram identity, less a bound on its rounding
        g = csq[:t] + zsq[c] - 2.0 * (cz[:t] @ zc) - 1e-12 * (csq[:t] + zsq[c])
        lb = (np.sqrt(np.maximum(g, 0.0)) - zslack) * rel
        cz[t], csq[t] = zc, zsq[c]
        opened = lb < reach[:t]
        opened[home] = True  # c leaves its cluster
        J = np.flatnonzero(opened)
        if 2 * counts[J].sum() > m - t:  # most of the pool: take it whole
            P = np.flatnonzero(mind >= 0)
            lbp = lb.take(assign.take(P))
        else:
            P = np.concatenate([members[j] for j in J])
            lbp = np.repeat(lb[J], counts[J])
        T = P[lbp < own.take(P) + zown.take(P)]
        zlo, zt = _zdist(Z, zsq, T, c, zslack)  # z(c, p) rounded down (bounds d(c, p)) and up (for zown)
        keep = zlo * rel < own.take(T)
        T, zt = T[keep], zt[keep]
        moved, d2 = T[:0], np.empty(0)
        if T.size > 64:  # many: rule out most by a product with a rounding bound
            keep = gram.may_be_below(T, c, mind.take(T))
            T, zt = T[keep], zt[keep]
        if T.size:
            touched += T.size
            d2 = _sq_to(X, T, c)
            closer = d2 < mind.take(T)
            moved, d2, zt = T[closer], d2[closer], zt[closer]
        # the clusters that lost points (or c) keep the rest; the moved points form the new cluster t
        changed = np.unique(np.append(assign.take(moved), home))
        mind[moved], own[moved], assign[moved], zown[moved] = d2, np.sqrt(d2), t, zt
        for j in changed:
            members[j] = members[j][assign[members[j]] == j]
            counts[j] = len(members[j])
        members.append(moved)
        counts[t] = moved.size
        _cluster_stats(np.append(changed, t), [members[j] for j in changed] + [moved], own, zown, mind, reach,
                       cmax, carg)
    progress.advance(n - (n - 1) // 256 * 256)  # picks 0..255 were reported at t = 256, and so on
    progress.close()
    return Selection(chosen, "greedy", seed, {"start": start, "distances_computed": int(touched)})


class _GramBound:
    """Squared distances from one pool row to many through |x|^2 + |c|^2 - 2 x.c in the input's precision, with a
    rigorous bound on their rounding (gamma_(d+4) (|x| + |c|)^2, as in the kNN kernel)."""

    def __init__(self, X: np.ndarray):
        self.X = X
        self.sq = np.einsum("ij,ij->i", X, X)  # working precision, as the product
        self.norm = np.sqrt(np.einsum("ij,ij->i", X, X, dtype=np.float64)) * 1.001
        self.gamma = rounding_gamma(X.shape[1] + 4, X.dtype)

    def may_be_below(self, rows: np.ndarray, c: int, limit: np.ndarray) -> np.ndarray:
        """For each row: can its exact squared distance to row c be below `limit`?"""
        X = self.X
        dots = (X @ X[c])[rows] if 4 * rows.size > len(X) else X.take(rows, axis=0) @ X[c]
        approx = (self.sq.take(rows) + self.sq[c] - 2 * dots).astype(np.float64)
        err = self.gamma * (self.norm.take(rows) + self.norm[c]) ** 2
        return approx - err < limit


def _cluster_stats(J, parts, own, zown, mind, reach, cmax, carg):
    """Reach (largest own + zown), largest mind and its lowest-index point of clusters J from their points
    (`parts`, one array per cluster); an empty cluster gets reach 0 and -1."""
    k = len(J)
    P = np.concatenate(parts)
    seg = np.repeat(np.arange(k), [len(p) for p in parts])
    r, v, a = np.zeros(k), np.full(k, -1.0), np.full(k, np.iinfo(np.int64).max)
    np.maximum.at(r, seg, own[P] + zown[P])
    np.maximum.at(v, seg, mind[P])
    top = mind[P] == v[seg]
    np.minimum.at(a, seg[top], P[top])
    reach[J], cmax[J], carg[J] = r, v, a


def _zdist(Z: np.ndarray, zsq: np.ndarray, rows: np.ndarray, c: int, zslack: float):
    """Distances between the projections of some rows and of row c, from the Gram identity: a value at most
    and one at least the true projected distance (the identity's rounding and the projection's allowed for)."""
    g = zsq.take(rows) + zsq[c] - 2.0 * (Z.take(rows, axis=0) @ Z[c])
    e = 1e-12 * (zsq.take(rows) + zsq[c])
    return np.sqrt(np.maximum(g - e, 0.0)) - zslack, np.sqrt(g + e) * (1 + 1e-9) + zslack


def _projection(X: np.ndarray, seed: int, q: int) -> tuple[np.ndarray, float]:
    """The pool projected on its top q principal directions (`linalg.principal_directions`, seeded), in float64,
    and an absolute allowance for the rounding of those projections (far above it: 1e-10 of the largest norm).
    Any orthonormal directions keep the bounds valid; good ones only make them tighter."""
    mean, P = principal_directions(X, q, seed, "greedy-pca")
    Z = np.empty((len(X), q))
    scale = 0.0
    for a in range(0, len(X), 8192):
        xc = X[a : a + 8192].astype(np.float64) - mean
        Z[a : a + 8192] = xc @ P
        scale = max(scale, float(np.sqrt(np.einsum("ij,ij->i", xc, xc).max())))
    return Z, 1e-10 * scale


# ---------------------------------------------------------------------------------------------- threshold


def default_tau0(x: np.ndarray, seed: int = 0, sample: int = 2048, progress: Progress | None = None) -> float:
    """tau0 default: twice the median distance of a pool point to its nearest other pool point, the median taken
    over a seeded sample of (at most) 2,048 pool points, each with its exact nearest neighbour in the whole pool.

    A first pass at that radius keeps only points well apart from each other; each further pass lowers tau by
    `decay` until N points are accepted, so the result starts as sparse as the pool allows.
    """
    if len(x) <= sample:
        return 2.0 * float(np.median(knn(x, None, 1, progress=progress).distances[:, 0]))
    pick = np.sort(numpy_rng(seed, "tau0-sample").choice(len(x), sample, replace=False))
    # a pool point's first neighbour in the pool is itself, at distance 0
    d = knn(x[pick], x, 2, progress=progress).distances
    return 2.0 * float(np.median(d[:, 1]))


def select_threshold(
    x: np.ndarray, n: int, seed: int, *, tau0: float | None = None, decay: float = 0.95, chunk: int = 1024,
    decay_when: str = "every_pass", progress: Progress | None = None, **_
) -> Selection:
    """Threshold decay filter, batched: exactly the sequential definition, a chunk of the visiting order at a time.

    `decay_when`: "every_pass" multiplies tau by `decay` after every full pass (the authors' released code);
    "empty_pass" only after a pass that accepted nothing (the paper's Algorithm 2). Both choose the same points:
    a point rejected in a pass lies within tau of a point accepted by then, the accepted set only grows, so a
    second pass at the same tau accepts nothing and then decays. Only the number of passes differs.

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
    gamma = rounding_gamma(d + 4, np.float32)
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
    if decay_when not in ("every_pass", "empty_pass"):
        raise UserError(f"decay_when must be every_pass or empty_pass, got {decay_when!r}")
    tau = float(tau0)
    passes = 0
    progress.start(f"threshold selection, {n} of {m}", n)
    while len(accepted) < n:
        passes += 1
        at_start = len(accepted)
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
            if decay_when == "every_pass" or len(accepted) == at_start:
                tau *= decay
    progress.close()
    return Selection(np.asarray(accepted, dtype=np.int64), "threshold", seed,
                     {"tau0": float(tau0), "decay": float(decay), "decay_when": decay_when, "tau_final": tau,
                      "passes": passes,
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
