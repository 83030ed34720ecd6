"""The reference-based selectors against their straightforward definitions, on data with ties and duplicates."""

import numpy as np
import pytest
from conftest import brute_knn
from test_selection import greedy_reference

from model_collapse.curation import REALISM_K, TIE, bandwidth, inside_manifold, spacing
from model_collapse.rng import numpy_rng
from model_collapse.errors import UserError
from model_collapse.selection import select


def gated_reference(x, n, seed, ref):
    """The definition: inside when within some reference point's k-th NN radius (float64 differences); farthest-
    point on the inside; too few inside: then the outside nearest the reference, ties to the lower index."""
    X, R = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    radii = brute_knn(R, None, REALISM_K)[0][:, -1]
    d = np.sqrt(((X[:, None] - R[None]) ** 2).sum(-1))
    inside = (d <= radii[None]).any(1)
    ins = np.flatnonzero(inside)
    if len(ins) >= n:
        return ins[greedy_reference(X[ins], n, seed)]
    order = ins[greedy_reference(X[ins], len(ins), seed)] if len(ins) > 1 else ins
    out = np.flatnonzero(~inside)
    near = d[out].min(1)
    return np.concatenate([order, out[np.lexsort((out, near))][: n - len(ins)]])


def herding_reference(x, n, seed, ref):
    """The definition, pick by pick over the whole pool, kernel values from float64 differences."""
    X, R = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    h = bandwidth(R, seed)
    k = lambda a, b: np.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / (2 * h * h))
    mu = k(X, R).mean(1)
    chosen = []
    for t in range(n):
        score = mu - (k(X, X[chosen]).sum(1) if chosen else 0.0) / (t + 1)
        score[chosen] = -np.inf
        chosen.append(int(np.flatnonzero(score >= score.max() - TIE).min()))
    return np.array(chosen)


def capped_reference(x, n, seed, ref):
    """The definition: greedy's order while each pick lies at least the reference's median nearest-neighbour
    distance (float64 differences) from the picks before it; then the rest in a seeded uniform order."""
    X, R = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    dr = np.sqrt(((R[:, None] - R[None]) ** 2).sum(-1))
    np.fill_diagonal(dr, np.inf)
    s = np.median(dr.min(1))
    order = greedy_reference(X, n, seed)
    kept = 1
    while kept < n and np.sqrt(((X[order[:kept]] - X[order[kept]]) ** 2).sum(1).min()) >= s:
        kept += 1
    rest = np.setdiff1d(np.arange(len(X)), order[:kept])
    return np.concatenate([order[:kept], rest[numpy_rng(seed, "capped-fill").permutation(len(rest))[: n - kept]]])


def pool_with_ties(rng, m=240, d=4):
    x = np.round(rng.normal(size=(m, d)) * 2) / 2  # coarse grid: many equal distances
    x[20:30] = x[3]  # duplicates
    x[200:] += 6  # a far cluster: off the reference's manifold
    return x


@pytest.mark.parametrize("n", [5, 60, 150])
def test_gated_equals_its_definition(rng, n):
    for seed in range(3):
        x = pool_with_ties(rng)
        ref = np.round(rng.normal(size=(80, 4)) * 2) / 2
        ref[5:8] = ref[0]
        fast = select(x, n, "gated", seed, reference=ref)
        np.testing.assert_array_equal(fast.indices, gated_reference(x, n, seed, ref))
        inside = inside_manifold(x, ref)
        assert fast.params["inside"] == inside.sum()
        assert not inside[200:].any()  # the far cluster is off the manifold


@pytest.mark.parametrize("n", [1, 40, 120])
def test_herding_equals_its_definition(rng, n):
    for seed in range(2):
        x = pool_with_ties(rng, m=180)
        ref = rng.normal(size=(70, 4))
        ref[1:4] = ref[0]
        fast = select(x, n, "herding", seed, reference=ref)
        np.testing.assert_array_equal(fast.indices, herding_reference(x, n, seed, ref))
        assert len(set(fast.indices.tolist())) == n


@pytest.mark.parametrize("n", [1, 30, 120, 240])
def test_capped_equals_its_definition(rng, n):
    for seed in range(3):
        x = pool_with_ties(rng)
        ref = np.round(rng.normal(size=(60, 4)) * 2) / 2  # on the same grid: spacings tie with pool distances
        fast = select(x, n, "capped", seed, reference=ref)
        np.testing.assert_array_equal(fast.indices, capped_reference(x, n, seed, ref))
        assert fast.params["spacing"] == spacing(ref) > 0
        assert len(set(fast.indices.tolist())) == n
    # float32 features with the reference inside the pool (accumulate's case): a reference pair's distance must
    # compare equal to itself as a spacing and as a pick value (the kNN kernel sums in another order)
    for seed in range(4):
        r = np.random.default_rng(seed)
        ref = r.random((30, 64), dtype=np.float32)
        x = np.concatenate([(r.random((12, 64)) * 4 + 1.5).astype(np.float32), ref, np.repeat(ref[:1], 10, 0)])
        for n in (15, 40):
            np.testing.assert_array_equal(select(x, n, "capped", seed, reference=ref).indices,
                                          capped_reference(x, n, seed, ref))
    # the cut on a reference pair itself: pairs whose distance the kNN kernel sums to another last bit than the
    # definition's order does; the pair's second point must still count as at the spacing
    from model_collapse.neighbours import knn

    r, found = np.random.default_rng(7), 0
    while found < 4:
        a, b = r.random((2, 64), dtype=np.float32)
        pair = np.stack([a, b])
        p64 = pair.astype(np.float64)
        if knn(p64, None, 1).distances[0, 0] == np.sqrt(((p64[0] - p64[1]) ** 2).sum()):
            continue
        found += 1
        far = (r.random((6, 64)) * 100 + 50 * np.arange(1, 7)[:, None]).astype(np.float32)
        x = np.concatenate([far, pair, np.repeat(a[None], 20, 0)])
        np.testing.assert_array_equal(select(x, 20, "capped", 0, reference=pair).indices,
                                      capped_reference(x, 20, 0, pair))
    # a reference wider than the pool keeps greedy's first pick only; one of zero spacing keeps greedy whole
    x = rng.normal(size=(100, 3))
    wide = select(x, 50, "capped", 0, reference=rng.normal(size=(40, 3)) * 100)
    assert wide.params["spread_picks"] == 1
    same = select(x, 50, "capped", 0, reference=np.repeat(rng.normal(size=(20, 3)), 2, axis=0))
    np.testing.assert_array_equal(same.indices, select(x, 50, "greedy", 0).indices)


def test_curation_keeps_to_the_reference_where_greedy_takes_outliers(rng):
    ref = rng.normal(size=(300, 2))
    x = np.concatenate([rng.normal(size=(400, 2)), rng.normal(size=(20, 2)) * 0.3 + [9, 9]])  # 20 outliers
    greedy = select(x, 40, "greedy", 0).indices
    assert (greedy >= 400).sum() >= 1  # farthest-point reaches for the outliers
    for method in ("gated", "herding"):
        assert (select(x, 40, method, 0, reference=ref).indices < 400).all(), method


def test_reference_is_required_and_checked(rng):
    x = rng.normal(size=(50, 3))
    for method in ("gated", "herding", "capped"):
        with pytest.raises(UserError, match="needs a reference"):
            select(x, 5, method, 0)
        with pytest.raises(UserError, match="dimension"):
            select(x, 5, method, 0, reference=rng.normal(size=(20, 4)))
        with pytest.raises(UserError, match="NaN"):
            select(x, 5, method, 0, reference=np.full((20, 3), np.nan))
