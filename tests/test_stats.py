"""Statistics over seeds: the interval arithmetic against hand-computed cases, pairing, and coverage on
simulations with a known effect."""

import math

import numpy as np
import pytest

from model_collapse.stats import Interval, correlation_ci, mean_ci, paired_difference, verdict

# two-sided 95% Student-t quantiles t_{0.975, df} from the published table
T975 = {2: 4.302652729911275, 3: 3.182446305284263, 4: 2.776445105197799}


def test_mean_ci_by_hand():
    iv = mean_ci([1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(((1.5**2) * 2 + (0.5**2) * 2) / 3)  # 1.2910
    half = T975[3] * sd / 2
    assert iv.mean == 2.5 and iv.n == 4 and iv.sd == pytest.approx(sd)
    assert (iv.ci_low, iv.ci_high) == (pytest.approx(2.5 - half), pytest.approx(2.5 + half))
    # missing and non-finite values are left out; one value has no interval; none has no mean
    assert mean_ci([1.0, None, float("nan"), 3.0]).n == 2
    assert mean_ci([7.0]) == Interval(7.0, None, None, 1)
    assert mean_ci([]).n == 0 and math.isnan(mean_ci([]).mean)


def test_paired_difference_uses_the_seeds_both_arms_have():
    a = {0: 1.0, 1: 3.0, 2: 5.0}
    b = {0: 0.0, 1: 1.0, 2: 2.0, 3: 9.0}  # seed 3 has no partner
    iv = paired_difference(a, b)  # differences 1, 2, 3
    half = T975[2] * 1.0 / math.sqrt(3)
    assert iv.n == 3 and iv.mean == 2.0
    assert (iv.ci_low, iv.ci_high) == (pytest.approx(2 - half), pytest.approx(2 + half))


def test_pairing_removes_what_the_arms_of_a_seed_share():
    """Seeds differ a lot, the arms of one seed by a steady 0.5: paired, the effect is clear; comparing the two
    arms' means as if independent, it is not."""
    seed_level = np.array([0.0, 10.0, -7.0, 4.0, 21.0])
    noise = np.array([0.05, -0.04, 0.02, -0.01, 0.03])
    a = dict(enumerate(seed_level + 0.5 + noise))
    b = dict(enumerate(seed_level))
    paired = paired_difference(a, b)
    assert paired.ci_low > 0.4 and paired.ci_high < 0.6 and verdict(paired, 0.0, "above") == "holds"
    ma, mb = mean_ci(list(a.values())), mean_ci(list(b.values()))
    unpaired_half = T975[4] * math.sqrt(ma.sd**2 / 5 + mb.sd**2 / 5)
    assert unpaired_half > 5  # the unpaired comparison could not tell


@pytest.mark.parametrize("n", [3, 5])
def test_interval_covers_a_known_effect_95_percent_of_the_time(n):
    """Simulated studies: a seed effect shared by both arms, an arm effect of 0.3, noise. The paired interval
    must cover 0.3 in about 95% of 4,000 simulated studies, and not cover 0 about as often as its power says."""
    rng = np.random.default_rng(7)
    sims, effect = 4000, 0.3
    seed_fx = rng.normal(0, 5, (sims, n))
    a = seed_fx + effect + rng.normal(0, 0.2, (sims, n))
    b = seed_fx + rng.normal(0, 0.2, (sims, n))
    cover = 0
    for i in range(sims):
        iv = paired_difference(dict(enumerate(a[i])), dict(enumerate(b[i])))
        cover += iv.ci_low <= effect <= iv.ci_high
    # binomial standard error at 4,000 draws is 0.0034: allow 3.5 of them
    assert abs(cover / sims - 0.95) < 0.012


def test_verdicts():
    iv = lambda lo, hi: Interval((lo + hi) / 2, lo, hi, 3)
    assert verdict(iv(0.1, 0.3), 0.0, "above") == "holds"
    assert verdict(iv(-0.3, -0.1), 0.0, "above") == "fails"
    assert verdict(iv(-0.1, 0.3), 0.0, "above") == "inconclusive"
    assert verdict(iv(-0.3, -0.1), 0.0, "below") == "holds"
    assert verdict(iv(0.1, 0.3), 0.0, "below") == "fails"
    assert verdict(iv(0.4, 0.6), 0.5, "above") == "inconclusive"  # straddles the threshold
    assert verdict(Interval(1.0, None, None, 1), 0.0, "above") == "inconclusive"  # one seed


def test_correlation_interval_on_fishers_z_scale():
    rs = [0.5, 0.7, 0.9]
    z = np.arctanh(rs)
    half = T975[2] * z.std(ddof=1) / math.sqrt(3)
    iv = correlation_ci(rs)
    assert iv.mean == pytest.approx(np.tanh(z.mean()))
    assert (iv.ci_low, iv.ci_high) == (pytest.approx(np.tanh(z.mean() - half)),
                                       pytest.approx(np.tanh(z.mean() + half)))
    assert -1 < iv.ci_low < iv.mean < iv.ci_high < 1
