"""Paired item-level statistics for arm-vs-baseline deltas: arrays in, numbers out, no I/O.

Both arms are scored on the same items, so the comparison is paired: the delta is a weighted
sum of per-item differences d_i = a_i - b_i, with weights c_i that reproduce how lm-eval
aggregates the task (c_i = 1/n for a flat task; w_s / n_s for item i of subtask s in a group
whose subtasks carry weights w_s - size-weighted for MMLU, so c_i = 1/N there too).

- Interval: percentile bootstrap of the delta, items resampled with replacement within their
  subtask (stratum), seeded. With several pretraining seeds per arm the bootstrap is
  hierarchical: seeds are resampled, then items within each drawn seed, so the interval covers
  both the item and the seed-to-seed variance.
- p-value (two-sided): exact McNemar (a binomial test on the discordant items) when the metric
  is 0/1 and every item has the same weight; otherwise the paired sign-flip permutation test on
  the weighted differences (exact enumeration for <= 16 non-zero differences, else seeded Monte
  Carlo with the (1 + hits) / (1 + resamples) correction).
- Minimal detectable effect (MDE) at power 1 - beta, level alpha: the normal approximation
  (z_{1-alpha/2} + z_{1-beta}) * se0 with se0 the null standard deviation of the delta. Under
  the sign-flip null se0^2 = sum_i c_i^2 d_i^2, which for a 0/1 metric on n equally weighted
  items is (discordant items / n) / n = p_disc / n: the McNemar variance. With seeds, se0 is the
  hierarchical bootstrap's standard deviation instead.
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
        step = max(1, _CHUNK // idx.size)
        for start in range(0, n_resamples, step):
            m = min(step, n_resamples - start)
            pick = rng.integers(0, idx.size, size=(m, idx.size))
            out[start:start + m] += x[pick].mean(axis=1)
    return out


@dataclass
class Paired:
    """One paired comparison (fractions; multiply by 100 for points)."""

    delta: float
    ci_low: float
    ci_high: float
    p_value: float
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


def paired_seeds(a_seeds, b_seeds, strata=None, stratum_weights: dict | None = None,
                 n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, alpha: float = 0.05,
                 power: float = 0.8) -> Paired:
    """Paired comparison with S >= 1 pretraining seeds per arm (seed j of a paired with seed j of b).

    Point delta: mean over seeds of the per-seed paired delta. Interval: hierarchical bootstrap
    (seeds, then items within subtasks) when S > 1, else the item bootstrap. p-value: on the
    seed-averaged item differences (McNemar when S = 1 and the metric is 0/1); it tests the
    item-level null and does not account for seed variance, which the interval does.
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
    if S == 1:
        boot = _boot_deltas(D[0], c, groups, n_resamples, rng)
        ci_method = f"paired bootstrap over items within subtasks ({n_resamples} resamples, seed {seed})"
    else:
        # For every resample r and every slot j, an independent item resample of every seed.
        reps = np.stack([np.stack([_boot_deltas(D[s], c, groups, n_resamples, rng) for s in range(S)])
                         for _ in range(S)])  # [slot j, seed s, r]
        drawn = rng.integers(0, S, size=(n_resamples, S))  # seeds drawn with replacement
        r = np.arange(n_resamples)
        boot = np.mean([reps[j, drawn[:, j], r] for j in range(S)], axis=0)
        ci_method = (f"hierarchical bootstrap: {S} seeds resampled, then items within subtasks "
                     f"({n_resamples} resamples, seed {seed})")
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    dbar = D.mean(axis=0)
    uniform = np.allclose(c, c[0])
    disc = None
    if S == 1 and uniform and _is_binary(A[0], B[0]):
        n10, n01 = int(np.sum(D[0] > 0)), int(np.sum(D[0] < 0))
        p, test = mcnemar_exact(n10, n01), "exact McNemar"
        disc = (n10, n01)
    else:
        p, test = sign_flip_p(dbar, c, n_resamples, seed)
    if S == 1:
        se0 = float(math.sqrt(np.sum(c ** 2 * dbar ** 2)))
    else:
        se0 = float(np.std(boot, ddof=1))
    mde = mde_from_se(se0, alpha, power) if se0 > 0 else None
    return Paired(delta=delta, ci_low=float(lo), ci_high=float(hi), p_value=float(p), test=test,
                  mde=mde, n_items=n, n_seeds=S, ci_method=ci_method,
                  score_a=[float(x) for x in A @ c], score_b=[float(x) for x in B @ c],
                  discordant=disc, se0=se0)
