import numpy as np
import pytest
import torch
from conftest import brute_knn
from sklearn.neighbors import NearestNeighbors

from model_collapse.neighbours import knn


def _cases(rng):
    """Seeded cases with exact duplicates, exact ties (integer grids), far-off-origin data, several shapes."""
    for n, d in [(50, 2), (200, 8), (300, 64), (120, 200)]:
        yield rng.normal(size=(n, d)).astype(np.float32)
        grid = rng.integers(0, 3, size=(n, d)).astype(np.float32)  # many equal distances and duplicates
        yield grid
        dup = rng.normal(size=(n, d)).astype(np.float32)
        q = n // 4
        dup[:q] = dup[q : 2 * q]
        yield dup
        yield (rng.normal(size=(n, d)) * 0.01 + 100.0).astype(np.float32)  # near-duplicates far from the origin


@pytest.mark.parametrize("k", [1, 2, 5])
def test_self_knn_equals_brute_force(rng, k):
    for x in _cases(rng):
        r = knn(x, None, k, tile=64)
        bd, bi = brute_knn(x, None, k)
        np.testing.assert_array_equal(r.indices, bi)
        np.testing.assert_allclose(r.distances, bd, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_cross_knn_equals_brute_force(rng, precision):
    for x in _cases(rng):
        q = np.concatenate([x[:10], rng.normal(size=(30, x.shape[1])).astype(np.float32)])
        r = knn(q, x, 3, tile=32, precision=precision)
        bd, bi = brute_knn(q, x, 3)
        np.testing.assert_array_equal(r.indices, bi)
        np.testing.assert_allclose(r.distances, bd, rtol=1e-12, atol=1e-12)


def test_tile_size_does_not_change_result(rng):
    x = rng.integers(0, 4, size=(500, 16)).astype(np.float32)
    a = knn(x, None, 3, tile=37)
    b = knn(x, None, 3, tile=4096)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.distances, b.distances)


def test_matches_sklearn_in_high_dimension(rng):
    x = rng.random((600, 3072)).astype(np.float32)
    r = knn(x, None, 2)
    nn = NearestNeighbors(n_neighbors=3, algorithm="brute").fit(x.astype(np.float64))
    d, _ = nn.kneighbors(x.astype(np.float64))
    np.testing.assert_allclose(r.distances, d[:, 1:], rtol=1e-6)


def test_rejects_too_few_references():
    with pytest.raises(ValueError):
        knn(np.zeros((3, 2), np.float32), None, 3)


def test_progress_hears_every_tile_of_the_main_pass(rng):
    from test_selection import Recorder

    x = rng.normal(size=(300, 8)).astype(np.float32)
    rec = Recorder()
    knn(x, None, 2, tile=64, progress=rec)  # 5 row blocks: 15 tiles on and above the diagonal
    assert rec.stages == [("nearest neighbours, 300 x 300", 15)] and rec.done == [15]
    rec = Recorder()
    knn(x[:70], x, 2, tile=64, progress=rec)  # 2 query blocks x 5 reference blocks
    assert rec.stages[0] == ("nearest neighbours, 70 x 300", 10) and rec.done[0] == 10


@pytest.mark.parametrize("k", [1, 3])
def test_8bit_pixels_take_exact_integer_products_and_equal_brute_force(rng, k):
    """uint8 inputs go through int8 products (exact distances, no rounding bound): the same neighbours and
    distances as brute force and as the float32 path, on pixels with duplicates, ties (few grey levels), one
    column, extreme values, odd tiles, against themselves and against other pixels."""
    import model_collapse.neighbours as nb

    pools = [rng.integers(0, 256, size=(150, 64)).astype(np.uint8),
             (rng.integers(0, 3, size=(200, 5)) * 120).astype(np.uint8),
             rng.integers(0, 256, size=(90, 1)).astype(np.uint8),
             rng.choice(np.array([0, 255], np.uint8), size=(60, 3072))]
    pools[0][100:140] = pools[0][:40]
    seen = []
    real_int8 = nb.Int8Rows
    monkey = pytest.MonkeyPatch()
    monkey.setattr(nb, "Int8Rows", lambda x, **kw: seen.append((x.shape, kw)) or real_int8(x, **kw))
    try:
        for x in pools:
            r = knn(x, None, k, tile=37)
            bd, bi = brute_knn(x.astype(np.float64), None, k)
            np.testing.assert_array_equal(r.indices, bi)
            np.testing.assert_allclose(r.distances, bd, rtol=1e-12, atol=1e-12)  # torch's and numpy's sqrt
            q = np.concatenate([x[:7], rng.integers(0, 256, size=(9, x.shape[1])).astype(np.uint8)])
            c = knn(q, x, k, tile=16)
            bd, bi = brute_knn(q.astype(np.float64), x.astype(np.float64), k)
            np.testing.assert_array_equal(c.indices, bi)
            np.testing.assert_allclose(c.distances, bd, rtol=1e-12, atol=1e-12)
            f = knn(q.astype(np.float32), x.astype(np.float32), k, tile=16)  # the float path agrees
            np.testing.assert_array_equal(f.indices, c.indices)
    finally:
        monkey.undo()
    assert len(seen) == 3 * len(pools)  # every uint8 call took the integer path (cross calls build two)
    assert all(kw == {"int32": True} for _, kw in seen)  # with int32 distances where they fit
    assert real_int8(pools[3], int32=True).dtype == torch.int32  # int32 distances up to 33,025 values


def test_knn_at_any_scale_and_with_a_large_offset(rng):
    """Values from 1e-40 (float32 subnormals) to 1e30, and float64 data far from the origin (offset 1e3, spread
    1e-3: rounded to float32 before centring, the working copy would lose the spread): a power-of-two scale and
    centring in the input's precision give brute force's neighbours, for a set against itself and against another,
    in both working precisions, and with float32 queries against float64 references."""
    pools = [(rng.normal(size=(120, 6)) * 10.0**e).astype(dt) for e in (-40, -22, 25) for dt in (np.float32, np.float64)]
    pools += [rng.normal(size=(150, 8)) * 1e-3 + 1e3, rng.normal(size=(150, 8)) + 1e12]
    for i, x in enumerate(pools):
        x64 = x.astype(np.float64)
        for prec in ("float32", "float64"):
            np.testing.assert_array_equal(knn(x, None, 2, precision=prec).indices, brute_knn(x64, None, 2)[1],
                                          err_msg=f"pool {i} {prec}")
            np.testing.assert_array_equal(knn(x[:15], x, 2, precision=prec).indices,
                                          brute_knn(x64[:15], x64, 2)[1], err_msg=f"pool {i} {prec}")
    q = pools[-2][:20].astype(np.float32)
    np.testing.assert_array_equal(knn(q, pools[-2], 3).indices, brute_knn(q.astype(np.float64), pools[-2], 3)[1])
