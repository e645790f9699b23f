"""Where can sampling beat greedy decoding on this model? Measured on the TRAIN split (method=inference_select
and the test never read it), to pick the tasks and strategies worth a full selection run.

    .venv/bin/python scripts/sampling_headroom.py task.name=products task.params.min_digits=1 \
        task.params.max_digits=2 --examples 100 --n 8 --temperatures 0.3,0.7 \
        --prompt "Compute the result. Reply with the number only, as 'Answer: <number>'."

Takes `task.*` and `model.*` settings as `metatuner train` does (`model.adapter=...` for a trained actor).
Per temperature: greedy decoding, majority@N, best-of-N (mean token log-probability), confidence-weighted
majority@N (metatuner.voting.weighted_vote) and pass@N (any sample right: the ceiling of any selection
rule), each with its paired difference to greedy on the same queries (bootstrap interval, exact McNemar p).
N here is all N samples drawn (one subset), as the full run's largest N. Prints a markdown table; returns
{"greedy": per-query 0/1, "by_temperature": {T: {"samples": ..., "rows": {name: per-query accuracy}}}}.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str]) -> dict:
    import torch

    with torch.no_grad():  # not torch.set_grad_enabled(False): a caller's grad mode stays as it was
        return measure(argv)


def measure(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=100, help="first K train examples")
    ap.add_argument("--n", type=int, default=8, help="samples per query")
    ap.add_argument("--temperatures", default="0.3,0.7")
    ap.add_argument("--prompt", default="", help="instruction (default: the task's p~)")
    ap.add_argument("--batch-size", type=int, default=16)
    args, rest = ap.parse_known_args(argv)
    from metatuner.config import load_config
    from metatuner.evaluate import evaluate
    from metatuner.inference import draw_samples, per_query_accuracy
    from metatuner.models import load_from_config
    from metatuner.run import set_seed
    from metatuner.stats import paired_comparison
    from metatuner.tasks.loading import load_task

    sets = [a for a in rest if a.startswith(("task.", "model.", "seed="))]
    if len(sets) != len(rest):
        raise SystemExit(f"unknown arguments: {[a for a in rest if a not in sets]}")
    cfg = load_config(None, sets + ["method=zero_shot", f"task.train_size={max(args.examples, 1)}"])
    task = load_task(cfg.task, seed=cfg.seed)
    exs = task.train[: args.examples]
    prompt = args.prompt or task.prompt
    model, tok = load_from_config(cfg.model)
    t0 = time.time()
    recs, _ = evaluate(model, tok, task, exs, prompt, batch_size=args.batch_size, progress=False, diagnose=False)
    greedy = [float(r["correct"]) for r in recs]
    print(f"{cfg.task.name}: {len(exs)} train queries, prompt {prompt!r}; greedy {100 * sum(greedy) / len(greedy):.1f}% "
          f"({time.time() - t0:.0f} s)", flush=True)
    out = {"greedy": greedy, "by_temperature": {}}
    print("| T | strategy | accuracy % | vs greedy: pts (95% CI) | McNemar p |")
    print("|---|---|---|---|---|")
    for t in [float(x) for x in args.temperatures.split(",")]:
        set_seed(cfg.seed)
        smp = draw_samples(model, tok, task, exs, prompt, args.n, t, cfg.inference.top_p, args.batch_size)
        rows = {s: per_query_accuracy(smp, args.n, s) for s in ("majority", "best_of_n", "weighted_majority")}
        rows["pass"] = [float(any(s["correct"])) for s in smp]
        rows["single sample"] = [sum(s["correct"]) / len(s["correct"]) for s in smp]
        out["by_temperature"][t] = {"samples": smp, "rows": rows}
        for name, acc in rows.items():
            label = name if name in ("pass", "single sample") else f"{name}@{args.n}"
            c = paired_comparison({0: dict(enumerate(acc))}, {0: dict(enumerate(greedy))})
            # McNemar wants 0/1 outcomes: exact for one subset at N; the single-sample mean is a rate
            p = f"{c['p']:.3f}" if name != "single sample" else "-"
            print(f"| {t:g} | {label} | {100 * sum(acc) / len(acc):.1f} | {100 * c['diff']:+.1f} "
                  f"({100 * c['ci95'][0]:+.1f} to {100 * c['ci95'][1]:+.1f}) | {p} |", flush=True)
    print(f"({time.time() - t0:.0f} s)")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
