"""Choose the prompt together with the inference strategy, so that the choice is never below greedy decoding.

    metatuner train method=inference_select select.n_values=[1,2,4,8] select.temperatures=[0.3,0.7]
    metatuner train method=inference_select model.adapter=runs/x/sft/seed_0/adapter   # a trained model

1. Candidate prompts: p~, the best OPRO instructions (select.opro_prompts), generator paraphrases
   (select.rewrites) and the user's (select.prompts).
2. Arms (metatuner.arms): greedy decoding with every prompt, and per (prompt, temperature) majority
   and best-of-N at every N of select.n_values and early-stopping majority capped at the largest N.
   On validation, greedy answers once per prompt and samples once per (prompt, temperature) at the
   largest N; every arm's per-query expected correctness follows from them. select.rule=lcb picks
   the eligible arm with the best lower confidence bound (paired bootstrap against greedy with p~)
   minus select.cost_weight x mean samples; select.rule=halving runs successive halving within
   select.explore_budget. Eligible = validation accuracy >= greedy's with the same prompt and with p~.
3. Test: metrics.json/predictions.jsonl for the chosen arm (final_eval); greedy with the chosen
   prompt and with p~ on the same test examples (paired McNemar test); fixed majority and
   early-stopping majority at the largest N and the budget comparison (metatuner.budget: probe vs
   uniform vs early stopping, decided on validation) from one set of test samples at the chosen
   temperature, topped up from the chosen arm's own samples. select.early_test=cheapest|all adds the
   early-stopping comparison at other (prompt, temperature) groups (early_stop_groups.json; the extra
   groups are chosen on validation only); scripts/early_stop_test.py adds it to a finished run.
4. select.json holds every arm with its interval, the choice, the paired test against greedy, early
   stopping against fixed majority, and the budget comparison; select_curves.png plots accuracy vs N;
   samples.jsonl holds every sample the comparisons replay (validation per (prompt, temperature), and
   the test samples of early stopping and the budgets), so a stopping rule can be replayed offline.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from metatuner.arms import Arm, arm_specs, choose_lcb, describe, fill, successive_halving, table
from metatuner.budget import compare_budgets, early_stop_run
from metatuner.config import Config
from metatuner.errors import MetatunerError
from metatuner.evaluate import evaluate
from metatuner.generation import chat_text
from metatuner.inference import accuracy_with_allocation, draw_samples, query_features, resolve_verifier
from metatuner.io import atomic_path, write_json, write_jsonl
from metatuner.vllm_backend import actor_engine
from metatuner.voting import fit_stop_rule

TOP_UP_KEYS = 1_000_000  # vLLM seed keys of test top-up samples: apart from the evaluation's (the example index)


def candidate_prompts(cfg: Config, actor, tok, task, engine=None) -> list[str]:
    from metatuner.prompts import optimizer_llm
    from metatuner.sapo import paraphrases

    cands = [task.prompt] + list(cfg.select.prompts)
    gen, gtok = optimizer_llm(cfg, actor, tok)
    if cfg.select.opro_prompts > 0:
        from metatuner.metaprompt import optimize

        _, _, rows, _ = optimize(cfg, actor, tok, gen, gtok, task, engine=engine)
        ranked = sorted(rows[1:], key=lambda r: -r["train_accuracy"])
        cands += [r["instruction"] for r in ranked[: cfg.select.opro_prompts]]
    if cfg.select.rewrites > 0:
        cands += paraphrases(gen, gtok, task.prompt, cfg.select.rewrites, cfg.sapo.temperature, cfg.sapo.max_new_tokens)
    return list(dict.fromkeys(c for c in cands if c.strip()))


def plot_curves(arms: list[Arm], path: Path) -> None:
    """Validation accuracy vs N of majority vote per (prompt, temperature); greedy per prompt as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for a in arms:
        if a.strategy == "greedy" and a.correct:
            ax.axhline(100 * a.accuracy, ls="--", lw=0.8, color=f"C{a.prompt % 10}", label=f"P{a.prompt} greedy")
    curves: dict[tuple, list[Arm]] = {}
    for a in arms:
        if a.strategy == "majority" and a.correct:
            curves.setdefault((a.prompt, a.temperature), []).append(a)
    for (p, t), pts in curves.items():
        pts.sort(key=lambda a: a.n)
        ax.plot([a.n for a in pts], [100 * a.accuracy for a in pts], marker="o", color=f"C{p % 10}",
                alpha=0.5 + 0.5 * (t == max(k[1] for k in curves)), label=f"P{p} majority T={t:g}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (samples per query)")
    ax.set_ylabel("validation accuracy (%)")
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def sample_temperature(chosen: Arm, arms: list[Arm], data: dict, default: float) -> float:
    """The temperature of the test samples: the chosen arm's, else (greedy chosen) the one whose majority
    at the largest N is best with the chosen prompt on validation."""
    if chosen.temperature is not None:
        return chosen.temperature
    cands = [a for a in arms if a.prompt == chosen.prompt and a.strategy != "greedy" and data.get(a.group)]
    if not cands:
        return default
    top = max(a.n for a in cands)
    return max(cands, key=lambda a: (a.strategy == "majority" and a.n == top, a.accuracy)).temperature


def top_up(actor, tok, task, examples, prompt, records, cap, temperature, cfg, verifier=None,
           engine=None) -> tuple[list[dict], int]:
    """cap samples per test query at `temperature`: the chosen arm's own samples (records' generations,
    when it sampled at that temperature) first, then new ones, scored as on validation (verifier, else
    mean token log-probability). A query whose reused samples carry no scores gets scores None (the
    caller reuses such records only when no confidence gate needs them). ({answers, correct, scores}
    per query, new samples). With a vLLM `engine` the new samples are seeded apart from the evaluation's
    (keys offset by TOP_UP_KEYS), so they never repeat the reused ones."""
    out = []
    for ex, r in zip(examples, records or [None] * len(examples)):
        gens = (r or {}).get("generations", [])[:cap]
        sc = (r or {}).get("scores")
        answers = [task.extract_for(g, ex) for g in gens]
        out.append({"answers": answers, "correct": [bool(task.score(a, ex)["correct"]) for a in answers],
                    "scores": list(sc or [])[:cap] if sc is not None or not gens else None})
    by_missing: dict[int, list[int]] = {}
    for i, s in enumerate(out):
        if len(s["answers"]) < cap:
            by_missing.setdefault(cap - len(s["answers"]), []).append(i)
    for m, idx in by_missing.items():
        new = draw_samples(actor, tok, task, [examples[i] for i in idx], prompt, m, temperature, cfg.inference.top_p,
                           cfg.eval.batch_size, verifier, engine=engine, keys=[TOP_UP_KEYS + i for i in idx])
        for i, s in zip(idx, new):
            out[i]["answers"] += s["answers"]
            out[i]["correct"] += s["correct"]
            if out[i]["scores"] is not None:
                out[i]["scores"] += s["scores"]
    return out, sum(m * len(idx) for m, idx in by_missing.items())


def stop_rules(cfg: Config, data: dict, nmax: int) -> dict:
    """The early-stopping rule of every sampled (prompt, temperature) group in `data`: fitted on its
    validation samples (select.stop_fit) or inference.stop_threshold / stop_min / stop_score. {group: fit dict}."""
    sc, inf = cfg.select, cfg.inference
    out = {}
    for g, d in data.items():
        if g[0] != "sampled" or not d:
            continue
        if sc.stop_fit:
            out[g] = fit_stop_rule(d, nmax, sc.stop_tolerance / 100, sc.subsets, cfg.seed, confidence=sc.confidence,
                                   gates=None if sc.stop_gate else [])
        else:
            out[g] = {"threshold": inf.stop_threshold, "min_samples": inf.stop_min, "stop_score": inf.stop_score}
    return out


def early_vs_fixed(samples: list[dict], rule: dict, nmax: int) -> dict:
    """Fixed majority at N=nmax against early-stopping majority capped at nmax, replayed on the same test
    samples in the order drawn (rule: threshold, min_samples and stop_score)."""
    ok, spent = early_stop_run(samples, rule["threshold"], rule["min_samples"], nmax, rule.get("stop_score"))
    fixed = accuracy_with_allocation(samples, [nmax] * len(samples), "majority")
    acc, mean = sum(ok) / max(1, len(ok)), sum(spent) / max(1, len(spent))
    return {"cap": nmax, "threshold": rule["threshold"], "min_samples": rule["min_samples"],
            "stop_score": rule.get("stop_score"), "fixed_majority_accuracy": fixed, "fixed_mean_samples": nmax,
            "early_accuracy": acc, "early_mean_samples": mean, "sample_ratio": mean / nmax, "accuracy_gap_points": 100 * (fixed - acc)}


def early_groups(rules: dict, data: dict, which: str, chosen: tuple, nmax: int) -> list[tuple[tuple, list[str], dict]]:
    """The sampled (prompt, temperature) groups whose early stopping is compared on test, with their roles
    and validation numbers: the chosen arm's group always; with select.early_test=cheapest also the group
    whose rule spends the fewest samples on its validation samples (ties: the more accurate there), among
    the groups with the most validation queries (halving drops groups after few); with all, every group
    with a rule. Decided on validation only. [(group, roles, validation)], the chosen group first."""
    val = {}
    for g, r in rules.items():
        if "mean_samples" in r:  # fitted: the expectation over orders the fit minimised
            val[g] = {"accuracy": r["accuracy"], "mean_samples": r["mean_samples"], "queries": r.get("queries"),
                      "fixed_majority_accuracy": r.get("fixed_majority_accuracy"), "loss_bound": r.get("loss_bound")}
        elif data.get(g):  # select.stop_fit=false: the configured rule replayed in the order drawn
            e = early_vs_fixed(data[g], r, nmax)
            val[g] = {"accuracy": e["early_accuracy"], "mean_samples": e["early_mean_samples"], "queries": len(data[g]),
                      "fixed_majority_accuracy": e["fixed_majority_accuracy"]}
    cheapest = None
    if which != "chosen" and val:
        most = max(v["queries"] or 0 for v in val.values())
        cheapest = min((g for g in val if (val[g]["queries"] or 0) == most),
                       key=lambda g: (val[g]["mean_samples"], -val[g]["accuracy"], g[1], g[2]))
    picked = [chosen] + [g for g in rules if g != chosen and (which == "all" or g == cheapest)]
    return [(g, ["chosen"] * (g == chosen) + ["cheapest on validation"] * (g == cheapest), val.get(g, {}))
            for g in picked]


def compare_early_groups(cfg: Config, groups: list, rules: dict, have: dict, draw_test, nmax: int) -> tuple[dict, list[dict]]:
    """Early stopping against fixed majority at nmax on test for every group of `early_groups`: the test
    samples of `have` ({group: samples}) or drawn by draw_test(group) (nmax per query). (early_stop_groups
    report, new sample rows for samples.jsonl)."""
    out, rows = [], []
    for g, roles, val in groups:
        samples = have.get(g)
        if samples is None:
            samples = draw_test(g)
            rows += [{"split": "test", "prompt": g[1], "temperature": g[2], "query": i, **smp}
                     for i, smp in enumerate(samples)]
        out.append({"prompt": g[1], "temperature": g[2], "roles": roles, "validation": val,
                    **early_vs_fixed(samples, rules[g], nmax)})
    return {"which": cfg.select.early_test, "cap": nmax, "tolerance_points": cfg.select.stop_tolerance,
            "groups": out}, rows


def versus(a: list[bool], b: list[bool]) -> dict:
    from metatuner.stats import mcnemar_exact, paired_bootstrap

    diff, lo, hi = paired_bootstrap(a, b)
    return {"diff": diff, "ci95": [lo, hi], "p_value": mcnemar_exact(a, b), "n_examples": len(a)}


def select_arm(cfg: Config, arms: list[Arm], val: list, nmax: int, draw) -> tuple[int, dict, dict, dict]:
    """(chosen index, data per group, report fields, stopping rule per sampled group) by select.rule. With
    halving the arms keep inference.stop_threshold / stop_min (groups are drawn in pieces) and no rule
    is returned: run() fits the ones it needs on the validation samples drawn for them."""
    sc = cfg.select
    rule = (cfg.inference.stop_threshold, cfg.inference.stop_min, cfg.inference.stop_score)
    groups = list(dict.fromkeys(a.group for a in arms))
    cost = lambda g: 1 if g[0] == "greedy" else nmax  # noqa: E731
    per_query = sum(cost(g) for g in groups)
    if sc.rule == "lcb":
        q = len(val) if not sc.explore_budget else min(len(val), sc.explore_budget // per_query)
        if q < 1:
            raise MetatunerError(f"select.explore_budget = {sc.explore_budget}: expected 0 (auto) or at least "
                                 f"{per_query} (one validation query for every arm) with select.rule=lcb")
        data = {g: draw(g, 0, q) for g in groups}
        rules = stop_rules(cfg, data, nmax)
        for a in arms:
            r = rules.get(a.group)
            fill(a, data[a.group], (r["threshold"], r["min_samples"], r["stop_score"]) if r else rule, sc.subsets,
                 cfg.seed)
        chosen = choose_lcb(arms, sc.confidence, sc.cost_weight, cfg.seed)
        return chosen, data, {"validation_queries": q, "validation_samples": per_query * q,
                              "explore_budget": sc.explore_budget}, rules
    budget = sc.explore_budget or per_query * len(val) // 2
    res = successive_halving(arms, len(val), budget, draw, cost, rule, sc.subsets, cfg.seed)
    describe(arms, sc.confidence, sc.cost_weight, cfg.seed)
    return res["chosen"], res["data"], {"validation_queries": len(val), "validation_samples": res["spent"],
                                        "explore_budget": budget, "halving_rounds": res["rounds"],
                                        "halving_winner": arms[res["winner"]].label}, {}


def run(cfg: Config) -> dict:
    from metatuner.models import load_from_config
    from metatuner.run import eval_examples, final_eval, is_main_process, stage, start_run

    t0 = time.time()
    sc, inf = cfg.select, cfg.inference
    configured = {"threshold": inf.stop_threshold, "min_samples": inf.stop_min, "stop_score": inf.stop_score}
    n_values = sorted({int(n) for n in sc.n_values})
    nmax = n_values[-1]
    temps = list(dict.fromkeys(float(t) for t in sc.temperatures))
    task = start_run(cfg)
    actor, tok = load_from_config(cfg.model)
    engine = actor_engine(cfg, actor, tok)  # generation.backend=vllm: one engine for validation and test
    verifier = resolve_verifier(inf.verifier, task)
    val = task.validation[: sc.val_examples]
    if not val:
        raise MetatunerError(f"task {task.name!r}: inference_select needs validation examples (task.val_size > 0)")
    out = Path(cfg.output_dir)
    bs = cfg.eval.batch_size
    with torch.no_grad():
        prompts = candidate_prompts(cfg, actor, tok, task, engine)
    arms = arm_specs(len(prompts), temps, n_values, list(sc.strategies))

    def greedy_correct(prompt: str, examples: list) -> list[bool]:
        recs, _ = evaluate(actor, tok, task, examples, prompt, batch_size=bs, progress=False, diagnose=False,
                           engine=engine)
        return [bool(r["correct"]) for r in recs]

    def draw(group: tuple, start: int, stop: int) -> list:
        if group[0] == "greedy":
            return greedy_correct(prompts[group[1]], val[start:stop])
        return draw_samples(actor, tok, task, val[start:stop], prompts[group[1]], nmax, group[2], inf.top_p, bs,
                            verifier, engine=engine, keys=range(start, stop))

    stage(f"choosing among {len(arms)} arms ({len(prompts)} prompts x greedy/{'/'.join(sc.strategies)} x "
          f"N {n_values} x T {temps}) on {len(val)} validation queries, rule {sc.rule}")
    with torch.no_grad():
        ci, data, sel, rules = select_arm(cfg, arms, val, nmax, draw)
    c = arms[ci]
    prompt = prompts[c.prompt]
    if is_main_process():
        print(table(arms, ci) + "\n" + "\n".join(f"P{i}: {p}" for i, p in enumerate(prompts)), flush=True)
        plot_curves(arms, out / "select_curves.png")
    stage(f"chosen: {c.label} (validation {100 * c.accuracy:.1f}%, greedy with p~ {100 * arms[0].accuracy:.1f}%)")

    # test: the chosen arm through the common harness, then greedy with its prompt and with p~
    test = eval_examples(cfg, task)
    inf.strategy, inf.n = c.strategy, c.n
    if c.temperature is not None:
        inf.temperature = c.temperature
    if c.strategy == "early_majority":
        if c.group not in rules:
            rules.update(stop_rules(cfg, {c.group: data[c.group]}, nmax))
        r = rules[c.group]
        inf.stop_threshold, inf.stop_min, inf.stop_score = r["threshold"], r["min_samples"], r["stop_score"]
    t_s = sample_temperature(c, arms, data, temps[0])
    chosen_fields = {"prompt": prompt, "chosen_arm": c.label, "chosen_strategy": c.strategy, "chosen_n": c.n,
                     "chosen_temperature": c.temperature, "train_steps": 0, "train_examples": 0,
                     "train_seconds": round(time.time() - t0, 1)}
    with torch.no_grad():
        metrics, records = final_eval(cfg, actor, tok, task, prompt, extra=chosen_fields, return_records=True,
                                     engine=engine)
        chosen_ok = [bool(r["correct"]) for r in records]
        same = chosen_ok if c.strategy == "greedy" else greedy_correct(prompt, test)
        ptilde = same if c.prompt == 0 else greedy_correct(prompts[0], test)
        cap = max(nmax, sc.max_per_query)
        g_s = ("sampled", c.prompt, t_s)
        val_s = data.get(g_s) or draw(g_s, 0, len(val))
        if g_s not in rules:
            rules.update(stop_rules(cfg, {g_s: val_s}, nmax))
        # the chosen arm's own samples are reused, unless a confidence gate needs scores they lack
        scored = all(r.get("scores") is not None for r in records)
        own = records if c.temperature == t_s and (scored or rules[g_s].get("stop_score") is None) else None
        test_samples, new_samples = top_up(actor, tok, task, test, prompt, own, cap, t_s, cfg, verifier, engine)

        def feats(exs):
            return query_features(actor, tok, [chat_text(tok, task.render(prompt, ex.query)) for ex in exs], bs)

        budget = compare_budgets(val_s, feats(val[: len(val_s)]), test_samples, feats(test), sc.budget,
                                 sc.max_per_query, cfg.seed)

        if sc.early_test != "chosen":
            rules.update(stop_rules(cfg, {g: d for g, d in data.items() if g not in rules}, nmax))
        groups = early_groups(rules, {**data, g_s: val_s}, sc.early_test, g_s, nmax)
        early_groups_report, extra_rows = compare_early_groups(
            cfg, groups, rules, {g_s: test_samples},
            lambda g: draw_samples(actor, tok, task, test, prompts[g[1]], nmax, g[2], inf.top_p, bs, verifier,
                                   engine=engine), nmax)
        new_samples += nmax * len(test) * sum(1 for g, _, _ in groups if g != g_s)

    early_block = {"prompt": prompt, "temperature": t_s, "rule_fitted_on_validation": sc.stop_fit,
                   **early_vs_fixed(test_samples, rules[g_s], nmax)}
    fixed, early_acc, early_mean = (early_block[k] for k in ("fixed_majority_accuracy", "early_accuracy",
                                                             "early_mean_samples"))
    vs = {"chosen_accuracy": metrics["accuracy"], "greedy_same_prompt_accuracy": sum(same) / len(same),
          "greedy_ptilde_accuracy": sum(ptilde) / len(ptilde), "vs_same_prompt": versus(chosen_ok, same),
          "vs_ptilde": versus(chosen_ok, ptilde)}
    arm_rows = [{"label": a.label, "prompt": a.prompt, "strategy": a.strategy, "n": a.n, "temperature": a.temperature,
                 **a.stats} for a in arms]
    report = {"prompts": prompts, "rule": sc.rule, "confidence": sc.confidence, "cost_weight": sc.cost_weight,
              **sel, "stop_rule": {
                  "fit_on_validation": sc.stop_fit, "tolerance_points": sc.stop_tolerance,
                  "configured": configured,
                  "per_group": [{"prompt": g[1], "temperature": g[2], **r} for g, r in rules.items()]},
              "arms": arm_rows,
              "chosen": {**arm_rows[ci], "prompt_text": prompt}, "vs_greedy": vs, "early_stop_vs_fixed": early_block,
              "budget": budget, "test_sample_temperature": t_s}
    metrics.update({"greedy_same_prompt_accuracy": vs["greedy_same_prompt_accuracy"],
                    "greedy_ptilde_accuracy": vs["greedy_ptilde_accuracy"],
                    "vs_greedy_diff": vs["vs_same_prompt"]["diff"], "vs_greedy_p_value": vs["vs_same_prompt"]["p_value"],
                    "early_stop_accuracy": early_acc, "early_stop_mean_samples": early_mean,
                    "fixed_majority_accuracy": fixed, "budget_used": budget["used"],
                    "budget_accuracy": budget["test_accuracy_of_used"], "budget_samples": budget["test"][budget["used"]]["total_samples"],
                    "validation_samples": sel["validation_samples"],
                    # beyond the chosen arm's own evaluation: validation, test top-ups, greedy baselines
                    "generation_calls": sel["validation_samples"] + new_samples
                    + len(test) * ((c.strategy != "greedy") + (c.prompt != 0))})
    if is_main_process():
        rows = [{"split": "validation", "prompt": g[1], "temperature": g[2], "query": i, **smp}
                for g, d in data.items() if g[0] == "sampled" for i, smp in enumerate(d)]
        if g_s not in data:
            rows += [{"split": "validation", "prompt": c.prompt, "temperature": t_s, "query": i, **smp}
                     for i, smp in enumerate(val_s)]
        rows += [{"split": "test", "prompt": c.prompt, "temperature": t_s, "query": i, **smp}
                 for i, smp in enumerate(test_samples)]
        write_jsonl(out / "samples.jsonl", rows + extra_rows)
        write_json(out / "early_stop_groups.json", early_groups_report)
        write_json(out / "select.json", report)
        write_json(out / "metrics.json", metrics)
    stage(f"test: chosen {100 * vs['chosen_accuracy']:.1f}% vs greedy same prompt "
          f"{100 * vs['greedy_same_prompt_accuracy']:.1f}% (McNemar p={vs['vs_same_prompt']['p_value']:.3g}); "
          f"early stop {100 * early_acc:.1f}% at {early_mean:.2f} samples vs majority@{nmax} {100 * fixed:.1f}%; "
          f"budget: {budget['why']}")
    for e in early_groups_report["groups"][1:]:
        stage(f"early stop, P{e['prompt']} T={e['temperature']:g} ({', '.join(e['roles']) or 'select.early_test=all'}): "
              f"{100 * e['early_accuracy']:.1f}% at {e['early_mean_samples']:.2f} samples vs majority@{nmax} "
              f"{100 * e['fixed_majority_accuracy']:.1f}%")
    return metrics
