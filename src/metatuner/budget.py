"""A fixed sample budget (select.budget per query on average, at most select.max_per_query for one query),
spent three ways on samples already drawn, and compared on validation before anything is used on test:

- probe: a logistic probe on the actor's hidden state predicts each query's success probability and
  `allocate_budget` gives more samples to uncertain queries (exact total). On validation the probe is
  cross-fitted (each fold is predicted by a probe fit on the other folds), so it is never scored on
  its own training queries;
- uniform: the same total, spread evenly;
- early stopping: majority vote with the Beta stopping rule (metatuner.voting), stop_min 1, at the
  highest threshold of THRESHOLDS whose mean samples on validation fit the budget (it may spend less;
  when no threshold fits, because votes never settle, its cap is lowered until it fits).

Each query uses its first k samples in the order drawn. The probe is used only if it beats both
others on validation; otherwise the better of uniform and early stopping is.
"""

from __future__ import annotations

import torch

from metatuner.inference import accuracy_with_allocation, allocate_budget, fit_probe
from metatuner.voting import early_outcome

THRESHOLDS = (0.99, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)


def uniform_allocation(q: int, total: int, cap: int) -> list[int]:
    """`total` samples over q queries as evenly as possible (the first queries get one more), at most cap."""
    if q == 0:
        return []
    total = max(q, min(total, q * cap))
    return [total // q + (1 if i < total % q else 0) for i in range(q)]


def early_stop_run(samples: list[dict], threshold: float, min_samples: int, cap: int,
                   stop_score: float | None = None) -> tuple[list[bool], list[int]]:
    """Early-stopping majority replayed on each query's samples in the order drawn: (correct, spent)."""
    out = [early_outcome(s["answers"], s["correct"], list(range(len(s["answers"]))), threshold, min_samples, cap,
                         s.get("scores"), stop_score) for s in samples]
    return [ok for ok, _ in out], [k for _, k in out]


def early_at_budget(samples: list[dict], budget: float, cap: int) -> dict:
    """Early stopping that spends at most `budget` samples per query on average: the highest threshold of
    THRESHOLDS that fits at the full cap, else (answers that never settle, e.g. unparsable ones) the
    highest cap below it that fits at the lowest threshold (cap = floor(budget) always fits)."""
    for c in range(cap, 0, -1):
        for t in THRESHOLDS if c == cap else THRESHOLDS[-1:]:
            ok, spent = early_stop_run(samples, t, 1, c)
            if sum(spent) <= budget * len(samples):
                return {"threshold": t, "cap": c, "accuracy": sum(ok) / max(1, len(ok)), "total_samples": sum(spent)}
    return {"threshold": THRESHOLDS[-1], "cap": 1, "accuracy": 0.0, "total_samples": 0}  # no samples at all


def success_labels(samples: list[dict]) -> torch.Tensor:
    """Soft labels: each query's success rate over its samples (a 0/1 threshold degenerates when the model
    rarely succeeds: every query falls on one side and the probe learns nothing)."""
    return torch.tensor([sum(s["correct"]) / max(1, len(s["correct"])) for s in samples], dtype=torch.float)


def probe(features: torch.Tensor, labels: torch.Tensor):
    """predict(features) -> p; the base rate (clipped to [0.05, 0.95]) when the labels are all equal."""
    if len(labels) == 0 or labels.min() == labels.max():
        rate = float(labels.mean()) if len(labels) else 0.5
        return lambda f: [min(max(rate, 0.05), 0.95)] * f.shape[0]
    return fit_probe(features, labels)


def crossfit(features: torch.Tensor, labels: torch.Tensor, folds: int = 2, seed: int = 0) -> list[float]:
    """Every query's p predicted by a probe fit on the other folds (random folds)."""
    q = len(labels)
    order = torch.randperm(q, generator=torch.Generator().manual_seed(seed)).tolist()
    p = [0.5] * q
    for f in range(folds):
        held = order[f::folds]
        if not held:
            continue
        fit = [i for i in order if i not in set(held)]
        predict = probe(features[fit], labels[fit]) if fit else probe(features[:0], labels[:0])
        for i, v in zip(held, predict(features[held])):
            p[i] = v
    return p


def spend(samples: list[dict], p_hat: list[float], budget: float, cap: int, early: dict) -> dict:
    """Accuracy and total samples of the three ways on these samples (p_hat: the probe's predictions;
    early: the threshold and cap of early stopping)."""
    q = len(samples)
    total = int(round(budget * q))
    adaptive = allocate_budget(p_hat, total, cap)
    uniform = uniform_allocation(q, total, cap)
    ok, spent = early_stop_run(samples, early["threshold"], 1, early["cap"])
    return {"probe": {"accuracy": accuracy_with_allocation(samples, adaptive, "majority"), "total_samples": sum(adaptive)},
            "uniform": {"accuracy": accuracy_with_allocation(samples, uniform, "majority"), "total_samples": sum(uniform)},
            "early_stop": {"accuracy": sum(ok) / max(1, q), "total_samples": sum(spent), "threshold": early["threshold"],
                           "cap": early["cap"]}}


def decide(val: dict) -> tuple[str, str]:
    """(used, why) from the validation numbers: the probe only if it beats both others."""
    a = {k: val[k]["accuracy"] for k in ("probe", "uniform", "early_stop")}
    if a["probe"] > a["uniform"] and a["probe"] > a["early_stop"]:
        return "probe", (f"the probe beats uniform and early stopping on validation "
                         f"({100 * a['probe']:.1f} vs {100 * a['uniform']:.1f} / {100 * a['early_stop']:.1f})")
    other = "uniform" if a["uniform"] >= a["early_stop"] else "early_stop"
    return other, (f"the probe is not used: {100 * a['probe']:.1f} on validation does not beat "
                   f"uniform {100 * a['uniform']:.1f} and early stopping {100 * a['early_stop']:.1f}; {other} is used")


def compare_budgets(val_samples: list[dict], val_feats: torch.Tensor, test_samples: list[dict],
                    test_feats: torch.Tensor, budget: float, max_per_query: int, seed: int = 0) -> dict:
    """The budget block of select.json: the validation comparison, the decision, and the test numbers of
    all three (the probe on test is fit on all of validation; early stopping keeps its validation threshold
    and cap, so on test it may spend a little more or less than the budget)."""
    cap = min(max_per_query, len(val_samples[0]["answers"]) if val_samples else max_per_query,
              len(test_samples[0]["answers"]) if test_samples else max_per_query)
    labels = success_labels(val_samples)
    early = early_at_budget(val_samples, budget, cap)
    val = spend(val_samples, crossfit(val_feats, labels, 2, seed), budget, cap, early)
    used, why = decide(val)
    test = spend(test_samples, probe(val_feats, labels)(test_feats), budget, cap, early)
    return {"budget_per_query": budget, "cap": cap, "validation": val, "used": used, "why": why, "test": test,
            "test_accuracy_of_used": test[used]["accuracy"]}
