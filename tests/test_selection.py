import numpy as np
import pytest

from model_collapse.errors import UserError
from model_collapse.neighbours import knn
from model_collapse.rng import numpy_rng
from model_collapse.selection import class_quotas, default_tau0, greedy_start, select, select_greedy, select_threshold


def greedy_reference(x, n, seed):
    """The definition, straightforwardly: full distance update every step, arg-max with ties to the lowest index."""
    X = np.asarray(x, np.float64)
    start = greedy_start(len(X), seed)
    mind = ((X - X[start]) ** 2).sum(1)
    chosen = [start]
    mind[start] = -1.0
    for _ in range(n - 1):
        c = int(np.argmax(mind))
        chosen.append(c)
        mind = np.minimum(mind, ((X - X[c]) ** 2).sum(1))
        mind[chosen] = -1.0
    return np.array(chosen)


def threshold_reference(x, n, seed, tau0, decay):
    """The definition, straightforwardly: one point at a time, in the seeded order, pass after pass."""
    X = np.asarray(x, np.float64)
    order = numpy_rng(seed, "threshold-order").permutation(len(X))
    acc, is_acc, tau = [], np.zeros(len(X), bool), tau0
    while len(acc) < n:
        for p in order:
            if is_acc[p]:
                continue
            if not acc or (((X[acc] - X[p]) ** 2).sum(1) > tau * tau).all():
                acc.append(int(p))
                is_acc[p] = True
                if len(acc) == n:
                    break
        else:
            tau *= decay
    return np.array(acc)


def _pools(rng):
    for m, d in [(40, 2), (300, 3), (500, 16), (400, 64)]:
        yield rng.normal(size=(m, d)).astype(np.float32)
        yield rng.integers(0, 4, size=(m, d)).astype(np.float32)  # exact ties everywhere
        x = rng.normal(size=(m, d)).astype(np.float32)
        x[: m // 5] = x[m // 5 : 2 * m // 5]  # exact duplicates
        yield x
        # clustered, low intrinsic dimension (as image features are)
        centres = rng.normal(size=(8, d)) * 5
        yield (centres[rng.integers(0, 8, m)] + rng.normal(size=(m, d)) * 0.3).astype(np.float32)


def test_greedy_equals_reference(rng):
    for i, x in enumerate(_pools(rng)):
        for n in (1, 5, len(x) // 3, len(x)):
            fast = select_greedy(x, n, seed=i).indices
            np.testing.assert_array_equal(fast, greedy_reference(x, n, i), err_msg=f"pool {i}, n {n}")


def test_padded_products_stay_within_the_spare_rows_and_drop_them(rng):
    """Products take `padded_count` columns, a multiple of 8, from at most PAD spare rows past the last real one;
    the selectors give the definition's picks for every column count around those multiples."""
    from model_collapse.farthest import farthest_points
    from model_collapse.neighbours import PAD, padded_count

    for n in range(2000):
        p = padded_count(n)
        assert 0 <= p - n < PAD and (n < 8 or p % 8 == 0), n
    x = rng.normal(size=(400, 5)).astype(np.float32)
    for n in (9, 17, 33, 120):
        for block in (9, 17, 1024):  # block products against 8 centres and more
            np.testing.assert_array_equal(farthest_points(x, n, 1, block=block)[0], greedy_reference(x, n, 1))
        for chunk in (16, 64):  # chunks against 8 accepted points and more, and wide conflict blocks
            np.testing.assert_array_equal(select_threshold(x, n, 1, tau0=2.0, chunk=chunk).indices,
                                          threshold_reference(x, n, 1, 2.0, 0.95))


def test_points_by_bound_read_in_parts_give_the_full_stable_order(rng):
    """Greedy's lazily sorted order (partitions of the remaining bounds, each sorted) against one stable argsort:
    heavy ties, infinities, reads one at a time and in slices past the end, pools smaller and larger than a part."""
    from model_collapse.farthest import _ByBound

    for m in (0, 1, 5, 1023, 1025, 5000):
        for kind in ("ties", "inf", "spread"):
            b = {"ties": rng.integers(0, 3, m).astype(float), "spread": rng.normal(size=m),
                 "inf": np.where(rng.random(m) < 0.3, np.inf, rng.integers(0, 5, m))}[kind]
            points = np.sort(rng.choice(10 * m + 1, m, replace=False))
            want = points[np.argsort(-b, kind="stable")]
            got = _ByBound(points, b)
            reads, at = [], 0
            while at < m:
                step = int(rng.integers(1, 700))
                reads.append(got[at] if step == 1 else got[at : at + step])
                at += step
            np.testing.assert_array_equal(np.concatenate([np.atleast_1d(r) for r in reads] or [[]]), want)


def test_greedy_on_integer_pixels(rng):
    x = rng.integers(0, 256, size=(300, 64)).astype(np.uint8)
    x[100:150] = x[:50]
    feats = x.astype(np.float32) / 255
    np.testing.assert_array_equal(select_greedy(feats, 200, seed=3).indices, greedy_reference(feats, 200, 3))


def test_threshold_equals_reference(rng):
    for i, x in enumerate(_pools(rng)):
        distinct = len(np.unique(x, axis=0))
        for n in (1, 7, distinct // 2, distinct):
            for tau0 in (0.5, 3.0):
                fast = select_threshold(x, n, seed=i, tau0=tau0, decay=0.9, chunk=64).indices
                ref = threshold_reference(x, n, i, tau0, 0.9)
                np.testing.assert_array_equal(fast, ref, err_msg=f"pool {i}, n {n}, tau0 {tau0}")


def test_threshold_decides_survivors_at_tau_exactly_and_only_when_asked(rng, monkeypatch):
    """Survivors of a chunk at exactly tau from each other (a grid of spacing tau0, float32): the pairs inside the
    rounding bound are decided on exact distances, and only those an accepted survivor asks for (the rows of
    survivors removed earlier are never computed)."""
    import model_collapse.spread as S

    exact_sq = S.exact_sq
    g = np.stack(np.meshgrid(np.arange(12), np.arange(12)), -1).reshape(-1, 2).astype(np.float32) * 0.75
    x = np.concatenate([g, g + np.float32(1e-3) * rng.normal(size=g.shape).astype(np.float32)])
    for tau0 in (0.75, 1.5):
        askers = []  # every exact pair pits a point against an accepted one (the asking survivor, or the set's)
        monkeypatch.setattr(S, "exact_sq", lambda x, rows, cols: askers.extend(cols) or exact_sq(x, rows, cols))
        got = select_threshold(x, 60, seed=4, tau0=tau0, decay=0.9, chunk=1024).indices
        np.testing.assert_array_equal(got, threshold_reference(x, 60, 4, tau0, 0.9))
        assert askers and set(askers) <= set(got.tolist())


def test_long_double_pools_are_chosen_on_their_float64_values():
    """Long-double input is taken as the float64 values the definitions compute with (a difference of one float64
    and one long-double operand gave two equal rows a positive distance)."""
    e = np.longdouble(2) ** -60
    x = np.array([[1 + e], [3], [1 + e], [1 + e], [3], [1 + e], [1 + e]], dtype=np.longdouble)
    for seed in range(4):
        np.testing.assert_array_equal(select_greedy(x, 7, seed=seed).indices, greedy_reference(x, 7, seed))
        np.testing.assert_array_equal(select_threshold(x, 2, seed=seed, tau0=1.0).indices,
                                      threshold_reference(x, 2, seed, 1.0, 0.95))


def test_threshold_at_any_scale(rng):
    """Pools of values from 1e-30 to 1e30, float32 and float64: the working copy is scaled by a power of two (no
    float32 underflow or overflow in its products), or left as it is (float32 norms within [2^-20, 2^20]: either
    side of both ends here), so the choices are the sequential definition's at any scale."""
    for e in (-30, -22, -7, -6, 0, 5, 6, 18, 20, 30):
        for dt in (np.float32, np.float64):
            x = (rng.normal(size=(150, 6)) * 10.0**e).astype(dt)
            x[100:120] = x[:20]
            tau0 = 1.5 * 10.0**e
            got = select_threshold(x, 40, seed=e % 7, tau0=tau0, decay=0.9, chunk=32).indices
            np.testing.assert_array_equal(got, threshold_reference(x, 40, e % 7, tau0, 0.9), err_msg=f"{e} {dt}")


def test_threshold_resolves_a_chunk_of_many_survivors_in_growing_blocks(rng, monkeypatch):
    """A chunk of 900 survivors that mostly do not conflict: their conflicts come in blocks of 64, 128, 256 and 512
    rows (counted; the next pass starts again at 64), with copies and near ties among them, and the choices are the
    sequential definition's."""
    import model_collapse.spread as S

    x = rng.normal(size=(900, 8)).astype(np.float32)
    x[800:] = x[:100]  # copies
    x[700:750] = x[600:650] + np.float32(1e-6)  # near ties
    sizes = []
    block = S._Conflicts._block
    monkeypatch.setattr(S._Conflicts, "_block", lambda self, i, live: sizes.append(self.block) or block(self, i, live))
    tau0 = 0.8
    got = select_threshold(x, 780, seed=3, tau0=tau0, decay=0.9, chunk=1024).indices
    np.testing.assert_array_equal(got, threshold_reference(x, 780, 3, tau0, 0.9))
    assert sizes[:5] == [64, 128, 256, 512, 64]


def test_threshold_conflict_rows_in_sub_blocks_make_the_same_choices(rng, monkeypatch):
    """A block's rows go in sub-blocks, each against the survivors after its first row only, with one rounding
    bound per row (its largest against the columns): any sub-block size, down to a row each, gives the sequential
    definition's choices on float pools with copies and near ties, float64 ones and 8-bit pixels."""
    import model_collapse.spread as S

    x = rng.normal(size=(600, 8)).astype(np.float32)
    x[500:] = x[:100]  # copies
    x[400:450] = x[300:350] + np.float32(1e-6)  # near ties
    x[:50] *= 3  # norms of several sizes
    z = rng.integers(0, 4, size=(500, 6)).astype(np.uint8)  # many equal distances
    for pool, tau0, n in ((x, 0.8, 450), (x.astype(np.float64), 0.8, 450), (z, 2.5, 90)):
        want = threshold_reference(pool, n, 3, tau0, 0.9)
        for sub in (1, 5, 128, 4096):
            monkeypatch.setattr(S._Conflicts, "SUB", sub)
            got = select_threshold(pool, n, seed=3, tau0=tau0, decay=0.9, chunk=1024).indices
            np.testing.assert_array_equal(got, want, err_msg=f"{pool.dtype} SUB {sub}")


def test_threshold_takes_float64_products_where_tau_is_near_float32s_bound(rng, monkeypatch):
    """Tight clusters far apart: tau0 (twice the median nearest-neighbour distance) squared lies within a few times
    the float32 rounding bound of data this wide, so most pairs near tau would be decided on exact distances
    (0.88 s on 16,384 x 16, 0.08 s on float64 products); the filter works on float64 products there, float32
    elsewhere, and chooses as the sequential definition does. Every float pool on float64 products too."""
    import model_collapse.spread as S

    line = (rng.normal(size=(1500, 8)) + 10 * rng.integers(0, 40, (1500, 1))).astype(np.float32)
    near = (rng.normal(size=(1500, 8)) + 10 * rng.integers(0, 3, (1500, 1))).astype(np.float32)
    for pool, products in ((line, "float64"), (near, "float32")):
        tau0 = default_tau0(pool, 0)
        sel = select_threshold(pool, 300, 2, tau0=tau0)
        np.testing.assert_array_equal(sel.indices, threshold_reference(pool, 300, 2, tau0, 0.95))
        assert sel.params["products"] == products
    monkeypatch.setattr(S, "WIDE_BELOW", 1e300)
    x = rng.integers(0, 3, size=(300, 5)).astype(np.float32)
    x[200:260] = x[:60]
    g = rng.integers(0, 4, size=(250, 3)).astype(np.float64) + rng.normal(size=(250, 3)) * 1e-9
    for pool, tau0, n in ((x, 1.5, 40), (x, 2.0, 40), (x + np.float32(0.1), 2.0, 40), (g, 1.2, 40),
                          (g * 1e-30, 1.2e-30, 40), (line, 2.0, 300)):  # tau 2 on a grid: pairs at exactly tau
        sel = select_threshold(pool, n, 4, tau0=tau0, decay=0.9, chunk=64)
        np.testing.assert_array_equal(sel.indices, threshold_reference(pool, n, 4, tau0, 0.9))
        assert sel.params["products"] == "float64"


def test_threshold_accepts_runs_of_quiet_survivors_but_not_the_removed_among_them(rng, monkeypatch):
    """Survivors whose rows remove nobody are accepted as one run, with no step of their own (only the 40 that
    remove a copy ask for theirs); a survivor that an earlier one removed can sit inside such a run (here a copy
    two places after its original, in visiting order) and stays out, as in the definition."""
    import model_collapse.spread as S

    asked = []
    later = S._Conflicts.later
    monkeypatch.setattr(S._Conflicts, "later", lambda self, i, live: asked.append(i) or later(self, i, live))
    m = 300
    order = numpy_rng(4, "threshold-order").permutation(m)
    y = rng.normal(size=(m, 8)).astype(np.float32) * 10  # far apart at tau 1
    y[2:120:3] = y[0:118:3]  # visiting position 3i + 2 copies position 3i
    x = np.empty_like(y)
    x[order] = y  # visiting position p holds y[p]
    for n in (150, 200):
        asked.clear()
        got = select_threshold(x, n, seed=4, tau0=1.0, chunk=1024).indices
        np.testing.assert_array_equal(got, threshold_reference(x, n, 4, 1.0, 0.95))
        assert len(asked) == 40, len(asked)


def test_threshold_chunk_size_does_not_change_result(rng):
    x = rng.integers(0, 3, size=(400, 6)).astype(np.float32)
    a = select_threshold(x, 50, seed=1, tau0=2.0, chunk=7).indices
    b = select_threshold(x, 50, seed=1, tau0=2.0, chunk=1024).indices
    np.testing.assert_array_equal(a, b)


def test_threshold_records_its_parameters(rng):
    x = rng.normal(size=(100, 4))
    s = select_threshold(x, 20, seed=5)
    assert s.params["tau0"] > 0 and s.params["decay"] == 0.95
    np.testing.assert_array_equal(np.sort(s.params["order"]), np.arange(100))
    np.testing.assert_array_equal(s.indices, threshold_reference(x, 20, 5, s.params["tau0"], 0.95))


def test_random_selection_is_seeded_and_distinct(rng):
    x = rng.normal(size=(100, 3))
    a, b, c = (select(x, 30, "random", s).indices for s in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert len(set(a)) == 30 and not np.array_equal(a, c)


def test_greedy_selection_has_higher_spread_than_random(rng):
    x = rng.normal(size=(400, 5))
    g = x[select(x, 40, "greedy", 0).indices]
    r = x[select(x, 40, "random", 0).indices]
    mind = lambda s: np.sort(np.sqrt(((s[:, None] - s[None]) ** 2).sum(-1)), 1)[:, 1].min()
    assert mind(g) > mind(r)


def test_per_class_selection_keeps_class_shares(rng):
    x = rng.normal(size=(300, 4))
    labels = np.repeat([0, 1, 2], [150, 100, 50])
    s = select(x, 60, "greedy", 0, labels=labels, per_class=True)
    assert np.bincount(labels[s.indices]).tolist() == [30, 20, 10]
    assert len(set(s.indices)) == 60


def test_class_quotas_sum_to_n():
    labels = np.array([0] * 7 + [1] * 7 + [2] * 7)
    q = class_quotas(labels, 10)
    assert sum(q.values()) == 10 and q == {0: 4, 1: 3, 2: 3}


@pytest.mark.parametrize("args, msg", [
    (dict(n=0), "N must be > 0"),
    (dict(n=500), "fewer than N"),
    (dict(n=5, method="nope"), "unknown selection method"),
])
def test_selection_rejects_bad_input(rng, args, msg):
    x = rng.normal(size=(50, 3))
    kw = {"method": "greedy", **args}
    with pytest.raises(UserError, match=msg):
        select(x, kw.pop("n"), kw.pop("method"), 0)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_selectors_called_directly_reject_nan_and_inf(rng, dtype):
    """The exact selectors find NaN and inf themselves (from the set-up pass's norms, not a pass of their own), and
    say so, whatever the float type; the threshold filter before choosing tau0 from such a pool too."""
    for bad in (np.nan, np.inf, -np.inf):
        x = rng.normal(size=(300, 7)).astype(dtype)
        x[123, 4] = bad
        for f, kw in ((select_greedy, {}), (select_threshold, {}), (select_threshold, {"tau0": 1.0})):
            with pytest.raises(UserError, match="NaN or inf"):
                f(x, 20, 0, **kw)


def test_selection_rejects_nan_and_bad_decay(rng):
    x = rng.normal(size=(50, 3))
    x[3, 1] = np.nan
    with pytest.raises(UserError, match="NaN"):
        select(x, 5, "greedy", 0)
    with pytest.raises(UserError, match="decay"):
        select(rng.normal(size=(50, 3)), 5, "threshold", 0, decay=1.5)
    with pytest.raises(UserError, match="distinct"):
        select(np.zeros((50, 3)), 5, "threshold", 0)
    huge = rng.integers(0, 3, size=(5, 1)) * 1e200  # squared distances past float64
    for method in ("greedy", "threshold"):
        with pytest.raises(UserError, match="overflow"):
            select(huge, 3, method, 3, tau0=1e200)


def test_threshold_finds_too_few_distinct_images_whatever_tau0(rng, monkeypatch):
    """Fewer distinct rows than N (counted only once the passes stall): a one-line error for float and 8-bit pools,
    with the default tau0 (taken on the distinct rows), a huge one and a tiny one; exactly N distinct rows are
    all taken, as the sequential definition takes them."""
    base = rng.normal(size=(8, 5))
    pools = [np.repeat(base, 6, axis=0).astype(np.float32), np.tile(base, (6, 1)),
             np.repeat(rng.integers(0, 256, size=(8, 16)), 6, axis=0).astype(np.uint8), np.zeros((50, 3), np.uint8)]
    with pytest.raises(UserError, match="only 5 distinct images"):  # fewer rows than N
        select_threshold(rng.normal(size=(5, 3)), 9, seed=0)
    for i, x in enumerate(pools):
        for tau0 in (None, 1e6, 1e-6):
            with pytest.raises(UserError, match="only [18] distinct images"):
                select_threshold(x, 9, seed=i, tau0=tau0)
        with monkeypatch.context() as mp:  # decays that would need more than MAX_DECAYS passes
            mp.setattr("model_collapse.spread.MAX_DECAYS", 10**5)
            with pytest.raises(UserError, match="only [18] distinct images"):
                select_threshold(x, 9, seed=i, tau0=10.0, decay=1 - 1e-9)
        if i < 3:
            got = select_threshold(x, 8, seed=i, tau0=3.0, decay=0.9).indices
            np.testing.assert_array_equal(got, threshold_reference(x, 8, i, 3.0, 0.9))


def test_default_tau0_is_the_spacing_of_the_distinct_images(rng):
    """Twice the median, over a seeded sample of pool points, of the distance to the nearest point at a positive
    distance: a pool of copies gets its images' spacing, not 0 (which was an error, "tau0 must be > 0", on a pool
    with enough distinct images), sampled or not, also where a point has dozens of copies; without copies, the
    plain nearest-neighbour median; one image, or one row, still gives one point."""
    def definition(x, seed, sample):
        X = np.asarray(x, np.float64)
        pick = (np.arange(len(X)) if len(X) <= sample else
                np.sort(numpy_rng(seed, "tau0-sample").choice(len(X), sample, replace=False)))
        d = np.sqrt(((X[pick, None] - X[None]) ** 2).sum(-1))
        return 2 * np.median(np.where(d > 0, d, np.inf).min(1))

    base = rng.normal(size=(60, 5)).astype(np.float32)
    many = np.concatenate([base, np.repeat(base[:2], 40, axis=0)])  # two images with 40 copies each
    for x in (base, np.repeat(base, 3, axis=0), np.concatenate([base, base[:7]]), many,
              np.repeat(rng.integers(0, 256, size=(60, 16)), 3, axis=0).astype(np.uint8)):
        for seed in (0, 1):
            np.testing.assert_allclose(default_tau0(x, seed, sample=100), definition(x, seed, 100), rtol=1e-6)
    import model_collapse.spread as S

    calls = []  # a few images with many copies: one query per image, not one per sampled copy
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(S, "knn", lambda q, r=None, k=1, **kw: calls.append(len(q)) or knn(q, r, k, **kw))
        default_tau0(many, 0, sample=100)
    assert calls[0] == 100 and max(calls[1:]) == 2
    x = np.repeat(base, 3, axis=0)
    sel = select_threshold(x, 40, seed=2)
    assert sel.params["tau0"] == default_tau0(x, 2) > 0
    np.testing.assert_array_equal(sel.indices, threshold_reference(x, 40, 2, sel.params["tau0"], 0.95))
    for one in (np.ones((30, 4), np.float32), base[:1], np.array([[1e-200, 0.0], [2e-200, 0.0]])):
        assert len(select_threshold(one, 1, seed=0).indices) == 1
    with pytest.raises(UserError, match="only 1 distinct images"):
        select_threshold(np.ones((30, 4), np.float32), 2, seed=0)


class Recorder:
    """A progress sink that keeps what it hears."""

    def __init__(self):
        self.stages, self.done = [], []

    def start(self, what, total):
        self.stages.append((what, total))
        self.done.append(0)

    def advance(self, n=1):
        assert n >= 0
        self.done[-1] += n

    def close(self):
        pass


@pytest.mark.parametrize("n", [1, 2, 255, 256, 257, 513])
def test_greedy_reports_every_pick(rng, n):
    x = rng.normal(size=(600, 5)).astype(np.float32)
    rec = Recorder()
    sel = select(x, n, "greedy", 3, progress=rec)
    assert rec.stages == [(f"greedy selection, {n} of 600", n)] and rec.done == [n]
    np.testing.assert_array_equal(sel.indices, select(x, n, "greedy", 3).indices)


def test_threshold_reports_every_acceptance_and_its_tau0_pass(rng):
    x = rng.normal(size=(300, 6)).astype(np.float32)
    rec = Recorder()
    select(x, 40, "threshold", 1, progress=rec)
    (knn_stage, knn_total), (stage, total) = rec.stages
    assert knn_stage.startswith("nearest neighbours") and rec.done[0] == knn_total > 0
    assert (stage, total) == ("threshold selection, 40 of 300", 40) and rec.done[1] == 40


def test_greedy_equals_reference_on_degenerate_and_clustered_pools(rng):
    """Pools where the pruning bounds are tight or vacuous: all points equal, two values, one dimension, clusters
    of exact copies, points far from the origin, and wide pools (d above the projection's 16 directions)."""
    pools = [
        np.zeros((50, 4), np.float32),
        np.repeat(rng.normal(size=(2, 6)), 40, axis=0).astype(np.float32),
        rng.integers(0, 5, size=(200, 1)).astype(np.float32),
        np.repeat(rng.normal(size=(30, 8)) * 3, 5, axis=0).astype(np.float32),
        (rng.normal(size=(300, 5)) * 1e-3 + 1e3).astype(np.float32),
        rng.normal(size=(250, 40)).astype(np.float32) @ np.diag(np.geomspace(10, 0.01, 40)).astype(np.float32),
        rng.random((600, 64), dtype=np.float32),  # high intrinsic dimension: steps reach most of the pool
        rng.integers(0, 2, size=(400, 48)).astype(np.float16),  # binary: ties everywhere, half floats
    ]
    for i, x in enumerate(pools):
        for seed in range(3):
            for n in (2, len(x) // 4, len(x)):
                np.testing.assert_array_equal(select_greedy(x, n, seed=seed).indices, greedy_reference(x, n, seed),
                                              err_msg=f"pool {i}, seed {seed}, n {n}")


def threshold_algorithm2_reference(x, n, seed, tau0, decay):
    """The paper's Algorithm 2, straightforwardly: sweep the pool in the seeded order, accepting points farther
    than tau from every accepted one; shrink tau only after a sweep that accepted nothing."""
    X = np.asarray(x, np.float64)
    order = numpy_rng(seed, "threshold-order").permutation(len(X))
    acc, tau, sweeps = [], tau0, 0
    while len(acc) < n:
        sweeps += 1
        added = 0
        for p in order:
            if p in acc:
                continue
            if not acc or (((X[acc] - X[p]) ** 2).sum(1) > tau * tau).all():
                acc.append(int(p))
                added += 1
                if len(acc) == n:
                    break
        if len(acc) < n and added == 0:
            tau *= decay
    return np.array(acc), sweeps


def test_threshold_decay_after_an_empty_pass_matches_algorithm_2_and_chooses_as_every_pass(rng):
    """The paper's Algorithm 2 (decay after an empty pass) and the authors' code (after every pass) choose the
    same points; only the number of passes differs."""
    for i in range(4):
        x = np.round(rng.normal(size=(160, 3)) * 2) / 2  # ties and duplicates
        x[10:20] = x[0]
        for tau0 in (0.5, 3.0):
            fast = select_threshold(x, 40, seed=i, tau0=tau0, decay=0.8, chunk=16, decay_when="empty_pass")
            ref, sweeps = threshold_algorithm2_reference(x, 40, i, tau0, 0.8)
            np.testing.assert_array_equal(fast.indices, ref)
            assert fast.params["passes"] == sweeps and fast.params["decay_when"] == "empty_pass"
            every = select_threshold(x, 40, seed=i, tau0=tau0, decay=0.8, chunk=16)
            np.testing.assert_array_equal(every.indices, fast.indices)
            assert every.params["passes"] <= fast.params["passes"]
    with pytest.raises(UserError, match="decay_when"):
        select_threshold(x, 5, seed=0, tau0=1.0, decay_when="sometimes")


def test_equal_share_draws_the_same_number_from_each_source():
    from model_collapse.paradigms import select_equal_share

    sources = np.repeat([-1, 0, 1, 2], [64, 64, 64, 10])  # the last source is smaller than its share
    sel = select_equal_share(sources, 64, seed=3)
    idx = sel.indices
    assert len(idx) == 64 and len(set(idx.tolist())) == 64
    counts = {s: int((sources[idx] == s).sum()) for s in (-1, 0, 1, 2)}
    assert counts[2] == 10 and min(counts[-1], counts[0], counts[1]) >= 16
    np.testing.assert_array_equal(select_equal_share(sources, 64, seed=3).indices, idx)
    even = select_equal_share(np.repeat([-1, 0, 1], 50), 31, seed=0).indices
    assert sorted(np.bincount(np.repeat([-1, 0, 1], 50)[even] + 1).tolist()) == [10, 10, 11]


def test_farthest_points_block_settings_do_not_change_the_choice(rng):
    """Block products every 1, 3 or 1,024 picks, stale bounds kept at any rho: always the definition's picks
    (ties and duplicates included)."""
    from model_collapse.farthest import farthest_points

    x = rng.integers(0, 3, size=(300, 5)).astype(np.float32)
    x[200:260] = x[:60]
    y = (rng.normal(size=(400, 24)) * 0.01 + 50).astype(np.float64)  # far from the origin, float64
    z = rng.integers(0, 256, size=(250, 48)).astype(np.uint8)
    for i, pool in enumerate((x, y, z)):
        want = greedy_reference(pool, len(pool) // 2, 5)
        for block in (1, 3, 1024):
            for rho in (0.0, 0.5, 0.95, 1.0):
                got, params = farthest_points(pool, len(pool) // 2, 5, block=block, rho=rho)
                np.testing.assert_array_equal(got, want, err_msg=f"pool {i}, block {block}, rho {rho}")
                assert params["start"] == want[0] and params["distances_computed"] > 0


def _leader_counts(monkeypatch):
    """A list that records greedy's number of leaders after every growth."""
    import model_collapse.farthest as F

    counts = []
    grow = F._Active.grow

    def counted(self):
        grow(self)
        counts.append(self.n)

    monkeypatch.setattr(F._Active, "grow", counted)
    return counts


def test_farthest_points_folds_everyone_in_the_first_block_at_any_rho(rng, monkeypatch):
    """The first block product compares every point with the start (rho = 0 included: 0 x -inf was NaN and folded
    no point, so the whole pool became leaders); later ones fold by the level, and the picks stay the definition's."""
    import model_collapse.farthest as F

    x = rng.normal(size=(3000, 8)).astype(np.float32)
    most = _leader_counts(monkeypatch)
    want = greedy_reference(x, 40, 0)
    for rho in (0.0, 0.5, 0.95):
        most.clear()
        np.testing.assert_array_equal(F.farthest_points(x, 40, 0, rho=rho)[0], want)
        assert max(most) < 1000, (rho, max(most))


def test_farthest_points_leaders_by_gram_or_matrix_vector_products_make_the_same_choice(rng, monkeypatch):
    """The leaders' distances to each new centre come from their Gram block (products when leaders join), or past
    GRAM_ROWS leaders from one matrix-vector product per pick; block products early (any share of the leaders'
    work) or never; the kept columns taken into the leaders' nearest when they reach COLS_BYTES: always the
    definition's picks, on float pools with ties and on 8-bit pixels."""
    import model_collapse.farthest as F

    x = rng.integers(0, 3, size=(300, 5)).astype(np.float32)
    x[200:260] = x[:60]
    z = rng.integers(0, 256, size=(250, 48)).astype(np.uint8)
    u = rng.random((400, 96), dtype=np.float32)  # near-equal values: many leaders
    for i, pool in enumerate((x, z, u)):
        want = greedy_reference(pool, len(pool) // 2, 2)
        for gram_rows, share, floor, cols in ((4096, 0.1, 16, 32 << 20), (70, 0.1, 16, 32 << 20),
                                              (4096, 0.0, 0, 32 << 20), (4096, 1e9, 1e9, 32 << 20),
                                              (0, 1e9, 1e9, 32 << 20), (4096, 1e9, 1e9, 1), (0, 1e9, 1e9, 1)):
            monkeypatch.setattr(F, "GRAM_ROWS", gram_rows)
            monkeypatch.setattr(F, "FOLD_SHARE", share)
            monkeypatch.setattr(F, "FOLD_FLOOR", floor)
            monkeypatch.setattr(F, "COLS_BYTES", cols)  # 1: the kept columns taken in every 64 picks
            got, _ = F.farthest_points(pool, len(pool) // 2, 2)
            np.testing.assert_array_equal(got, want, err_msg=f"pool {i}, gram rows {gram_rows}, share {share}, "
                                                             f"columns {cols}")


def test_fold_chunks_are_the_cheapest_ranges(rng):
    """`chunks` splits rows sorted by the centres they have seen into product ranges of least modelled work: equal to
    the best of every split at group boundaries (brute force), covering every row once, in order."""
    import itertools

    import model_collapse.farthest as F

    for trial in range(200):
        g = int(rng.integers(1, 7))
        vals = np.sort(rng.choice(60, size=g, replace=False))
        upto = np.repeat(vals, rng.integers(1, 40, size=g))
        hi, d = int(vals[-1]) + int(rng.integers(1, 80)), int(rng.choice([8, 384, 3072]))

        def work(ranges):
            return sum((b - a) * max(hi - int(upto[a]), F.MEMORY_COLS) + F.CHUNK_WORK / d for a, b in ranges)

        got = F.chunks(upto, hi, d)
        assert got[0][0] == 0 and got[-1][1] == len(upto) and all(x[1] == y[0] for x, y in zip(got, got[1:]))
        starts = [int(i) for i in np.flatnonzero(np.r_[True, upto[1:] != upto[:-1]])]
        assert all(a in starts for a, _ in got)
        best = min(work(list(zip((0,) + cut, cut + (len(upto),))))
                   for k in range(g) for cut in itertools.combinations(starts[1:], k))
        assert work(got) == pytest.approx(best, rel=1e-12), trial
    # many groups (a block product after many): the least work of a plain dynamic programme over them, quickly
    upto = np.sort(np.repeat(rng.choice(10**5, 2000, replace=False), rng.integers(1, 30, 2000)))
    starts = [int(i) for i in np.flatnonzero(np.r_[True, upto[1:] != upto[:-1]])] + [len(upto)]
    hi, d, best = 10**5 + 7, 384, [0.0]
    for j in range(1, len(starts)):
        best.append(min(best[i] + (starts[j] - starts[i]) * max(hi - int(upto[starts[i]]), F.MEMORY_COLS)
                        + F.CHUNK_WORK / d for i in range(j)))
    got = F.chunks(upto, hi, d)
    assert sum((b - a) * max(hi - int(upto[a]), F.MEMORY_COLS) + F.CHUNK_WORK / d for a, b in got) == \
        pytest.approx(best[-1], rel=1e-12)


def test_farthest_points_same_picks_whatever_the_fold_ranges(rng, monkeypatch):
    """Block products in one range per group of rows that saw the same centres, in one range for all (columns a
    row has seen masked), or split at a few rows (ROWS): the definition's picks, on float pools with ties and on
    8-bit pixels."""
    import model_collapse.farthest as F

    x = rng.integers(0, 3, size=(300, 5)).astype(np.float32)
    x[200:260] = x[:60]
    z = rng.integers(0, 256, size=(250, 48)).astype(np.uint8)
    u = rng.random((400, 96), dtype=np.float32)
    for i, pool in enumerate((x, z, u)):
        want = greedy_reference(pool, len(pool) // 2, 4)
        for cols, work, rows in ((24, 1e7, 4096), (0, 0.0, 4096), (10**9, 1e18, 4096), (24, 1e7, 7)):
            monkeypatch.setattr(F, "MEMORY_COLS", cols)
            monkeypatch.setattr(F, "CHUNK_WORK", work)
            monkeypatch.setattr(F, "ROWS", rows)
            got, _ = F.farthest_points(pool, len(pool) // 2, 4, block=16)
            np.testing.assert_array_equal(got, want, err_msg=f"pool {i}, {cols}, {work}, {rows}")


def test_farthest_points_hands_the_leaders_back_before_every_block_product(rng, monkeypatch):
    """A block product comes every `block` picks, when the leaders' products reach the threshold, or in place of a
    growth that would cross it (`_pick` returns None): each time the leaders' state (their distances to the centres
    since they joined, their exact values) goes back to the pool's arrays first, so the block product does not
    compute those pairs again; and the picks are the definition's."""
    import model_collapse.farthest as F

    made, back, nones = [], [], []
    init, write_back, pick = F._Active.__init__, F._Active.write_back, F._pick
    monkeypatch.setattr(F._Active, "__init__", lambda self, *a: made.append(1) or init(self, *a))
    monkeypatch.setattr(F._Active, "write_back", lambda self: back.append(1) or write_back(self))

    def counted(*args):
        out = pick(*args)
        nones.append(out is None)
        return out

    monkeypatch.setattr(F, "_pick", counted)
    u = rng.random((3000, 24), dtype=np.float32)
    c = (rng.normal(size=(3000, 8)) + 6 * rng.integers(0, 12, (3000, 1))).astype(np.float32)
    for pool, block in ((u, 1024), (u, 16), (c, 1024), (c, 16)):
        made.clear(), back.clear(), nones.clear()
        np.testing.assert_array_equal(F.farthest_points(pool, 600, 2, block=block)[0], greedy_reference(pool, 600, 2))
        assert len(made) > 2 and len(back) == len(made) - 1, (len(made), len(back))
    monkeypatch.setattr(F, "FOLD_SHARE", 0.0)  # a threshold of 2 pool rows' worth: the second growth crosses it
    monkeypatch.setattr(F, "FOLD_FLOOR", 2.0)
    made.clear(), back.clear(), nones.clear()
    np.testing.assert_array_equal(F.farthest_points(u, 600, 2)[0], greedy_reference(u, 600, 2))
    assert any(nones) and len(back) == len(made) - 1


def test_farthest_points_goes_to_float64_products_where_float32_cannot_tell_the_picks_apart(rng, monkeypatch):
    """Tight clusters far apart (on a line): the later picks' values, inside a cluster, fall to a few times the
    float32 rounding bound of data this wide, where nearly every point shares the top's band (the float32 run took
    16 s on 20,000 x 16 where the matrix-vector loop takes 1; 0.9 s on float64). The selection starts again on
    float64 products: the definition's picks, progress reported once per pick. Pools whose values stay well above
    the bound keep float32."""
    import model_collapse.farthest as F

    line = (rng.normal(size=(3000, 8)) + 10 * rng.integers(0, 40, (3000, 1))).astype(np.float32)
    near = (rng.normal(size=(3000, 8)) + 10 * rng.integers(0, 3, (3000, 1))).astype(np.float32)
    for pool, products in ((line, "float64"), (near, "float32")):
        rec = Recorder()
        got, info = F.farthest_points(pool, 400, 1, progress=rec)
        np.testing.assert_array_equal(got, greedy_reference(pool, 400, 1))
        assert info["products"] == products and rec.done == [400]
    monkeypatch.setattr(F, "WIDE_BELOW", 0.0)  # float32 throughout: the same picks
    got, info = F.farthest_points(line, 400, 1)
    np.testing.assert_array_equal(got, greedy_reference(line, 400, 1))
    assert info["products"] == "float32"


def test_farthest_points_on_float64_products_makes_the_definitions_choices(rng, monkeypatch):
    """Every float pool on float64 products (WIDE_BELOW huge: the float32 run gives way at its first pick): ties,
    duplicates, near ties, scales far from 1, many leaders; the definition's picks."""
    import model_collapse.farthest as F

    monkeypatch.setattr(F, "WIDE_BELOW", 1e300)
    x = rng.integers(0, 3, size=(300, 5)).astype(np.float32)
    x[200:260] = x[:60]
    g = rng.integers(0, 4, size=(250, 3)).astype(np.float64) + rng.normal(size=(250, 3)) * 1e-9
    u = rng.random((400, 96), dtype=np.float32)
    for i, pool in enumerate((x, g, u, x * np.float32(1e-25), g * 1e30, x.astype(np.float16))):
        for block in (1024, 5):
            want = greedy_reference(pool, len(pool) // 2, 3)
            got, info = F.farthest_points(pool, len(pool) // 2, 3, block=block)
            np.testing.assert_array_equal(got, want, err_msg=f"pool {i}, block {block}")
            assert info["products"] == "float64"


def test_farthest_points_takes_chains_of_certain_picks_at_once(rng, monkeypatch):
    """Picks whose lower bounds, lowered by the picks before them, clear every other upper bound come in one step:
    far fewer steps than picks on data of many dimensions, and the definition's picks (with ties: pixels)."""
    import model_collapse.farthest as F

    steps = []
    pick = F._pick

    def counted(*args):
        out = pick(*args)
        if out is not None:  # None: a block product first
            steps.append(len(out[0]))
        return out

    monkeypatch.setattr(F, "_pick", counted)
    u = rng.random((2000, 64), dtype=np.float32)
    z = rng.integers(0, 256, size=(1000, 24)).astype(np.uint8)
    for pool in (u, z):
        steps.clear()
        np.testing.assert_array_equal(F.farthest_points(pool, 400, 1)[0], greedy_reference(pool, 400, 1))
        assert sum(steps) == 399 and len(steps) < 399 / 2, len(steps)


def test_farthest_points_chains_on_near_ties_and_one_candidate(rng, monkeypatch):
    """Near-ties within the rounding bound (integer grids plus 1e-5 noise): a chain's lower bounds are the Gram
    distances less their bound, and the largest upper bound outside the chain is taken from beyond the candidates
    (with one candidate, the leader after it): the definition's picks either way."""
    import model_collapse.farthest as F

    for chain in (32, 1):
        monkeypatch.setattr(F, "CHAIN", chain)
        for seed in range(6):
            x = (rng.integers(0, 3, (40, 2)) + rng.normal(size=(40, 2)) * 1e-5).astype(np.float32)
            np.testing.assert_array_equal(F.farthest_points(x, 40, seed)[0], greedy_reference(x, 40, seed))
            y = (rng.integers(0, 5, (120, 2)) + rng.normal(size=(120, 2)) * 1e-5).astype(np.float32)
            np.testing.assert_array_equal(F.farthest_points(y, 90, seed)[0], greedy_reference(y, 90, seed))


def test_farthest_points_leaders_joining_after_a_take_in_see_the_centres_before_it(rng, monkeypatch):
    """Leaders that join after the kept columns were taken into the others' nearest (here every 64 picks, in one
    long block) take the block's earlier centres into their own nearest from their Gram rows: decisions on them
    read those centres (without, the picks differ from the definition's)."""
    import model_collapse.farthest as F

    for name, value in (("FOLD_SHARE", 1e9), ("FOLD_FLOOR", 1e9), ("COLS_BYTES", 1)):
        monkeypatch.setattr(F, name, value)
    late = []
    grow = F._Active.grow

    def counted(self):
        late.append(self.c0 > self.t0)
        grow(self)

    monkeypatch.setattr(F._Active, "grow", counted)
    for seed in range(3):
        u = rng.random((1500, 32), dtype=np.float32)
        np.testing.assert_array_equal(F.farthest_points(u, 500, seed)[0], greedy_reference(u, 500, seed))
    assert any(late)


def test_farthest_points_past_gram_rows_decide_on_exact_values_of_any_leader(rng, monkeypatch):
    """Past GRAM_ROWS leaders (here 70) the leaders' nearest are kept current at every pick; decisions among
    hundreds of near-equal leaders read them (and no kept columns): the definition's picks."""
    import model_collapse.farthest as F

    monkeypatch.setattr(F, "GRAM_ROWS", 70)
    u = rng.integers(0, 4, size=(1500, 6)).astype(np.float32)  # ties everywhere: decisions on exact values
    leaders = _leader_counts(monkeypatch)
    np.testing.assert_array_equal(F.farthest_points(u, 200, 3)[0], greedy_reference(u, 200, 3))
    assert max(leaders) > 300


def _bounds_of_40_centres(x, rng):
    """A farthest-point kernel state with 40 random centres folded into every point of x; the points that are not
    centres, and their exact squared distances to the nearest centre (brute force, float64)."""
    from model_collapse.farthest import _Bounds

    centres = rng.choice(len(x), 40, replace=False)
    B = _Bounds(x, 40)
    for t, c in enumerate(centres):
        B.add(t, int(c))
    B.fold(np.arange(len(x)), 40)
    P = np.setdiff1d(np.arange(len(x)), centres)
    want = ((x[P, None, :].astype(np.float64) - x[centres][None].astype(np.float64)) ** 2).sum(2).min(1)
    return B, P, want


def test_farthest_exact_values_in_every_band_case(rng):
    """The exact value of a point (squared distance to its nearest centre) from its approximate nearest: one
    centre, two or more of those kept, or every centre within the rounding band when all kept lie in it; against
    the brute-force minimum."""
    x = rng.integers(0, 3, size=(500, 4)).astype(np.float32)  # many points equidistant from several centres
    B, P, want = _bounds_of_40_centres(x, rng)
    band = B.near[P, 0] + 2 * B.err[P]
    cases = {"one": B.near[P, 1] > band, "two": (B.near[P, 1] <= band) & (B.near[P, 2] > band),
             "more": (B.near[P, 2] <= band) & (B.near[P, -1] > band), "band": B.near[P, -1] <= band}
    assert all(c.any() for c in cases.values()), {k: int(c.sum()) for k, c in cases.items()}
    np.testing.assert_array_equal(B.exact(P, B.near[P], B.near_at[P], B.err[P], 40), want * B.scale2)


def test_farthest_exact_values_from_wherever_the_band_puts_the_nearest(rng):
    """Approximate distances off by up to their bound, in either direction, put the exact nearest centre anywhere
    among the nearest kept, or beyond them when all kept lie in the band: the exact value is still the brute-force
    minimum."""
    x = rng.normal(size=(400, 6))
    B, P, want = _bounds_of_40_centres(x, rng)
    D = ((x[P, None, :] - x[B.centres][None]) ** 2).sum(2) * B.scale2  # every centre, exact
    Ds = np.sort(D, axis=1)
    err = (Ds[:, 4] - Ds[:, 0]) * rng.uniform(0.05, 1.5, len(P))  # bands of one centre to a dozen
    approx = D + rng.uniform(-1, 1, D.shape) * err[:, None]
    by = np.argsort(approx, axis=1, kind="stable")
    k = B.near.shape[1]
    near, near_at = np.take_along_axis(approx, by[:, :k], 1), by[:, : k - 1]
    band = near[:, 0] + 2 * err
    where = (np.take_along_axis(D, by[:, :k], 1) == want[:, None] * B.scale2).argmax(1)  # kept position of the nearest
    assert len(set(where[near[:, -1] > band].tolist())) >= 4 and (near[:, -1] <= band).any()
    np.testing.assert_array_equal(B.exact(P, near, near_at, err, 40), want * B.scale2)


def test_farthest_points_at_any_scale_and_summation_order(rng):
    """Equal float64 sums decided as the definition sums them (numpy's row sum, not another order); pools so small
    that float32 products underflow, or so large that they overflow, choose as the definition does."""
    from model_collapse.farthest import farthest_points

    x = np.array([[0, 0, 0], [-1.6480752229690552, 0.1674647480249405, 0.10901408642530441],
                  [0.1674647480249405, -1.6480752229690552, 0.10901408642530441]], dtype=np.float32)
    for pool in (x, x[[0, 2, 1]]):
        np.testing.assert_array_equal(farthest_points(pool, 2, 0)[0], greedy_reference(pool, 2, 0))
    tiny = np.array([[2.4e-21], [1.75e-20], [8e-22], [1.66e-20], [5.8e-21], [1.41e-20]])
    pools = [tiny, rng.random((200, 3)) * 1e-21, rng.normal(size=(60, 3)) * 1e19,
             (rng.normal(size=(60, 3)) * 1e19).astype(np.float32)]
    # float32 pools either side of the unscaled window's ends (largest norms 2^-20 and 2^20), and far above it
    # (squared norms within float32's range: unscaled, their products would round to nothing of the distances)
    pools += [(rng.normal(size=(80, 4)) * 10.0**e).astype(np.float32) for e in (-7, -6, 5, 6, 18)]
    for i, pool in enumerate(pools):
        for n in (len(pool) // 2, len(pool)):
            np.testing.assert_array_equal(farthest_points(pool, n, 0)[0], greedy_reference(pool, n, 0),
                                          err_msg=f"pool {i}, n {n}")
    # norms far above 2^20: scaled (left as they are, these picks differ from the definition's)
    huge = (np.random.default_rng(3).normal(size=(80, 4)) * 2.0**62).astype(np.float32)
    for seed in range(6):
        np.testing.assert_array_equal(farthest_points(huge, 40, seed)[0], greedy_reference(huge, 40, seed))


def test_threshold_with_a_huge_tau0_skips_its_empty_passes_exactly(rng):
    """tau0 a million times the pool's scale: hundreds of passes accept nothing; the filter skips them and still
    chooses, counts passes and ends at the tau of the definition; tau0 = inf is refused in one line."""
    x = rng.normal(size=(120, 6)).astype(np.float32)
    x[60:70] = x[:10]
    X = x.astype(np.float64)
    order = numpy_rng(2, "threshold-order").permutation(len(x))
    acc, tau, passes = [], 1e6, 0
    while len(acc) < 40:  # the definition (every_pass), counting its passes
        passes += 1
        for p in order:
            if p not in acc and (not acc or (((X[acc] - X[p]) ** 2).sum(1) > tau * tau).all()):
                acc.append(int(p))
                if len(acc) == 40:
                    break
        else:
            tau *= 0.9
    for decay_when in ("every_pass", "empty_pass"):
        sel = select_threshold(x, 40, 2, tau0=1e6, decay=0.9, decay_when=decay_when)
        np.testing.assert_array_equal(sel.indices, acc)
        assert sel.params["tau_final"] == tau and passes > 100
        if decay_when == "every_pass":
            assert sel.params["passes"] == passes
    with pytest.raises(UserError, match="tau0 must be a finite number"):
        select_threshold(x, 40, 2, tau0=float("inf"))


def test_skipping_empty_passes_repeats_the_scalar_decays_exactly_and_refuses_billions(rng):
    """decay_below is `while tau * tau >= top: tau *= decay` with the same rounding, for decays near 1 too (blocks
    of a sequential product); a tau0 needing more than MAX_DECAYS passes is refused in one line, at once."""
    import math

    from model_collapse.spread import decay_below

    checked = 0
    for _ in range(400):
        tau, top = float(10 ** rng.uniform(-3, 100)), float(10 ** rng.uniform(-6, 4))
        decay = float(rng.choice([0.5, 0.95, 0.999, 1 - 1e-5, 1 - 1e-7]))
        if tau * tau >= top and math.log(tau * tau / top) / -math.log(decay) > 2e5:
            continue
        t, p = tau, 0
        while t * t >= top:
            t *= decay
            p += 1
        assert decay_below(tau, decay, top, 3) == (t, p + 3)
        checked += 1
    assert checked > 200
    x = rng.normal(size=(50, 4)).astype(np.float32)
    with pytest.raises(UserError, match="more than 1,000,000,000 passes"):
        select_threshold(x, 10, 0, tau0=1e300, decay=0.99999999)


def test_greedy_on_8bit_pixels_uses_exact_integer_products(rng):
    """uint8 pools take the int8 product path (no rounding bound: every distance exact): the definition's picks on
    pools with duplicates, exact ties (few grey levels), one column, all-equal rows and the extreme values 0 and
    255; exact values in every band case."""
    from model_collapse.farthest import _Bounds, farthest_points

    pools = [rng.integers(0, 256, size=(300, 64)).astype(np.uint8),
             rng.integers(0, 3, size=(250, 12)).astype(np.uint8) * 127,  # 0, 127, 254: ties everywhere
             rng.integers(0, 256, size=(120, 1)).astype(np.uint8),
             np.full((40, 7), 255, np.uint8),
             rng.choice(np.array([0, 255], np.uint8), size=(200, 3072))]  # the largest products
    pools[0][150:220] = pools[0][:70]
    for i, x in enumerate(pools):
        assert _Bounds(x, 2).int8
        for seed in range(2):
            for n in (2, len(x) // 3, len(x)):
                got, _ = farthest_points(x, n, seed, block=[1024, 7][seed])
                np.testing.assert_array_equal(got, greedy_reference(x, n, seed), err_msg=f"pool {i}, n {n}")
    B, P, want = _bounds_of_40_centres(rng.integers(0, 3, size=(500, 4)).astype(np.uint8), rng)
    np.testing.assert_array_equal(B.near[P, 0], want)  # the approximate values are exact here
    np.testing.assert_array_equal(B.exact(P, B.near[P], B.near_at[P], B.err[P], 40), want)


def test_threshold_on_8bit_pixels_uses_exact_integer_products(rng):
    """uint8 pools: the threshold filter's int8 product path makes the sequential definition's choices, on pools
    with duplicates, ties at tau itself (few grey levels: many distances equal tau^2 exactly), one column and
    the extreme values."""
    pools = [rng.integers(0, 256, size=(300, 48)).astype(np.uint8),
             rng.integers(0, 3, size=(250, 6)).astype(np.uint8) * 100,
             rng.integers(0, 256, size=(150, 1)).astype(np.uint8),
             rng.choice(np.array([0, 255], np.uint8), size=(120, 3072))]
    pools[0][100:160] = pools[0][:60]
    for i, x in enumerate(pools):
        d = np.sqrt(((x[:40, None].astype(np.float64) - x[None, :40]) ** 2).sum(2))
        for tau0 in (float(np.median(d)), float(d[d > 0].min())):  # the second: a distance of the pool exactly
            n = min(40, len(np.unique(x, axis=0)))
            got = select_threshold(x, n, seed=i, tau0=tau0, decay=0.9, chunk=32).indices
            np.testing.assert_array_equal(got, threshold_reference(x, n, i, tau0, 0.9), err_msg=f"pool {i}, {tau0}")


@pytest.mark.filterwarnings("ignore:TF32 acceleration")  # torch's note on entering mkldnn.flags
def test_8bit_pixels_of_65536_values_and_more_and_the_float_fallback(rng):
    """Rows of 70,000 pixels (twice a product passes 2^31: doubled after widening), dark, light and mixed; and
    with oneDNN off (the int8 products' fast exact kernel unavailable) uint8 pools take the float path, to the
    same choices."""
    import torch

    from model_collapse.farthest import _Bounds, farthest_points
    from model_collapse.neighbours import Int8Rows, knn

    x = np.stack([np.zeros(70_000), np.ones(70_000), np.full(70_000, 255), np.full(70_000, 3),
                  rng.integers(0, 256, 70_000), rng.integers(250, 256, 70_000)]).astype(np.uint8)
    for seed in range(3):
        np.testing.assert_array_equal(farthest_points(x, len(x), seed)[0], greedy_reference(x, len(x), seed))
    tau0 = float(np.sqrt(((x[0].astype(np.float64) - x[4]) ** 2).sum()))
    np.testing.assert_array_equal(select_threshold(x, 4, seed=1, tau0=tau0, decay=0.9).indices,
                                  threshold_reference(x, 4, 1, tau0, 0.9))
    d = ((x[:, None].astype(np.float64) - x[None].astype(np.float64)) ** 2).sum(2)
    np.fill_diagonal(d, np.inf)
    np.testing.assert_array_equal(knn(x, None, 2).indices, np.argsort(d, axis=1, kind="stable")[:, :2])
    assert Int8Rows(x, int32=True).dtype == torch.float64 and _Bounds(x, 2).dist_dtype == torch.float64  # past int32
    y = rng.integers(0, 4, size=(120, 9)).astype(np.uint8)
    with torch.backends.mkldnn.flags(enabled=False):
        assert not _Bounds(y, 2).int8
        np.testing.assert_array_equal(farthest_points(y, 60, 0)[0], greedy_reference(y, 60, 0))
