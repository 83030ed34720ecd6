"""Greedy farthest-point selection, exact, at matrix-product speed on any data.

The definition (Gonzalez 1985): start from a seeded random pool index; repeatedly add the pool point whose
distance to its nearest selected centre is largest; ties go to the lowest pool index; distances are exact float64
squared distances computed from differences.

The straightforward loop streams the whole pool once per pick (a matrix-vector product): memory-bound, whatever
the data. Here the distance work is batched into matrix-matrix products instead, with no geometric assumption:

* Every pool point p keeps its NEAR (six; three for 8-bit pixels) smallest *approximate* squared distances
  (float32 matrix-product identity on centred data, scaled by a power of two where its norms lie outside
  [2^-20, 2^20], `scaled_rows`) to the
  centres it has been compared with (the first upto[p] of them), and which centres gave all but the last. A
  rigorous bound E[p] on the identity's rounding (gamma_(d+6) (|p| + max |x|)^2, as in the kNN kernel, plus
  float32 underflow) makes the smallest, val[p], plus E[p] an upper bound of p's exact value now: comparing with
  more centres only lowers it. Where the picks' values fall to a few times E (WIDE_BELOW: tight clusters far
  apart, whose extent dwarfs the distances that decide the later picks), float32 cannot tell the candidates apart:
  the selection starts again on float64 products (`farthest_points`).
* Every `block` picks (sooner: in place of a growth of the leaders whose products would bring theirs since the
  last one to FOLD_SHARE of what the block product will cost), the remaining points are compared with the centres
  added since, as matrix products over ranges of rows that saw the same centres (`chunks`), and sorted by upper
  bound. Points whose bound lies below where the value will be by the next block
  product are left for later: their stale bound stays valid, and they are brought up to date only if it ever
  competes (most never do). That level is the last pick's value times the factor by which the value fell over
  the last block, or times `rho` where that is higher: a value that falls slowly (data of many dimensions) folds
  only the points that may compete soon; one that falls fast (clusters) folds down to `rho` of it, as before,
  and what lies below joins the leaders when it competes.
* Between block products only the leaders are kept up to date with each new centre (their smallest distance;
  the centre's column of distances is kept for their nearest); the next points by bound join them whenever the
  best leader's lower bound val - E does not clear the bound of everything behind (lazy evaluation: a bound only
  falls). Every centre is a leader when it is picked, so the leaders' distances to each other, computed as
  products when they join, hold each new centre's distances to all of them: a row read per pick, not a
  matrix-vector product (past GRAM_ROWS leaders, one matrix-vector product per pick again). For the same reason a
  newcomer's Gram row holds its distances to the centres since the block product; only a point left behind at an
  earlier one is compared with the centres before it as a product of its own.
* 8-bit pixels take exact int8 products instead (int32 distances up to 33,025 values): no rounding bound.
* Products take a multiple of 8 columns (`padded_count`: this machine's products run up to twice as long for
  other counts), from zero rows kept after the centres.
* A pick is certain when one leader's lower bound lies above every other point's upper bound. Otherwise the few
  leaders within the rounding band are decided on exact float64 distances, computed from differences, to every
  centre whose approximate distance lies within the band: among the nearest kept, or (when all of those lie in
  it) among all centres. The same call computes the exact values of the next PREFETCH leaders by bound, the
  likely contenders of the next picks. A point's exact value, once known, is kept up to date with each new
  centre (a centre within the band of it gets an exact distance), so later decisions reuse it; the largest exact
  value wins, the lowest index among equal ones.
* After a pick, the leaders next by lower bound are often certain too: each one's lower bound, lowered by its
  Gram distances to the picks before it, above every other point's upper bound (`_Active.chain`). Such a chain
  of picks is taken at once, with no decision or bookkeeping of its own per pick.
* When the largest exact value is 0, every remaining point is a copy of a centre: the rest of the selection is
  the remaining points in index order, as the definition's ties give.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from model_collapse.errors import UserError
from model_collapse.linalg import first_nonfinite_row
from model_collapse.neighbours import (INT32_FAR, PAD, Int8Rows, exact_int8, host_buffer, rounding_gamma,
                                       sq_distances, sq_distances_to_rows)
from model_collapse.progress import Progress, or_silent
from model_collapse.rng import numpy_rng

ROWS = 4096  # row chunk of the block products (4,096 x block float32 at most)
GRAM_ROWS = 4096  # leaders whose distances to each other are kept (64 MiB of float32, 128 of float64)
# a block product comes early once the leaders' own products since the last one (in pairs) reach FOLD_SHARE of the
# pairs it will compute, plus FOLD_FLOOR pool rows' worth (the first leaders' products cost the same at any pick);
# 0.05-0.25 and 16-64 measured within the noise on the uniform and pixel pools
FOLD_SHARE, FOLD_FLOOR = 0.1, 16
NEAR = 6  # smallest distances kept per point: a decision computes every centre's distance when all lie in its band
PREFETCH = 8  # unknown leaders next by upper bound whose exact values a decision computes too (4-16: the same)
# the leaders' kept columns: once they fill at this size or more, taken into the leaders' nearest and started again
# (at most GRAM_ROWS rows: with blocks of 1,024 picks they stay under 32 MiB and are taken in only at the block's end)
COLS_BYTES = 32 << 20
CHAIN = 32  # leaders by lower bound a pick's chain considers (`_Active.chain`)
GRAM_RATE = 16  # a matrix-vector product costs about as much per pair as 16 pairs of a matrix product


def selection_input(x: np.ndarray) -> np.ndarray:
    """x as the exact selectors compute on it: 8-bit pixels as they are (exact int8 products, `exact_int8`); half
    floats and integers of up to 16 bits as float32 (exact); wider integers and long doubles as float64, the
    values the definitions compare (a long-double operand against a float64 one gave equal rows a positive
    distance)."""
    x = np.ascontiguousarray(x)
    if exact_int8(x) or x.dtype in (np.float32, np.float64):
        return x
    return x.astype(np.float32 if x.itemsize <= 2 else np.float64)


def greedy_start(m: int, seed: int) -> int:
    return int(numpy_rng(seed, "greedy-start").integers(m))


def exact_sq(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Exact float64 squared distances, from differences, between pool rows[i] and cols[i] (pairwise); each row
    summed as numpy's sum over the row sums it (pairwise), the definition's order, so equal sums stay equal."""
    diff = x.take(rows, axis=0).astype(np.float64)
    diff -= x.take(cols, axis=0)  # in place: fresh arrays of this size cost their page faults (10x at 100 pairs)
    diff *= diff
    return diff.sum(1)


TILE_BYTES = 1 << 21  # a tile of the set-up passes over the pool: stays in cache between its steps


def _spans(x: np.ndarray):
    """Row ranges of the set-up passes: no whole-pool temporaries, and a tile gathered, centred and summed while in
    cache (one pass over memory instead of three). Never a lone row where there are more: numpy's einsum sums a
    single row of over 8,192 values in another order than a row among others."""
    m = len(x)
    step = max(2, TILE_BYTES // max(1, x.shape[1] * x.itemsize))
    for a in range(0, m, step):
        if m - a > 1 and m - (a + step) == 1:  # the last row joins this tile
            yield a, m
            return
        yield a, min(a + step, m)


def _row_sq(x: np.ndarray, dtype=None) -> np.ndarray:
    """Squared row norms, a tile at a time, accumulated in `dtype` (default: x's own)."""
    return np.concatenate([np.einsum("ij,ij->i", x[a:b], x[a:b], dtype=dtype) for a, b in _spans(x)])


def scaled_rows(x: np.ndarray, order: np.ndarray | None = None,
                dtype=np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """The rows of x (in `order` if given) centred, scaled by a power of two to a largest norm of about [0.5, 1] and
    rounded once to float32; their squared norms (float64 of float32 sums, as the products' own); upper bounds of
    their norms; the square of the scale. Float32 input whose largest centred norm lies within [2^-20, 2^20] is
    left unscaled (float32's range has room for it: no pass to scale), and is centred on the mean of a sample of
    its rows (any centre serves: a pass over the pool less).

    No float32 overflow, and underflow (absolute errors of at most 2^-150 per value, at most 2^-90 of the largest
    norm) only far beneath any distance that matters: the bound gamma_(d+6) (|x| + |y|)^2 + (d + 6) 2^-80 covers
    the products' rounding, the norms' and the centred copy's, and underflow. Distances in these units are
    `scale2` times the input's: a power of two, so comparisons come out as they would unscaled.

    `dtype` float64: the same, rounded once to float64 instead (centred in float64, always scaled).
    """
    d = x.shape[1]

    def tiles():  # the rows in order, a tile at a time
        for a, b in _spans(x):
            yield a, x[a:b] if order is None else x[order[a:b]]

    if x.dtype == np.float32 and dtype == np.float32:  # float32 input: centred in float32, one rounding
        mean = x[:: max(1, len(x) // 256)].mean(0)
        xc = np.empty(x.shape, np.float32)
        sq = np.empty(len(x))
        with np.errstate(invalid="ignore", over="ignore"):  # NaN, inf and overflow: checked below
            for a, c in tiles():  # gathered, centred and summed while the tile is in cache
                out = xc[a : a + len(c)]
                np.subtract(c, mean, out=out)
                sq[a : a + len(c)] = np.einsum("ij,ij->i", out, out)  # float32 sums, as `_row_sq`
        top = float(np.sqrt(sq.max()))
        if not math.isfinite(top):  # NaN or inf in the input, or float32 overflow
            check_finite(x)
    exact64 = (x.dtype != np.float32 or dtype != np.float32
               or not (math.isfinite(top) and top >= 2.0**-60))  # float64, overflow, tiny
    if exact64:  # centre in float64, a chunk at a time, and round once
        mean = x.mean(0, dtype=np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            top = float(np.max([np.sqrt(_row_sq(c - mean).max()) for _, c in tiles()]))  # NaN stays NaN
        if not math.isfinite(top):  # the definition's float64 squared distances would overflow too
            check_finite(x)
            raise UserError(f"selection input too large: squared distances overflow float64 (largest value "
                            f"{float(np.abs(x).max()):g})")
    scale = 2.0 ** -math.ceil(math.log2(top)) if top > 0 else 1.0
    if not exact64 and 2.0**-20 <= top <= 2.0**20:
        scale = 1.0
    if exact64:
        xc = np.concatenate([((c - mean) * scale).astype(dtype) for _, c in tiles()])
        sq = _row_sq(xc).astype(np.float64)
    elif scale != 1.0:
        xc *= np.float32(scale)
        sq *= scale * scale  # a power of two: the squared norms of the scaled rows, as exactly
    # a float32 sum of d squares lies within gamma_d of the true one: raised by that, the norms bound the true ones
    norms = np.sqrt(sq * (1 + rounding_gamma(d, dtype))) * 1.001
    return xc, sq, norms, scale * scale


def check_finite(x: np.ndarray) -> None:
    """The check of the selectors' input for NaN and inf: a pass over the pool, made only where the set-up pass's
    largest norm came out non-finite (as it does for any NaN or inf, and for float32 overflow)."""
    if first_nonfinite_row(x) is not None:
        raise UserError("selection input contains NaN or inf")


def product_bound(d: int, dtype=np.float32) -> tuple[float, float]:
    """(gamma, tiny) of the rigorous bound gamma (|x| + |y|)^2 + tiny on an approximate squared distance between
    `scaled_rows` of d columns in `dtype`: gamma_(d+6), the kNN kernel's d + 4 and the rounding of the centred
    copy; tiny, underflow: of the products and sums (2^-149 each in float32, 2^-1074 in float64) and of the
    centred values (2^-90 of the largest norm in float32), with room to spare."""
    return rounding_gamma(d + 6, dtype), (d + 6) * (2.0**-80 if dtype == np.float32 else 2.0**-1000)


def merge_near(near: np.ndarray, near_at: np.ndarray, v: np.ndarray, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points' NEAR smallest distances and their centres, with the distances `v` (to centres `at`, each row
    ascending) merged in; equal distances keep the older centre first, as one at a time would."""
    k = near.shape[1]
    vals = np.concatenate([near, v], axis=1)
    by = np.argsort(vals, axis=1, kind="stable")[:, :k]
    ats = np.concatenate([near_at, np.full((len(near), 1), -1), at], axis=1)
    # the old last (centre unknown, -1) has k - 1 values before it: never among the first k - 1
    return np.take_along_axis(vals, by, 1), np.take_along_axis(ats, by[:, : k - 1], 1)


def merge_columns(near: np.ndarray, near_at: np.ndarray, v: np.ndarray, c0: int) -> tuple[np.ndarray, np.ndarray]:
    """`merge_near` of distances v to centres c0, c0 + 1, ... (a column each), only for the rows where one is among
    the nearest (their smallest few by topk: which of equal distances is kept never changes a decision)."""
    near, near_at = near.copy(), near_at.copy()
    hit = np.flatnonzero(v.min(1) < near[:, -1])  # the rest keep their nearest
    v, by = torch.topk(torch.from_numpy(v[hit]), min(near.shape[1], v.shape[1]), dim=1, largest=False)
    near[hit], near_at[hit] = merge_near(near[hit], near_at[hit], v.numpy(), c0 + by.numpy())
    return near, near_at


MEMORY_COLS = 24  # a product against fewer columns takes as long as against this many: it streams its rows
CHUNK_WORK = 1e7  # the fixed cost of one product and its bookkeeping, in pairs times dimensions


def chunks(upto: np.ndarray, hi: int, d: int) -> list[tuple[int, int]]:
    """Row ranges of `fold`'s products: rows (sorted by upto, the centres each has seen) against centres
    [upto of the range's first row, hi). Rows that saw more centres than the first of their range compute columns
    they do not need; a range more costs a product. Chosen by dynamic programming over the distinct upto values (few:
    one per block product) for the least work: rows x max(columns, MEMORY_COLS), plus CHUNK_WORK / d a range."""
    starts = np.flatnonzero(np.r_[True, upto[1:] != upto[:-1]])
    ends = np.r_[starts[1:], len(upto)]
    g = len(starts)
    cols = np.maximum(hi - upto[starts], MEMORY_COLS).astype(np.float64)  # a range from group i computes cols[i]
    best, cut = np.zeros(g + 1), np.zeros(g + 1, dtype=np.int64)
    for j in range(1, g + 1):  # best[j]: the groups before j; the last range runs from group i to j - 1
        cost = best[:j] + (ends[j - 1] - starts[:j]) * cols[:j] + CHUNK_WORK / d
        cut[j] = int(np.argmin(cost))
        best[j] = cost[cut[j]]
    out, j = [], g
    while j:
        out.append((int(starts[cut[j]]), int(ends[j - 1])))
        j = cut[j]
    return out[::-1]


class _Bounds:
    """The pool's approximate distances to the centres: per point the NEAR smallest (`near`, ascending), the
    centres of all but the last (`near_at`, positions in `centres`), up to which centre (`upto`), the rounding bound
    (`err`) and the exact value where a decision needed it (`ex`, NaN elsewhere; up to date with `near`)."""

    def __init__(self, x: np.ndarray, n: int, wide: bool = False):
        self.x = x
        d = x.shape[1]
        m = len(x)
        self.int8 = exact_int8(x)
        k = 3 if self.int8 else NEAR  # exact integers: only equal distances share the band
        self.near = np.full((m, k), np.inf)
        self.near_at = np.zeros((m, k - 1), dtype=np.int64)
        self.upto = np.zeros(m, dtype=np.int64)
        self.ex = np.full(m, np.nan)
        self.centres = np.empty(n, dtype=np.int64)
        self.pairs = 0
        if self.int8:  # 8-bit pixels: exact integer products, no rounding to bound
            # distances in int32 where they fit (up to 33,025 values): a quarter of the float64 memory traffic (at
            # d = 384 the float64 output took longer than the product)
            rows = Int8Rows(x, int32=True)
            self.xc, self.sq, self.dist_dtype = rows.x, rows.sq, rows.dtype
            self.scale2, self.err = 1.0, np.zeros(m)
        else:
            dtype = np.float64 if wide else np.float32
            xc, sq, norms, self.scale2 = scaled_rows(x, dtype=dtype)
            self.xc, self.sq = torch.from_numpy(xc), torch.from_numpy(sq.astype(dtype))  # as the products
            gamma, tiny = product_bound(d, dtype)
            self.err = gamma * (norms + norms.max()) ** 2 + tiny
            self.dist_dtype = self.xc.dtype
        # the centres' rows, and PAD zero rows after the last (`sq_distances_to_rows`)
        self.cbuf = host_buffer((n + PAD, self.xc.shape[1]), self.xc.dtype, zeros=True)  # int8 rows: wider than d
        self.csq = host_buffer(n + PAD, self.dist_dtype, zeros=True)
        self._np = self.cbuf.numpy(), self.xc.numpy(), self.csq.numpy(), self.sq.numpy()  # `add`'s views
        self.gbuf = self.xc[:0]  # `_gathered`
        self.leader_buffers = self.xc[:0], self.sq[:0], torch.empty(0, 0, dtype=self.dist_dtype)  # `_Active`

    def dist(self, rows: torch.Tensor, sq: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Approximate squared distances of `rows` (with squared norms `sq`) to centres lo..hi-1: the float32
        identity, or exact for 8-bit pixels (int32, or float64 past 33,025 values)."""
        return sq_distances_to_rows(rows, sq, self.cbuf, self.csq, lo, hi)

    @property
    def far(self) -> float:
        """Stands for a column not to count: inf, or above every int32 distance."""
        return INT32_FAR if self.dist_dtype == torch.int32 else math.inf

    def add(self, t: int, p: int) -> None:
        self.centres[t] = p
        cbuf, xc, csq, sq = self._np  # numpy's row copy: a tenth of torch's indexing overhead
        cbuf[t], csq[t] = xc[p], sq[p]

    def exact_pairs(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """`exact_sq` in this object's units (times a power of two: still exact, equal values stay equal)."""
        return exact_sq(self.x, rows, cols) * self.scale2

    def ub(self, p):
        return self.near[p, 0] + self.err[p]

    def fold(self, rows: np.ndarray, hi: int) -> None:
        """Compare `rows` with the centres [upto, hi) each has not seen: one product per range of rows `chunks`
        chooses (at most ROWS rows)."""
        upto = self.upto[rows]
        rows, upto = rows[upto < hi], upto[upto < hi]
        if not len(rows):
            return
        by = np.argsort(upto, kind="stable")
        rows, upto = rows[by], upto[by]
        for a, b in chunks(upto, hi, self.xc.shape[1]):
            for c in range(a, b, ROWS):
                self._fold_chunk(rows[c : min(b, c + ROWS)], upto[c : min(b, c + ROWS)], int(upto[c]), hi)
        self.upto[rows] = hi

    def _fold_chunk(self, r: np.ndarray, u: np.ndarray, lo: int, hi: int) -> None:
        a, b = int(r.min()), int(r.max()) + 1
        if b - a <= 2 * len(r):  # dense rows: a product over the slice copies nothing (wide rows cost to gather)
            D = self.dist(self.xc[a:b], self.sq[a:b], lo, hi)[torch.from_numpy(r - a)]
        else:
            rt = torch.from_numpy(r)
            D = self.dist(torch.index_select(self.xc, 0, rt, out=self._gathered(len(r))), self.sq[rt], lo, hi)
        if u.max() > lo:  # columns a row has seen already would count its nearest centre twice
            D[torch.arange(hi - lo)[None] < torch.from_numpy(u - lo)[:, None]] = self.far
        self.pairs += D.numel()
        k = min(self.near.shape[1], hi - lo)
        v, i = torch.topk(D, k, dim=1, largest=False) if k > 1 else (D, torch.zeros_like(D, dtype=torch.int64))
        ex = self.ex[r]
        known = np.flatnonzero(~np.isnan(ex))
        if len(known):
            self.ex[r[known]] = self.fold_exact(r[known], ex[known], self.err[r[known]], D[known].numpy(), lo)
        v, i = self.as_float(v), i.numpy() + lo
        hit = np.flatnonzero(v[:, 0] < self.near[r, -1])  # the rest keep their nearest
        r = r[hit]
        self.near[r], self.near_at[r] = merge_near(self.near[r], self.near_at[r], v[hit], i[hit])

    def _gathered(self, k: int) -> torch.Tensor:
        """A buffer of k rows for the gathered rows of a chunk, kept between chunks: fresh memory of this size costs
        its first touch (page faults) at every chunk, four times the gather itself (20 MB: 4.9 ms against 1.1)."""
        if len(self.gbuf) < k:
            self.gbuf = host_buffer((max(k, 2 * len(self.gbuf)), self.xc.shape[1]), self.xc.dtype)
        return self.gbuf[:k]

    def as_float(self, d: torch.Tensor) -> np.ndarray:
        """Distances as float64 numpy, the int32 stand-in for a column not to count (`far`) as inf."""
        out = d.double().numpy()
        if self.far != math.inf:
            out[out == self.far] = math.inf
        return out

    def fold_exact(self, P, ex, err, D, lo: int) -> np.ndarray:
        """Exact values ex of points P, brought up to date with centres lo, lo + 1, ... whose approximate squared
        distances are the columns of D: only a centre within err of ex can come nearer."""
        r, c = np.nonzero(D <= (ex + err)[:, None])
        if len(r):
            ex = ex.copy()
            np.minimum.at(ex, r, self.exact_pairs(P[r], self.centres[lo + c]))
        return ex

    def exact(self, P: np.ndarray, near: np.ndarray, near_at: np.ndarray, err: np.ndarray, t: int,
              val: np.ndarray | None = None, more: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """Exact float64 values (squared distance to the nearest of the first t centres) of points P whose `near` and
        `near_at` are up to date with those centres; or (the leaders) with those before the centres `more` gives,
        (rows, pool indices) of every later centre within the band, and `val` the smallest approximate distance to
        all."""
        band = (near[:, 0] if val is None else val) + 2 * err  # the exact nearest's approximate distance is below
        out = np.full(len(P), np.inf)
        scan = near[:, -1] <= band  # every centre may lie within the band
        r, c = np.nonzero(near[:, :-1] <= band[:, None])  # the nearest within it: one call for all of them
        r, c = r[~scan[r]], c[~scan[r]]
        rows, cols = r, self.centres[near_at[r, c]]
        if more is not None:
            keep = ~scan[more[0]]
            rows, cols = np.concatenate([rows, more[0][keep]]), np.concatenate([cols, more[1][keep]])
        np.minimum.at(out, rows, self.exact_pairs(P[rows], cols))
        for i in np.flatnonzero(scan):
            p = int(P[i])
            d = self.dist(self.xc[p : p + 1], self.sq[p : p + 1], 0, t)[0].double().numpy()
            c = self.centres[:t][d <= band[i]]
            out[i] = self.exact_pairs(np.full(len(c), p), c).min()
        return out


class _ByBound:
    """Pool points in descending order of a fixed upper bound (ties: the lower index first), sorted only as far as
    it is read: the leaders come from its front, and sorting a million bounds at every block product took a tenth
    of greedy's time on a large pool. `points` ascending."""

    def __init__(self, points: np.ndarray, bound: np.ndarray):
        self.points, self.key = points, -bound
        self.done = np.empty(0, dtype=np.int64)  # positions, sorted
        self.left = np.arange(len(points))  # positions not yet sorted, ascending

    def __len__(self) -> int:
        return len(self.points)

    def _extend(self, stop: int) -> None:
        while len(self.done) < stop and len(self.left):
            want = max(stop - len(self.done), 1024, len(self.done))
            key = self.key[self.left]
            if want < len(key):  # the smallest `want` keys and every key equal to the last of them
                last = np.partition(key, want - 1)[want - 1]
                take = key <= last
            else:
                take = np.ones(len(key), dtype=bool)
            part = self.left[take]
            self.done = np.concatenate([self.done, part[np.argsort(key[take], kind="stable")]])
            self.left = self.left[~take]

    def __getitem__(self, i):
        """A position (>= 0) or a slice with a stop, as the leaders read them."""
        stop = i.stop if isinstance(i, slice) else i + 1
        self._extend(stop)
        return self.points[self.done[i]]


class _Active:
    """The points that may hold the maximum: the leaders by upper bound since the last block product, each kept up
    to date with every centre. Every centre is a leader when it is picked, so the leaders' distances to each other
    (`gram`, computed as matrix products when leaders join) give each new centre's distances to all of them: no
    matrix-vector product per pick. Past GRAM_ROWS leaders (a pool of near-equal values) the leaders go back to one
    matrix-vector product of their rows per pick. The rest lie behind `behind`, an upper bound of all their
    values.

    Per pick only each leader's smallest approximate distance (`val`) is brought up to date; the pick's column of
    distances is kept (`cols`, from centre c0 on). A leader's nearest (`near`, `near_at`) are as of when it joined
    or the columns were last taken in: at the end of the block, past COLS_BYTES, and when the leaders pass
    GRAM_ROWS; from then on no columns are kept and each centre goes into the nearest at once (where it is among
    them). A decision reads the columns within its band directly."""

    def __init__(self, bounds: _Bounds, order: _ByBound, t: int):
        self.B, self.order, self.nxt, self.t = bounds, order, 0, t
        self.n = 0  # leaders (slots of rows, sq and gram; a picked leader keeps its slot, marked by val = -inf)
        self.idx = np.empty(0, dtype=np.int64)
        # the leaders' rows, norms and Gram in the buffers of the leaders before (`_reserve`): filled afresh, with no
        # first touch of new memory at every block product (a Gram of 4,096 float64 leaders: 128 MiB)
        self.rows, self.sq, self.gram = bounds.leader_buffers
        self.near, self.near_at = bounds.near[:0], bounds.near_at[:0]
        self.val, self.err, self.ex = np.empty(0), np.empty(0), np.empty(0)
        self.cols = np.empty((0, 0))  # cols[slot, j]: the leader's approximate distance to centre c0 + j
        self.picks, self.c0, self.t0 = 0, t, t
        self.pick_slots = []  # the slot of each centre since t0, while the Gram is kept
        self.work = 0  # leaders' product pairs since the block product (a matrix-vector pair counts GRAM_RATE)

    @property
    def behind(self) -> float:
        return float(self.B.ub(self.order[self.nxt])) if self.nxt < len(self.order) else -np.inf

    def _reserve(self, n: int) -> None:
        """Room for n leaders: rows, norms, Gram (while kept) and kept columns; buffers handed on to the next
        leaders (`leader_buffers`)."""
        cap = len(self.rows)
        if n > cap:
            cap = max(n, 2 * cap, 256)
            rows = host_buffer((cap, self.rows.shape[1]), self.rows.dtype)
            rows[: self.n] = self.rows[: self.n]
            sq = self.sq.new_empty(cap)
            sq[: self.n] = self.sq[: self.n]
            self.rows, self.sq = rows, sq
        gram = self.B.leader_buffers[2]
        if self.gram is not None:
            if len(self.gram) < min(n, GRAM_ROWS):
                g = min(cap, GRAM_ROWS)
                gram = host_buffer((g, g), self.gram.dtype)
                gram[: self.n, : self.n] = self.gram[: self.n, : self.n]
                self.gram = gram
            if len(self.cols) < n:
                self._columns(cap, self.cols.shape[1])
        self.B.leader_buffers = self.rows, self.sq, gram

    def _columns(self, rows: int, cols: int) -> None:
        out = np.empty((rows, max(cols, 64)))
        out[: self.n, : self.picks] = self.cols[: self.n, : self.picks]
        self.cols = out

    def crowded(self, more: int) -> bool:
        """Whether the leaders' products since the block product, with `more` pairs to come, reach FOLD_SHARE of
        the pairs the next block product will compute, plus FOLD_FLOOR pool rows' worth (the first leaders' products
        cost the same at any pick)."""
        left = len(self.B.x) - self.t
        return self.work + more >= FOLD_SHARE * left * (self.t - self.t0) + FOLD_FLOOR * left

    def growth(self) -> int:
        """The product pairs of the next `grow`."""
        new = min(max(64, self.n // 2), len(self.order) - self.nxt)
        return new * (self.n + new) if self.gram is not None and self.n + new <= GRAM_ROWS else 0

    def grow(self) -> None:
        """Take the next leaders from behind, brought up to date with the centres they have not seen. Every centre
        since the block product was a leader when picked, so the newcomers' Gram rows hold their distances to those
        centres (their columns); only points behind since an earlier block are compared with the centres before it
        as a product of their own."""
        B = self.B
        new = self.order[self.nxt : self.nxt + max(64, self.n // 2)]
        self.nxt += len(new)
        a, b = self.n, self.n + len(new)
        if b > GRAM_ROWS and self.gram is not None:  # from now one matrix-vector product per pick, no columns
            self._take_in(self.t)
            self.gram = None
        B.fold(new, self.t if self.gram is None else self.t0)
        self._reserve(b)
        nt = torch.from_numpy(new)
        torch.index_select(B.xc, 0, nt, out=self.rows[a:b])
        self.sq[a:b] = B.sq[nt]
        near, near_at, err, ex = B.near[new], B.near_at[new], B.err[new], B.ex[new]
        val = near[:, 0]
        if self.gram is not None:
            g = sq_distances(self.rows[a:b], self.sq[a:b], self.rows[:b], self.sq[:b])
            self.gram[a:b, :b] = g
            self.gram[:a, a:b] = g[:, :a].T
            self.work += g.numel()
            d = g[:, torch.tensor(self.pick_slots, dtype=torch.int64)].double().numpy()  # centres t0 .. t - 1
            ex = B.fold_exact(new, ex, err, d, self.t0)
            if len(self.pick_slots):
                val = np.minimum(val, d.min(1))
            taken = self.c0 - self.t0  # centres the leaders have taken into their nearest: these too
            if taken:
                near, near_at = merge_columns(near, near_at, d[:, :taken], self.t0)
            self.cols[a:b, : self.picks] = d[:, taken:]
        self.n = b
        self.idx = np.concatenate([self.idx, new])
        self.near, self.near_at = np.concatenate([self.near, near]), np.concatenate([self.near_at, near_at])
        self.val = np.concatenate([self.val, val])
        self.err, self.ex = np.concatenate([self.err, err]), np.concatenate([self.ex, ex])

    def add_centres(self, t: int, slots: list[int]) -> None:
        """Fold centres t - k .. t - 1, the leaders in `slots` (k of them; one past GRAM_ROWS), into every leader."""
        B = self.B
        self.t, k = t, len(slots)
        if self.gram is not None:  # symmetric: the rows read contiguous memory (numpy's: less overhead)
            d = self.gram.numpy()[slots, : self.n].astype(np.float64)
        else:
            d = B.dist(self.rows[: self.n], self.sq[: self.n], t - 1, t).double().numpy().T
            self.work += GRAM_RATE * self.n
        # known exact values the centres may lower (NaN: unknown), against the values before them: a superset of one
        # centre at a time, the same minimum
        self.ex = B.fold_exact(self.idx, self.ex, self.err, d.T, t - k)
        np.minimum(self.val, d.min(0), out=self.val)
        if self.gram is None:  # many leaders: into their nearest now, where the centre is among them (few)
            d = d[0]
            hit = np.flatnonzero(d < self.near[:, -1])
            if len(hit):
                self.near[hit], self.near_at[hit] = merge_near(self.near[hit], self.near_at[hit], d[hit, None],
                                                               np.full((len(hit), 1), t - 1))
            self.c0 = t
            return
        if self.picks + k > self.cols.shape[1] and self.cols.nbytes >= COLS_BYTES:
            self._take_in(t - k)
        if self.picks + k > self.cols.shape[1]:  # (a chain may be wider than the columns kept)
            self._columns(len(self.cols), max(2 * self.picks, self.picks + k))
        self.cols[: self.n, self.picks : self.picks + k] = d.T
        self.picks += k
        self.pick_slots += slots

    def chain(self, first: int, limit: int) -> list[int]:
        """Leader slots certain to be the next picks after the leader in `first`, in order, at most `limit`: each
        one's lower bound, lowered by its distances to the picks before it in the chain (the Gram rows, less its
        rounding bound), lies above every other point's upper bound (as they are: a pick only lowers a value).
        Few points compete closely for one pick, but the next several are often clear of the rest: those picks
        need no decision of their own."""
        if limit <= 0 or self.gram is None:
            return []
        low, up = self.bounds()
        live = np.flatnonzero(np.isfinite(self.val))
        if not len(live):
            return []
        cand = live[np.argsort(-low[live], kind="stable")[:CHAIN]]
        tops = live[np.argsort(-up[live], kind="stable")[: len(cand) + 1]].tolist()  # one outside any chain
        behind = self.behind
        # the candidates' lower bounds as each pick before them lowers them (their Gram rows, less the bound)
        lows = self.gram.numpy()[np.ix_(np.concatenate([[first], cand]), cand)] - self.err[cand]
        lo = np.minimum(low[cand], lows[0])
        out, picked = [], {first}
        for c, j in enumerate(cand.tolist()[:limit]):
            rest = next((up[o] for o in tops if o != j and o not in picked), -np.inf)
            if not lo[c] > max(rest, behind):
                break
            out.append(j)
            picked.add(j)
            np.minimum(lo, lows[c + 1], out=lo)
        for j in out:
            self.remove(j)
        return out

    def _take_in(self, c0: int) -> None:
        """Take the kept columns into the leaders' nearest; the next column is centre c0's."""
        if self.picks:
            live = np.flatnonzero(np.isfinite(self.val))
            self.near[live], self.near_at[live] = self.nearest(live)
        self.picks, self.c0 = 0, c0

    def nearest(self, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`near` and `near_at` of leaders i, up to date with every centre."""
        return merge_columns(self.near[i], self.near_at[i], self.cols[i, : self.picks], self.c0)

    def exact(self, i: np.ndarray, t: int) -> np.ndarray:
        """Exact values of leaders i: from their nearest (as of joining or the last take-in) and the columns since
        that lie within the band."""
        band, more = self.val[i] + 2 * self.err[i], None
        if self.picks:
            r, j = np.nonzero(self.cols[i, : self.picks] <= band[:, None])
            more = r, self.B.centres[self.c0 + j]
        return self.B.exact(self.idx[i], self.near[i], self.near_at[i], self.err[i], t, self.val[i], more)

    def remove(self, i: int) -> None:
        """Leader i is picked; `last` keeps its approximate value."""
        self.last = float(self.val[i])
        self.val[i], self.err[i], self.ex[i] = -np.inf, 0.0, np.nan

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bounds of the leaders' exact values (the value itself where it is known)."""
        low, up = self.val - self.err, self.val + self.err
        known = np.flatnonzero(~np.isnan(self.ex))  # few
        low[known] = up[known] = self.ex[known]
        return low, up

    def write_back(self) -> None:
        """Hand the leaders' state back to the pool's arrays (before a block product)."""
        live = np.flatnonzero(np.isfinite(self.val))
        P = self.idx[live]
        B = self.B
        B.near[P], B.near_at[P] = self.nearest(live) if self.picks else (self.near[live], self.near_at[live])
        B.ex[P], B.upto[P] = self.ex[live], self.t


def farthest_points(x: np.ndarray, n: int, seed: int, *, block: int = 1024, rho: float = 0.95,
                    progress: Progress | None = None) -> tuple[np.ndarray, dict]:
    """Greedy farthest-point selection, exact (see the module's docstring): n pool indices in selection order and
    what decided them (the start, the share of all pool-centre distances computed, the products' precision).

    Float pools run on float32 products unless the picks' values fall below WIDE_BELOW times the float32 rounding
    bound (data whose extent dwarfs the distances that decide the later picks, such as tight clusters far apart):
    there the band of undecided points spans much of the pool, and the selection starts again on float64 products,
    whose bound is 2^29 times smaller. The picks are the definition's either way."""
    m = len(x)
    X = selection_input(x)
    progress = or_silent(progress)
    progress.start(f"greedy selection, {n} of {m}", n)
    done = [0]  # picks reported: a rerun in float64 reports only beyond them

    def report(t: int) -> None:
        while t - done[0] >= 256:
            progress.advance(256)
            done[0] += 256

    pairs = 0
    for wide in (False, True):
        B = _Bounds(X, n, wide=wide)  # NaN or inf: a UserError (`scaled_rows`)
        chosen = _greedy(B, n, greedy_start(m, seed), block, rho, report)
        pairs += B.pairs
        products = str(B.xc.dtype).removeprefix("torch.")  # int8, float32 or float64
        B = None  # the float32 working copy goes before a float64 one is made
        if chosen is not None:
            break
    progress.advance(n - done[0])
    progress.close()
    return np.asarray(chosen, dtype=np.int64), {"start": int(chosen[0]), "distances_computed": int(pairs),
                                                "products": products}


WIDE_BELOW = 32  # float32 products while the picks' values lie above this many times their rounding bound


def _greedy(B: _Bounds, n: int, start: int, block: int, rho: float, report) -> list[int] | None:
    """The selection on B's products, from `start`; None as soon as a pick's value falls below WIDE_BELOW times the
    float32 rounding bound (`farthest_points`)."""
    m = len(B.x)
    taken = np.zeros(m, dtype=bool)
    taken[start] = True
    B.add(0, start)
    chosen = [start]
    coarse = WIDE_BELOW * float(B.err.max()) if B.dist_dtype == torch.float32 else -np.inf
    A, flushed, last, slots, before = None, 0, -np.inf, [], -np.inf
    t = 1
    while t < n:
        report(t)
        picked = None
        if A is not None and not (t - flushed >= block or A.crowded(0)):
            A.add_centres(t, slots)
            picked = _pick(B, A, t, n)  # None: a block product first, in place of a growth of the leaders
        if picked is None:  # everyone against the centres added since: one product per row chunk
            if A is not None:
                A.write_back()  # the leaders' state, up to date with the centres they have seen
            rest = np.flatnonzero(~taken)
            fell = last / before if before > 0 else 0.0  # over the last block
            level = max(rho, fell) * last if last > -np.inf else -np.inf  # the first block: everyone (rho = 0 too)
            B.fold(rest[B.ub(rest) >= level], t)  # the rest keep their (higher) bound until it competes
            before = last
            A = _Active(B, _ByBound(rest, B.ub(rest)), t)
            flushed = t
            picked = _pick(B, A, t, n)
        wins, slots, best, last = picked
        if best == 0.0:  # every remaining point is a copy of a centre: index order, as the ties give
            chosen.extend(np.flatnonzero(~taken)[: n - t].tolist())
            break
        if last < coarse:
            return None
        for win in wins:
            chosen.append(win)
            taken[win] = True
            B.add(t, win)
            t += 1
    return chosen


def _pick(B: _Bounds, A: _Active, t: int, n: int) -> tuple[list[int], list[int], float | None, float]:
    """The point of largest exact value among the pool's remaining points (lowest index among equal ones), and the
    leaders certain to follow it (`_Active.chain`, up to n picks in all): their pool indices and leader slots, the
    first one's value when it had to be computed, and the last one's approximate value (as before the chain's
    picks: only the fold level reads it); they leave the leaders."""
    while True:
        low, up = A.bounds()
        lo = low.max() if len(low) else -np.inf
        if lo > A.behind:
            break
        if A.t > A.t0 and A.crowded(A.growth()):  # a block product costs less than these leaders' products
            return None
        A.grow()
    near = np.flatnonzero(up >= lo)
    if len(near) == 1:
        i, best = int(near[0]), None
    else:
        todo = near[np.isnan(A.ex[near])]
        if len(todo):
            # and the next unknown leaders by upper bound, the likely contenders of the next picks: one call
            nxt = np.flatnonzero(np.isnan(A.ex) & (up < lo) & np.isfinite(A.val))  # live
            nxt = nxt[np.argsort(-up[nxt], kind="stable")[: PREFETCH]]
            todo = np.concatenate([todo, nxt])
            A.ex[todo] = A.exact(todo, t)
        ex = A.ex[near]
        best = float(ex.max())
        i = int(near[ex == best][np.argmin(A.idx[near[ex == best]])])
    slots = [i]
    A.remove(i)
    if best != 0.0:
        slots += A.chain(i, n - t - 1)
    return A.idx[slots].tolist(), slots, best, A.last
