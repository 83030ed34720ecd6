import math

import numpy as np
import pytest
import scipy.linalg
from conftest import brute_knn
from scipy.special import digamma, gammaln
from sklearn.neighbors import NearestNeighbors

from model_collapse.metrics import (
    distinct_rows,
    frechet_distance,
    frechet_distance_features,
    gaussian_stats,
    generalization_score,
    kernel_inception_distance,
    kl_entropy,
    precision_recall,
    total_variance,
)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_entropy_of_gaussian_matches_closed_form(d):
    rng = np.random.default_rng(d)
    a = rng.normal(size=(d, d))
    cov = a @ a.T + d * np.eye(d)
    x = rng.multivariate_normal(np.zeros(d), cov, size=20000)
    exact = 0.5 * d * (1 + math.log(2 * math.pi)) + 0.5 * np.linalg.slogdet(cov)[1]
    est = kl_entropy(x, k=1)
    assert est.duplicates == 0 and est.n == 20000 and est.dim == d
    assert abs(est.entropy - exact) < 0.05 * d, (est.entropy, exact)


def test_entropy_matches_independent_sklearn_computation_in_high_dimension(rng):
    x = rng.random((800, 256)).astype(np.float32)
    for k in (1, 3):
        est = kl_entropy(x, k=k)
        nn = NearestNeighbors(n_neighbors=k + 1).fit(x.astype(np.float64))
        r = nn.kneighbors(x.astype(np.float64))[0][:, k]
        n, d = x.shape
        logc = 0.5 * d * math.log(math.pi) - gammaln(0.5 * d + 1)
        ref = digamma(n) - digamma(k) + logc + d * np.mean(np.log(r))
        assert est.entropy == pytest.approx(ref, rel=1e-9)


def test_duplicates_are_counted_not_hidden(rng):
    x = rng.normal(size=(300, 5))
    clean = kl_entropy(x)
    dup = np.concatenate([x, x[:40], x[:10]])
    res = kl_entropy(dup)
    assert res.duplicates == 50
    assert res.n == 300
    assert res.entropy == pytest.approx(clean.entropy, rel=1e-12)
    assert math.isfinite(res.entropy)


def test_distinct_rows_keeps_first_appearance():
    x = np.array([[3, 3], [1, 1], [3, 3], [2, 2], [1, 1]])
    u, n = distinct_rows(x)
    np.testing.assert_array_equal(u, [[3, 3], [1, 1], [2, 2]])
    assert n == 2


def test_generalization_score_against_brute_force(rng):
    train = rng.integers(0, 5, size=(200, 12)).astype(np.float32)
    gen = np.concatenate([train[:30] + 0.01, rng.integers(0, 5, size=(70, 12)).astype(np.float32)])
    res = generalization_score(gen, train)
    u, _ = distinct_rows(train)
    d, i = brute_knn(gen, u, 2)
    assert res.gen_score == pytest.approx(d[:, 0].mean(), rel=1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(d[:, 1] > 0, d[:, 0] / d[:, 1], 1.0)
    assert res.mem_fraction == pytest.approx(np.mean(ratio < 1 / 3))
    tnn = brute_knn(u, None, 1)[0][:, 0]
    assert res.train_spacing == pytest.approx(tnn.mean(), rel=1e-12)
    assert res.gen_score_ratio == pytest.approx(d[:, 0].mean() / tnn.mean(), rel=1e-12)
    assert res.copy_fraction == pytest.approx(np.mean(d[:, 0] < np.median(tnn) / 3))
    np.testing.assert_array_equal(res.nearest, i[:, 0])


def test_copies_are_memorized_and_new_points_are_not(rng):
    train = rng.normal(size=(100, 20))
    copies = train[:50] + rng.normal(size=(50, 20)) * 1e-3
    fresh = rng.normal(size=(50, 20))
    res = generalization_score(np.concatenate([copies, fresh]), train)
    assert res.mem_fraction == pytest.approx(0.5)
    assert res.copy_fraction == pytest.approx(0.5)


def test_frechet_distance_closed_form_for_gaussians(rng):
    d = 6
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T + np.eye(d), b @ b.T + 0.5 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    ref = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9)
    # commuting case in closed form: diagonal covariances
    s1, s2 = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    assert frechet_distance(np.zeros(2), s1, np.ones(2), s2) == pytest.approx(2 + (1 - 3) ** 2 + (2 - 1) ** 2)
    assert frechet_distance(mu1, s1 * 0 + np.eye(6)[:2, :2], mu1, np.eye(2)) == pytest.approx(0, abs=1e-9)


def test_frechet_from_samples_is_zero_for_same_set(rng):
    x = rng.normal(size=(500, 10))
    assert frechet_distance_features(x, x) == pytest.approx(0.0, abs=1e-8)
    mu, s = gaussian_stats(x)
    np.testing.assert_allclose(s, np.cov(x, rowvar=False))


def test_variance_is_trace_of_covariance(rng):
    x = rng.normal(size=(400, 7)) * np.arange(1, 8)
    assert total_variance(x) == pytest.approx(np.trace(np.cov(x, rowvar=False)))


def _pr_cases(rng):
    """Seeded (real, fake) pairs: plain, integer grids (exact ties at the radii), real duplicates (radius 0) with
    fakes that copy real points, and far from the origin."""
    yield rng.normal(size=(150, 4)), rng.normal(size=(120, 4)) * 1.5 + 0.5
    yield rng.integers(0, 3, size=(140, 3)), rng.integers(0, 3, size=(90, 3))
    real = rng.normal(size=(100, 6))
    real[:30] = real[30:60]
    real[:10] = real[40:50]  # points with three copies
    yield real, np.concatenate([real[:20], rng.normal(size=(40, 6))])
    yield rng.normal(size=(80, 5)) * 0.01 + 100.0, rng.normal(size=(70, 5)) * 0.01 + 100.0


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_against_brute_force(rng, k):
    for real, fake in _pr_cases(rng):
        real, fake = real.astype(np.float32), fake.astype(np.float32)
        res = precision_recall(real, fake, k=k)
        dr = np.sqrt(((real[:, None].astype(float) - real[None]) ** 2).sum(-1))
        df = np.sqrt(((fake[:, None].astype(float) - fake[None]) ** 2).sum(-1))
        dx = np.sqrt(((fake[:, None].astype(float) - real[None]) ** 2).sum(-1))
        np.fill_diagonal(dr, np.inf)
        np.fill_diagonal(df, np.inf)
        rr = np.sort(dr, 1)[:, k - 1]
        rf = np.sort(df, 1)[:, k - 1]
        assert res["precision"] == np.mean((dx <= rr[None]).any(1))
        assert res["recall"] == np.mean((dx.T <= rf[None]).any(1))
        assert res["density"] == pytest.approx((dx <= rr[None]).sum(1).mean() / k, rel=1e-12)
        assert res["coverage"] == np.mean((dx <= rr[None]).any(0))


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel(rng):
    """With subsets as large as both sets, every subset is the whole set: KID is the full unbiased MMD^2, which a
    double loop over pairs computes straightforwardly."""
    a, b = rng.normal(size=(30, 5)), rng.normal(size=(30, 5)) + 0.3

    def k(x, y):
        return (x @ y / 5 + 1) ** 3

    n = len(a)
    xx = sum(k(a[i], a[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(b[i], b[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(a[i], b[j]) for i in range(n) for j in range(n)) / (n * n)
    kid, std = kernel_inception_distance(a, b, subsets=7, subset_size=30)
    assert kid == pytest.approx(xx + yy - 2 * xy, rel=1e-10) and std < 1e-10
    same, _ = kernel_inception_distance(rng.normal(size=(400, 5)), rng.normal(size=(400, 5)), subsets=20,
                                        subset_size=200)
    far, _ = kernel_inception_distance(rng.normal(size=(400, 5)), rng.normal(size=(400, 5)) + 1.0, subsets=20,
                                       subset_size=200)
    assert abs(same) < 0.2 * far and far > 0


def test_collapsed_sets_are_recorded_not_refused(rng):
    """A training set of one distinct image (or k distinct ones): entropy minus infinity with its duplicates
    counted, generalization score the exact mean distance to that image, the undefined parts NaN; the verdict
    calls it contraction at its limit."""
    import math

    from model_collapse.measure import memorization
    from model_collapse.metrics import generalization_score, kl_entropy
    from model_collapse.verdict import decide

    one = np.repeat(rng.normal(size=(1, 5)), 8, axis=0)
    gen = rng.normal(size=(20, 5))
    e = kl_entropy(one, 1)
    assert e.entropy == -math.inf and e.duplicates == 7 and e.n == 1
    assert kl_entropy(np.vstack([one, one[:1] + 1.0]), 2).entropy == -math.inf  # two distinct, k = 2
    sc = generalization_score(gen, one)
    np.testing.assert_allclose(sc.d1, np.sqrt(((gen - one[0]) ** 2).sum(1)), rtol=1e-12)
    assert sc.gen_score == sc.d1.mean() and math.isnan(sc.gen_score_ratio) and math.isnan(sc.mem_fraction)
    m, _ = memorization(one, gen)
    assert m["train_entropy"] == -math.inf and m["train_duplicates"] == 7 and math.isnan(m["copy_fraction"])
    assert m["train_collapsed"] and not memorization(gen, one)[0]["train_collapsed"]
    # as the loop reads it back from metrics.json: non-finite values are null there, the flag keeps the fact
    row = {f"{k}_pixel": (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in m.items()}
    base = {"train_spacing_pixel": 1.0, "train_entropy_pixel": 0.0, "gen_score_ratio_pixel": 1.0}
    assert decide(row, base, 0.1, 0.8)[0] == "contracting"


@pytest.mark.parametrize("case", range(6))
def test_kid_from_whole_kernel_matrices_equals_each_subsets_own_kernels(case, monkeypatch):
    """The fast path (kernel matrices once, subset sums as indicator products) against each subset's own kernels
    (the path of sets larger than KID_WHOLE), on seeded sets with duplicate rows, subsets smaller than and equal
    to the sets, and sets of different sizes."""
    import model_collapse.metrics as mm

    rng = np.random.default_rng(case)
    na, nb, d = int(rng.integers(20, 90)), int(rng.integers(20, 90)), int(rng.integers(2, 12))
    a = rng.normal(size=(na, d))
    b = rng.normal(size=(nb, d)) + rng.uniform(0, 1)
    a[: na // 4] = a[0]  # duplicates
    b[-3:] = a[1]
    size = [10, 30, 1000][case % 3]
    fast = mm.kernel_inception_distance(a, b, subsets=9, subset_size=size, seed=case)
    monkeypatch.setattr(mm, "KID_WHOLE", 0)
    slow = mm.kernel_inception_distance(a, b, subsets=9, subset_size=size, seed=case)
    assert fast[0] == pytest.approx(slow[0], rel=1e-9, abs=1e-12)
    assert fast[1] == pytest.approx(slow[1], rel=1e-6, abs=1e-12)
