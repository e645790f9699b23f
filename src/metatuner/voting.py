"""Votes over sampled answers: majority vote, best-of-N, and when a vote is settled (early stopping).

Early stopping follows Adaptive-Consistency's Beta criterion (Aggarwal et al., 2023): with c1 and c2
the counts of the two most frequent answers so far, the vote is settled when

    P(p1 > p2) = P(X > 1/2),  X ~ Beta(c1 + 1, c2 + 1)

reaches the threshold. Unparsable answers (None or "") are ignored, as `majority_vote` ignores them:
they neither settle nor unsettle a vote, so a query whose samples never parse runs to the cap.
At threshold 0.95 a unanimous vote settles after 4 samples (P = 1 - 2^-5 = 0.969; 3 give 0.9375),
at 0.85 after 2 (0.875).
"""

from __future__ import annotations

import random
from collections import Counter
from functools import lru_cache


def majority_vote(answers: list[str | None]) -> str | None:
    """The most frequent non-empty answer; ties go to the one seen first."""
    counts = Counter(a for a in answers if a is not None and a != "")
    if not counts:
        return None
    best = max(counts.values())
    for a in answers:
        if a is not None and counts.get(a) == best:
            return a
    return None


def best_of_n(samples: list[str], scores: list[float]) -> int:
    """Index of the highest-scoring sample (first on ties)."""
    return max(range(len(samples)), key=lambda i: (scores[i], -i))


@lru_cache(maxsize=4096)
def lead_probability(c1: int, c2: int) -> float:
    """P(X > 1/2) for X ~ Beta(c1 + 1, c2 + 1): how sure the vote is that the leader beats the runner-up."""
    from scipy.special import betainc

    return float(1.0 - betainc(c1 + 1, c2 + 1, 0.5))


def top_two(answers: list[str | None]) -> tuple[int, int]:
    """Counts of the most and second most frequent parsable answers (0 when absent)."""
    counts = sorted(Counter(a for a in answers if a is not None and a != "").values(), reverse=True)
    return (counts[0] if counts else 0, counts[1] if len(counts) > 1 else 0)


def vote_settled(answers: list[str | None], threshold: float, min_samples: int = 2) -> bool:
    """Stop sampling? At least `min_samples` samples drawn (parsable or not), a parsable leader, and
    P(leader beats runner-up) >= threshold under the Beta criterion."""
    if len(answers) < min_samples:
        return False
    c1, c2 = top_two(answers)
    return c1 > 0 and lead_probability(c1, c2) >= threshold


def stop_point(answers: list[str | None], threshold: float, min_samples: int, cap: int) -> int:
    """How many of `answers` (in this order) early stopping draws: the first k at which the vote is
    settled, else the cap (or all of them when fewer)."""
    last = min(cap, len(answers))
    for k in range(1, last + 1):
        if vote_settled(answers[:k], threshold, min_samples):
            return k
    return last


def early_outcome(answers: list, correct: list[bool], order: list[int], threshold: float, min_samples: int,
                  cap: int) -> tuple[bool, int]:
    """(is the early-stopping majority correct, samples spent) when the samples arrive in `order`."""
    seq = [answers[i] for i in order]
    k = stop_point(seq, threshold, min_samples, cap)
    pick = majority_vote(seq[:k])
    if pick is None:
        return False, k
    return bool(correct[order[seq.index(pick)]]), k


def early_expectation(answers: list, correct: list[bool], threshold: float, min_samples: int, cap: int,
                      orders: int = 200, seed: int = 0) -> tuple[float, float]:
    """Expected (correctness, samples spent) of early-stopping majority over random orders of the drawn
    samples (the drawn order first): a replay of the stopping rule, no new generation."""
    rng = random.Random(seed)
    idx = list(range(len(answers)))
    hits = spent = 0.0
    for r in range(max(1, orders)):
        order = idx if r == 0 else rng.sample(idx, len(idx))
        ok, k = early_outcome(answers, correct, order, threshold, min_samples, cap)
        hits += ok
        spent += k
    n = max(1, orders)
    return hits / n, spent / n
