"""Choosing an inference configuration on validation: arms = (prompt, strategy, N, temperature).

Arms: greedy decoding with every prompt (N=1, no temperature), and for every (prompt, temperature)
majority and best-of-N at every N, plus early-stopping majority with the largest N as its cap. Each
arm holds, per validation query, its expected correctness and expected samples spent, estimated
from samples drawn once per (prompt, temperature) at the largest N (subsets for majority/best-of-N,
replays of the stopping rule over random orders for early stopping), so any two arms compare query
by query.

Two rules, both with the same guard: an arm is *eligible* only if its validation accuracy is at least
that of greedy decoding with the same prompt and that of greedy decoding with p~ (the reference,
`arms[0]`), on the same queries. Greedy with p~ is always eligible, so the choice is never below
greedy on validation by construction.
- `choose_lcb`: the eligible arm maximizing  acc(greedy p~) + LCB(paired gain over greedy p~)
  - cost_weight x mean samples, the LCB one-sided at `confidence` from a paired bootstrap over
  queries. An arm that is better by a noisy point estimate only loses to greedy p~.
- `successive_halving`: a fixed-budget best-arm search. Greedy arms answer every query first; the
  rest of the budget is split evenly over ceil(log2(arms)) rounds, each round draws the same number
  of new queries for every (prompt, temperature) that still has an arm, and keeps the better half
  of the arms by accuracy on the queries drawn so far. The survivor is chosen if eligible, else the
  best greedy arm. The samples drawn never exceed the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from metatuner.errors import MetatunerError
from metatuner.inference import per_query_accuracy
from metatuner.voting import early_expectation

BOOTSTRAP = 4000


@dataclass
class Arm:
    prompt: int  # index into the candidate prompts; 0 = p~
    strategy: str  # greedy | majority | best_of_n | weighted_majority | early_majority
    n: int = 1  # samples (early_majority: the cap)
    temperature: float | None = None
    correct: list[float] = field(default_factory=list)  # expected correctness per validation query
    samples: list[float] = field(default_factory=list)  # expected samples spent per validation query
    stats: dict = field(default_factory=dict)

    @property
    def group(self) -> tuple:
        """What must be drawn to evaluate the arm: greedy answers of a prompt, or samples at a temperature."""
        return ("greedy", self.prompt) if self.strategy == "greedy" else ("sampled", self.prompt, self.temperature)

    @property
    def label(self) -> str:
        if self.strategy == "greedy":
            return f"P{self.prompt} greedy"
        return f"P{self.prompt} {self.strategy}@{self.n} T={self.temperature:g}"

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / max(1, len(self.correct))

    @property
    def mean_samples(self) -> float:
        return sum(self.samples) / max(1, len(self.samples))


def arm_specs(n_prompts: int, temperatures: list[float], n_values: list[int], strategies: list[str]) -> list[Arm]:
    """Every arm, greedy ones first (greedy with p~ at index 0). best_of_n and weighted_majority start at N=2
    (at N=1 they are majority@1: one sample)."""
    arms = [Arm(p, "greedy") for p in range(n_prompts)]
    nmax = max(n_values)
    for p in range(n_prompts):
        for t in temperatures:
            if "majority" in strategies:
                arms += [Arm(p, "majority", n, t) for n in n_values]
            if "best_of_n" in strategies:
                arms += [Arm(p, "best_of_n", n, t) for n in n_values if n > 1]
            if "weighted_majority" in strategies:
                arms += [Arm(p, "weighted_majority", n, t) for n in n_values if n > 1]
            if "early_majority" in strategies:
                arms.append(Arm(p, "early_majority", nmax, t))
    return arms


def fill(arm: Arm, data: list, rule: tuple[float, int], subsets: int, seed: int) -> None:
    """Set the arm's per-query vectors from its group's data: greedy correctness (0/1 per query) or
    samples ({answers, correct, scores} per query). rule = (stop_threshold, stop_min[, stop_score])."""
    if arm.strategy == "greedy":
        arm.correct, arm.samples = [float(c) for c in data], [1.0] * len(data)
    elif arm.strategy == "early_majority":
        gate = rule[2] if len(rule) > 2 else None
        pairs = [early_expectation(s["answers"], s["correct"], rule[0], rule[1], arm.n, subsets, seed + q,
                                   s.get("scores"), gate) for q, s in enumerate(data)]
        arm.correct, arm.samples = [a for a, _ in pairs], [k for _, k in pairs]
    else:
        arm.correct = per_query_accuracy(data, arm.n, arm.strategy, subsets, seed)
        arm.samples = [float(arm.n)] * len(data)


def _eligible(arm: Arm, arms: list[Arm]) -> bool:
    """Accuracy >= greedy's with the same prompt and with p~, on the arm's queries (rounded to 1e-9)."""
    q = len(arm.correct)
    same = next(a for a in arms if a.strategy == "greedy" and a.prompt == arm.prompt)
    acc = round(arm.accuracy, 9)
    return all(acc >= round(sum(g.correct[:q]) / max(1, q), 9) for g in (same, arms[0]))


def describe(arms: list[Arm], confidence: float, cost_weight: float, seed: int = 0) -> None:
    """Fill each arm's stats: accuracy, two-sided interval at `confidence`, gain over greedy p~ (paired,
    on the arm's queries) with its one-sided lower bound, mean samples, eligible, score."""
    ref = np.asarray(arms[0].correct, dtype=float)
    rng = np.random.default_rng(seed)
    rows_by_q: dict[int, np.ndarray] = {}
    for arm in arms:
        v = np.asarray(arm.correct, dtype=float)
        q = len(v)
        if q == 0:
            arm.stats = {"queries": 0, "eligible": False, "score": -math.inf}
            continue
        if q not in rows_by_q:  # the same resampled queries for every arm seen on q queries (paired)
            rows_by_q[q] = rng.integers(0, q, size=(BOOTSTRAP, q))
        rows = rows_by_q[q]
        acc_boot = v[rows].mean(axis=1)
        diff = v - ref[:q]
        diff_boot = diff[rows].mean(axis=1)
        lo, hi = np.quantile(acc_boot, [(1 - confidence) / 2, (1 + confidence) / 2])
        lcb = 0.0 if arm is arms[0] else float(np.quantile(diff_boot, 1 - confidence))
        arm.stats = {"queries": q, "accuracy": arm.accuracy, "interval": [float(lo), float(hi)],
                     "gain_over_greedy_ptilde": float(diff.mean()), "gain_lcb": lcb,
                     "mean_samples": arm.mean_samples, "eligible": _eligible(arm, arms),
                     "score": float(ref[:q].mean()) + lcb - cost_weight * arm.mean_samples}


def choose_lcb(arms: list[Arm], confidence: float, cost_weight: float, seed: int = 0) -> int:
    """Index of the eligible arm with the best score (ties: fewer samples, then the earlier arm)."""
    describe(arms, confidence, cost_weight, seed)
    ok = [i for i, a in enumerate(arms) if a.stats["eligible"]]
    return max(ok, key=lambda i: (round(arms[i].stats["score"], 12), -arms[i].mean_samples, -i))


def successive_halving(arms: list[Arm], n_queries: int, budget: int, draw: Callable[[tuple, int, int], list],
                       cost: Callable[[tuple], int], rule: tuple[float, int], subsets: int, seed: int = 0) -> dict:
    """Fixed-budget best-arm search over `arms` (greedy with p~ first). draw(group, start, stop) returns
    the group's data for validation queries [start, stop); cost(group) is what one query of it costs in
    samples. Fills every arm's vectors on the queries it saw; returns {chosen, winner, spent, rounds, data}."""
    groups = list(dict.fromkeys(a.group for a in arms))
    greedy = [g for g in groups if g[0] == "greedy"]
    need = sum(cost(g) for g in greedy) * n_queries + sum(cost(g) for g in groups if g not in greedy)
    if budget < need:
        raise MetatunerError(f"select.explore_budget = {budget}: expected at least {need} with select.rule=halving "
                             "(greedy answers of every prompt on every validation query, then one query per "
                             "(prompt, temperature))")
    data = {g: draw(g, 0, n_queries) for g in greedy}
    spent = sum(cost(g) for g in greedy) * n_queries
    alive = list(range(len(arms)))
    n_rounds = max(1, math.ceil(math.log2(len(arms))))
    drawn, rounds = 0, []
    for r in range(n_rounds):
        live = list(dict.fromkeys(arms[i].group for i in alive if arms[i].strategy != "greedy"))
        per_query = sum(cost(g) for g in live)
        m = 0
        if live:
            share = (budget - spent) // (n_rounds - r)
            if drawn == 0:
                share = max(share, per_query)  # the first round sees at least one query (paid for: checked above)
            m = min(n_queries - drawn, share // per_query)
        for g in live:
            data[g] = data.get(g, []) + (draw(g, drawn, drawn + m) if m else [])
        spent += m * per_query
        drawn += m
        seen = drawn if live else n_queries
        for i in alive:
            fill(arms[i], data[arms[i].group][:seen], rule, subsets, seed)
        if len(alive) == 1:
            break
        ranked = sorted(alive, key=lambda i: (-round(arms[i].accuracy, 12), arms[i].mean_samples, i))
        alive = sorted(ranked[: math.ceil(len(alive) / 2)])
        rounds.append({"round": r + 1, "queries": seen, "new_queries": m, "kept": [arms[i].label for i in alive]})
    winner = min(alive, key=lambda i: (-round(arms[i].accuracy, 12), arms[i].mean_samples, i))
    for a in arms:  # greedy answers exist for every query: the guard compares on the winner's queries
        if a.strategy == "greedy":
            fill(a, data[a.group], rule, subsets, seed)
    chosen = winner
    if not _eligible(arms[winner], arms):
        greedy_idx = [i for i, a in enumerate(arms) if a.strategy == "greedy"]
        chosen = max(greedy_idx, key=lambda i: (round(arms[i].accuracy, 12), -i))
    return {"chosen": chosen, "winner": winner, "spent": spent, "rounds": rounds, "data": data}


def table(arms: list[Arm], chosen: int) -> str:
    """One line per arm: validation accuracy with its interval, gain lower bound, samples, eligibility."""
    lines = [f"{'arm':34} {'acc%':>6} {'interval%':>13} {'gain LCB':>8} {'samples':>7} {'queries':>7}  eligible"]
    for i, a in enumerate(arms):
        s = a.stats
        if not s.get("queries"):
            lines.append(f"{a.label:34} {'-':>6} {'-':>13} {'-':>8} {'-':>7} {0:>7}  no")
            continue
        lo, hi = s["interval"]
        lines.append(f"{a.label:34} {100 * s['accuracy']:6.1f} {f'{100 * lo:.1f}-{100 * hi:.1f}':>13} "
                     f"{100 * s['gain_lcb']:+8.1f} {s['mean_samples']:7.2f} {s['queries']:7d}  "
                     f"{'yes' if s['eligible'] else 'no'}{'  <- chosen' if i == chosen else ''}")
    return "\n".join(lines)
