"""How much could a per-query choice among the prompt pool gain, and how much of it does MetaTuner's decoder get?

    .venv/bin/python scripts/pool_oracle.py runs/pool/sft_sapo/seed_0
    .venv/bin/python scripts/pool_oracle.py runs/pool/metatuner_j_pool/seed_0

For a finished SFT-with-SAPO run (its sapo.json candidates are the pool; any run with a candidate list
works, e.g. `--pool runs/pool/metatuner_j_pool/seed_0/pool.json`), answers every validation and test query
greedily with every pool candidate (the run's model, adapter merged; a run that trained no weights, e.g. a
zero-shot `metatuner eval`, answers with its base model; the run's task and splits) and reports per
candidate its accuracy, the best single candidate on validation and its test accuracy, and the per-query
oracle (a query counts as right if any candidate answers it right): the most a
per-query prompt choice (MetaTuner's pool decoder) could add over one prompt for everyone, for this
model (an SFT-SAPO model was trained with one of the candidates, which favours that one). Also: the share
of test queries where the validation-best candidate is wrong and another is right, and how often all
candidates agree on correctness. Writes pool_oracle.json (with the correctness matrices) in the run folder;
run again, it reuses them; an interrupted run resumes from pool_oracle.partial.json (one column per
split and candidate, and a MetaTuner run's decoder picks).

For a finished MetaTuner run with a pool (final/generator.safetensors and final/pool.json), the model is
the run's own system: the warmed-up actor with the LoRA its parameter decoder generates per query (that
LoRA depends on (p~, x) only, so forcing a candidate changes the prompt alone), and the report adds the
prompt decoder's own per-query choice: its accuracy (on test it must equal the run's), how often it picks
a right candidate where one exists, and its picks per candidate.

--versus RUN: the decoder's choice against another run on the same test queries (e.g. SFT), paired: the
difference with its bootstrap interval and the exact McNemar p (metatuner.stats), for runs whose own test
evaluation did not finish.

--learned N (MetaTuner runs): the same question with a supervised chooser. Every candidate also answers
the first N training queries; a linear softmax over the pool, read from the h_i the run's own meta
encoder gives each query (what its decoders read), is fitted on those queries' full outcomes (the listwise
loss: -log of the probability on the candidates that answered right; queries whose candidates all agree
carry no choice and are left out), its L2 weight chosen on validation; its argmax is scored on test and
compared, paired, with the candidate best on validation. A chooser trained directly on every candidate's
outcome, with more queries than the decoder's D2 ever held: if it gains nothing on test, the headroom is
not learnable from h_i.

--resample K (with --temperature T, default 0.7): is the pool's per-query spread more than decoding luck?
The candidate best on validation answers every test query K times, sampled at T, with the same model;
reports pass@K (some sample right) beside the pool's per-query oracle, and how many of the queries where the
best candidate is wrong and another candidate right are also answered right by one of its own samples. If
sampling one prompt reaches as far as switching prompts, the pool's headroom is of the same kind as
sampling noise, which nothing read from the query predicts.

--groups operators: is the per-query headroom learnable from the query at all? Groups the queries by the
binary operators they contain (' + ', ' - ', ' * ', ' / '; e.g. basic_arithmetic's + - * questions), takes
per group the candidate best on validation (ties: the candidate best on all of validation) and scores that
choice on test: a chooser that reads one obvious feature of the query, fitted on validation only (and, as
its ceiling, the same choice fitted on test itself).

--grouped-demos K: a pool built so that a per-query choice has something systematic to find, in place of the
run's own: p~, p~ with K training demonstrations (what prompts.demos adds), and, for every operator group of
the training queries (as --groups operators reads them; '+', '-', '*' on basic_arithmetic with two terms), p~
with K demonstrations of that group. With --groups operators: does showing the query's own operator help,
per group, more than one prompt for everyone? E.g. with the base model (a zero-shot `metatuner eval` run):

    .venv/bin/python scripts/pool_oracle.py runs/ops_base/seed_0 --grouped-demos 3 --groups operators
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def oracle_report(correct: dict[str, list[list[bool]]], pool: list[str]) -> dict:
    """correct[split][query][candidate] -> the report's numbers (pure; no model)."""
    def acc(rows, j):
        return sum(r[j] for r in rows) / max(1, len(rows))

    val, test = correct["validation"], correct["test"]
    best = max(range(len(pool)), key=lambda j: (acc(val, j), -j))
    return {
        "pool": pool,
        "validation_accuracy": [acc(val, j) for j in range(len(pool))],
        "test_accuracy": [acc(test, j) for j in range(len(pool))],
        "best_on_validation": best,
        "best_on_validation_test_accuracy": acc(test, best),
        "oracle_validation_accuracy": sum(any(r) for r in val) / max(1, len(val)),
        "oracle_test_accuracy": sum(any(r) for r in test) / max(1, len(test)),
        "test_best_wrong_other_right": sum(not r[best] and any(r) for r in test) / max(1, len(test)),
        "test_all_agree": sum(all(r) or not any(r) for r in test) / max(1, len(test)),
        "queries": {"validation": len(val), "test": len(test)},
    }


def resample_report(test_correct: list[list[bool]], best: int, samples_correct: list[list[bool]],
                    temperature: float) -> dict:
    """The pool's per-query spread (test_correct[query][candidate]) beside K samples of candidate `best`
    (samples_correct[query][k]), pure."""
    n = max(1, len(samples_correct))
    headroom = [q for q, r in enumerate(test_correct) if not r[best] and any(r)]
    return {
        "candidate": best, "samples": len(samples_correct[0]) if samples_correct else 0, "temperature": temperature,
        "top_p": 1.0,
        "single_sample_accuracy": sum(sum(s) / max(1, len(s)) for s in samples_correct) / n,
        "pass_at_k": sum(any(s) for s in samples_correct) / n,
        "pool_oracle": sum(any(r) for r in test_correct) / n,
        "pool_headroom_queries": len(headroom),
        "pool_headroom_sampled_right": sum(any(samples_correct[q]) for q in headroom),
        "sampling_headroom_queries": sum(not r[best] and any(s) for r, s in zip(test_correct, samples_correct)),
        "samples_correct": samples_correct,
    }


def chooser_report(correct: dict[str, list[list[bool]]], picks: dict[str, list[int]]) -> dict:
    """The decoder's per-query picks (pool indices) against the same correctness matrices (pure)."""
    out = {}
    for split in ("validation", "test"):
        rows, ch = correct[split], picks[split]
        solvable = [i for i, r in enumerate(rows) if any(r)]
        out[split] = {
            "accuracy": sum(r[c] for r, c in zip(rows, ch)) / max(1, len(rows)),
            "right_when_possible": sum(rows[i][ch[i]] for i in solvable) / max(1, len(solvable)),
            "picks": [ch.count(j) for j in range(len(rows[0]) if rows else 0)],
        }
    return out


def operators(query: str) -> str:
    """The binary operators of an arithmetic question, in order (' + ', ' - ', ' * ', ' / ' with spaces)."""
    import re

    return "".join(re.findall(r"\s([+\-*/])\s", query)) or "none"


def grouped_demos_pool(task, k: int) -> list[str]:
    """p~; p~ with the first k training examples as demonstrations (prompts.demos' candidate); then, per
    operator group of the training queries with at least k of them (in sorted order), p~ with that group's
    first k: candidates that differ systematically by query. Deduplicated."""
    import dataclasses

    from metatuner.pool import demo_prompt

    groups: dict[str, list] = {}
    for ex in task.train:
        groups.setdefault(operators(ex.query), []).append(ex)
    pool = [task.prompt, demo_prompt(task, k)]
    pool += [demo_prompt(dataclasses.replace(task, train=groups[g]), k) for g in sorted(groups) if len(groups[g]) >= k]
    return list(dict.fromkeys(pool))


def group_chooser(correct: dict[str, list[list[bool]]], keys: dict[str, list[str]]) -> dict:
    """Per group (keys[split][i]), the candidate best on the group's validation queries (ties and groups
    validation lacks: the candidate best on all of validation), scored on test (pure)."""
    val = correct["validation"]
    C = len(val[0]) if val else 0
    overall = max(range(C), key=lambda j: (sum(r[j] for r in val), -j))
    groups = sorted(set(keys["validation"]) | set(keys["test"]))
    choice = {}
    for g in groups:
        rows = [r for r, k in zip(val, keys["validation"]) if k == g]
        choice[g] = max(range(C), key=lambda j: (sum(r[j] for r in rows), j == overall, -j)) if rows else overall
    out = {"choice": choice}
    test_rows = lambda g: [r for r, k in zip(correct["test"], keys["test"]) if k == g]  # noqa: E731
    # the same per-group choice fitted on test itself: the most any chooser reading only the groups could get
    out["test_fitted_accuracy"] = sum(max(sum(r[j] for r in test_rows(g)) for j in range(C)) for g in groups) / max(
        1, len(correct["test"]))
    for split in ("validation", "test"):
        rows, ks = correct[split], keys[split]
        out[split] = {"accuracy": sum(r[choice[k]] for r, k in zip(rows, ks)) / max(1, len(rows)),
                      "queries": {g: ks.count(g) for g in groups}}
    # every candidate's accuracy on each group's test queries (which candidate helps which kind of query)
    out["test_by_group"] = {g: [sum(r[j] for r in test_rows(g)) / len(test_rows(g)) for j in range(C)]
                            for g in groups if test_rows(g)}
    return out


def learned_chooser(feats: dict, correct: dict[str, list[list[bool]]], l2_grid=(1e-3, 1e-2, 1e-1, 1.0, 10.0),
                    steps: int = 200, seed: int = 0) -> dict:
    """A linear softmax chooser over the pool (pure; feats[split]: [n, d] float tensor, correct[split]: the
    outcome matrix), fitted on the train queries whose candidates disagree with -log of the probability on
    the right candidates + l2 x mean squared weight (features standardised on train; full-batch LBFGS), the
    L2 weight picked by validation accuracy of the argmax (ties: the larger). Returns per split its accuracy
    and picks, the L2 chosen, and the paired comparison on test with the candidate best on validation."""
    import torch

    from metatuner.stats import paired_comparison

    tr = torch.tensor(correct["train"], dtype=torch.bool)
    keep = tr.any(1) & ~tr.all(1)
    x = feats["train"].float()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    norm = {k: (v.float() - mu) / sd for k, v in feats.items()}
    C = tr.shape[1]

    def fit(l2: float) -> torch.nn.Linear:
        torch.manual_seed(seed)
        lin = torch.nn.Linear(x.shape[1], C)
        torch.nn.init.zeros_(lin.weight)
        torch.nn.init.zeros_(lin.bias)
        opt = torch.optim.LBFGS(lin.parameters(), max_iter=steps, line_search_fn="strong_wolfe")
        xs, right = norm["train"][keep], tr[keep]

        def closure():
            opt.zero_grad()
            logp = torch.log_softmax(lin(xs), -1)
            loss = -torch.logsumexp(logp.masked_fill(~right, float("-inf")), -1).mean() + l2 * lin.weight.pow(2).mean()
            loss.backward()
            return loss

        if int(keep.sum()):
            opt.step(closure)
        return lin

    def accuracy(lin, split):
        with torch.no_grad():
            pick = lin(norm[split]).argmax(-1).tolist()
        rows = correct[split]
        return sum(r[j] for r, j in zip(rows, pick)) / max(1, len(rows)), pick

    fits = [(l2, fit(l2)) for l2 in l2_grid]
    scored = [(accuracy(lin, "validation")[0], l2, lin) for l2, lin in fits]
    val_acc, l2, lin = max(scored, key=lambda t: (t[0], t[1]))
    val = correct["validation"]
    best = max(range(C), key=lambda j: (sum(r[j] for r in val), -j))
    out = {"l2": l2, "train_queries": len(correct["train"]), "train_decisive": int(keep.sum()),
           "validation_by_l2": {str(g): a for a, g, _ in scored}, "best_on_validation": best}
    for split in ("train", "validation", "test"):
        acc, pick = accuracy(lin, split)
        out[split] = {"accuracy": acc, "picks": [pick.count(j) for j in range(C)]}
    _, pick = accuracy(lin, "test")
    test = correct["test"]
    out["test_best_single_accuracy"] = sum(r[best] for r in test) / max(1, len(test))
    out["versus_best_single"] = paired_comparison({0: {i: int(r[j]) for i, (r, j) in enumerate(zip(test, pick))}},
                                                  {0: {i: int(r[best]) for i, r in enumerate(test)}})
    return out


def query_states(system, examples, batch_size: int):
    """h_i of each query (the run's meta encoder over (p~, x), pooled as its parameter decoder pools): [n, d]."""
    import torch

    from metatuner.hypernet import pool as pool_states

    out = []
    with torch.no_grad():
        for s in range(0, len(examples), batch_size):
            enc = system.gen_encode(examples[s : s + batch_size])
            h = system.gen.encode(enc["input_ids"], enc["attention_mask"])
            out.append(pool_states(h, enc["attention_mask"], system.cfg.hypernet.pooling).float().cpu())
    return torch.cat(out)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--pool", default="", help="a pool.json ({'pool': [...]}) instead of the run's sapo.json candidates")
    ap.add_argument("--groups", choices=["operators"], default=None,
                    help="also score a per-group choice fitted on validation (groups: the query's binary operators)")
    ap.add_argument("--grouped-demos", type=int, default=0, metavar="K",
                    help="instead of the run's pool: p~, p~ with K training demonstrations, and p~ with K "
                         "demonstrations of each operator group (see above)")
    ap.add_argument("--learned", type=int, default=0, metavar="N",
                    help="MetaTuner runs: also answer the first N training queries with every candidate and score a "
                         "linear chooser over the pool fitted on them (see above)")
    ap.add_argument("--resample", type=int, default=0, metavar="K",
                    help="also answer every test query K times, sampled, with the candidate best on validation, "
                         "and set pass@K beside the pool's per-query oracle")
    ap.add_argument("--temperature", type=float, default=0.7, help="--resample's sampling temperature")
    ap.add_argument("--versus", default="",
                    help="MetaTuner runs: another run folder on the same test queries (its predictions.jsonl); the "
                         "decoder's choice against it, paired: difference, 95%% bootstrap interval, exact McNemar p")
    args = ap.parse_args(argv)
    if args.grouped_demos < 0:
        raise SystemExit(f"error: --grouped-demos needs K >= 1 (got {args.grouped_demos})")
    if args.resample < 0 or (args.resample and args.temperature <= 0):
        raise SystemExit(f"error: --resample needs K >= 1 (got {args.resample}) and --temperature > 0 "
                         f"(got {args.temperature:g})")

    import torch

    from metatuner.config import load_saved_config
    from metatuner.errors import MetatunerError
    from metatuner.evaluate import evaluate
    from metatuner.io import write_json
    from metatuner.run import eval_examples, set_seed
    from metatuner.tasks import load_task

    d = Path(args.run_dir)
    metatuner = (d / "final" / "generator.safetensors").is_file()
    if args.grouped_demos and (args.pool or metatuner):
        raise SystemExit("error: --grouped-demos builds the pool itself: not with --pool, nor on a MetaTuner run "
                         "(its decoder chooses among its own pool)")
    src = Path(args.pool) if args.pool else d / ("final/pool.json" if metatuner else "sapo.json")
    for p in (d / "config.yaml",) + (() if args.grouped_demos else (src,)):
        if not p.exists():
            raise SystemExit(f"error: {p}: not found (expected a finished run with a candidate pool (or --pool), "
                             "or a MetaTuner run with final/pool.json)")
    if args.grouped_demos:
        cfg = load_saved_config(d / "config.yaml")
        pool = grouped_demos_pool(load_task(cfg.task, cfg.seed), args.grouped_demos)
    else:
        data = json.loads(src.read_text())
        pool = data.get("pool") or data.get("candidates")
        if not pool or not all(isinstance(p, str) for p in pool):
            raise SystemExit(f"error: {src}: expected 'pool' or 'candidates', a list of prompt strings")
    if args.learned and not metatuner:
        raise SystemExit("error: --learned needs a MetaTuner run with a pool (the chooser reads its meta encoder)")
    cached = d / "pool_oracle.json"
    old = json.loads(cached.read_text()) if cached.is_file() else {}
    if old.get("pool") != pool:
        old = {}
    loaded = None  # (model, tokenizer, system, context) once a model is loaded
    if old and len(old["correct"].get("train", [])) >= args.learned:
        rep = old
    else:
        cfg = load_saved_config(d / "config.yaml")
        set_seed(cfg.seed)
        task = load_task(cfg.task, cfg.seed)
        splits = {"validation": task.split("validation"), "test": eval_examples(cfg, task)}  # the run's own test queries
        if args.learned:
            splits["train"] = task.split("train")[: args.learned]
        picks = None
        # one column (split, candidate) at a time, kept in pool_oracle.partial.json with the decoder's picks:
        # an interrupted run resumes (scoring the pool for every query is itself long on a CPU)
        partial_path = d / "pool_oracle.partial.json"
        partial = json.loads(partial_path.read_text()) if partial_path.is_file() else {}
        if partial.get("pool") != pool:
            partial = {"pool": pool, "columns": {}}
        for split, rows in old.get("correct", {}).items():  # a finished report's columns are kept (adding --learned)
            for j in range(len(pool)):
                partial["columns"].setdefault(f"{split}/{j}", [bool(r[j]) for r in rows])
        if "picks" in old:
            partial.setdefault("picks", old["picks"])
        try:
            loaded = model, tok, system, context = run_model(d, cfg, metatuner)
            if metatuner:
                from metatuner.methods.metatuner.rollouts import test_prompts

                if "picks" not in partial:
                    with torch.no_grad():
                        chosen = {k: test_prompts(system, exs) for k, exs in splits.items() if k != "train"}
                    if any(p not in pool for ps in chosen.values() for p in ps):
                        raise SystemExit(f"error: {d}: the decoder chose prompts outside {src} (prompt_space=mixed?)")
                    partial["picks"] = {k: [pool.index(p) for p in ps] for k, ps in chosen.items()}
                    write_json(partial_path, partial)
                picks = partial["picks"]
        except MetatunerError as e:
            raise SystemExit(f"error: {e}") from None
        correct = {}
        for split, exs in splits.items():
            for j, prompt in enumerate(pool):
                key = f"{split}/{j}"
                if len(partial["columns"].get(key, [])) != len(exs):  # absent, or kept from another --learned N
                    with torch.no_grad():
                        recs, _ = evaluate(model, tok, task, exs, prompt, batch_size=cfg.eval.batch_size,
                                           batch_context=context(exs), progress=False, diagnose=False)
                    partial["columns"][key] = [bool(r["correct"]) for r in recs]
                    write_json(partial_path, partial)
                    print(f"{key}: {100 * sum(partial['columns'][key]) / max(1, len(exs)):.1f}%", flush=True)
            correct[split] = [list(row) for row in zip(*(partial["columns"][f"{split}/{j}"] for j in range(len(pool))))]
        rep = {**oracle_report(correct, pool), "correct": correct, "run": str(d)}
        if args.learned:
            feats = {k: query_states(system, exs, cfg.eval.batch_size) for k, exs in splits.items()}
            rep["learned_chooser"] = learned_chooser(feats, correct)
        if picks is not None:
            rep["chooser"] = chooser_report(correct, picks)
            rep["picks"] = picks
            metrics = d / "metrics.json"
            if metrics.is_file():
                rep["run_test_accuracy"] = json.loads(metrics.read_text()).get("accuracy")
        write_json(cached, rep)
        partial_path.unlink()
    rs = rep.get("resample")
    if args.resample and not (rs and rs["samples"] == args.resample and rs["temperature"] == args.temperature
                              and rs["candidate"] == rep["best_on_validation"]):
        cfg = load_saved_config(d / "config.yaml")
        task = load_task(cfg.task, cfg.seed)
        tests = eval_examples(cfg, task)
        if len(tests) != len(rep["correct"]["test"]):
            raise SystemExit(f"error: {cached}: its correctness matrices do not match the run's test split (delete it to recompute)")
        try:
            model, tok, _, context = loaded or run_model(d, cfg, metatuner)  # the model the matrices used, if loaded
        except MetatunerError as e:
            raise SystemExit(f"error: {e}") from None
        set_seed(cfg.seed)
        best = rep["best_on_validation"]
        with torch.no_grad():
            recs, _ = evaluate(model, tok, task, tests, pool[best], batch_size=cfg.eval.batch_size, strategy="majority",
                               n=args.resample, temperature=args.temperature, batch_context=context(tests),
                               progress=False, diagnose=False)
        samples = [[bool(task.score(task.extract_for(g, ex), ex)["correct"]) for g in r["generations"]]
                   for r, ex in zip(recs, tests)]
        rep["resample"] = resample_report(rep["correct"]["test"], best, samples, args.temperature)
        write_json(cached, rep)
    print("| candidate | validation % | test % |\n|---|---|---|")
    for j, p in enumerate(pool):
        mark = " (best on validation)" if j == rep["best_on_validation"] else ""
        print(f"| #{j} {p[:50]!r}{mark} | {100 * rep['validation_accuracy'][j]:.1f} | {100 * rep['test_accuracy'][j]:.1f} |")
    print(f"\nbest single on validation: test {100 * rep['best_on_validation_test_accuracy']:.1f}%; per-query oracle: "
          f"test {100 * rep['oracle_test_accuracy']:.1f}% (validation {100 * rep['oracle_validation_accuracy']:.1f}%); "
          f"test queries where the best is wrong and another right: {100 * rep['test_best_wrong_other_right']:.1f}%; "
          f"all candidates agree: {100 * rep['test_all_agree']:.1f}%")
    if args.groups:
        cfg = load_saved_config(d / "config.yaml")
        task = load_task(cfg.task, cfg.seed)
        splits = {"validation": task.split("validation"), "test": eval_examples(cfg, task)}
        keys = {k: [operators(ex.query) for ex in exs] for k, exs in splits.items()}
        if any(len(keys[k]) != len(rep["correct"][k]) for k in keys):
            raise SystemExit(f"error: {cached}: its correctness matrices do not match the run's splits (delete it to recompute)")
        g = group_chooser(rep["correct"], keys)
        rep["group_chooser"] = g
        write_json(cached, rep)
        print(f"\nper-operator choice fitted on validation: " + ", ".join(
            f"{k} -> #{j} ({g['test']['queries'][k]} test)" for k, j in g["choice"].items())
            + f"; validation {100 * g['validation']['accuracy']:.1f}%, test {100 * g['test']['accuracy']:.1f}% "
            f"(fitted on test itself, the most a per-operator choice could get: {100 * g['test_fitted_accuracy']:.1f}%)")
        print("\n| test queries with | n | " + " | ".join(f"#{j} %" for j in range(len(pool))) + " |\n|---|---|"
              + "---|" * len(pool))
        for k, accs in g["test_by_group"].items():
            print(f"| {k} | {g['test']['queries'][k]} | " + " | ".join(f"{100 * a:.1f}" for a in accs) + " |")
    if "chooser" in rep:
        for split in ("validation", "test"):
            c = rep["chooser"][split]
            print(f"the prompt decoder's choice on {split}: {100 * c['accuracy']:.1f}%; right where a candidate is: "
                  f"{100 * c['right_when_possible']:.1f}%; picks per candidate {c['picks']}")
        if rep.get("run_test_accuracy") is not None:
            print(f"(the run's own test accuracy: {100 * rep['run_test_accuracy']:.1f}%)")
    if rep.get("learned_chooser"):
        lc = rep["learned_chooser"]
        v = lc["versus_best_single"]
        print(f"linear chooser on h_i, fitted on {lc['train_queries']} training queries ({lc['train_decisive']} whose "
              f"candidates disagree), L2 {lc['l2']:g} chosen on validation: train {100 * lc['train']['accuracy']:.1f}%, "
              f"validation {100 * lc['validation']['accuracy']:.1f}%, test {100 * lc['test']['accuracy']:.1f}% "
              f"(picks {lc['test']['picks']}) vs the best single candidate {100 * lc['test_best_single_accuracy']:.1f}%: "
              f"{100 * v['diff']:+.1f} points ({100 * v['ci95'][0]:+.1f} to {100 * v['ci95'][1]:+.1f}), "
              f"McNemar p={v['p']:.3f}")
    if args.resample:
        r = rep["resample"]
        print(f"candidate #{r['candidate']} sampled {r['samples']} times per test query at T={r['temperature']:g}: "
              f"one sample {100 * r['single_sample_accuracy']:.1f}%, pass@{r['samples']} {100 * r['pass_at_k']:.1f}% vs "
              f"the pool's per-query oracle {100 * r['pool_oracle']:.1f}%; of the {r['pool_headroom_queries']} test queries "
              f"where it is wrong greedily and another candidate right, its own samples get {r['pool_headroom_sampled_right']} "
              f"right (sampling reaches {r['sampling_headroom_queries']} queries it gets wrong greedily)")
    if args.versus:
        if "chooser" not in rep:
            raise SystemExit("error: --versus needs a MetaTuner run with a pool (the decoder's choice is compared)")
        rep["versus"] = versus(d, rep, Path(args.versus))
        v = rep["versus"]
        print(f"the decoder's choice vs {args.versus}: {100 * v['accuracy']:.1f} vs {100 * v['other_accuracy']:.1f}%, "
              f"{100 * v['diff']:+.1f} points ({100 * v['ci95'][0]:+.1f} to {100 * v['ci95'][1]:+.1f}), "
              f"McNemar p={v['p']:.3f} ({v['only_a']} right only here, {v['only_b']} only there; {v['n_examples']} queries)")
    return rep


# methods that train no actor weights: their runs have no adapter/ and answer with the base model
BASE_MODEL_METHODS = ("zero_shot", "opro", "bpo", "inference_select")


def run_model(d: Path, cfg, metatuner: bool):
    """(model, tokenizer, system or None, context): a MetaTuner run's own system (the actor with the per-query
    LoRA its parameter decoder generates: context(examples) gives evaluate's batch_context), else the run's
    model with its adapter merged, or the base model for a run of a method in BASE_MODEL_METHODS without
    adapter/ (context gives None)."""
    if metatuner:
        from metatuner.methods.metatuner.inference import load_system

        system = load_system(d)
        return system.actor, system.tok, system, (lambda exs: lambda idx: system.with_factors([exs[i] for i in idx]))
    from metatuner.models import load_from_config

    if (d / "adapter").is_dir():
        cfg.model.adapter = str(d / "adapter")
    elif cfg.method not in BASE_MODEL_METHODS:  # a lost adapter must not silently score the base model
        raise SystemExit(f"error: {d / 'adapter'}: not found (a {cfg.method} run answers with its adapter; only "
                         f"{', '.join(BASE_MODEL_METHODS)} runs answer with the base model)")
    model, tok = load_from_config(cfg.model)
    return model, tok, None, (lambda exs: None)


def versus(d: Path, rep: dict, other_dir: Path) -> dict:
    """The decoder's per-query choice (scored on the oracle's matrix) against another run's test answers,
    matched by query text: metatuner.stats.paired_comparison."""
    from metatuner.config import load_saved_config
    from metatuner.run import eval_examples
    from metatuner.stats import paired_comparison
    from metatuner.tasks import load_task

    path = other_dir / "predictions.jsonl" if other_dir.is_dir() else other_dir
    if not path.is_file():
        raise SystemExit(f"error: --versus {other_dir}: no predictions.jsonl")
    other = {r["query"]: int(bool(r["correct"])) for r in map(json.loads, path.read_text().splitlines()) if r}
    cfg = load_saved_config(d / "config.yaml")
    tests = eval_examples(cfg, load_task(cfg.task, cfg.seed))
    if len(tests) != len(rep["correct"]["test"]):
        raise SystemExit(f"error: {d}/pool_oracle.json does not match the run's test split (delete it to recompute)")
    mine = {ex.query: int(row[j]) for ex, row, j in zip(tests, rep["correct"]["test"], rep["picks"]["test"])}
    both = [q for q in mine if q in other]
    if len(both) < len(mine):
        raise SystemExit(f"error: --versus {other_dir}: {len(mine) - len(both)} of {len(mine)} test queries are not in it")
    a, b = {0: {i: mine[q] for i, q in enumerate(both)}}, {0: {i: other[q] for i, q in enumerate(both)}}
    return {"run": str(other_dir), "accuracy": sum(mine.values()) / len(both),
            "other_accuracy": sum(other[q] for q in both) / len(both), **paired_comparison(a, b)}


if __name__ == "__main__":
    main()
