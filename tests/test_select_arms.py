"""Choosing an arm (metatuner.arms) and the budget comparison (metatuner.budget) on hand-made vectors:
never below greedy on validation, uncertainty-aware, budgets respected exactly."""

from __future__ import annotations

import random

import pytest
import torch

from metatuner.arms import Arm, arm_specs, choose_lcb, fill, successive_halving, table
from metatuner.budget import compare_budgets, decide, early_at_budget, early_stop_run, uniform_allocation
from metatuner.errors import MetatunerError

Q = 48


def vec(ones: list[int], q: int = Q) -> list[float]:
    return [1.0 if i in set(ones) else 0.0 for i in range(q)]


def arm(prompt, strategy, ones, n=1, t=None, samples=None):
    a = Arm(prompt, strategy, n, t)
    a.correct = vec(ones)
    a.samples = [float(samples or n)] * Q
    return a


def test_arm_specs_cover_the_grid_with_greedy_first():
    arms = arm_specs(2, [0.3, 0.7], [1, 2, 4, 8], ["majority", "best_of_n", "early_majority"])
    assert [a.label for a in arms[:2]] == ["P0 greedy", "P1 greedy"]
    assert len(arms) == 2 + 2 * 2 * (4 + 3 + 1)
    assert {a.label for a in arms} >= {"P1 majority@8 T=0.7", "P0 best_of_n@2 T=0.3", "P0 early_majority@8 T=0.3"}
    assert all(a.temperature is None for a in arms if a.strategy == "greedy")


def test_weighted_majority_arms_start_at_two():
    arms = arm_specs(1, [0.3], [1, 2, 4], ["weighted_majority"])
    assert [a.label for a in arms] == ["P0 greedy", "P0 weighted_majority@2 T=0.3", "P0 weighted_majority@4 T=0.3"]


def test_a_noisy_point_estimate_does_not_beat_greedy():
    g0 = list(range(14))  # greedy with p~: 14/48
    noisy = list(range(8, 14)) + list(range(20, 30))  # 16/48: +10 queries, -8 queries
    arms = [arm(0, "greedy", g0), arm(0, "majority", noisy, 8, 0.7)]
    assert arms[1].accuracy > arms[0].accuracy
    assert choose_lcb(arms, 0.9, 0.0) == 0
    assert arms[1].stats["eligible"] and arms[1].stats["gain_lcb"] < 0
    lo, hi = arms[1].stats["interval"]
    assert lo < arms[1].accuracy < hi


def test_a_clearly_better_arm_is_chosen():
    g0 = list(range(14))
    better = list(range(26))  # right wherever greedy is, and on 12 more queries
    arms = [arm(0, "greedy", g0), arm(0, "majority", better, 4, 0.3), arm(0, "majority", better[:20], 2, 0.3)]
    assert choose_lcb(arms, 0.9, 0.0) == 1
    assert arms[1].stats["gain_lcb"] > 0 and arms[1].stats["gain_over_greedy_ptilde"] == pytest.approx(12 / 48)
    # the cost weight trades the lower bound against samples: between these weights the cheaper arm wins
    lcb1, lcb2 = arms[1].stats["gain_lcb"], arms[2].stats["gain_lcb"]
    lo, hi = (lcb1 - lcb2) / 2, lcb2  # lcb1 - 4w < lcb2 - 2w and lcb2 - 2w > 0 - w
    assert lo < hi
    assert choose_lcb(arms, 0.9, (lo + hi) / 2) == 2
    assert choose_lcb(arms, 0.9, 1.0) == 0  # far too expensive: greedy with p~
    assert "<- chosen" in table(arms, 0).splitlines()[1]


def test_an_arm_below_greedy_with_its_own_prompt_is_never_chosen():
    g0 = list(range(10))
    g1 = list(range(30))  # greedy with P1 is much better than with p~
    sampled = list(range(27))  # better than greedy p~, worse than greedy with its own prompt
    arms = [arm(0, "greedy", g0), arm(1, "greedy", g1), arm(1, "majority", sampled, 8, 0.7)]
    assert choose_lcb(arms, 0.9, 0.0) == 1
    assert not arms[2].stats["eligible"] and arms[2].stats["gain_lcb"] > arms[1].stats["gain_lcb"] - 0.1


def test_random_arms_never_choose_below_greedy():
    rng = random.Random(0)
    for trial in range(40):
        arms = [arm(p, "greedy", [i for i in range(Q) if rng.random() < 0.3]) for p in range(3)]
        for p in range(3):
            for n in (2, 4, 8):
                a = Arm(p, "majority", n, 0.7)
                a.correct = [min(1.0, max(0.0, c + rng.uniform(-0.6, 0.7))) for c in arms[p].correct]
                a.samples = [float(n)] * Q
                arms.append(a)
        c = arms[choose_lcb(arms, rng.choice([0.5, 0.8, 0.9, 0.95]), rng.choice([0.0, 0.001, 0.01]), seed=trial)]
        same = next(a for a in arms if a.strategy == "greedy" and a.prompt == c.prompt)
        assert c.accuracy >= same.accuracy - 1e-9 and c.accuracy >= arms[0].accuracy - 1e-9


# ----------------------------------------------------------------------------- successive halving


def halving_setup(n_queries=40, good=None):
    """Prompts 0 and 1 at temperatures 0.3 / 0.7; (1, 0.7) samples are always right when `good`."""
    arms = arm_specs(2, [0.3, 0.7], [1, 2, 4], ["majority", "early_majority"])
    spent = []
    rng = random.Random(1)
    truth = {("greedy", 0): [rng.random() < 0.3 for _ in range(n_queries)],
             ("greedy", 1): [rng.random() < 0.35 for _ in range(n_queries)]}

    def draw(group, start, stop):
        spent.append((group, start, stop, (stop - start) * (1 if group[0] == "greedy" else 4)))
        if group[0] == "greedy":
            return truth[group][start:stop]
        out = []
        for q in range(start, stop):
            right = good and group[1:] == (1, 0.7) or random.Random(hash((group, q))).random() < 0.3
            answers = ["42"] * 4 if right else [str(random.Random(hash((group, q, k))).randint(0, 3)) for k in range(4)]
            out.append({"answers": answers, "correct": [a == "42" for a in answers], "scores": [0.0] * 4})
        return out

    return arms, draw, spent


@pytest.mark.parametrize("budget", [2000, 700, 400, 323, 5000])
def test_halving_never_spends_more_than_the_budget(budget):
    arms, draw, spent = halving_setup(good=True)
    cost = lambda g: 1 if g[0] == "greedy" else 4  # noqa: E731
    res = successive_halving(arms, 40, budget, draw, cost, (0.95, 2), 50)
    assert res["spent"] == sum(s[-1] for s in spent) <= budget
    assert res["spent"] >= 80 + 4 * 4  # greedy everywhere, then one query per (prompt, temperature)
    assert len({(g, a) for g, a, _, _ in spent}) == len(spent)  # no query drawn twice for a group
    if budget >= 2000:  # enough to find the arm that is always right
        assert arms[res["chosen"]].group == ("sampled", 1, 0.7)


def test_halving_with_too_small_a_budget_is_one_line():
    arms, draw, _ = halving_setup()
    with pytest.raises(MetatunerError, match=r"^select\.explore_budget = 50: expected at least 96 "):
        successive_halving(arms, 40, 50, draw, lambda g: 1 if g[0] == "greedy" else 4, (0.95, 2), 50)


def test_halving_falls_back_to_greedy_when_the_survivor_is_below_it():
    arms = [Arm(0, "greedy"), Arm(0, "majority", 1, 0.7), Arm(0, "majority", 2, 0.7), Arm(0, "early_majority", 2, 0.7)]
    g = [False] * 5 + [True] * 35  # greedy is wrong on the first queries only

    def draw(group, start, stop):
        if group[0] == "greedy":
            return g[start:stop]
        return [{"answers": ["1", "1"], "correct": [q < 8] * 2, "scores": [0, 0]} for q in range(start, stop)]

    cost = lambda g_: 1 if g_[0] == "greedy" else 2  # noqa: E731
    res = successive_halving(arms, 40, 80, draw, cost, (0.95, 2), 10)
    # round 1 on 10 queries: sampled 8/10 beats greedy 5/10; round 2 on 20: the survivor has 8/20, greedy 15/20
    assert [r["queries"] for r in res["rounds"]] == [10, 20]
    assert arms[res["winner"]].strategy == "majority" and res["chosen"] == 0 and res["spent"] == 80


# ----------------------------------------------------------------------------- the budget comparison


def test_uniform_allocation_is_exact():
    for q, total, cap in [(10, 20, 8), (7, 20, 8), (5, 3, 4), (5, 100, 4), (3, 7, 3)]:
        alloc = uniform_allocation(q, total, cap)
        assert sum(alloc) == min(max(total, q), q * cap) and max(alloc) <= cap and min(alloc) >= 1
        assert max(alloc) - min(alloc) <= 1


def samples_of(rows):
    return [{"answers": a, "correct": [x == "1" for x in a], "scores": None} for a in rows]


def test_early_stop_at_budget_fits_the_budget():
    s = samples_of([["1"] * 8, ["1", "2"] * 4, ["2", "2", "1", "1", "1", "1", "1", "1"], ["1", "1", "2"] + ["1"] * 5])
    for budget in (1, 2, 3, 5, 8):
        e = early_at_budget(s, budget, 8)
        assert e["total_samples"] <= budget * len(s)
        ok, spent = early_stop_run(s, e["threshold"], 1, e["cap"])
        assert sum(spent) == e["total_samples"] and e["accuracy"] == sum(ok) / 4
    assert early_at_budget(s, 8, 8)["threshold"] == 0.99 and early_at_budget(s, 1, 8)["threshold"] <= 0.75
    assert early_at_budget(s, 2, 8)["cap"] == 8
    # votes that never settle (no parsable answer): the cap comes down until the budget fits
    never = [{"answers": [None] * 8, "correct": [False] * 8}] * 3
    assert early_at_budget(never, 2.5, 8) == {"threshold": 0.5, "cap": 2, "accuracy": 0.0, "total_samples": 6}


def test_the_probe_is_used_only_when_it_beats_both():
    def v(p, u, e):
        return {"probe": {"accuracy": p}, "uniform": {"accuracy": u}, "early_stop": {"accuracy": e}}

    assert decide(v(0.5, 0.4, 0.45))[0] == "probe"
    assert decide(v(0.5, 0.5, 0.4)) == ("uniform", decide(v(0.5, 0.5, 0.4))[1])
    assert decide(v(0.5, 0.4, 0.5))[0] == "early_stop"
    used, why = decide(v(0.3, 0.4, 0.35))
    assert used == "uniform" and why.startswith("the probe is not used")


def test_compare_budgets_spends_equal_totals():
    rng = random.Random(0)
    rows = [[str(rng.randint(1, 3)) for _ in range(8)] for _ in range(30)]
    val, test = samples_of(rows[:20]), samples_of(rows[20:])
    out = compare_budgets(val, torch.randn(20, 5), test, torch.randn(10, 5), 2.0, 4, seed=0)
    assert out["cap"] == 4
    for split, q in (("validation", 20), ("test", 10)):
        assert out[split]["probe"]["total_samples"] == out[split]["uniform"]["total_samples"] == 2 * q
    assert out["validation"]["early_stop"]["total_samples"] <= 2 * 20  # fitted to the budget on validation
    assert out["used"] in ("probe", "uniform", "early_stop") and out["test_accuracy_of_used"] == out["test"][out["used"]]["accuracy"]
    assert out["used"] == decide(out["validation"])[0]


def test_fill_gives_per_query_vectors():
    data = samples_of([["1", "1", "2", "2"], ["2", "2", "2", "2"]])
    a = Arm(0, "majority", 4, 0.7)
    fill(a, data, (0.95, 2), 50, 0)
    assert a.correct == [1.0, 0.0] and a.samples == [4.0, 4.0]
    e = Arm(0, "early_majority", 4, 0.7)
    fill(e, data, (0.85, 2), 50, 0)
    assert e.samples[1] == 2.0 and e.correct[1] == 0.0 and 2 <= e.samples[0] <= 4
