"""The spread-maximising selectors: random, greedy farthest-point, threshold decay (`selection` is the entry).

Selectors take vectors (pixel or feature space) and return pool indices in selection order, never images, so
every run records exactly which samples were chosen. Distances are Euclidean; every decision that compares two
distances, or a distance with a threshold, is taken on exact float64 squared distances computed from
differences, so the fast paths here make exactly the choices of the straightforward definitions:

* greedy: start from a seeded random pool index; repeatedly add the pool point whose distance to its nearest
  selected point is largest; ties go to the lowest pool index (`farthest`).
* threshold: visit the pool in a seeded random order; accept a point if its squared distance to every accepted
  point is greater than tau^2; after each full pass multiply tau by `decay`; stop at N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from model_collapse.errors import UserError
from model_collapse.farthest import (WIDE_BELOW, check_finite, exact_sq, farthest_points, product_bound, scaled_rows,
                                    selection_input)
from model_collapse.metrics import distinct_index, image_ids
from model_collapse.neighbours import (PAD, Int8Rows, exact_int8, host_buffer, knn, sq_distances,
                                       sq_distances_to_rows)
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


def select_greedy(x: np.ndarray, n: int, seed: int, *, progress: Progress | None = None, **_) -> Selection:
    """Greedy farthest-point selection, exact, with its distance work in matrix products (`farthest`)."""
    indices, params = farthest_points(x, n, seed, progress=progress)
    return Selection(indices, "greedy", seed, params)


# ---------------------------------------------------------------------------------------------- threshold


def default_tau0(x: np.ndarray, seed: int = 0, sample: int = 2048, progress: Progress | None = None) -> float:
    """tau0 default: twice the median distance of a pool point to its nearest pool point at a positive distance,
    the median taken over a seeded sample of (at most) 2,048 pool points, each with its exact neighbours in the
    whole pool. Copies do not count: a point whose nearest neighbour is its twin counts its nearest distinct image
    (a pool of samples with many exact copies gets the spacing of its images, not 0).

    A first pass at that radius keeps only points well apart from each other; each further pass lowers tau by
    `decay` until N points are accepted, so the result starts as sparse as the pool allows.
    """
    m = len(x)
    if m <= sample:
        pick = np.arange(m)
        nn = knn(x, None, 1, progress=progress).distances[:, 0] if m > 1 else np.zeros(m)
    else:
        pick = np.sort(numpy_rng(seed, "tau0-sample").choice(m, sample, replace=False))
        # a pool point's first neighbour in the pool is itself, at distance 0
        nn = knn(x[pick], x, 2, progress=progress).distances[:, 1]
    # points with a copy: more neighbours of one point per image (the copies and the point itself come first, at 0),
    # k x4 until one lies at a positive distance; no pass over the whole pool's rows, and at most as many neighbours
    # per image as 4 x its copies (a few images with thousands of copies each: a few queries, not thousands)
    todo = np.flatnonzero(nn == 0)
    if len(todo):
        ids = image_ids(x[pick[todo]])
        first = np.unique(ids, return_index=True)[1]  # one sampled point per image
        value, left, k = np.zeros(len(first)), np.arange(len(first)), 2
        while len(left) and k < m:
            k = min(4 * k, m)
            d = knn(x[pick[todo[first[left]]]], x, k).distances
            found = d[:, -1] > 0
            value[left[found]] = d[found][np.arange(found.sum()), np.argmax(d[found] > 0, axis=1)]
            left = left[~found]
        nn[todo] = value[ids]
    nn = nn[nn > 0]  # none: every point copies one image (or its distances underflow to 0)
    return 2.0 * float(np.median(nn)) if len(nn) else 1.0  # one image: any radius accepts the first point only


def select_threshold(
    x: np.ndarray, n: int, seed: int, *, tau0: float | None = None, decay: float = 0.95, chunk: int = 1024,
    decay_when: str = "every_pass", progress: Progress | None = None, **_
) -> Selection:
    """Threshold decay filter, batched: exactly the sequential definition, a chunk of the visiting order at a time.

    `decay_when`: "every_pass" multiplies tau by `decay` after every full pass (the authors' released code);
    "empty_pass" only after a pass that accepted nothing (the paper's Algorithm 2). Both choose the same points:
    a point rejected in a pass lies within tau of a point accepted by then, the accepted set only grows, so a
    second pass at the same tau accepts nothing and then decays. Only the number of passes differs.

    The pool's rows are permuted once into visiting order, so a chunk is a slice. For each chunk, distances to the
    points accepted since its last visit come from one float32 matrix product, with a rigorous rounding bound;
    only pairs within that bound of tau^2 are recomputed exactly. A point whose distance to the accepted points it
    has seen already puts it surely within tau skips that product: it is out of this pass whatever came since
    (most rejected points, pass after pass). Where tau0 squared lies within WIDE_BELOW times that bound (tight
    clusters far apart), the working copy and its products are float64. 8-bit pixels take int8 products instead, which
    are exact: no pair is recomputed. Survivors are then resolved in visiting order among themselves (the first
    survivor is accepted and removes the survivors within tau of it, and so on), which is what the sequential
    loop does; a survivor's row of conflicts is computed only if it is accepted (`_Conflicts`).
    """
    m, d = x.shape
    if not 0.0 < decay < 1.0:
        raise UserError(f"decay must lie in (0, 1), got {decay}")
    if decay_when not in ("every_pass", "empty_pass"):
        raise UserError(f"decay_when must be every_pass or empty_pass, got {decay_when!r}")
    progress = or_silent(progress)
    x = selection_input(x)

    def check_distinct() -> None:  # counted only where it can matter: it costs a pass over every row's bytes
        n_distinct = len(distinct_index(x))
        if n_distinct < n:
            raise UserError(f"threshold selection: the pool has only {n_distinct} distinct images, fewer than N = {n}")

    if n > m:
        check_distinct()
    if tau0 is None:
        tau0 = default_tau0(x, seed, progress=progress)
        if not math.isfinite(tau0):  # NaN or inf in the pool (the set-up pass would say so too, later)
            check_finite(x)
    if not (math.isfinite(tau0) and tau0 > 0):
        raise UserError(f"tau0 must be a finite number > 0, got {tau0}")
    order = numpy_rng(seed, "threshold-order").permutation(m)
    # Everything below is in visiting order (position i holds pool row order[i]): a chunk is a slice, no gather.
    if exact_int8(x):  # 8-bit pixels: int8 products give exact distances, nothing to decide again
        rows = Int8Rows(x, order=order)
        X, sq, norms = rows.x, rows.sq, rows.sq.sqrt()
        exact = _Exact(x, order, 0.0, 0.0, 1.0)
    else:  # centred and scaled (for the approximate pass only), rounded once to float32; exact distances from x
        dtype = np.float32
        xc, sq, norms, scale2 = scaled_rows(x, order)
        gamma, tiny = product_bound(d, dtype)
        if tau0 * tau0 * scale2 < WIDE_BELOW * (gamma * (2 * norms.max()) ** 2 + tiny):
            # tau^2 within a few times float32's rounding bound (tight clusters far apart): most pairs near tau
            # would be decided on exact distances; float64 products tell them apart (greedy's WIDE_BELOW)
            dtype, xc, sq = np.float64, None, None  # the float32 copy goes before the float64 one is made
            xc, sq, norms, scale2 = scaled_rows(x, order, dtype=dtype)
            gamma, tiny = product_bound(d, dtype)
        X, sq, norms = torch.from_numpy(xc), torch.from_numpy(sq), torch.from_numpy(norms)
        exact = _Exact(x, order, gamma, tiny, scale2)
    accepted: list[int] = []  # positions
    is_acc = np.zeros(m, dtype=bool)
    # buffers filled in passes (`host_buffer`: a few page faults, not thousands), with PAD zero rows after the last
    # (`sq_distances_to_rows`)
    acc_buf = host_buffer((n + PAD, X.shape[1]), X.dtype, zeros=True)
    acc_sq = torch.zeros(n + PAD, dtype=torch.float64)
    surv_buf = host_buffer((min(chunk, m) + PAD, X.shape[1]), X.dtype, zeros=True)  # a chunk's survivors
    acc_norm = torch.empty(n, dtype=torch.float64)
    # per position: approximate squared distance to the nearest accepted point among the first upto[p] accepted.
    # The accepted set only grows and tau only shrinks, so this is carried from pass to pass and only the
    # points accepted since are folded in: about one M x N product in all, not one per pass.
    near = torch.full((m,), math.inf, dtype=torch.float64)
    upto = np.zeros(m, dtype=np.int64)
    tau = float(tau0)
    passes = 0
    distinct_checked = False

    def fold_in(q: np.ndarray, k: int, a: int = 0, b: int = 0) -> None:
        """Bring positions q (within the slice a:b, if given) up to date with the first k accepted points."""
        lo, qt = int(upto[q].min()), torch.from_numpy(q)
        # each row's smallest in the product's own dtype, then float64 (exact): no rows x accepted float64
        # temporaries, whose fresh pages cost as much as the product
        if 2 * len(q) >= b - a > 0:  # most of the slice: a product over it copies nothing
            approx = sq_distances_to_rows(X[a:b], sq[a:b], acc_buf, acc_sq, lo, k).min(1).values[q - a]
        else:
            approx = sq_distances_to_rows(X[qt], sq[qt], acc_buf, acc_sq, lo, k).min(1).values
        near[qt] = torch.minimum(near[qt], approx.double())
        upto[q] = k

    diameter = 2 * float(norms.max()) / math.sqrt(exact.scale2)  # no two points lie farther apart
    if diameter > 0 and math.log(tau / diameter) / -math.log(decay) > MAX_DECAYS:
        check_distinct()  # the more telling error first
        raise UserError(f"threshold selection: tau0 = {tau0!r} with decay = {decay!r} needs more than {MAX_DECAYS:,} "
                        f"passes to reach the pool's diameter ({diameter:g}); lower tau0 or the decay")
    progress.start(f"threshold selection, {n} of {m}", n)
    while len(accepted) < n:
        passes += 1
        at_start = len(accepted)
        t2 = tau * tau
        t2w = t2 * exact.scale2  # in the working copy's units
        for a in range(0, m, chunk):
            b = min(a + chunk, m)
            pos = a + np.flatnonzero(~is_acc[a:b])
            if not len(pos):
                continue
            it = torch.from_numpy(pos)
            k = len(accepted)
            alive = torch.ones(len(pos), dtype=torch.bool)
            if k:
                err = exact.bound(norms[it], acc_norm[:k].max())  # bounds every pair of this point
                # near over the first upto accepted points bounds the distance to the nearest of all from above:
                # a point already surely within tau stays out of this pass without the accepted points since (in
                # the later passes, most of the rejected ones)
                fold = (upto[pos] < k) & ~(near[it] + err <= t2w).numpy()
                if fold.any():
                    fold_in(pos[fold], k, a, b)
                alive &= ~(near[it] + err <= t2w)  # surely within tau of an accepted point
                amb = alive & ~(near[it] - err > t2w)  # near tau (or NaN): decide on exact distances
                if amb.any():
                    close = exact.close(X, sq, norms, it[amb], acc_buf[:k], acc_sq[:k], acc_norm[:k], accepted, t2)
                    alive[torch.nonzero(amb).squeeze(1)[close]] = False
            surv = it[alive]
            if not surv.numel():
                continue
            # resolve among survivors in visiting order, on exact distances
            before = len(accepted)
            accepted += surv[_Conflicts(X, exact, sq, norms, surv, t2, surv_buf).resolve(n - before)].tolist()
            new = torch.as_tensor(accepted[before:])
            is_acc[new.numpy()] = True
            acc_buf[before : len(accepted)] = X[new]
            acc_sq[before : len(accepted)], acc_norm[before : len(accepted)] = sq[new], norms[new]
            progress.advance(len(accepted) - before)
            if len(accepted) == n:
                break
        else:
            if decay_when == "every_pass" or len(accepted) == at_start:
                if tau * decay == tau:  # 0 or the last subnormals: tau stops shrinking and the passes never end
                    check_distinct()
                    raise UserError(f"threshold selection: tau shrank to {tau!r} with {len(accepted)} of N = {n} "
                                    f"accepted: the points left lie closer to accepted ones than float64 resolves")
                tau *= decay
            if len(accepted) == at_start:  # empty: so is every pass while tau^2 >= each point's bound on its value
                stale = np.flatnonzero(~is_acc & (upto < len(accepted)))  # skipped this pass: their bound is loose
                for c in range(0, len(stale), chunk):
                    fold_in(stale[c : c + chunk], len(accepted))
                rest = torch.as_tensor(np.flatnonzero(~is_acc))
                top = float((near[rest] + exact.bound(norms[rest], acc_norm[: len(accepted)].max())).max())
                top /= exact.scale2  # the input's units
                if not distinct_checked and (top > t2 or top <= 0):
                    # empty although a bound reached above tau: perhaps every point left copies an accepted one (an
                    # exact distance of 0 lies within any tau), and the passes would never end
                    check_distinct()
                    distinct_checked = True
                try:
                    tau, passes = decay_below(tau, decay, top, passes)  # a huge tau0 ends
                except UserError:
                    check_distinct()  # the more telling error first
                    raise
    progress.close()
    return Selection(order[accepted].astype(np.int64), "threshold", seed,
                     {"tau0": float(tau0), "decay": float(decay), "decay_when": decay_when, "tau_final": tau,
                      "passes": passes, "products": str(X.dtype).removeprefix("torch."),
                      "order": order.astype(np.int64)})


MAX_DECAYS = 10**9  # passes of the threshold filter, counted while empty passes are skipped


def decay_below(tau: float, decay: float, top: float, passes: int) -> tuple[float, int]:
    """`while tau * tau >= top: tau *= decay; passes += 1`, with the same rounding (a sequential product in
    float64, in growing blocks), refusing beyond MAX_DECAYS passes instead of running for hours."""
    block = 1
    with np.errstate(over="ignore", under="ignore"):
        while tau * tau >= top:
            if passes >= MAX_DECAYS:
                raise UserError(f"threshold selection: more than {MAX_DECAYS:,} passes (tau = {tau!r}, decay = "
                                f"{decay!r}); lower tau0 or the decay")
            seq = np.multiply.accumulate(np.concatenate([[tau], np.full(block, decay)]))[1:]
            below = np.flatnonzero(seq * seq < top)
            if len(below):
                return float(seq[below[0]]), passes + int(below[0]) + 1
            tau, passes = float(seq[-1]), passes + block
            block = min(2 * block, 1 << 20)
    return tau, passes


class _Exact:
    """Exact float64 squared distances from differences of the input rows (`exact_sq`), between visiting positions
    (position i: pool row order[i]); and the bound on the working copy's approximate ones (in its units, `scale2`
    times the input's)."""

    def __init__(self, x: np.ndarray, order: np.ndarray, gamma: float, tiny: float, scale2: float):
        self.x, self.order, self.gamma, self.tiny, self.scale2 = x, order, gamma, tiny, scale2

    def sq(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return exact_sq(self.x, self.order[a], self.order[b])

    def bound(self, norm_a, norm_b):
        """|approximate - exact| squared distance of rows with norms (upper bounds) norm_a, norm_b."""
        return self.gamma * (norm_a + norm_b) ** 2 + self.tiny

    def close(self, X, sq, norms, rows, acc, acc_sq, acc_norm, accepted: list, t2: float) -> torch.Tensor:
        """For each row: is some accepted point within tau (exact squared distance <= tau^2)?"""
        t2w = t2 * self.scale2
        approx = sq_distances(X[rows], sq[rows], acc, acc_sq).double()  # float32 (within the bound), or exact int8
        err = self.bound(norms[rows][:, None], acc_norm[None])
        close = (approx + err <= t2w).any(1)
        amb = ~(approx - err > t2w) & ~(approx + err <= t2w) & ~close[:, None]  # NaN: decided exactly
        if amb.any():
            r, c = torch.nonzero(amb, as_tuple=True)
            hit = torch.from_numpy(self.sq(rows[r].numpy(), np.asarray(accepted)[c.numpy()]) <= t2)
            close[r[hit]] = True
        return close


class _Conflicts:
    """Which later survivors lie within tau of a survivor (exact squared distance <= tau^2), asked in visiting order
    for each survivor that is accepted.

    Rows come in blocks: the next survivors still alive against every later survivor, one float32 matrix product
    with the rounding bound. The first block has BLOCK rows and each next one twice as many, up to MAX_BLOCK: with a
    large tau the first survivor removes the rest and one small block is all it costs (a survivor that an earlier
    one removes never gets a row of its own); where few conflict, the later blocks are wide enough to run at the
    product's full rate (64 rows ran at half of it). A pair within the bound of tau^2 is recomputed exactly from
    differences only when its row is asked for."""

    BLOCK, MAX_BLOCK, SUB = 64, 512, 128

    def __init__(self, X, exact: _Exact, sq, norms, surv, t2: float, buf: torch.Tensor):
        # the survivors' rows, gathered into `buf` (a chunk's rows and PAD more, one buffer for every chunk of the
        # call: fresh 12 MiB arrays cost thousands of page faults, as long as the filter's products on a 4,096 x 3,072
        # pool); the rows after them, zeros or an earlier chunk's, pad the products (`sq_distances_to_rows`)
        self.X = buf[: len(surv) + PAD]
        torch.index_select(X, 0, surv, out=self.X[: len(surv)])  # (numpy's take with `out`: 7x as long)
        self.sq, self.norms = torch.cat([sq[surv], sq.new_zeros(PAD)]), norms[surv]
        self.exact, self.surv, self.t2 = exact, surv.numpy(), t2
        self.at: dict[int, int] = {}
        self.block = self.BLOCK

    def _block(self, i: int, live: np.ndarray) -> None:
        """Rows: the next `block` live survivors from i; columns: every survivor after i (a slice: no copy). Rows go in
        sub-blocks of SUB, each against the columns after its first row only (a row's columns before it are never
        read: 37% of a 487-row block's pairs)."""
        rows = torch.from_numpy(i + np.flatnonzero(live[i:])[: self.block])
        self.block = min(2 * self.block, self.MAX_BLOCK)
        X, sq, norms, end = self.X, self.sq, self.norms, len(self.surv)
        t2w = self.t2 * self.exact.scale2
        self.sure = np.zeros((len(rows), end - i - 1), dtype=bool)
        self.amb = np.zeros_like(self.sure) if self.exact.gamma else None
        for a in range(0, len(rows), self.SUB):
            r = rows[a : a + self.SUB]
            lo = int(r[0]) + 1
            if lo == end:  # the last survivor: no later ones
                break
            approx = sq_distances_to_rows(X[r], sq[r], X, sq, lo, end)
            # a row's bound for all its pairs (the largest column norm): the product's values against per-row float64
            # limits (torch compares them in float64, exactly), with no rows x columns float64 temporaries (1.5 ms of 8)
            err = self.exact.bound(norms[r], norms[lo:].max())
            sure = self.sure[a : a + len(r), lo - i - 1 :]
            sure[:] = (approx <= (t2w - err)[:, None]).numpy()
            if self.amb is not None:  # NaN too
                self.amb[a : a + len(r), lo - i - 1 :] = ~(approx > (t2w + err)[:, None]).numpy() & ~sure
        self.rows = rows.numpy()
        self.at = {int(p): k for k, p in enumerate(self.rows)}
        self.first = i + 1  # the columns' first position
        # rows that may remove no later survivor alive now (nor later: the live ones only become fewer)
        may = (self.sure if self.amb is None else self.sure | self.amb) & live[None, i + 1 :]
        self.quiet = ~(may & (np.arange(i + 1, len(self.surv))[None] > self.rows[:, None])).any(1)

    def resolve(self, limit: int) -> np.ndarray:
        """The survivors accepted, in visiting order (positions), at most `limit`: each accepted one removes the later
        ones within tau of it. A run of block rows that remove nobody is accepted at once (those still alive):
        where few conflict, most survivors need no step of their own."""
        live = np.ones(len(self.surv), dtype=bool)
        out: list[int] = []
        i = 0
        while i < len(live) and len(out) < limit:
            if not live[i]:
                i += 1
                continue
            if i not in self.at:
                self._block(i, live)
            k = self.at[i]
            stop = k + int(np.argmin(np.append(self.quiet[k:], False)))  # the run of quiet rows from k
            if stop > k:
                run = self.rows[k:stop]
                out += run[live[run]][: limit - len(out)].tolist()
                i = int(self.rows[stop]) if stop < len(self.rows) else int(run[-1]) + 1
                continue
            out.append(i)
            if len(out) < limit:
                live[self.later(i, live)] = False
            i += 1
        return np.asarray(out, dtype=np.int64)

    def later(self, i: int, live: np.ndarray) -> np.ndarray:
        """Positions j > i of the survivors still alive within tau of survivor i (itself alive)."""
        if i not in self.at:
            self._block(i, live)
        k, a = self.at[i], i + 1 - self.first
        mask = live[i + 1 :]
        hit = self.sure[k, a:] & mask
        if self.amb is not None:
            ask = np.flatnonzero(self.amb[k, a:] & mask)
            if len(ask):
                hit[ask] = self.exact.sq(self.surv[i + 1 + ask], np.full(len(ask), self.surv[i])) <= self.t2
        return i + 1 + np.flatnonzero(hit)
