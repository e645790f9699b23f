"""Paired statistics of `metatuner compare` against reference computations done independently here."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest, norm, t

from metatuner.stats import (examples_needed, holm, mcnemar_exact, paired_bootstrap, paired_comparison, t_interval,
                             wilson)

# 40 test examples: a right on 26, b right on 18; 12 only a, 4 only b
A = [1] * 14 + [1] * 12 + [0] * 4 + [0] * 10
B = [1] * 14 + [0] * 12 + [1] * 4 + [0] * 10


def test_mcnemar_exact_equals_binomial_test_of_discordant_pairs():
    only_a = sum(1 for x, y in zip(A, B) if x and not y)
    only_b = sum(1 for x, y in zip(A, B) if y and not x)
    assert (only_a, only_b) == (12, 4)
    ref = binomtest(only_a, only_a + only_b, 0.5, alternative="two-sided").pvalue
    assert mcnemar_exact(A, B) == pytest.approx(ref)
    assert mcnemar_exact(A, B) == pytest.approx(0.0768, abs=1e-4)  # 2 * P(X <= 4), X ~ Bin(16, 1/2)
    assert mcnemar_exact(B, A) == pytest.approx(ref)  # symmetric
    assert mcnemar_exact([1, 0, 1], [1, 0, 1]) == 1.0  # no discordant pair
    sm = pytest.importorskip("statsmodels.stats.contingency_tables")
    table = [[14, 12], [4, 10]]
    assert mcnemar_exact(A, B) == pytest.approx(sm.mcnemar(table, exact=True).pvalue)


def test_paired_bootstrap_equals_direct_numpy_computation():
    a, b = np.array(A, float), np.array(B, float)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(a), size=(10_000, len(a)))
    boot = (a[idx] - b[idx]).mean(axis=1)
    ref_lo, ref_hi = np.percentile(boot, [2.5, 97.5])
    diff, lo, hi = paired_bootstrap(A, B, samples=10_000, seed=0)
    assert diff == pytest.approx(0.2)
    assert (lo, hi) == pytest.approx((ref_lo, ref_hi))
    assert lo < 0.2 < hi and lo > 0  # 12 vs 4 discordant on 40: the interval clears 0


def test_paired_bootstrap_keeps_seeds_of_an_example_together():
    """(examples, seeds) input: rows are resampled whole, the difference is the mean over all cells."""
    a = np.array([[1, 1], [1, 0], [0, 0], [1, 1]], float)
    b = np.array([[0, 1], [1, 1], [0, 1], [0, 0]], float)
    diff, lo, hi = paired_bootstrap(a, b, samples=2000, seed=3)
    assert diff == pytest.approx((a - b).mean())
    rng = np.random.default_rng(3)
    rows = rng.integers(0, 4, size=(2000, 4))
    ref = np.percentile((a - b).mean(axis=1)[rows].mean(axis=1), [2.5, 97.5])
    assert (lo, hi) == pytest.approx(tuple(ref))


def test_holm_by_hand():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> monotone 0.06
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []
    multi = pytest.importorskip("statsmodels.stats.multitest")
    assert holm(p) == pytest.approx(list(multi.multipletests(p, method="holm")[1]))


def test_examples_needed_is_connors_formula():
    n, only_a, only_b = 40, 12, 4
    psi, delta = (only_a + only_b) / n, (only_a - only_b) / n
    ref = (norm.ppf(0.975) * math.sqrt(psi) + norm.ppf(0.8) * math.sqrt(psi - delta**2)) ** 2 / delta**2
    assert examples_needed(A, B) == math.ceil(ref) == 77
    assert examples_needed([1, 0], [0, 1]) is None  # no difference: no size tells them apart


def test_paired_comparison_pairs_by_index_and_pools_seeds():
    a = {0: dict(enumerate(A)), 1: dict(enumerate(A))}
    # b's predictions listed in another order: pairing goes by example index, not position
    b = {0: {i: B[i] for i in reversed(range(len(B)))}, 1: dict(enumerate(B))}
    c = paired_comparison(a, b)
    assert c["diff"] == pytest.approx(0.2) and c["n_examples"] == 40 and c["seeds"] == [0, 1]
    assert (c["only_a"], c["only_b"]) == (24, 8)
    assert c["p"] == pytest.approx(binomtest(24, 32, 0.5).pvalue)  # pooled: discordant pairs summed over seeds
    assert c["p_per_seed"] == pytest.approx({"0": binomtest(12, 16).pvalue, "1": binomtest(12, 16).pvalue})
    assert not c["inconclusive"]
    # seeds or examples only one method has are left out
    c2 = paired_comparison({0: {0: 1, 1: 1, 2: 0}, 5: {0: 1}}, {0: {1: 0, 2: 0, 3: 1}})
    assert c2["n_examples"] == 2 and c2["seeds"] == [0] and c2["diff"] == pytest.approx(0.5)
    assert paired_comparison({0: {0: 1}}, {1: {0: 1}}) is None


def test_paired_comparison_inconclusive_when_interval_spans_zero():
    a = {0: {i: int(i % 2 == 0) for i in range(20)}}
    b = {0: {i: int(i % 2 == 0) if i != 1 else 1 for i in range(20)} | {0: 0}}  # one discordant each way
    c = paired_comparison(a, b)
    assert c["diff"] == 0 and c["inconclusive"] and c["examples_needed"] is None and c["p"] == 1.0


def test_wilson_by_hand():
    z = 1.96
    for k, n in [(8, 10), (0, 10), (10, 10), (37, 100), (1, 1)]:
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        lo, hi = wilson(k, n)
        assert lo == pytest.approx(max(0.0, centre - half)) and hi == pytest.approx(min(1.0, centre + half))
    assert wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # textbook values
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(0, 0) == (0.0, 0.0)


def test_t_interval_by_hand():
    # two seeds: t(0.975, df=1) = 12.706 (textbook table); mean 0.6, sd 0.1414
    lo, hi = t_interval([0.5, 0.7])
    h = 12.706 * math.sqrt(0.02) / math.sqrt(2)
    assert (lo, hi) == pytest.approx((0.6 - h, 0.6 + h), abs=1e-4)
    # three seeds: df=2 -> 4.303
    assert t_interval([0.2, 0.4, 0.6]) == pytest.approx((0.4 - 4.303 * 0.2 / math.sqrt(3),
                                                         0.4 + 4.303 * 0.2 / math.sqrt(3)), abs=1e-4)
    # forty seeds: the t quantile at df=39 (2.023), not the normal 1.96
    xs = [0.1 * (i % 4) for i in range(40)]
    m, s = np.mean(xs), np.std(xs, ddof=1)
    q = t.ppf(0.975, 39)
    assert q == pytest.approx(2.0227, abs=1e-4)
    assert t_interval(xs) == pytest.approx((m - q * s / math.sqrt(40), m + q * s / math.sqrt(40)))
    assert t_interval([0.3]) == (0.3, 0.3) and t_interval([]) == (0.0, 0.0)
    assert t_interval([0.5, 0.5]) == (0.5, 0.5)
