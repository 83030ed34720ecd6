"""The one exact k-nearest-neighbour kernel that every metric and selector shares.

Distances are Euclidean. The kernel computes squared distances tile by tile with the matrix-product identity
|x - y|^2 = |x|^2 + |y|^2 - 2 x.y (float32 by default: the fast path on CPUs and GPUs), keeps the `k + extra`
best candidates of every query, then makes the answer exact:

* the candidates' distances are recomputed in float64 from differences, sum((x - y)^2), and sorted by
  (distance, index), so ties go to the lowest reference index;
* a rigorous bound on the identity's rounding error, gamma_(d+4) * (|x| + |y|)^2 with gamma_n = n u / (1 - n u)
  (Higham, Accuracy and Stability of Numerical Algorithms, 3.1), certifies that no reference outside the
  candidates can be closer than the k-th: the k-th exact distance must lie below the largest candidate's
  approximate distance minus the bound. Queries that fail the test (near-duplicates, many ties) are redone with
  more candidates, and finally by an exact float64 scan.

Both sets are centred on the reference mean first: distances do not change, norms (and so the error bound)
shrink. Memory is bounded by the tile size: no n x n matrix is ever built. For a set against itself
(`refs=None`) only the upper triangle of tiles is computed, each tile updating both its rows and its columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_TILE = 2048
DEFAULT_EXTRA = 4


@dataclass(frozen=True)
class KnnResult:
    distances: np.ndarray  # float64 (n, k), ascending per row
    indices: np.ndarray  # int64 (n, k)
    rechecked: int = 0  # queries whose first candidate set could not be certified


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _unit_roundoff(dtype: torch.dtype) -> float:
    return {torch.float32: 2.0**-24, torch.float64: 2.0**-53}[dtype]


def _gamma(n: int, dtype: torch.dtype) -> float:
    nu = n * _unit_roundoff(dtype)
    return 2.0 * nu / (1.0 - nu)  # a factor 2 of slack over the textbook bound


def _as_tensor(x, device, dtype) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 2:
        raise ValueError(f"expected a 2-D array of vectors, got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=dtype)


def exact_sq_dists(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared distances between rows x[i] and y[i] (paired), float64 from differences."""
    return ((x.double() - y.double()) ** 2).sum(-1)


def _merge(best_v, best_i, v, i, m):
    """Keep the m smallest of the running best and a new tile (i: the tile's column indices, shape (1, c))."""
    vals = torch.cat([best_v, v], dim=1)
    idx = torch.cat([best_i, i.expand(v.shape[0], -1)], dim=1)
    top_v, pos = torch.topk(vals, m, dim=1, largest=False, sorted=False)
    return top_v, torch.gather(idx, 1, pos)


def _approx_candidates(xq, yr, xn, yn, m, tile, symmetric: bool):
    """Top-m (approximate, unsorted) squared distances and indices of every row of xq among rows of yr.

    symmetric: xq is yr itself; only tiles on and above the diagonal are computed, and a row never
    counts itself.
    """
    nq, nr = xq.shape[0], yr.shape[0]
    dev = xq.device
    best_v = torch.full((nq, m), math.inf, device=dev, dtype=xq.dtype)
    best_i = torch.full((nq, m), -1, device=dev, dtype=torch.int64)
    if symmetric:
        for a in range(0, nq, tile):
            qa = xq[a : a + tile]
            for b in range(a, nr, tile):
                rb = yr[b : b + tile]
                d = torch.addmm(xn[a : a + tile, None] + yn[None, b : b + tile], qa, rb.T, alpha=-2.0)
                cols = torch.arange(b, b + rb.shape[0], device=dev)[None]
                if a == b:
                    d.fill_diagonal_(math.inf)
                v, i = _merge(best_v[a : a + tile], best_i[a : a + tile], d, cols, m)
                best_v[a : a + tile], best_i[a : a + tile] = v, i
                if b != a:
                    rows = torch.arange(a, a + qa.shape[0], device=dev)[None]
                    v, i = _merge(best_v[b : b + tile], best_i[b : b + tile], d.T, rows, m)
                    best_v[b : b + tile], best_i[b : b + tile] = v, i
        return best_v, best_i
    for a in range(0, nq, tile):
        qa = xq[a : a + tile]
        for b in range(0, nr, tile):
            rb = yr[b : b + tile]
            d = torch.addmm(xn[a : a + tile, None] + yn[None, b : b + tile], qa, rb.T, alpha=-2.0)
            cols = torch.arange(b, b + rb.shape[0], device=dev)[None]
            v, i = _merge(best_v[a : a + tile], best_i[a : a + tile], d, cols, m)
            best_v[a : a + tile], best_i[a : a + tile] = v, i
    return best_v, best_i


def _exact_rows(xq, yr, idx, chunk_elems=1 << 24):
    """Exact float64 squared distances of each query to its candidate references idx (n, m)."""
    n, m = idx.shape
    out = torch.empty((n, m), dtype=torch.float64, device=xq.device)
    step = max(1, chunk_elems // max(1, m * xq.shape[1]))
    for a in range(0, n, step):
        ii = idx[a : a + step]
        safe = ii.clamp_min(0)
        d = ((yr[safe].double() - xq[a : a + step, None].double()) ** 2).sum(-1)
        out[a : a + step] = torch.where(ii >= 0, d, torch.full_like(d, math.inf))
    return out


def _sort_exact(dist, idx):
    """Sort candidates by (distance, index): stable sort by index first, then by distance."""
    o = torch.argsort(idx, dim=1, stable=True)
    idx, dist = torch.gather(idx, 1, o), torch.gather(dist, 1, o)
    o = torch.argsort(dist, dim=1, stable=True)
    return torch.gather(dist, 1, o), torch.gather(idx, 1, o)


def _full_exact(xq_rows, yr, k, self_rows, chunk=4096):
    """Exact float64 scan of some queries against every reference: the last resort, O(n_ref * d) per query."""
    n = xq_rows.shape[0]
    dist = torch.empty((n, k), dtype=torch.float64, device=yr.device)
    idx = torch.empty((n, k), dtype=torch.int64, device=yr.device)
    for j in range(n):
        q = xq_rows[j].double()
        parts = [((yr[b : b + chunk].double() - q) ** 2).sum(-1) for b in range(0, yr.shape[0], chunk)]
        d = torch.cat(parts)
        if self_rows is not None:
            d[self_rows[j]] = math.inf
        # lexicographic (distance, index): a stable sort on distance keeps index order among ties
        o = torch.argsort(d, stable=True)[:k]
        dist[j], idx[j] = d[o], o
    return dist, idx


def knn(
    queries,
    refs=None,
    k: int = 1,
    *,
    precision: str = "float32",
    tile: int = DEFAULT_TILE,
    extra: int = DEFAULT_EXTRA,
    device: str | torch.device | None = None,
) -> KnnResult:
    """Exact k nearest neighbours of every query row among the reference rows (Euclidean).

    With refs=None, the neighbours of each row among the *other* rows of the same set. Returns distances
    (float64, ascending) and reference indices; among equal distances the lower index comes first.
    """
    if precision not in ("float32", "float64"):
        raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")
    dev = torch.device(device) if device is not None else default_device()
    dtype = torch.float32 if precision == "float32" else torch.float64
    symmetric = refs is None
    x64 = _as_tensor(queries, dev, torch.float64)
    y64 = x64 if symmetric else _as_tensor(refs, dev, torch.float64)
    if not symmetric and x64.shape[1] != y64.shape[1]:
        raise ValueError(f"queries have dimension {x64.shape[1]}, references {y64.shape[1]}")
    n, d = x64.shape
    n_ref = y64.shape[0] - (1 if symmetric else 0)
    if k < 1 or k > n_ref:
        raise ValueError(f"k = {k} needs at least {k} reference points, have {n_ref}")
    if n == 0:
        return KnnResult(np.zeros((0, k)), np.zeros((0, k), dtype=np.int64))
    centre = y64.mean(0, keepdim=True)
    xc64 = x64 - centre
    yc64 = xc64 if symmetric else y64 - centre
    xq, yr = xc64.to(dtype), yc64.to(dtype)
    xn, yn = (xc64**2).sum(1), (yc64**2).sum(1)
    gamma = _gamma(d + 4, dtype)
    ymax = float(yn.max().sqrt())
    err = gamma * (xn.sqrt() + ymax) ** 2  # bound on |approx - exact| for every pair of this query

    out_d = torch.empty((n, k), dtype=torch.float64, device=dev)
    out_i = torch.empty((n, k), dtype=torch.int64, device=dev)
    xq_n, yr_n = xn.to(dtype), yn.to(dtype)
    todo = torch.arange(n, device=dev)
    m = min(k + extra, n_ref)
    rechecked = 0
    while todo.numel():
        if symmetric and todo.numel() == n:
            av, ai = _approx_candidates(xq, yr, xq_n, yr_n, m, tile, symmetric=True)
        elif symmetric:
            av, ai = _approx_candidates_rows(xq[todo], yr, xq_n[todo], yr_n, m, tile, todo)
        else:
            av, ai = _approx_candidates(xq[todo], yr, xq_n[todo], yr_n, m, tile, symmetric=False)
        ex, ei = _sort_exact(_exact_rows(xc64[todo], yc64, ai), ai)
        if m >= n_ref:  # every reference is a candidate: nothing left to certify
            ok = torch.ones(todo.numel(), dtype=torch.bool, device=dev)
        else:
            ok = ex[:, k - 1] < av.double().max(dim=1).values - err[todo]
        out_d[todo[ok]], out_i[todo[ok]] = ex[ok, :k], ei[ok, :k]
        if rechecked == 0:
            rechecked = int((~ok).sum())
        todo = todo[~ok]
        if todo.numel() and m >= 256:
            fd, fi = _full_exact(xc64[todo], yc64, k, todo if symmetric else None)
            out_d[todo], out_i[todo] = fd, fi
            break
        m = min(m * 4, n_ref)
    return KnnResult(out_d.clamp_min(0).sqrt().cpu().numpy(), out_i.cpu().numpy(), rechecked)


def _approx_candidates_rows(sub, yr, subn, yn, m, tile, rows):
    """Top-m candidates of some rows of a set among the whole set, excluding each row itself."""
    nq = sub.shape[0]
    dev = sub.device
    best_v = torch.full((nq, m), math.inf, device=dev, dtype=sub.dtype)
    best_i = torch.full((nq, m), -1, device=dev, dtype=torch.int64)
    for a in range(0, nq, tile):
        qa = sub[a : a + tile]
        ra = rows[a : a + tile]
        for b in range(0, yr.shape[0], tile):
            rb = yr[b : b + tile]
            d = torch.addmm(subn[a : a + tile, None] + yn[None, b : b + tile], qa, rb.T, alpha=-2.0)
            hit = (ra >= b) & (ra < b + rb.shape[0])
            if hit.any():
                r = torch.nonzero(hit).squeeze(1)
                d[r, ra[r] - b] = math.inf
            cols = torch.arange(b, b + rb.shape[0], device=dev)[None]
            v, i = _merge(best_v[a : a + tile], best_i[a : a + tile], d, cols, m)
            best_v[a : a + tile], best_i[a : a + tile] = v, i
    return best_v, best_i


def pairwise_sq_dists_exact(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Exact float64 squared distances, for small sets (selection bookkeeping and tests)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
