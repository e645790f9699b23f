"""Co-optimize the prompt with the inference strategy: joint (prompt, N) selection and adaptive budget.

    metatuner train method=inference_select inference.strategy=majority select.n_values=[1,2,4,8]

1. Candidate prompts: p~, the best OPRO instructions (select.opro_prompts), generator paraphrases
   (select.rewrites) and the user's (select.prompts).
2. On validation, sample max(N) answers per (prompt, query) once; estimate the accuracy of every
   (prompt, N) by subsampling; pick the pair maximizing accuracy - select.cost_weight * N; plot the
   accuracy-vs-N curve per prompt (select_curves.png) and say whether the best prompt at N=1 is the
   best at the largest N.
3. Adaptive budget: a logistic probe on the actor's hidden state, fit on validation outcomes of the
   chosen prompt, predicts each test query's success probability; select.budget samples per query
   on average are allocated greedily (more to uncertain queries) and compared with the uniform
   allocation at the same total.
4. Test: metrics.json/predictions.jsonl for the chosen (prompt, N) with the chosen strategy;
   select.json holds the curves, the choice and the budget comparison.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from metatuner.config import Config
from metatuner.errors import MetatunerError
from metatuner.evaluate import chat_text
from metatuner.inference import (accuracy_with_allocation, allocate_budget, draw_samples, estimate_accuracy,
                                 fit_probe, query_features, resolve_verifier, select_pair)
from metatuner.io import atomic_path, write_json


def candidate_prompts(cfg: Config, actor, tok, task) -> list[str]:
    from metatuner.prompts import optimizer_llm
    from metatuner.sapo import paraphrases

    cands = [task.prompt] + list(cfg.select.prompts)
    gen, gtok = optimizer_llm(cfg, actor, tok)
    if cfg.select.opro_prompts > 0:
        from metatuner.metaprompt import optimize

        _, _, rows, _ = optimize(cfg, actor, tok, gen, gtok, task)
        ranked = sorted(rows[1:], key=lambda r: -r["train_accuracy"])
        cands += [r["instruction"] for r in ranked[: cfg.select.opro_prompts]]
    if cfg.select.rewrites > 0:
        cands += paraphrases(gen, gtok, task.prompt, cfg.select.rewrites, cfg.sapo.temperature, cfg.sapo.max_new_tokens)
    return list(dict.fromkeys(c for c in cands if c.strip()))


def plot_curves(curves: dict[str, dict[int, float]], path: Path, strategy: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, (p, c) in enumerate(curves.items()):
        ns = sorted(c)
        label = f"P{i}: {p[:50]}{'...' if len(p) > 50 else ''}"
        ax.plot(ns, [100 * c[n] for n in ns], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"N (samples per query, {strategy})")
    ax.set_ylabel("validation accuracy (%)")
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def run(cfg: Config) -> dict:
    from metatuner.models import load_from_config
    from metatuner.run import eval_examples, final_eval, is_main_process, start_run

    t0 = time.time()
    sc = cfg.select
    strategy = cfg.inference.strategy if cfg.inference.strategy != "greedy" else "majority"
    n_values = sorted({int(n) for n in sc.n_values})
    if not n_values or n_values[0] < 1:
        raise MetatunerError(f"select.n_values: expected positive integers, got {sc.n_values}")
    nmax = n_values[-1]
    task = start_run(cfg)
    actor, tok = load_from_config(cfg.model)
    verifier = resolve_verifier(cfg.inference.verifier, task)
    val = task.validation[: sc.val_examples]
    if not val:
        raise MetatunerError(f"task {task.name!r}: inference_select needs validation examples (task.val_size > 0)")
    out = Path(cfg.output_dir)
    with torch.no_grad():
        prompts = candidate_prompts(cfg, actor, tok, task)
        samples = {p: draw_samples(actor, tok, task, val, p, nmax, cfg.inference.temperature, cfg.inference.top_p,
                                   cfg.eval.batch_size, verifier) for p in prompts}
    curves = {p: {n: estimate_accuracy(samples[p], n, strategy, sc.subsets, cfg.seed) for n in n_values} for p in prompts}
    best_p, best_n, best_obj = select_pair(curves, sc.cost_weight)
    best_at_1 = max(prompts, key=lambda p: curves[p][n_values[0]])
    best_at_max = max(prompts, key=lambda p: curves[p][nmax])
    if is_main_process():
        plot_curves(curves, out / "select_curves.png", strategy)

    # adaptive budget with a probe fit on validation outcomes of the chosen prompt
    test = eval_examples(cfg, task)
    with torch.no_grad():
        feats_val = query_features(actor, tok, [chat_text(tok, task.render(best_p, ex.query)) for ex in val], cfg.eval.batch_size)
        # soft labels: each query's success rate over its samples (a 0/1 threshold degenerates when the
        # model rarely succeeds: every query falls on one side and the probe learns nothing)
        labels = torch.tensor([sum(s["correct"]) / len(s["correct"]) for s in samples[best_p]], dtype=torch.float)
        if labels.min() == labels.max():  # nothing to learn: the probe predicts the base rate
            rate = float(labels.mean())
            predict = lambda f: [min(max(rate, 0.05), 0.95)] * f.shape[0]  # noqa: E731
        else:
            predict = fit_probe(feats_val, labels)
        feats_test = query_features(actor, tok, [chat_text(tok, task.render(best_p, ex.query)) for ex in test], cfg.eval.batch_size)
        p_hat = predict(feats_test)
        cap = max(sc.max_per_query, 1)
        test_samples = draw_samples(actor, tok, task, test, best_p, cap, cfg.inference.temperature, cfg.inference.top_p,
                                    cfg.eval.batch_size, verifier)
    total = int(round(sc.budget * len(test)))
    adaptive = allocate_budget(p_hat, total, cap)
    uniform_n = max(1, min(cap, total // max(1, len(test))))
    uniform = [uniform_n] * len(test)
    # spend exactly the same total on the uniform side when the budget is not a multiple of |test|
    extra = min(total, cap * len(test)) - sum(uniform)
    for i in range(max(0, extra)):
        uniform[i % len(test)] += 1
    budget = {"total_samples": sum(adaptive), "uniform_total_samples": sum(uniform),
              "adaptive_accuracy": accuracy_with_allocation(test_samples, adaptive, strategy),
              "uniform_accuracy": accuracy_with_allocation(test_samples, uniform, strategy),
              "probe_mean_p": sum(p_hat) / max(1, len(p_hat)),
              "samples_to_most_uncertain_quartile": _uncertain_share(p_hat, adaptive)}
    report = {"strategy": strategy, "n_values": n_values, "prompts": prompts,
              "curves": {f"P{i}": {"prompt": p, "accuracy": curves[p]} for i, p in enumerate(prompts)},
              "chosen": {"prompt": best_p, "n": best_n, "objective": best_obj, "cost_weight": sc.cost_weight},
              "best_prompt_at_n1": best_at_1, "best_prompt_at_nmax": best_at_max,
              "best_prompt_changes_with_n": best_at_1 != best_at_max, "adaptive_budget": budget}
    if is_main_process():
        write_json(out / "select.json", report)
    cfg.inference.strategy, cfg.inference.n = strategy, best_n
    with torch.no_grad():
        return final_eval(cfg, actor, tok, task, best_p, extra={
            "prompt": best_p, "chosen_n": best_n, "best_prompt_changes_with_n": best_at_1 != best_at_max,
            "adaptive_accuracy": budget["adaptive_accuracy"], "uniform_accuracy": budget["uniform_accuracy"],
            "budget_samples": budget["total_samples"], "train_steps": 0, "train_examples": 0,
            "generation_calls": len(prompts) * len(val) * nmax + len(test) * cap,
            "train_seconds": round(time.time() - t0, 1)})


def _uncertain_share(p_hat: list[float], alloc: list[int]) -> float:
    """Share of all samples given to the quarter of queries whose p is closest to 0.5."""
    if not alloc:
        return 0.0
    order = sorted(range(len(p_hat)), key=lambda i: abs(p_hat[i] - 0.5))
    top = order[: max(1, math.ceil(len(order) / 4))]
    return sum(alloc[i] for i in top) / max(1, sum(alloc))
