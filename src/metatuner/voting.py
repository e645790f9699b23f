"""Votes over sampled answers: majority vote, best-of-N, and when a vote is settled (early stopping).

Early stopping follows Adaptive-Consistency's Beta criterion (Aggarwal et al., 2023): with c1 and c2
the counts of the two most frequent answers so far, the vote is settled when

    P(p1 > p2) = P(X > 1/2),  X ~ Beta(c1 + 1, c2 + 1)

reaches the threshold. Unparsable answers (None or "") are ignored, as `majority_vote` ignores them:
they neither settle nor unsettle a vote, so a query whose samples never parse runs to the cap.
At threshold 0.95 a unanimous vote settles after 4 samples (P = 1 - 2^-5 = 0.969; 3 give 0.9375),
at 0.85 after 2 (0.875).

A confidence gate (`stop_score`, after confidence-aware self-consistency such as CISC and DeepConf,
which read the model's own token probabilities) settles a vote earlier, from the first sample on and
regardless of `min_samples`: when every sample so far holds the same parsable answer and each one's
score (the sampler's mean token log-probability, or the verifier's score) is at least `stop_score`.
A weak model's samples rarely agree, so the count-only rule settles late; its confident samples are
the ones its other samples would repeat. The answer is still the majority of the samples drawn.

`fit_stop_rule` picks the threshold, minimum and gate on samples already drawn (validation): the cheapest rule
whose replayed accuracy loss against fixed majority over all the samples stays within a tolerance (its
point estimate, or with `confidence` its paired-bootstrap upper bound).
"""

from __future__ import annotations

import math
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


def best_of_n(samples: list[str], scores: list[float], answers: list[str | None] | None = None) -> int:
    """Index of the highest-scoring sample (first on ties). With `answers`, only samples whose answer parses
    compete when any does: an answerless sample is wrong whatever its score (a weak model's short,
    answerless samples often score highest by mean log-probability)."""
    idx = range(len(samples))
    if answers is not None:
        idx = [i for i in idx if answers[i] is not None and answers[i] != ""] or idx
    return max(idx, key=lambda i: (scores[i], -i))


def weighted_vote(answers: list[str | None], scores: list[float]) -> int | None:
    """Confidence-weighted majority (after CISC, Taubenfeld et al., 2025): each parsable answer gets the
    sum of exp(score) over the samples that hold it (score: the mean token log-probability, so a weight is
    the sample's geometric-mean token probability; or a verifier's score), and the answer with the largest
    sum wins. Returns the index of its first sample (ties: the answer seen first), None when nothing parses.
    Non-finite scores weigh 0. The weights are exp(score - the largest finite score): the same winner,
    and a verifier's large scores do not overflow."""
    finite = [x if isinstance(x, (int, float)) and math.isfinite(x) else None
              for x in (list(scores[: len(answers)]) + [None] * (len(answers) - len(scores)))]
    top = max((x for x in finite if x is not None), default=0.0)
    weight: dict[str, float] = {}
    first: dict[str, int] = {}
    for i, a in enumerate(answers):
        if a is None or a == "":
            continue
        w = math.exp(finite[i] - top) if finite[i] is not None else 0.0
        weight[a] = weight.get(a, 0.0) + w
        first.setdefault(a, i)
    if not weight:
        return None
    best = max(weight.values())
    return min(first[a] for a, w in weight.items() if w == best)


@lru_cache(maxsize=4096)
def lead_probability(c1: int, c2: int) -> float:
    """P(X > 1/2) for X ~ Beta(c1 + 1, c2 + 1): how sure the vote is that the leader beats the runner-up."""
    from scipy.special import betainc

    return float(1.0 - betainc(c1 + 1, c2 + 1, 0.5))


def top_two(answers: list[str | None]) -> tuple[int, int]:
    """Counts of the most and second most frequent parsable answers (0 when absent)."""
    counts = sorted(Counter(a for a in answers if a is not None and a != "").values(), reverse=True)
    return (counts[0] if counts else 0, counts[1] if len(counts) > 1 else 0)


def agreed_score(answers: list[str | None], scores: list[float] | None) -> float | None:
    """The lowest score among the samples when all of them hold the same parsable answer and each has a
    finite score, else None. What the confidence gate compares with `stop_score`."""
    if not answers or answers[0] is None or answers[0] == "" or any(a != answers[0] for a in answers):
        return None
    sc = list(scores or [])[: len(answers)]
    if len(sc) < len(answers) or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in sc):
        return None
    return min(sc)


def vote_settled(answers: list[str | None], threshold: float, min_samples: int = 2,
                 scores: list[float] | None = None, stop_score: float | None = None) -> bool:
    """Stop sampling? Either at least `min_samples` samples drawn (parsable or not), a parsable leader,
    and P(leader beats runner-up) >= threshold under the Beta criterion; or (with `stop_score` and the
    samples' `scores`) every sample so far holds the same parsable answer, each scoring >= stop_score."""
    if stop_score is not None:
        agreed = agreed_score(answers, scores)
        if agreed is not None and agreed >= stop_score:
            return True
    if len(answers) < min_samples:
        return False
    c1, c2 = top_two(answers)
    return c1 > 0 and lead_probability(c1, c2) >= threshold


def stop_point(answers: list[str | None], threshold: float, min_samples: int, cap: int,
               scores: list[float] | None = None, stop_score: float | None = None) -> int:
    """How many of `answers` (in this order) early stopping draws: the first k at which the vote is
    settled, else the cap (or all of them when fewer)."""
    last = min(cap, len(answers))
    for k in range(1, last + 1):
        if vote_settled(answers[:k], threshold, min_samples, scores, stop_score):
            return k
    return last


def early_outcome(answers: list, correct: list[bool], order: list[int], threshold: float, min_samples: int,
                  cap: int, scores: list[float] | None = None, stop_score: float | None = None) -> tuple[bool, int]:
    """(is the early-stopping majority correct, samples spent) when the samples arrive in `order`."""
    seq = [answers[i] for i in order]
    k = stop_point(seq, threshold, min_samples, cap, [scores[i] for i in order] if scores else None, stop_score)
    pick = majority_vote(seq[:k])
    if pick is None:
        return False, k
    return bool(correct[order[seq.index(pick)]]), k


def early_expectation(answers: list, correct: list[bool], threshold: float, min_samples: int, cap: int,
                      orders: int = 200, seed: int = 0, scores: list[float] | None = None,
                      stop_score: float | None = None) -> tuple[float, float]:
    """Expected (correctness, samples spent) of early-stopping majority over random orders of the drawn
    samples (the drawn order first): a replay of the stopping rule, no new generation."""
    rng = random.Random(seed)
    idx = list(range(len(answers)))
    hits = spent = 0.0
    for r in range(max(1, orders)):
        order = idx if r == 0 else rng.sample(idx, len(idx))
        ok, k = early_outcome(answers, correct, order, threshold, min_samples, cap, scores, stop_score)
        hits += ok
        spent += k
    n = max(1, orders)
    return hits / n, spent / n


STOP_THRESHOLDS = (0.99, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6)


STOP_SCORE_QUANTILES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def _prefix_table(answers: list, correct: list[bool], cap: int, orders: int, seed: int,
                  scores: list[float] | None = None):
    """For each replay order (the orders `early_expectation` uses): per prefix length k = 1..cap, the lead
    probability (0 without a parsable leader), whether the majority pick is correct, and the prefix's
    `agreed_score` (NaN where it is None, so no gate passes it; what the confidence gate compares)."""
    import numpy as np

    rng = random.Random(seed)
    idx = list(range(len(answers)))
    last = min(cap, len(answers))
    lead = np.zeros((max(1, orders), last))
    right = np.zeros((max(1, orders), last), dtype=bool)
    agree = np.full((max(1, orders), last), np.nan)
    for r in range(max(1, orders)):
        order = idx if r == 0 else rng.sample(idx, len(idx))
        seq = [answers[i] for i in order]
        sc = [scores[i] for i in order] if scores else None
        for k in range(1, last + 1):
            c1, c2 = top_two(seq[:k])
            lead[r, k - 1] = lead_probability(c1, c2) if c1 > 0 else 0.0
            pick = majority_vote(seq[:k])
            right[r, k - 1] = pick is not None and bool(correct[order[seq.index(pick)]])
            a = agreed_score(seq[:k], sc)
            agree[r, k - 1] = np.nan if a is None else a
    return lead, right, agree


def score_gates(samples: list[dict], quantiles: tuple = STOP_SCORE_QUANTILES) -> list[float]:
    """Candidate `stop_score` values: quantiles of the samples' scores (none when any query lacks scores)."""
    import numpy as np

    if not samples or any(s.get("scores") is None for s in samples):
        return []
    flat = [x for s in samples for x in s["scores"] if x is not None and math.isfinite(x)]
    return sorted({round(float(v), 6) for v in np.quantile(flat, quantiles)}) if flat else []


def fit_stop_rule(samples: list[dict], cap: int, tolerance: float, orders: int = 200, seed: int = 0,
                  thresholds: tuple = STOP_THRESHOLDS, confidence: float | None = None,
                  gates: list[float] | None = None) -> dict:
    """The stopping rule (threshold, min_samples, stop_score) that spends the fewest expected samples per
    query on `samples` ({answers, correct, scores} per query, drawn at `cap` or more) while its expected
    accuracy stays within `tolerance` (a fraction, 0.01 = 1 point) of fixed majority over the first `cap`
    samples. Rules: every threshold of `thresholds` x min_samples 1..cap x stop_score in [None] + `gates`
    (default: `score_gates` of the samples' scores, none without scores); min_samples = cap without a
    gate never stops early, so some rule always qualifies. Ties: higher accuracy, then the more cautious
    rule (more samples first, higher threshold, higher gate). Expectations are over the random orders
    of `early_expectation` (query i replayed with seed + i), so a rule's accuracy and mean samples here
    equal `early_expectation`'s. With `confidence`, a rule qualifies only if the one-sided upper bound
    at that level of its accuracy loss (paired bootstrap over queries) is within the tolerance, not
    just its point estimate: on few or rarely-correct queries a point estimate lets aggressive rules
    through. Returns the rule with its accuracy, mean samples and loss bound, and the fixed majority's
    accuracy on these samples."""
    import numpy as np

    q = max(1, len(samples))
    fixed_q = np.zeros(len(samples))
    for i, s in enumerate(samples):
        pick = majority_vote(s["answers"][:cap])
        fixed_q[i] = bool(pick is not None and s["correct"][s["answers"].index(pick)])
    fixed = float(fixed_q.sum() / q)
    if gates is None:
        gates = score_gates(samples)
    tables = [_prefix_table(s["answers"][:cap], s["correct"][:cap], cap, orders, seed + i,
                            (s.get("scores") or [])[:cap] or None)
              for i, s in enumerate(samples)]
    rows = np.random.default_rng(seed).integers(0, len(samples), size=(2000, len(samples))) if confidence else None
    best = None
    for g in [None] + list(gates):
        for m in range(1, cap + 1):
            for t in thresholds:
                acc_q, spent_q = np.zeros(len(samples)), np.zeros(len(samples))
                for i, (lead, right, agree) in enumerate(tables):
                    last = lead.shape[1]
                    ks = np.arange(1, last + 1)
                    settled = (lead >= t) & (ks >= m)[None, :]
                    if g is not None:
                        with np.errstate(invalid="ignore"):
                            settled |= agree >= g  # NaN (no agreement) never passes
                    stop = np.where(settled.any(axis=1), settled.argmax(axis=1), last - 1)
                    acc_q[i] = right[np.arange(len(stop)), stop].mean()
                    spent_q[i] = (stop + 1).mean()
                acc, mean = float(acc_q.sum() / q), float(spent_q.sum() / q)
                loss = fixed - acc
                if rows is not None and len(samples):
                    loss = float(np.quantile((fixed_q - acc_q)[rows].mean(axis=1), confidence))
                ok = loss <= tolerance + 1e-12 or (m == cap and g is None)
                key = (round(mean, 9), -round(acc, 9), -m, -t, -(math.inf if g is None else g))
                if ok and (best is None or key < best[0]):
                    best = (key, {"threshold": t, "min_samples": m, "stop_score": g, "accuracy": acc,
                                  "mean_samples": mean, "loss_bound": loss})
                if m == cap:
                    break  # at min_samples = cap every threshold stops at the cap (the gate aside)
    return {**best[1], "fixed_majority_accuracy": fixed, "cap": cap, "tolerance": tolerance,
            "confidence": confidence, "queries": len(samples), "gates_tried": list(gates)}
