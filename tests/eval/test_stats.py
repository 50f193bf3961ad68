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


def test_seeds_crossed_interval_widens_with_seed_variance():
    rng = np.random.default_rng(5)
    b = (rng.random((2, 500)) < 0.5).astype(float)
    a_same = b.copy()
    a_same[:, :25] = 1.0  # both seeds: the same items flipped up
    a_spread = b.copy()
    a_spread[0, :60] = 1.0  # seeds disagree strongly about the gain
    r1 = stats.paired_seeds(a_same, b, n_resamples=2000, seed=0)
    r2 = stats.paired_seeds(a_spread, b, n_resamples=2000, seed=0)
    assert r1.n_seeds == 2 and "crossed" in r1.ci_method and r1.test.startswith("crossed t")
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


# ---------------------------------------------------------------- seeds: the crossed design

def _crossed_data(rng, n, S, item_sd, seed_sd, noise_sd, mu=0.0):
    """D[s, i] = mu + a_i + b_s + e_si: item effects shared by every seed (the crossed design)."""
    return (mu + rng.normal(0, item_sd, n)[None, :] + rng.normal(0, seed_sd, S)[:, None]
            + rng.normal(0, noise_sd, (S, n)))


def _independent_per_seed_sd(D, R, rng):
    """The old (nested) design: an independent item resample for every seed, seeds averaged."""
    S, n = D.shape
    reps = np.stack([D[s][rng.integers(0, n, size=(R, n))].mean(axis=1) for s in range(S)])
    return float(reps.mean(axis=0).std(ddof=1))


def test_crossed_bootstrap_matches_its_closed_form_on_the_issues_case():
    # 400 items, 4 seeds, item-effect sd 0.5, noise sd 0.1 (no seed effect): the true sd of the
    # delta is sqrt(0.5^2/400 + 0.1^2/1600) = 0.02512; the crossed bootstrap's expectation
    # sqrt(0.5^2/400 + 3 * 0.1^2/1600) = 0.02537 (interaction counted ~3 times, conservative).
    rng = np.random.default_rng(22)
    n, S = 400, 4
    D = _crossed_data(rng, n, S, 0.5, 0.0, 0.1)
    c = np.full(n, 1 / n)
    groups = [np.arange(n)]
    R = 20000
    boot = stats.crossed_bootstrap(D, c, groups, R, np.random.default_rng(0))
    closed = math.sqrt(stats.crossed_bootstrap_variance(D, c, groups))
    sd = float(boot.std(ddof=1))
    print(f"crossed bootstrap sd {sd:.5f}, its closed form {closed:.5f}, "
          f"population sqrt(s_a^2/n + 3 s_e^2/(nS)) {math.sqrt(0.25 / n + 3 * 0.01 / (n * S)):.5f}, "
          f"old independent-per-seed sd {_independent_per_seed_sd(D, 4000, np.random.default_rng(1)):.5f}")
    assert sd == pytest.approx(closed, rel=0.03)  # Monte Carlo: sd of an sd over 20k replicates ~0.5%
    assert closed == pytest.approx(math.sqrt(0.25 / n + 3 * 0.01 / (n * S)), rel=0.08)  # one draw of 400 items
    cv = stats.crossed_variance(D, c, groups)
    assert math.sqrt(cv.var) == pytest.approx(math.sqrt(0.25 / n + 0.01 / (n * S)), rel=0.08)
    assert cv.interaction == pytest.approx(0.01 / (n * S), rel=0.1)
    # the nested design shares no item draw across seeds: about sqrt((0.25 + 0.01) / (n S)), half as wide
    old = _independent_per_seed_sd(D, 4000, np.random.default_rng(1))
    assert old == pytest.approx(math.sqrt(0.26 / (n * S)), rel=0.1) and old < 0.55 * sd
    r = stats.paired_seeds(D, np.zeros_like(D), n_resamples=4000)
    assert r.ci_high - r.ci_low == pytest.approx(2 * 1.96 * closed, rel=0.1)


def test_crossed_bootstrap_closed_form_with_strata_and_seed_effects():
    rng = np.random.default_rng(3)
    S = 3
    strata = ["x"] * 30 + ["y"] * 50 + ["z"] * 20
    D = _crossed_data(rng, 100, S, 0.3, 0.2, 0.4)
    c = stats.item_weights(100, strata, {"x": 1, "y": 2, "z": 1})
    groups = stats._strata(100, strata)
    boot = stats.crossed_bootstrap(D, c, groups, 20000, np.random.default_rng(5))
    assert float(boot.mean()) == pytest.approx(float((D @ c).mean()), abs=0.01)
    assert float(boot.std(ddof=1)) == pytest.approx(math.sqrt(stats.crossed_bootstrap_variance(D, c, groups)),
                                                    rel=0.03)


def test_crossed_variance_is_unbiased_and_its_test_holds_its_level():
    # known item, seed and noise variance: the estimate's mean over simulated runs hits the closed
    # form sigma_a^2/n + sigma_b^2/S + sigma_e^2/(nS); under the null the t test rejects ~5%
    rng = np.random.default_rng(7)
    n, S, sa, sb, se = 60, 3, 0.4, 0.15, 0.3
    truth = sa ** 2 / n + sb ** 2 / S + se ** 2 / (n * S)
    c, groups = np.full(n, 1 / n), [np.arange(n)]
    vs, rejected, deltas = [], 0, []
    for _ in range(600):
        D = _crossed_data(rng, n, S, sa, sb, se)
        cv = stats.crossed_variance(D, c, groups)
        vs.append(cv.var)
        deltas.append(float((D @ c).mean()))
        rejected += stats.t_two_sided_p(deltas[-1] / math.sqrt(cv.var), cv.df) < 0.05 if cv.var > 0 else 0
    assert np.mean(vs) == pytest.approx(truth, rel=0.06)
    assert np.var(deltas) == pytest.approx(truth, rel=0.15)  # the truth is the delta's real variance
    assert 0.02 <= rejected / 600 <= 0.085
    # with seed variance the df is small (few seeds), not the item count
    assert stats.crossed_variance(_crossed_data(rng, n, S, sa, 0.5, se), c, groups).df < 10


def test_multi_seed_p_and_mde_count_seed_variance():
    rng = np.random.default_rng(11)
    n, S = 300, 4
    D = _crossed_data(rng, n, S, 0.2, 0.3, 0.2, mu=0.1)  # a gain the seeds disagree about
    r = stats.paired_seeds(D, np.zeros_like(D), n_resamples=2000)
    cv = stats.crossed_variance(D, np.full(n, 1 / n), [np.arange(n)])
    assert r.se0 == pytest.approx(math.sqrt(cv.var))
    assert r.mde == pytest.approx((stats.t_quantile(0.975, cv.df) + stats.t_quantile(0.8, cv.df)) * r.se0)
    # a test that ignored the seeds (item sign-flip on the seed means) would call it certain
    naive, _ = stats.sign_flip_p(D.mean(axis=0), np.full(n, 1 / n), 2000)
    assert naive < 0.001 < r.p_value
    z = stats.paired_seeds(np.zeros((2, 5)), np.zeros((2, 5)), n_resamples=200)
    assert z.delta == 0 and z.p_value == 1.0


def test_two_items_per_subtask_bootstrap_variance_is_unbiased():
    # the demo's MMLU: 57 subtasks x 2 items. n of n draws would give (n-1)/n = half the variance;
    # n-1 draws give sum_g w_g^2 s_g^2 / n_g with the unbiased s_g^2, whose expectation is Var(delta)
    rng = np.random.default_rng(9)
    G, N = 200, 400
    strata = np.repeat(np.arange(G), 2).tolist()
    d = rng.normal(0, 1.0, N)
    boot = stats._boot_deltas(d, np.full(N, 1 / N), stats._strata(N, strata), 20000, np.random.default_rng(1))
    pairs = d.reshape(G, 2)
    closed = sum((2 / N) ** 2 * p.var(ddof=1) / 2 for p in pairs)
    assert float(boot.var(ddof=1)) == pytest.approx(closed, rel=0.04)
    assert closed == pytest.approx(1.0 / N, rel=0.15)  # and its expectation is the delta's variance
