"""Prompt x inference strategy: accuracy of (prompt, N) from one set of samples, and adaptive budgets.

- Sample N_max answers per (prompt, query) once; the accuracy of majority vote or best-of-N at any
  N <= N_max is estimated by averaging over size-N subsets of those samples (all subsets when
  there are at most `max_subsets`, else that many random ones).
- `per_query_accuracy` keeps that estimate per query, so arms compare query by query
  (metatuner.arms chooses among them).
- Adaptive budget (after Damani et al., 2025): a logistic probe on the actor's hidden state
  predicts each query's success probability p; the k-th sample of a query is worth p(1-p)^(k-1)
  (the chance it is the first success), so samples go greedily to the largest marginal value
  until the total budget is spent exactly.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from typing import Callable

import torch

from metatuner.evaluate import majority_vote
from metatuner.voting import best_of_n, weighted_vote


def subset_outcome(answers: list, correct: list[bool], scores: list[float] | None, idx: tuple[int, ...], strategy: str) -> bool:
    """Is the strategy's pick from the samples `idx` correct? majority: most frequent answer (ties to
    the earliest sample); best_of_n: highest score among the samples whose answer parses (all when none
    does; ties to the earliest); weighted_majority: the answer with the largest sum of exp(score)
    (metatuner.voting.weighted_vote)."""
    if strategy == "majority":
        sub = [answers[i] for i in idx]
        pick = majority_vote(sub)
        if pick is None:
            return False
        j = idx[sub.index(pick)]
        return bool(correct[j])
    if strategy == "best_of_n":
        sub = [answers[i] for i in idx]
        j = idx[best_of_n(sub, [scores[i] for i in idx], sub)]
        return bool(correct[j])
    if strategy == "weighted_majority":
        k = weighted_vote([answers[i] for i in idx], [scores[i] for i in idx])
        return k is not None and bool(correct[idx[k]])
    raise ValueError(strategy)


def query_accuracy(s: dict, n: int, strategy: str, max_subsets: int, rng: random.Random) -> float:
    """Expected correctness of one query at N=n: the mean over size-n subsets of its samples (all subsets
    when C(N_max, n) <= max_subsets, else that many random ones)."""
    nmax = len(s["answers"])
    if n > nmax:
        raise ValueError(f"N={n} exceeds the {nmax} samples drawn")
    if math.comb(nmax, n) <= max_subsets:
        subs = list(itertools.combinations(range(nmax), n))
    else:
        subs = [tuple(sorted(rng.sample(range(nmax), n))) for _ in range(max_subsets)]
    return sum(subset_outcome(s["answers"], s["correct"], s.get("scores"), idx, strategy) for idx in subs) / len(subs)


def per_query_accuracy(samples: list[dict], n: int, strategy: str = "majority", max_subsets: int = 200,
                       seed: int = 0) -> list[float]:
    """Expected correctness at N=n of every query (a vector, so two strategies can be compared query by query)."""
    rng = random.Random(seed)
    return [query_accuracy(s, n, strategy, max_subsets, rng) for s in samples]


def estimate_accuracy(samples: list[dict], n: int, strategy: str = "majority", max_subsets: int = 200,
                      seed: int = 0) -> float:
    """Mean over queries of the expected correctness at N=n. samples[q] = {"answers", "correct", "scores"}
    with N_max entries each. Exact (all subsets) when C(N_max, n) <= max_subsets."""
    return sum(per_query_accuracy(samples, n, strategy, max_subsets, seed)) / max(1, len(samples))


def allocate_budget(p: list[float], total: int, max_per_query: int, min_per_query: int = 1) -> list[int]:
    """Samples per query summing to exactly `total` (when feasible): min_per_query each, then greedily the
    largest marginal gain p(1-p)^(k-1) of a query's k-th sample (more samples to uncertain queries)."""
    q = len(p)
    if q == 0:
        return []
    total = max(min(total, q * max_per_query), q * min_per_query)
    alloc = [min_per_query] * q
    left = total - sum(alloc)

    def gain(i: int) -> float:
        pi = min(max(p[i], 1e-6), 1 - 1e-6)
        return pi * (1 - pi) ** alloc[i]  # value of sample number alloc[i] + 1

    heap = [(-gain(i), i) for i in range(q) if alloc[i] < max_per_query]
    heapq.heapify(heap)
    while left > 0 and heap:
        _, i = heapq.heappop(heap)
        alloc[i] += 1
        left -= 1
        if alloc[i] < max_per_query:
            heapq.heappush(heap, (-gain(i), i))
    return alloc


def fit_probe(features: torch.Tensor, labels: torch.Tensor, steps: int = 300, lr: float = 0.05, l2: float = 1e-3):
    """Logistic regression on standardized features (full-batch Adam). -> predict(features) -> p."""
    x = features.float()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mu) / sd
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    y = labels.float()
    with torch.enable_grad():  # callers often run under torch.no_grad()
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * (w * w).sum()
            loss.backward()
            opt.step()

    def predict(f: torch.Tensor) -> list[float]:
        with torch.no_grad():
            return torch.sigmoid(((f.float() - mu) / sd) @ w + b).tolist()

    return predict


@torch.no_grad()
def query_features(model, tok, texts: list[str], batch_size: int = 16) -> torch.Tensor:
    """Mean-pooled last-layer hidden state of each rendered query: [Q, d] (the probe's input)."""
    feats = []
    for s in range(0, len(texts), batch_size):
        enc = tok(texts[s : s + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        out = model(**enc, output_hidden_states=True, use_cache=False, logits_to_keep=1)
        h = out.hidden_states[-1].float()
        m = enc["attention_mask"].unsqueeze(-1).float()
        feats.append(((h * m).sum(1) / m.sum(1)).cpu())
    return torch.cat(feats)


def accuracy_with_allocation(samples: list[dict], alloc: list[int], strategy: str) -> float:
    """Accuracy when query q uses its first alloc[q] samples."""
    ok = [subset_outcome(s["answers"], s["correct"], s.get("scores"), tuple(range(k)), strategy)
          for s, k in zip(samples, alloc)]
    return sum(ok) / max(1, len(ok))


def draw_samples(model, tok, task, examples, prompt: str, n: int, temperature: float, top_p: float,
                 batch_size: int = 16, verifier: Callable | None = None, scores: bool = True, engine=None,
                 keys: list[int] | None = None) -> list[dict]:
    """n samples per query with one prompt: answers, correctness, scores (verifier or mean log-prob;
    none without `scores`). Generation stops at the task's answer_end, as evaluate() does. `engine`
    (generation.backend=vllm): it samples instead of `model`, every query in one request, query j seeded
    by keys[j] (default its position)."""
    from metatuner.generation import chat_text, generate_texts

    out = []
    step = max(1, len(examples)) if engine is not None else batch_size
    keys = list(range(len(examples))) if keys is None else list(keys)
    for s in range(0, len(examples), step):
        exs = examples[s : s + step]
        texts = [chat_text(tok, task.render(prompt, ex.query)) for ex in exs]
        kw = dict(do_sample=True, temperature=temperature, top_p=top_p, num_return_sequences=n,
                  return_logprobs=scores and verifier is None, answer_end=getattr(task, "answer_end", ""))
        if engine is not None:
            gens, _, lps = engine.generate(texts, task.max_new_tokens, keys=keys[s : s + step], **kw)
        else:
            gens, _, lps = generate_texts(model, tok, texts, task.max_new_tokens, **kw)
        for j, ex in enumerate(exs):
            answers = [task.extract_for(g, ex) for g in gens[j]]
            correct = [bool(task.score(a, ex)["correct"]) for a in answers]
            sc = ([verifier(g, ex) for g in gens[j]] if verifier else lps[j]) if scores else None
            out.append({"answers": answers, "correct": correct, "scores": sc})
    return out


def resolve_verifier(spec: str, task) -> Callable | None:
    """inference.verifier: '' -> None (the actor's log-probability), 'oracle' -> the task's scorer,
    'module:function' -> that function(generation, example) -> float."""
    if not spec:
        return None
    if spec == "oracle":
        return lambda g, ex: float(task.score(task.extract_for(g, ex), ex)["correct"])
    from metatuner.errors import MetatunerError

    if ":" not in spec:
        raise MetatunerError(f"inference.verifier: expected '', 'oracle' or 'module:function', got {spec!r}")
    import importlib

    mod, fn = spec.split(":", 1)
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise MetatunerError(f"inference.verifier: cannot import {spec!r} ({e})") from None
