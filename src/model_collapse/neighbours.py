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

The approximate pass centres both sets on the reference mean: distances do not change, norms (and so the error
bound) shrink. Exact distances always come from the inputs as given, so equal distances stay exactly equal.
Memory is bounded by the tile size: no n x n matrix is ever built. For a set against itself (`refs=None`) only
the upper triangle of tiles is computed, each tile updating both its rows and its columns, and of a diagonal
tile only the sub-blocks on and above its diagonal.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from model_collapse.progress import NO_PROGRESS, Progress, or_silent
from model_collapse.registry import resolve_device

DEFAULT_TILE = 2048
DEFAULT_EXTRA = 4
INT8_DIMS = 2**31 // 2**14 - 1  # 8-bit pixels of up to this many values: int8 products sum exactly in int32


@dataclass(frozen=True)
class KnnResult:
    distances: np.ndarray  # float64 (n, k), ascending per row
    indices: np.ndarray  # int64 (n, k)
    rechecked: int = 0  # queries whose first candidate set could not be certified


def rounding_gamma(n: int, dtype) -> float:
    """gamma_n = n u / (1 - n u) (Higham 3.1) with a factor 2 of slack, u the unit roundoff of a float32 or float64
    dtype (torch or numpy): the relative error bound of a sum of n products in that precision. Every
    approximate-then-exact decision in this package (kNN, selection, precision/recall) bounds its products with
    gamma_(d+4) (|x| + |y|)^2."""
    bits = torch.finfo(dtype).bits if isinstance(dtype, torch.dtype) else np.finfo(dtype).bits
    nu = n * {32: 2.0**-24, 64: 2.0**-53}[bits]
    return 2.0 * nu / (1.0 - nu)


def _as_tensor(x, device) -> torch.Tensor:
    """The input as a float tensor without a copy where it already is one (float32 or float64)."""
    t = torch.as_tensor(x)
    if t.ndim != 2:
        raise ValueError(f"expected a 2-D array of vectors, got shape {tuple(t.shape)}")
    if not t.is_floating_point() or t.dtype in (torch.float16, torch.bfloat16):
        t = t.to(torch.float32)  # integers up to 2^24 and half floats are exact in float32
    return t.to(device)


CENTRED_COPY_BYTES = 1 << 29  # centre into one copy up to 512 MiB; larger sets are centred tile by tile


class _Centred:
    """A set centred on a fixed point, in the working precision: one copy when small, else tile by tile. The centre
    is subtracted in the more precise of the input's and the working precision (in float64 where a `scale`, a power
    of two, brings extreme ranges into the working precision's) and rounded once to the working precision, so the
    rounding is relative to the centred values, which the bound assumes."""

    def __init__(self, x: torch.Tensor, centre: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
        self.x, self.dtype, self.scale = x, dtype, scale
        # subtract in the more precise of the input's and the working precision (float32 values are exact in float64)
        self.sub = torch.float64 if torch.float64 in (x.dtype, dtype) or scale != 1.0 else torch.float32
        self.centre = centre.to(self.sub)
        itemsize = torch.finfo(dtype).bits // 8
        self.copy = None
        if x.numel() * itemsize <= CENTRED_COPY_BYTES:
            copy = torch.empty(x.shape, dtype=dtype, device=x.device)
            for a in range(0, x.shape[0], 8192):  # a chunk at a time: no whole-set temporary
                copy[a : a + 8192] = self._centred(x[a : a + 8192])
            self.copy = copy
        # squared norms for the identity (working precision) and, widened by a relative 1e-3, for the error bound
        self.sq = torch.cat([(t * t).sum(1) for t in self.chunks()])

    def _centred(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.sub) - self.centre
        return (t * self.scale if self.scale != 1.0 else t).to(self.dtype)

    def tile(self, a: int, size: int) -> torch.Tensor:
        if self.copy is not None:
            return self.copy[a : a + size]
        return self._centred(self.x[a : a + size])

    def rows(self, r: torch.Tensor) -> torch.Tensor:
        return self._centred(self.x[r])

    def chunks(self, size: int = 8192):
        for a in range(0, self.x.shape[0], size):
            yield self.tile(a, size)


def _scale(sets, centre: torch.Tensor) -> float:
    """A power of two that brings the centred sets' norms to at most 1 where they could leave the working
    precision's range (a bound on every norm outside [2^-40, 2^40]: squares and products would overflow, or
    underflow beside distances that matter); else 1 (no extra pass)."""
    c, top = centre.double().reshape(-1), 0.0
    for t in sets:
        if t.numel():
            far = torch.maximum((t.amax(0).double() - c).abs(), (t.amin(0).double() - c).abs())
            top = max(top, float(far.max()) * math.sqrt(t.shape[1]))
    if top == 0 or not math.isfinite(top) or 2.0**-40 <= top <= 2.0**40:
        return 1.0
    return 2.0 ** -math.ceil(math.log2(top))


def exact_int8(x) -> bool:
    """Whether x (a numpy array) is 8-bit pixels whose distances int8 matrix products compute exactly here
    (`int8_rows`): and whether this process's int8 products are exact and fast (`int8_products_exact`)."""
    return (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2 and x.shape[1] <= INT8_DIMS
            and int8_products_exact())


def int8_products_exact() -> bool:
    """torch's CPU `_int_mm` goes through oneDNN only on CPUs with AVX-512 VNNI (elsewhere a scalar loop 25x slower
    than float32 products), and oneDNN capped below VNNI (ONEDNN_MAX_CPU_ISA) saturates its int16 pair sums: the
    int8 path is taken only where oneDNN is on, the CPU has VNNI, and a probe of extreme values comes out exact."""
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled and _int8_probe()


@functools.cache
def _int8_probe() -> bool:
    if not torch.cpu._is_vnni_supported():
        return False
    g = torch.Generator().manual_seed(0)
    a = torch.cat([torch.full((2, 64), 127, dtype=torch.int8), torch.full((2, 64), -128, dtype=torch.int8),
                   torch.randint(-128, 128, (13, 64), dtype=torch.int8, generator=g)])
    b = torch.cat([a, torch.randint(-128, 128, (9, 64), dtype=torch.int8, generator=g)])
    try:
        return bool(torch.equal(torch._int_mm(a, b.T).long(), a.long() @ b.long().T))
    except RuntimeError:
        return False


def int8_rows(x: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
    """uint8 rows (in `order` if given) as v - 128 in int8 (the top bit flipped: distances do not change, and
    products of up to INT8_DIMS values sum exactly in int32), with zero columns up to a multiple of 8 (torch 2.14's
    CPU `_int_mm` is wrong with one column; zeros add nothing). Read a tile at a time: no whole-pool temporary."""
    m, d = x.shape if order is None else (len(order), x.shape[1])
    out = np.zeros((m, -(-d // 8) * 8), np.int8)
    for a in range(0, m, 8192):
        rows = x[a : a + 8192] if order is None else x[order[a : a + 8192]]
        out[a : a + 8192, :d] = (rows ^ np.uint8(128)).view(np.int8)
    return out


def _numpy_of(x):
    """x as a numpy array where it is one, or a CPU tensor (no copy); else None (a GPU tensor stays one)."""
    if isinstance(x, torch.Tensor):
        return x.numpy() if x.device.type == "cpu" and not x.requires_grad else None
    return np.asarray(x)


INT32_FAR = 2**31 - 1  # above every int32 squared distance of 8-bit rows (at most d * 255^2, d <= INT32_DIMS)
INT32_DIMS = INT32_FAR // 255**2  # 33,025 values: d * 255^2 stays below INT32_FAR


class Int8Rows:
    """8-bit pixels as int8 rows (`int8_rows`) and their squared norms (float64, exact: integers below 2^53): the
    identity's products in int32 are exact, and so are the distances (`sq_distances`): nothing to bound, no
    centring. The kNN kernel reads it as it reads a centred set (`tile`, `rows`, `sq`, `dtype`); with `int32` (rows
    of at most INT32_DIMS values) its distances stay int32, half the memory traffic of float64, and INT32_FAR
    stands for infinity."""

    dtype = torch.float64  # of the distances

    def __init__(self, x: np.ndarray, int32: bool = False, order: np.ndarray | None = None):
        xi = int8_rows(x, order)
        self.x = torch.from_numpy(xi)
        self.sq = torch.from_numpy(np.einsum("ij,ij->i", xi, xi, dtype=np.int64)).double()
        if int32 and x.shape[1] <= INT32_DIMS:
            self.dtype, self.sq = torch.int32, self.sq.int()

    def tile(self, a: int, size: int) -> torch.Tensor:
        return self.x[a : a + size]

    def rows(self, r: torch.Tensor) -> torch.Tensor:
        return self.x[r]


def sq_distances(a: torch.Tensor, sq_a: torch.Tensor, b: torch.Tensor, sq_b: torch.Tensor,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Squared distances between rows a and rows b with squared norms sq_a, sq_b, by the identity
    |x|^2 + |y|^2 - 2 x.y: for int8 rows (`Int8Rows`) exact, in the norms' dtype (int32, or float64 where twice a
    product of 65,536 values or more overflows int32: doubled in float64); else in a's float precision, within the
    callers' rounding bound. `out`: written in place, the product accumulated onto the norms (no allocation)."""
    if a.dtype == torch.int8:
        return torch.add(sq_a[:, None], sq_b[None], out=out).sub_(torch._int_mm(a, b.T), alpha=2)
    if out is not None:
        return torch.add(sq_a[:, None], sq_b[None], out=out).addmm_(a, b.T, alpha=-2.0)
    # the row norms added after the product: no rows x columns bias to build (10-20% of a 384-column product)
    return torch.addmm(sq_b.to(a.dtype)[None], a, b.T, alpha=-2.0).add_(sq_a.to(a.dtype)[:, None])


def host_buffer(shape, dtype: torch.dtype, zeros: bool = False) -> torch.Tensor:
    """A CPU tensor on numpy's memory: numpy puts large arrays on huge pages (madvise), so a buffer's first touch
    costs a few page faults, not one per 4 KiB as torch's own allocations do (a 45 MiB buffer: 11,000 of them)."""
    like = torch.empty(0, dtype=dtype).numpy().dtype
    return torch.from_numpy(np.zeros(shape, like) if zeros else np.empty(shape, like))


PAD = 8  # spare rows a buffer keeps past its last real row for `sq_distances_to_rows` (padded_count(n) - n < PAD)


def padded_count(n: int) -> int:
    """Columns to compute for n: the next multiple of 8 (under 8, n). This machine's float32 and int8 products take
    up to twice as long for a column count off a multiple of 8 (4,096 x 3,072 float32 rows against 31 columns:
    11.2 ms, against 32: 6.3 ms; against 255: 47.5 ms, against 256: 36.6 ms; `bench_product_shapes.py`)."""
    return n if n < 8 else -(-n // 8) * 8


def sq_distances_to_rows(a: torch.Tensor, sq_a: torch.Tensor, b: torch.Tensor, sq_b: torch.Tensor, lo: int,
                         hi: int) -> torch.Tensor:
    """`sq_distances` of rows a against rows lo..hi-1 of b, computed against `padded_count(hi - lo)` rows of b and
    cut back: b holds at least PAD rows (zeros, or rows to come) past hi."""
    top = lo + padded_count(hi - lo)
    return sq_distances(a, sq_a, b[lo:top], sq_b[lo:top])[:, : hi - lo]


def _merge(best_v, best_i, d, cols, m, dim=1):
    """Keep the m smallest of the running best and a tile d: per row of d (dim=1) or per column (dim=0, the
    transposed update of a symmetric tile). cols: the tile's indices along `dim`. The tile's own m smallest
    come first, so only small arrays are concatenated."""
    if dim == 0:  # row-wise top-k of the transposed tile is about twice as fast as top-k along columns
        d = d.T.contiguous()
    tv, tp = torch.topk(d, min(m, d.shape[1]), dim=1, largest=False, sorted=False)
    vals = torch.cat([best_v, tv], dim=1)
    idx = torch.cat([best_i, cols[tp]], dim=1)
    top_v, pos = torch.topk(vals, m, dim=1, largest=False, sorted=False)
    return top_v, torch.gather(idx, 1, pos)


def _diagonal_tile(out, qa, xn, sub):
    """The square tile of a block against itself: only the sub-blocks on and above its diagonal are multiplied;
    those below are their transposes (saves close to half the products of every diagonal tile)."""
    t = qa.shape[0]
    for i in range(0, t, sub):
        for j in range(i, t, sub):
            rows, cols = slice(i, i + sub), slice(j, j + sub)
            sq_distances(qa[rows], xn[rows], qa[cols], xn[cols], out=out[rows, cols])
            if j != i:
                out[cols, rows].copy_(out[rows, cols].T)
    return out


def _approx_candidates(X, Y, rows, m, tile, symmetric: bool, progress: Progress = NO_PROGRESS):
    """Top-m (approximate, unsorted) squared distances and indices of rows `rows` of X among the rows of Y.

    Tiles are centred and cast on the fly into one reused buffer. symmetric (X is Y and rows is every row): only
    tiles on and above the diagonal are computed, each updating its rows and its columns, and a diagonal tile
    only its upper half of sub-blocks. Otherwise, when X is Y, a row never counts itself.
    """
    nq, nr = rows.numel(), Y.x.shape[0]
    dev, dtype = X.x.device, X.dtype
    far = INT32_FAR if dtype == torch.int32 else math.inf
    best_v = torch.full((nq, m), far, device=dev, dtype=dtype)
    best_i = torch.full((nq, m), -1, device=dev, dtype=torch.int64)
    whole = rows.numel() == X.x.shape[0]
    xn_q, yn_t = (X.sq if whole else X.sq[rows]), Y.sq
    same = X is Y
    buf = torch.empty(min(tile, nq) * min(tile, nr), device=dev, dtype=dtype)
    sub = -(-tile // 4)  # diagonal tiles in 4 x 4 sub-blocks, 10 of the 16 multiplied
    nbq, nbr = -(-nq // tile), -(-nr // tile)
    progress.start(f"nearest neighbours, {nq} x {nr}", nbq * (nbq + 1) // 2 if symmetric else nbq * nbr)
    for a in range(0, nq, tile):
        qrows = rows[a : a + tile]
        qa = X.tile(a, tile) if whole else X.rows(qrows)
        for b in range(a if symmetric else 0, nr, tile):
            diagonal = symmetric and b == a
            rb = qa if diagonal else Y.tile(b, tile)
            d = buf[: qa.shape[0] * rb.shape[0]].view(qa.shape[0], rb.shape[0])
            if diagonal:
                _diagonal_tile(d, qa, xn_q[a : a + tile], sub)
            else:
                sq_distances(qa, xn_q[a : a + tile], rb, yn_t[b : b + rb.shape[0]], out=d)
            cols = torch.arange(b, b + rb.shape[0], device=dev)
            if same:
                hit = (qrows >= b) & (qrows < b + rb.shape[0])
                if hit.any():
                    r = torch.nonzero(hit).squeeze(1)
                    d[r, qrows[r] - b] = far
            v, i = _merge(best_v[a : a + tile], best_i[a : a + tile], d, cols, m)
            best_v[a : a + tile], best_i[a : a + tile] = v, i
            if symmetric and not diagonal:
                v, i = _merge(best_v[b : b + tile], best_i[b : b + tile], d, qrows, m, dim=0)
                best_v[b : b + tile], best_i[b : b + tile] = v, i
            progress.advance()
    progress.close()
    return best_v, best_i


def _exact_rows(X, Y, rows, idx, chunk_elems=1 << 16):
    """Exact float64 squared distances, from differences, of query rows to their candidate references idx (n, m)."""
    n, m = idx.shape
    out = torch.empty((n, m), dtype=torch.float64, device=X.device)
    step = max(1, chunk_elems // max(1, m * X.shape[1]))
    for a in range(0, n, step):
        ii = idx[a : a + step]
        d = ((Y[ii.clamp_min(0)].double() - X[rows[a : a + step], None].double()) ** 2).sum(-1)
        out[a : a + step] = torch.where(ii >= 0, d, torch.full_like(d, math.inf))
    return out


def _sort_exact(dist, idx):
    """Sort candidates by (distance, index): stable sort by index first, then by distance."""
    o = torch.argsort(idx, dim=1, stable=True)
    idx, dist = torch.gather(idx, 1, o), torch.gather(dist, 1, o)
    o = torch.argsort(dist, dim=1, stable=True)
    return torch.gather(dist, 1, o), torch.gather(idx, 1, o)


def _full_exact(X, Y, rows, k, same: bool, chunk=4096):
    """Exact float64 scan of some queries against every reference: the last resort, O(n_ref * d) per query."""
    n = rows.numel()
    dist = torch.empty((n, k), dtype=torch.float64, device=Y.device)
    idx = torch.empty((n, k), dtype=torch.int64, device=Y.device)
    for j in range(n):
        q = X[rows[j]].double()
        d = torch.cat([((Y[b : b + chunk].double() - q) ** 2).sum(-1) for b in range(0, Y.shape[0], chunk)])
        if same:
            d[rows[j]] = math.inf
        o = torch.argsort(d, stable=True)[:k]  # a stable sort keeps index order among equal distances
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
    progress: Progress | None = None,
) -> KnnResult:
    """Exact k nearest neighbours of every query row among the reference rows (Euclidean).

    With refs=None, the neighbours of each row among the *other* rows of the same set. Returns distances
    (float64, ascending) and reference indices; among equal distances the lower index comes first. Memory beyond
    the inputs: a few tiles and O(n k) candidates. `progress` hears of every tile of the main pass.
    """
    if precision not in ("float32", "float64"):
        raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")
    dev = torch.device(resolve_device(device))
    dtype = torch.float32 if precision == "float32" else torch.float64
    symmetric = refs is None
    qn, rn = _numpy_of(queries), None if symmetric else _numpy_of(refs)
    int8 = dev.type == "cpu" and exact_int8(qn) and (symmetric or exact_int8(rn))
    if int8:  # the exact rows read the uint8 values themselves: no float32 copy of the pool
        X = torch.from_numpy(qn)
        Y = X if symmetric else torch.from_numpy(rn)
    else:
        X = _as_tensor(queries, dev)
        Y = X if symmetric else _as_tensor(refs, dev)
    if not symmetric and X.shape[1] != Y.shape[1]:
        raise ValueError(f"queries have dimension {X.shape[1]}, references {Y.shape[1]}")
    n, d = X.shape
    n_ref = Y.shape[0] - (1 if symmetric else 0)
    if k < 1 or k > n_ref:
        raise ValueError(f"k = {k} needs at least {k} reference points, have {n_ref}")
    if n == 0:
        return KnnResult(np.zeros((0, k)), np.zeros((0, k), dtype=np.int64))
    if int8:
        Xc = Int8Rows(qn, int32=True)  # exact: no bound
        Yc = Xc if symmetric else Int8Rows(rn, int32=True)
        err = torch.zeros(n, dtype=torch.float64)
    else:
        centre = Y.mean(0, keepdim=True)  # any centre gives the same distances; the mean makes the norms small
        low = min((X.dtype, Y.dtype), key=lambda t: torch.finfo(t).bits)
        centre = centre.to(low)  # one point for both sets: exact in either one's precision
        scale = _scale((X,) if symmetric else (X, Y), centre)
        Xc = _Centred(X, centre, dtype, scale)
        Yc = Xc if symmetric else _Centred(Y, centre, dtype, scale)
        # bound on |approx - exact| of every pair of a query: rounding of the product, the norms and the centring
        xn, ymax = Xc.sq.double() * 1.001, float(Yc.sq.max()) * 1.001
        err = rounding_gamma(d + 4, dtype) * (xn.sqrt() + math.sqrt(ymax)) ** 2 / (scale * scale)

    out_d = torch.empty((n, k), dtype=torch.float64, device=dev)
    out_i = torch.empty((n, k), dtype=torch.int64, device=dev)
    todo = torch.arange(n, device=dev)
    m = min(k + extra, n_ref)
    rechecked = None
    while todo.numel():
        first = todo.numel() == n
        av, ai = _approx_candidates(Xc, Yc, todo, m, tile, symmetric=symmetric and first,
                                    progress=or_silent(progress) if first else NO_PROGRESS)
        av, o = torch.sort(av.double() / (1.0 if int8 else scale * scale), dim=1)  # the input's units: exact
        ai = torch.gather(ai, 1, o)
        e = err[todo]
        ok = torch.zeros(todo.numel(), dtype=torch.bool, device=dev)
        if m > k:
            # the k best are certain when the k-th lies clearly below the (k+1)-th: exact values for those k only
            clear = av[:, k - 1] + e < av[:, k] - e
            if clear.any():
                rows = todo[clear]
                ex = av[clear, :k] if int8 else _exact_rows(X, Y, rows, ai[clear, :k])  # int8: exact already
                ex, ei = _sort_exact(ex, ai[clear, :k])
                out_d[rows], out_i[rows] = ex, ei
                ok |= clear
        amb = ~ok
        if amb.any():
            # near ties: exact values of the candidates that can still reach the k best (approximately within
            # 2 bounds of the k-th), certified against the references outside the candidates
            rows = todo[amb]
            reach = int((av[amb] <= av[amb, k - 1 : k] + 2 * e[amb, None]).sum(1).max())
            cols = ai[amb, : max(reach, k)]
            ex, ei = _sort_exact(av[amb, : cols.shape[1]] if int8 else _exact_rows(X, Y, rows, cols), cols)
            cert = torch.ones(rows.numel(), dtype=torch.bool, device=dev) if m >= n_ref else \
                ex[:, k - 1] < av[amb, -1] - e[amb]
            out_d[rows[cert]], out_i[rows[cert]] = ex[cert, :k], ei[cert, :k]
            ok[torch.nonzero(amb).squeeze(1)[cert]] = True
        if rechecked is None:
            rechecked = int((~ok).sum())
        todo = todo[~ok]
        if todo.numel() and m >= 256:
            out_d[todo], out_i[todo] = _full_exact(X, Y, todo, k, same=symmetric)
            break
        m = min(m * 4, n_ref)
    return KnnResult(out_d.clamp_min(0).sqrt().cpu().numpy(), out_i.cpu().numpy(), rechecked or 0)
