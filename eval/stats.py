"""Paired item-level statistics for arm-vs-baseline deltas: arrays in, numbers out, no I/O.

Both arms are scored on the same items, so the comparison is paired: the delta is a weighted
sum of per-item differences d_i = a_i - b_i, with weights c_i that reproduce how lm-eval
aggregates the task (c_i = 1/n for a flat task; w_s / n_s for item i of subtask s in a group
whose subtasks carry weights w_s - size-weighted for MMLU, so c_i = 1/N there too).

One seed per arm:
- Interval: percentile bootstrap of the delta, items resampled with replacement within their
  subtask (stratum), seeded; n_g - 1 draws from a stratum of n_g items (S - 1 of S seeds), which
  makes the bootstrap variance of a mean unbiased (n of n gives (n - 1)/n of it: half with the
  demo's 2 items per MMLU subject).
- p-value (two-sided): exact McNemar (a binomial test on the discordant items) when the metric
  is 0/1 and every item has the same weight; otherwise the paired sign-flip permutation test on
  the weighted differences (exact enumeration for <= 16 non-zero differences, else seeded Monte
  Carlo with the (1 + hits) / (1 + resamples) correction).
- Minimal detectable effect (MDE) at power 1 - beta, level alpha: the normal approximation
  (z_{1-alpha/2} + z_{1-beta}) * se0 with se0 the null standard deviation of the delta. Under
  the sign-flip null se0^2 = sum_i c_i^2 d_i^2, which for a 0/1 metric on n equally weighted
  items is (discordant items / n) / n = p_disc / n: the McNemar variance.

S > 1 seeds per arm (seed j of the arm paired with seed j of the baseline): every seed answers
the SAME items, so the design is crossed (items x seeds), not nested. An item that is easy for
the treated arm is easy in every seed; resampling items independently per seed averages that
shared item effect down by about 1/S and gives intervals far too narrow (400 items, 4 seeds,
item-effect sd 0.5, noise sd 0.1: sd 0.0114 against 0.025). Hence:
- Interval: crossed bootstrap. Per replicate, one item draw per stratum, applied to every
  seed, and the seeds drawn with replacement. Its variance is, exactly (the plug-in closed
  form, `crossed_bootstrap_variance`), V_items / (n - 1) + V_seeds / (S - 1) + V_interaction /
  ((n - 1)(S - 1)) per stratum: it counts the interaction about three times over (a known, conservative property of
  the "pigeonhole" bootstrap, Owen 2007), which matters only when the interaction dominates.
- Variance, p-value and MDE: the two-way random-effects decomposition (`crossed_variance`),
  Var(delta) = sigma_item^2 / n + sigma_seed^2 / S + sigma_noise^2 / (n S), estimated without
  bias from the mean squares, (MS_items + MS_seeds - MS_interaction) / (n S) per stratum; the
  test is t = delta / sqrt(Var) with Satterthwaite's degrees of freedom (the quasi-F of crossed
  designs: with few seeds and real seed variance the df is small and the test says so), and
  the MDE is (t_{1-alpha/2, df} + t_{power, df}) * sqrt(Var).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

DEFAULT_RESAMPLES = 10_000
EXACT_SIGN_FLIP_MAX = 16  # 2^16 sign patterns: enumerate instead of sampling
_CHUNK = 2_000_000  # resample entries per numpy block (~16 MB), whatever the item count


def z_quantile(p: float) -> float:
    """Standard normal quantile (inverse CDF) by bisection on math.erf; no scipy needed."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {p}")
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def mde_from_se(se0: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true delta a two-sided level-alpha test detects with probability `power`."""
    return (z_quantile(1 - alpha / 2) + z_quantile(power)) * se0


def mde_binary(n: int, discordance: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """MDE (as a fraction) of a paired 0/1 comparison on n items with discordance rate p_disc.

    McNemar's normal approximation: se0 = sqrt(p_disc / n).
    """
    if n <= 0:
        raise ValueError("n must be >= 1")
    return mde_from_se(math.sqrt(discordance / n), alpha, power)


def independent_discordance(p_a: float, p_b: float) -> float:
    """Discordance of two 0/1 scorers with accuracies p_a, p_b whose errors are independent.

    Models trained on overlapping data err on overlapping items, so real discordance is lower
    and this gives an upper bound on the MDE.
    """
    return p_a * (1 - p_b) + p_b * (1 - p_a)


def binom_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided binomial(n, 1/2) p-value of k successes: 2 * P(X <= min(k, n-k)), <= 1."""
    if n == 0:
        return 1.0
    m = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(m + 1))
    return min(1.0, (2 * tail) / (1 << n))  # exact integers: no float overflow at large n


def mcnemar_exact(n10: int, n01: int) -> float:
    """Exact McNemar: the discordant pairs split as binomial(n10 + n01, 1/2) under the null."""
    return binom_two_sided_p(int(n10), int(n10) + int(n01))


def sign_flip_p(d: np.ndarray, weights: np.ndarray | None = None, n_resamples: int = DEFAULT_RESAMPLES,
                seed: int = 0) -> tuple[float, str]:
    """Two-sided paired sign-flip p-value of T = sum_i c_i d_i; returns (p, how)."""
    d = np.asarray(d, dtype=float)
    c = np.full(d.shape, 1.0 / max(1, d.size)) if weights is None else np.asarray(weights, dtype=float)
    x = (c * d)[d != 0]
    if x.size == 0:
        return 1.0, "sign-flip (no non-zero differences)"
    t = abs(x.sum())
    tol = 1e-12 * max(1.0, np.abs(x).sum())
    if x.size <= EXACT_SIGN_FLIP_MAX:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=x.size)))
        stats = np.abs(signs @ x)
        return float(np.mean(stats >= t - tol)), "sign-flip (exact)"
    rng = np.random.default_rng(seed)
    hits = 0
    done = 0
    while done < n_resamples:
        m = min(max(1, _CHUNK // x.size), n_resamples - done)
        signs = rng.choice((1.0, -1.0), size=(m, x.size))
        hits += int(np.sum(np.abs(signs @ x) >= t - tol))
        done += m
    return (1 + hits) / (1 + n_resamples), f"sign-flip ({n_resamples} resamples)"


def _strata(n: int, strata) -> list[np.ndarray]:
    if strata is None:
        return [np.arange(n)]
    s = np.asarray(strata)
    return [np.flatnonzero(s == v) for v in dict.fromkeys(s.tolist())]


def item_weights(n: int, strata=None, stratum_weights: dict | None = None) -> np.ndarray:
    """c_i such that sum_i c_i x_i is the task score lm-eval reports.

    No strata: the plain mean. Strata without weights: weighted by size (lm-eval's
    weight_by_size, MMLU) = plain mean. Strata with weights w_s: sum_s w_s mean_s / sum_s w_s.
    """
    if stratum_weights is None:
        return np.full(n, 1.0 / n)
    c = np.zeros(n)
    groups = _strata(n, strata)
    keys = list(dict.fromkeys(np.asarray(strata).tolist()))
    total = sum(float(stratum_weights[k]) for k in keys)
    for k, idx in zip(keys, groups):
        c[idx] = float(stratum_weights[k]) / total / idx.size
    return c


def _boot_deltas(d: np.ndarray, c: np.ndarray, groups: list[np.ndarray], n_resamples: int,
                 rng: np.random.Generator) -> np.ndarray:
    """n_resamples bootstrap replicates of sum_i c_i d_i, items resampled within strata."""
    out = np.zeros(n_resamples)
    for idx in groups:
        x = (c[idx] * d[idx]) * idx.size  # stratum total = size * mean of c*d over its items
        k = _draws(idx.size)
        step = max(1, _CHUNK // idx.size)
        for start in range(0, n_resamples, step):
            m = min(step, n_resamples - start)
            pick = rng.integers(0, idx.size, size=(m, k))
            out[start:start + m] += x[pick].mean(axis=1)
    return out


def _draws(n: int) -> int:
    """Draws per replicate from n units: n - 1 (n >= 2). The mean of n - 1 draws with replacement
    has variance s^2 / n, the unbiased one; n draws give (n - 1)/n of it, half with 2 items per
    subtask (the demo's MMLU) or 2 seeds (Rao & Wu's rescaled bootstrap, McCarthy & Snowden)."""
    return max(1, n - 1)


@dataclass
class Paired:
    """One paired comparison (fractions; multiply by 100 for points)."""

    delta: float
    ci_low: float
    ci_high: float
    p_value: float | None
    test: str
    mde: float | None
    n_items: int
    n_seeds: int
    ci_method: str
    score_a: list[float] = field(default_factory=list)  # per seed
    score_b: list[float] = field(default_factory=list)
    discordant: tuple[int, int] | None = None  # (a right b wrong, a wrong b right) for 0/1
    se0: float | None = None

    @property
    def mean_a(self) -> float:
        return float(np.mean(self.score_a))

    @property
    def mean_b(self) -> float:
        return float(np.mean(self.score_b))

    @property
    def std_a(self) -> float | None:
        return float(np.std(self.score_a, ddof=1)) if len(self.score_a) > 1 else None

    @property
    def std_b(self) -> float | None:
        return float(np.std(self.score_b, ddof=1)) if len(self.score_b) > 1 else None


def _is_binary(*xs: np.ndarray) -> bool:
    return all(np.all((x == 0) | (x == 1)) for x in xs)


def paired(a, b, strata=None, stratum_weights: dict | None = None, n_resamples: int = DEFAULT_RESAMPLES,
           seed: int = 0, alpha: float = 0.05, power: float = 0.8) -> Paired:
    """Paired comparison of arm a against baseline b on the same items (one seed each).

    a, b: per-item scores aligned by item; strata: per-item subtask labels (or None).
    """
    return paired_seeds([a], [b], strata, stratum_weights, n_resamples, seed, alpha, power)


def _seed_weights(S: int, m: int, rng: np.random.Generator) -> np.ndarray:
    """[m, S]: how often each seed is drawn (S - 1 draws with replacement) per replicate, / draws."""
    k = _draws(S)
    return rng.multinomial(k, np.full(S, 1.0 / S), size=m) / k


def crossed_bootstrap(D: np.ndarray, c: np.ndarray, groups: list[np.ndarray], n_resamples: int,
                      rng: np.random.Generator) -> np.ndarray:
    """Replicates of sum_i c_i mean_s D[s, i]: per replicate one item draw per stratum, shared by
    every seed, and the seeds drawn with replacement (a crossed, not nested, resampling)."""
    D = np.atleast_2d(D)
    S = D.shape[0]
    per_seed = np.zeros((S, n_resamples))
    for idx in groups:
        x = D[:, idx] * (c[idx] * idx.size)  # [S, n_g]: the stratum's total = mean over its items
        step = max(1, _CHUNK // (idx.size * S))
        for start in range(0, n_resamples, step):
            m = min(step, n_resamples - start)
            pick = rng.integers(0, idx.size, size=(m, _draws(idx.size)))  # the same items for every seed
            per_seed[:, start:start + m] += x[:, pick].mean(axis=2)
    w = _seed_weights(S, n_resamples, rng)
    return np.einsum("rs,sr->r", w, per_seed)


def _two_way(D: np.ndarray, c: np.ndarray, groups: list[np.ndarray]):
    """Per stratum the items x seeds decomposition x = m + r_i + q_s + e_si of x = D c n_g."""
    S = D.shape[0]
    Q = np.zeros(S)
    parts = []
    for idx in groups:
        x = D[:, idx] * (c[idx] * idx.size)
        m = x.mean()
        r = x.mean(axis=0) - m
        q = x.mean(axis=1) - m
        e = x - m - r[None, :] - q[:, None]
        Q += q
        parts.append((idx.size, r, e))
    return Q, parts


def crossed_bootstrap_variance(D, c, groups) -> float:
    """The crossed bootstrap's variance in closed form (exact expectation over its resampling,
    k_g = n_g - 1 item draws, k_S = S - 1 seed draws):
    sum_g mean(r_g^2) / k_g + mean(Q^2) / k_S + sum_g mean(e_g^2) / (k_g k_S), Q = sum_g q_g."""
    D = np.atleast_2d(np.asarray(D, dtype=float))
    kS = _draws(D.shape[0])
    Q, parts = _two_way(D, np.asarray(c, dtype=float), groups)
    return float(sum(np.mean(r ** 2) / _draws(ng) + np.mean(e ** 2) / (_draws(ng) * kS) for ng, r, e in parts)
                 + np.mean(Q ** 2) / kS)


@dataclass
class CrossedVariance:
    """Unbiased Var(delta) over items and seeds, its Satterthwaite df and the parts it sums."""

    var: float
    df: float | None
    items: float       # sum_g (MS_items - MS_interaction) / (n_g S): sigma_item^2 / n
    seeds: float       # (mean square of the seed effects - its interaction part) / S: sigma_seed^2 / S
    interaction: float  # sum_g MS_interaction / (n_g S): sigma_noise^2 / (n S)


def crossed_variance(D, c, groups) -> CrossedVariance:
    """Var(delta) for S >= 2 seeds x n items from the two-way random-effects mean squares.

    Per stratum g (n_g items): MS_items = S sum r^2 / (n_g - 1), MS_inter = sum e^2 / ((n_g - 1)(S - 1));
    seeds (shared by the strata): M_seeds = sum_s Q_s^2 / (S - 1). Then
    Var = sum_g MS_items / (n_g S) + M_seeds / S - sum_g MS_inter / (n_g S), whose expectation is
    sum_g sigma_item,g^2 / n_g + sigma_seed^2 / S + sum_g sigma_noise,g^2 / (n_g S). A stratum with one
    item has no item or interaction mean square (its item variance cannot be estimated; it
    enters through the seed term only). df: Satterthwaite for a linear combination of mean squares.
    """
    D = np.atleast_2d(np.asarray(D, dtype=float))
    S = D.shape[0]
    if S < 2:
        raise ValueError("crossed_variance needs >= 2 seeds")
    Q, parts = _two_way(D, np.asarray(c, dtype=float), groups)
    terms = []  # (coefficient * mean square, df)
    items = inter = 0.0
    for ng, r, e in parts:
        if ng < 2:
            continue
        ms_r = S * float(np.sum(r ** 2)) / (ng - 1)
        ms_e = float(np.sum(e ** 2)) / ((ng - 1) * (S - 1))
        terms += [(ms_r / (ng * S), ng - 1), (-ms_e / (ng * S), (ng - 1) * (S - 1))]
        items += (ms_r - ms_e) / (ng * S)
        inter += ms_e / (ng * S)
    m_q = float(np.sum(Q ** 2)) / (S - 1)
    terms.append((m_q / S, S - 1))
    var = float(sum(t for t, _ in terms))
    seeds = m_q / S - inter
    denom = sum(t ** 2 / df for t, df in terms if df > 0)
    df = var ** 2 / denom if var > 0 and denom > 0 else None
    return CrossedVariance(var=var, df=df, items=items, seeds=seeds, interaction=inter)


def t_two_sided_p(t: float, df: float) -> float:
    from scipy import stats as sps

    return float(2 * sps.t.sf(abs(t), df))


def t_quantile(p: float, df: float) -> float:
    from scipy import stats as sps

    return float(sps.t.ppf(p, df))


def paired_seeds(a_seeds, b_seeds, strata=None, stratum_weights: dict | None = None,
                 n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, alpha: float = 0.05,
                 power: float = 0.8) -> Paired:
    """Paired comparison with S >= 1 pretraining seeds per arm (seed j of a paired with seed j of b).

    Point delta: mean over seeds of the per-seed paired delta. S = 1: item bootstrap, McNemar or
    sign-flip, discordance MDE. S > 1: crossed bootstrap interval; p-value and MDE from the
    crossed variance decomposition (t with Satterthwaite df), so seed variance counts in all three.
    """
    A = np.atleast_2d(np.asarray(a_seeds, dtype=float))
    B = np.atleast_2d(np.asarray(b_seeds, dtype=float))
    if A.shape != B.shape:
        raise ValueError(f"arms disagree in shape: {A.shape} vs {B.shape} (seeds x items)")
    S, n = A.shape
    if n == 0:
        raise ValueError("no items to compare")
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError("alpha and power must be in (0, 1)")
    c = item_weights(n, strata, stratum_weights)
    groups = _strata(n, strata)
    D = A - B
    per_seed = D @ c
    delta = float(per_seed.mean())
    rng = np.random.default_rng(seed)
    disc = None
    if S == 1:
        boot = _boot_deltas(D[0], c, groups, n_resamples, rng)
        ci_method = f"paired bootstrap over items within subtasks ({n_resamples} resamples, seed {seed})"
        if np.allclose(c, c[0]) and _is_binary(A[0], B[0]):
            n10, n01 = int(np.sum(D[0] > 0)), int(np.sum(D[0] < 0))
            p, test = mcnemar_exact(n10, n01), "exact McNemar"
            disc = (n10, n01)
        else:
            p, test = sign_flip_p(D[0], c, n_resamples, seed)
        se0 = float(math.sqrt(np.sum(c ** 2 * D[0] ** 2)))
        mde = mde_from_se(se0, alpha, power) if se0 > 0 else None
    else:
        boot = crossed_bootstrap(D, c, groups, n_resamples, rng)
        ci_method = (f"crossed bootstrap: one item draw per subtask shared by all {S} seeds, seeds "
                     f"resampled ({n_resamples} resamples, seed {seed})")
        cv = crossed_variance(D, c, groups)
        se0 = math.sqrt(cv.var) if cv.var > 0 else None
        if not np.any(D):
            p, test, mde = 1.0, "crossed t (no non-zero differences)", None
        elif se0 and cv.df:
            p = t_two_sided_p(delta / se0, cv.df)
            test = f"crossed t (items x seeds, Satterthwaite df {cv.df:.1f})"
            mde = (t_quantile(1 - alpha / 2, cv.df) + t_quantile(power, cv.df)) * se0
        else:
            p, test, mde = None, "no test (the crossed variance estimate is not positive)", None
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return Paired(delta=delta, ci_low=float(lo), ci_high=float(hi), p_value=None if p is None else float(p),
                  test=test, mde=mde, n_items=n, n_seeds=S, ci_method=ci_method,
                  score_a=[float(x) for x in A @ c], score_b=[float(x) for x in B @ c],
                  discordant=disc, se0=se0)
