"""Statistics of a comparison: intervals of one method's accuracy and paired tests between two methods.

Every method of a comparison answers the same test examples, so two methods are compared example by
example (paired): the accuracy difference with a bootstrap interval that resamples test examples, and
an exact McNemar test on the examples where exactly one of the two is right. Holm's step-down
correction adjusts p-values across the methods compared against one reference.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
from scipy.stats import binomtest, norm, t

BOOTSTRAP_SAMPLES = 10_000


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a proportion k/n."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def t_interval(xs: list[float]) -> tuple[float, float]:
    """95% t interval of the mean over seeds (n-1 degrees of freedom)."""
    if len(xs) < 2:
        return (xs[0], xs[0]) if xs else (0.0, 0.0)
    m, s = statistics.mean(xs), statistics.stdev(xs)
    h = float(t.ppf(0.975, len(xs) - 1)) * s / math.sqrt(len(xs))
    return (m - h, m + h)


def paired_bootstrap(a, b, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """Accuracy difference mean(a) - mean(b) and its 95% percentile bootstrap interval.

    a, b: 0/1 outcomes of shape (examples,) or (examples, seeds), row i being the same test example for
    both methods. Each bootstrap sample draws examples (rows) with replacement, keeping all seeds of a
    drawn example together, so seeds pool without being counted as new examples.
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.ndim == 1:
        d = d[:, None]
    if d.shape[0] == 0:
        return (0.0, 0.0, 0.0)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, d.shape[0], size=(samples, d.shape[0]))
    per_row = d.mean(axis=1)
    boot = per_row[rows].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return (float(d.mean()), float(lo), float(hi))


def discordant(a, b) -> tuple[int, int]:
    """(examples only a got right, examples only b got right)."""
    a, b = np.asarray(a, dtype=bool).ravel(), np.asarray(b, dtype=bool).ravel()
    return int((a & ~b).sum()), int((~a & b).sum())


def mcnemar_exact(a, b) -> float:
    """Two-sided exact McNemar p-value: a binomial test of the discordant pairs against 1/2."""
    only_a, only_b = discordant(a, b)
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given)."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def examples_needed(a, b, alpha: float = 0.05, power: float = 0.8) -> int | None:
    """Test examples a paired (McNemar) test needs to detect the observed difference with the given power,
    from the observed discordance rate (Connor 1987):

        n = (z_{1-alpha/2} sqrt(psi) + z_{power} sqrt(psi - delta^2))^2 / delta^2

    psi = share of discordant examples, delta = observed accuracy difference. None when delta is 0.
    """
    only_a, only_b = discordant(a, b)
    n = np.asarray(a).size
    if n == 0 or only_a == only_b:
        return None
    psi, delta = (only_a + only_b) / n, abs(only_a - only_b) / n
    za, zb = norm.ppf(1 - alpha / 2), norm.ppf(power)
    return math.ceil((za * math.sqrt(psi) + zb * math.sqrt(max(0.0, psi - delta * delta))) ** 2 / (delta * delta))


def paired_comparison(a: dict, b: dict) -> dict | None:
    """Compare method a with method b on the examples and seeds both have.

    a, b: {seed: {example index: 0/1}}. Returns the difference (a - b) with its bootstrap interval,
    exact McNemar p per seed and pooled (discordant pairs summed over seeds), the discordant counts and
    the examples a paired test would need; None when they share no example.
    """
    seeds = [s for s in a if s in b]
    if not seeds:
        return None
    idx = sorted(set.intersection(*[set(a[s]) & set(b[s]) for s in seeds]))
    if not idx:
        return None
    xa = np.array([[a[s][i] for s in seeds] for i in idx], dtype=float)
    xb = np.array([[b[s][i] for s in seeds] for i in idx], dtype=float)
    diff, lo, hi = paired_bootstrap(xa, xb)
    only_a, only_b = discordant(xa, xb)
    return {"diff": diff, "ci95": [lo, hi], "p": mcnemar_exact(xa, xb),
            "p_per_seed": {str(s): mcnemar_exact(xa[:, j], xb[:, j]) for j, s in enumerate(seeds)},
            "only_a": only_a, "only_b": only_b, "n_examples": len(idx), "seeds": seeds,
            "inconclusive": lo <= 0.0 <= hi, "examples_needed": examples_needed(xa, xb)}
