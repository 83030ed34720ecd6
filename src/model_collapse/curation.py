"""Selectors that aim at high entropy *on* the data manifold: they take a reference set of what good data look
like and keep the spread of farthest-point selection without its pull towards off-manifold outliers.

Farthest-point selection maximises spread, and the points farthest from everything are often the ones no real
image resembles (blurred, noisy or broken samples). Both methods here measure candidates against a reference
set: in the loop, the real training set of iteration 0 (in replace it only judges candidates, it never enters a
training set); in `select`, any `--reference`.

* `gated`: the realism gate of improved precision (Kynkaanniemi et al. 2019), then farthest-point. A candidate
  passes when it lies within the k-NN radius (k = 5) of some reference point, that is inside the reference's k-NN
  manifold; greedy farthest-point selection then runs on the candidates that pass. When fewer than N pass, all of
  them are taken (in farthest-point order), then the candidates nearest to the reference.
* `herding`: kernel herding (Chen, Welling and Smola 2010) towards the reference: pick by pick, the candidate
  maximising mu(x) - (1 / (t + 1)) sum_{s chosen} k(x, s), where mu(x) is the mean kernel value to the reference
  and k a Gaussian kernel with the median inter-point distance of the reference as bandwidth. It greedily
  minimises the MMD between the chosen set and the reference; the second term repels each pick from the earlier
  ones, so the choice spreads over the reference's support instead of piling up on its densest mode.
* `capped`: spread up to the reference's spacing, not beyond, then density. Farthest-point picks are kept while
  each pick lies at least the reference's typical spacing (the median distance of a reference point to its
  nearest other reference point) from the picks before it; the rest of the N are drawn uniformly (seeded) from the
  remaining candidates, that is from the model's own density. Greedy keeps spreading below the real data's
  spacing once the pool has contracted; the cap stops it there. Its first picks, outliers included, are greedy's:
  it does not gate, and on a pool as spread as the reference it is greedy.

All three are exact against their straightforward definitions (tests): the gate decides membership on exact
distances near each radius; capped cuts greedy's order on exact float64 distances; herding takes the arg-max over float64 scores, scores within 1e-9 of the best
counting as ties, which go to the lowest pool index.
"""

from __future__ import annotations

import numpy as np
import torch

from model_collapse.errors import UserError
from model_collapse.farthest import exact_sq
from model_collapse.metrics import DistanceTile
from model_collapse.neighbours import knn, rounding_gamma
from model_collapse.progress import Progress, or_silent
from model_collapse.rng import numpy_rng
from model_collapse.spread import Selection, select_greedy

REALISM_K = 5  # the reference's k-NN manifold, as in improved precision/recall
TIE = 1e-9  # herding scores (kernel values lie in [0, 1]) closer than this to the best count as ties
BANDWIDTH_SAMPLE = 1000


def _reference(reference: np.ndarray | None, x: np.ndarray, method: str) -> np.ndarray:
    if reference is None:
        raise UserError(f"the {method} selector needs a reference set (select --reference, or the loop's)")
    ref = np.asarray(reference, np.float64)
    if ref.ndim != 2 or ref.shape[1] != x.shape[1]:
        raise UserError(f"{method}: reference vectors {ref.shape} do not match the pool's dimension {x.shape[1]}")
    if len(ref) <= REALISM_K and method == "gated":
        raise UserError(f"gated: the reference needs more than {REALISM_K} points, has {len(ref)}")
    if len(ref) < 2:
        raise UserError(f"{method}: the reference needs at least 2 points, has {len(ref)}")
    if not np.isfinite(ref).all():
        raise UserError(f"{method}: the reference contains NaN or inf")
    return ref


def inside_manifold(x: np.ndarray, reference: np.ndarray, k: int = REALISM_K, block: int = 1024) -> np.ndarray:
    """For each row of x: is it within the k-th nearest-neighbour distance of some reference point of that
    point (improved precision's test), decided on exact distances near each radius."""
    ref = np.asarray(reference, np.float64)
    radii = knn(ref, None, k).distances[:, k - 1]
    gamma = rounding_gamma(ref.shape[1] + 4, np.float64)
    inside = np.zeros(len(x), bool)
    for a in range(0, len(x), block):
        f = np.asarray(x[a : a + block], np.float64)
        for b in range(0, len(ref), block):
            tile = DistanceTile(f, ref[b : b + block], gamma)
            inside[a : a + block] |= tile.within(radii[None, b : b + block]).any(1)
    return inside


def select_gated(x: np.ndarray, n: int, seed: int, *, reference: np.ndarray | None = None,
                 progress: Progress | None = None, **_) -> Selection:
    """Realism-gated farthest-point selection (see the module docstring). Reference: realistic examples.
    Cost: one kNN of the reference (n_ref^2 d), the pool against the reference (M n_ref d, in float64 tiles),
    then farthest-point selection on the candidates that pass."""
    ref = _reference(reference, x, "gated")
    inside = inside_manifold(x, ref)
    ins = np.flatnonzero(inside)
    params = {"inside": int(len(ins)), "k": REALISM_K}
    if len(ins) >= n:
        return Selection(ins[select_greedy(x[ins], n, seed, progress=progress).indices], "gated", seed, params)
    order = ins[select_greedy(x[ins], len(ins), seed).indices] if len(ins) > 1 else ins
    out = np.flatnonzero(~inside)
    near = knn(np.asarray(x[out]), ref, 1).distances[:, 0]
    fill = out[np.lexsort((out, near))][: n - len(ins)]  # nearest the reference first, ties to the lower index
    return Selection(np.concatenate([order, fill]).astype(np.int64), "gated", seed, params)


def bandwidth(reference: np.ndarray, seed: int) -> float:
    """The median distance between two points of (a seeded sample of at most 1,000 of) the reference."""
    ref = np.asarray(reference, np.float64)
    if len(ref) > BANDWIDTH_SAMPLE:
        ref = ref[np.sort(numpy_rng(seed, "herding-bandwidth").choice(len(ref), BANDWIDTH_SAMPLE, replace=False))]
    i, j = np.triu_indices(len(ref), 1)
    d = np.sqrt(((ref[i] - ref[j]) ** 2).sum(1))
    h = float(np.median(d))
    return h if h > 0 else 1.0


def _kernel_sums(x: np.ndarray, y: np.ndarray, h: float, block: int = 2048) -> np.ndarray:
    """sum_j exp(-|x_i - y_j|^2 / (2 h^2)) for every row of x, float64, in tiles."""
    X, Y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    xs, ys = (X * X).sum(1), (Y * Y).sum(1)
    out = torch.zeros(len(X), dtype=torch.float64)
    for b in range(0, len(Y), block):
        d2 = (xs[:, None] + ys[None, b : b + block] - 2.0 * X @ Y[b : b + block].T).clamp_(min=0.0)
        out += torch.exp(d2 / (-2.0 * h * h)).sum(1)
    return out.numpy()


def select_herding(x: np.ndarray, n: int, seed: int, *, reference: np.ndarray | None = None,
                   progress: Progress | None = None, **_) -> Selection:
    """Kernel herding towards the reference (see the module docstring). Reference: samples of the distribution
    to match. Cost: the pool against the reference once (M n_ref d, float64 tiles), then one float64
    matrix-vector product of the pool with each pick (M d per pick, memory-bound: about 16 ms per pick at
    65,536 x 384, so 16,384 picks take minutes). Nothing cheaper is exact here: the kernel is broad (median
    bandwidth), so every candidate's score moves at every pick, and the scores lie so close together that no
    candidate can be ruled out of the next pick without its exact kernel sum (measured in benchmarks/RESULTS.md:
    bounds, speculative blocks of rows and shortlist simulations were all slower than this loop)."""
    ref = _reference(reference, x, "herding")
    X = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    m = len(X)
    h = bandwidth(ref, seed)
    mu = torch.as_tensor(_kernel_sums(X.numpy(), ref, h) / len(ref))
    sq = (X * X).sum(1)
    ksum = torch.zeros(m, dtype=torch.float64)  # kernel sums to the picks so far
    taken = torch.zeros(m, dtype=torch.bool)
    chosen = np.empty(n, dtype=np.int64)
    progress = or_silent(progress)
    progress.start(f"herding selection, {n} of {m}", n)
    for t in range(n):
        score = mu - ksum / (t + 1)
        score[taken] = -np.inf
        best = float(score.max())
        c = int(torch.nonzero(score >= best - TIE)[0, 0])  # ties to the lowest index
        chosen[t] = c
        taken[c] = True
        d2 = (sq + sq[c] - 2.0 * (X @ X[c])).clamp_(min=0.0)
        ksum += torch.exp(d2 / (-2.0 * h * h))
        progress.advance(1)
    progress.close()
    return Selection(chosen, "herding", seed, {"bandwidth": h})


SPACING_CANDIDATES = 8  # nearest neighbours whose distances are summed again in the definition's order


def spacing(reference: np.ndarray) -> float:
    """The reference's typical spacing: the median distance of a reference point to its nearest other one, each
    distance summed as `exact_sq` sums it (the order greedy's pick values are summed in, so a pair of points in
    both sets compares equal to itself). The nearest is taken among the kNN kernel's 8 nearest, whose own sums may
    differ from these in the last bit."""
    ref = np.ascontiguousarray(reference, np.float64)
    k = min(SPACING_CANDIDATES, len(ref) - 1)
    idx = knn(ref, None, k).indices
    rows = np.repeat(np.arange(len(ref)), k)
    d2 = exact_sq(ref, rows, idx.reshape(-1)).reshape(len(ref), k)
    return float(np.median(np.sqrt(d2.min(1))))


def pick_values(x: np.ndarray, order: np.ndarray, t: int, chunk: int = 4096) -> float:
    """The exact distance (float64 differences) of the t-th pick of a selection order to the picks before it."""
    best = np.inf
    for a in range(0, t, chunk):
        b = min(t, a + chunk)
        best = min(best, float(exact_sq(x, np.full(b - a, order[t]), order[a:b]).min()))
    return float(np.sqrt(best))


def select_capped(x: np.ndarray, n: int, seed: int, *, reference: np.ndarray | None = None,
                  progress: Progress | None = None, **_) -> Selection:
    """Farthest-point selection capped at the reference's spacing, then a uniform fill (see the module docstring).
    Reference: a set whose spacing the training set should reach, not exceed (in the loop the real training set,
    the same size as a training set). Cost: one kNN of the reference (n_ref^2 d), greedy's selection of N, then a
    binary search for the cut over greedy's order (O(N d log N): farthest-point values only fall)."""
    ref = _reference(reference, x, "capped")
    s = spacing(ref)
    order = select_greedy(x, n, seed, progress=progress).indices
    X = np.asarray(x)
    lo, hi = 1, n  # picks before lo are kept (the first has no predecessor); the cut lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if pick_values(X, order, mid) >= s:
            lo = mid + 1
        else:
            hi = mid
    kept = order[:lo]
    rest = np.setdiff1d(np.arange(len(X)), kept)  # ascending
    fill = rest[numpy_rng(seed, "capped-fill").permutation(len(rest))[: n - lo]]
    return Selection(np.concatenate([kept, fill]).astype(np.int64), "capped", seed,
                     {"spacing": s, "spread_picks": int(lo)})
