"""eval.stats against closed forms on constructed inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eval import stats


def test_identical_arms_give_zero_delta_and_p_one():
    rng = np.random.default_rng(0)
    a = (rng.random(300) < 0.4).astype(float)
    r = stats.paired(a, a.copy(), n_resamples=2000)
    assert r.delta == 0 and r.ci_low == 0 and r.ci_high == 0 and r.p_value == 1.0
    assert r.test == "exact McNemar" and r.discordant == (0, 0) and r.mde is None
    cont = rng.random(50)  # continuous metric: the sign-flip test
    r = stats.paired(cont, cont.copy(), n_resamples=2000)
    assert r.delta == 0 and r.p_value == 1.0 and r.test.startswith("sign-flip")


def test_known_constant_shift():
    rng = np.random.default_rng(1)
    b = rng.random(400)
    r = stats.paired(b + 0.05, b, n_resamples=2000)
    assert r.delta == pytest.approx(0.05)
    # every difference is +0.05: each bootstrap replicate is exactly 0.05
    assert r.ci_low == pytest.approx(0.05) and r.ci_high == pytest.approx(0.05)
    # all 400 differences positive: the sign-flip p is at its Monte-Carlo floor 1/(1+R)
    assert r.p_value == pytest.approx(1 / 2001)
    assert r.score_a[0] - r.score_b[0] == pytest.approx(0.05)


def test_mcnemar_matches_the_exact_binomial_form():
    # 12 items a right / b wrong, 3 the other way, 85 concordant
    a = np.array([1] * 12 + [0] * 3 + [1] * 40 + [0] * 45, dtype=float)
    b = np.array([0] * 12 + [1] * 3 + [1] * 40 + [0] * 45, dtype=float)
    r = stats.paired(a, b, n_resamples=1000)
    n, k = 15, 3  # P(X <= 3) for X ~ Bin(15, 1/2), doubled
    expected = 2 * sum(math.factorial(n) / (math.factorial(i) * math.factorial(n - i)) for i in range(k + 1)) / 2 ** n
    assert r.test == "exact McNemar" and r.discordant == (12, 3)
    assert r.p_value == pytest.approx(expected, rel=1e-12)
    assert r.delta == pytest.approx(9 / 100)
    assert stats.mcnemar_exact(5, 5) == 1.0 and stats.mcnemar_exact(0, 0) == 1.0
    assert stats.mcnemar_exact(6, 0) == pytest.approx(2 / 64)
    # n = 5000: no float overflow; the continuity-corrected normal tail erfc(199 / sqrt(5000) / sqrt 2) = 0.004889
    assert stats.mcnemar_exact(2600, 2400) == pytest.approx(0.004889, rel=0.01)


def test_exact_sign_flip_enumerates_every_pattern():
    d = np.array([0.5, 0.25, 0.25, -0.125])  # T = 0.875 / 4
    p, how = stats.sign_flip_p(d)
    # |±0.5 ±0.25 ±0.25 ±0.125| >= 0.875 only for the all-aligned patterns (and their negation)
    totals = [abs(s1 * 0.5 + s2 * 0.25 + s3 * 0.25 + s4 * 0.125)
              for s1 in (1, -1) for s2 in (1, -1) for s3 in (1, -1) for s4 in (1, -1)]
    assert how == "sign-flip (exact)"
    assert p == pytest.approx(sum(t >= 0.875 - 1e-12 for t in totals) / 16)


def test_bootstrap_ci_of_a_mean_matches_the_normal_approximation_on_large_n():
    rng = np.random.default_rng(2)
    n = 20000
    d = rng.normal(0.02, 1.0, size=n)
    r = stats.paired(d, np.zeros(n), n_resamples=4000, seed=3)
    se = d.std(ddof=1) / math.sqrt(n)
    assert r.ci_low == pytest.approx(d.mean() - 1.959964 * se, abs=0.1 * se)
    assert r.ci_high == pytest.approx(d.mean() + 1.959964 * se, abs=0.1 * se)


def test_bootstrap_is_seeded():
    rng = np.random.default_rng(4)
    a, b = rng.random(60), rng.random(60)
    r1, r2 = stats.paired(a, b, n_resamples=500, seed=7), stats.paired(a, b, n_resamples=500, seed=7)
    assert (r1.ci_low, r1.ci_high, r1.p_value) == (r2.ci_low, r2.ci_high, r2.p_value)
    r3 = stats.paired(a, b, n_resamples=500, seed=8)  # the seed is used, not a fixed internal stream
    assert (r3.ci_low, r3.ci_high) != (r1.ci_low, r1.ci_high)
    assert r1.ci_low < r1.delta < r1.ci_high


def test_mde_formula_against_its_closed_form():
    # (z_.975 + z_.8) * sqrt(p_disc / n)
    assert stats.z_quantile(0.975) == pytest.approx(1.959964, abs=1e-6)
    assert stats.z_quantile(0.8) == pytest.approx(0.841621, abs=1e-6)
    assert stats.mde_binary(100, 0.2) == pytest.approx(2.801585 * math.sqrt(0.002), rel=1e-6)
    # the observed-discordance MDE of a 0/1 comparison is the same formula
    a = np.array([1] * 10 + [0] * 10 + [1] * 80, dtype=float)
    b = np.array([0] * 10 + [1] * 10 + [1] * 80, dtype=float)
    r = stats.paired(a, b, n_resamples=200)
    assert r.mde == pytest.approx(stats.mde_binary(100, 0.2), rel=1e-9)
    assert stats.independent_discordance(0.5, 0.5) == 0.5


def test_strata_weights_reproduce_the_group_score():
    # two subtasks of unequal size; unweighted mean of subtask means vs size-weighted
    a = np.array([1, 1, 0, 0, 1, 0, 0, 0, 0, 0], dtype=float)
    b = np.zeros(10)
    strata = ["x"] * 4 + ["y"] * 6
    sized = stats.paired(a, b, strata, n_resamples=300)
    assert sized.delta == pytest.approx(3 / 10)  # lm-eval weight_by_size = item-level mean
    equal = stats.paired(a, b, strata, {"x": 1, "y": 1}, n_resamples=300)
    assert equal.delta == pytest.approx((2 / 4 + 1 / 6) / 2)
    assert equal.test.startswith("sign-flip")  # unequal item weights: not McNemar


def test_seeds_hierarchical_interval_widens_with_seed_variance():
    rng = np.random.default_rng(5)
    b = (rng.random((2, 500)) < 0.5).astype(float)
    a_same = b.copy()
    a_same[:, :25] = 1.0  # both seeds: the same items flipped up
    a_spread = b.copy()
    a_spread[0, :60] = 1.0  # seeds disagree strongly about the gain
    r1 = stats.paired_seeds(a_same, b, n_resamples=2000, seed=0)
    r2 = stats.paired_seeds(a_spread, b, n_resamples=2000, seed=0)
    assert r1.n_seeds == 2 and "hierarchical" in r1.ci_method
    assert r1.delta == pytest.approx(np.mean((a_same - b).mean(axis=1)))
    per_seed = (a_spread - b).mean(axis=1)
    assert r2.delta == pytest.approx(per_seed.mean())
    # seed resampling: the interval reaches towards both per-seed deltas
    assert r2.ci_high - r2.ci_low > r1.ci_high - r1.ci_low
    assert r2.ci_low <= per_seed.min() + 0.01 and r2.ci_high >= per_seed.max() - 0.01
    assert r2.std_a is not None and len(r2.score_a) == 2


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        stats.paired_seeds([[1, 0]], [[1, 0, 1]])
