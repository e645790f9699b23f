"""Evaluation throughput (test examples per second) of the quick start's model: old harness vs new.

Same model (default: the embedded SmolLM2-135M-Instruct), task (chain_sum), prompt and test examples,
zero-shot greedy, one process, both settings side by side:

- old: `evaluate(..., sort_by_length=False, stop_at_answer=False, fast_greedy=False)`: Hugging Face
  `generate` on batches in data order; every row of a batch runs until the batch's longest row ends;
- new: the defaults: batches sorted by prompt length, the shared prefix (chat header + task prompt) run
  once per batch, finished rows dropped from the batch, rows stopped at the task's answer line.

The examples are cut into chunks; each chunk is evaluated by both, in the order old-new, new-old, ...
(ABBA), so changing load from other processes on a shared machine falls on both alike. On a shared
machine use --threads 1: torch's default (a thread per core) slows down erratically under
contention. Also counts the examples whose extracted answer differs.

    .venv/bin/python benchmarks/eval_throughput.py [--n 64] [--batch 32] [--threads 0] [--model NAME]

The last line printed is JSON: old_ex_per_s, new_ex_per_s, speedup, same_answers, n, ...
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

warnings.filterwarnings("ignore")

# used only when the task has no answer_end of its own: a complete "Answer: ..." line
FALLBACK_ANSWER_END = r"(?im)^\s*answer\s*:[^\n]*\S[^\n]*\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--task", default="chain_sum")
    ap.add_argument("--n", type=int, default=64, help="test examples")
    ap.add_argument("--batch", type=int, default=32, help="eval batch size (the quick start's eval.batch_size)")
    ap.add_argument("--chunk", type=int, default=64, help="examples per old/new alternation")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides (e.g. task.max_new_tokens=48)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from metatuner.config import load_config
    from metatuner.evaluate import evaluate
    from metatuner.models import load_from_config
    from metatuner.tasks import load_task

    cfg = load_config(None, [f"model.name={args.model}", f"task.name={args.task}", f"model.device={args.device}",
                             f"task.test_size={args.n}", *args.overrides])
    task = load_task(cfg.task, 0)
    if not getattr(task, "answer_end", ""):
        task.answer_end = FALLBACK_ANSWER_END
    model, tok = load_from_config(cfg.model)
    examples = task.test[: args.n]
    old_s = new_s = 0.0
    old_recs, new_recs, old_tok, new_tok = [], [], 0, 0
    for c, start in enumerate(range(0, len(examples), args.chunk)):
        part = examples[start : start + args.chunk]
        for which in (("old", "new") if c % 2 == 0 else ("new", "old")):  # ABBA: drift in load falls on both
            legacy = which == "old"
            t = time.perf_counter()
            recs, m = evaluate(model, tok, task, part, batch_size=args.batch, progress=False, diagnose=False,
                               sort_by_length=not legacy, stop_at_answer=not legacy, fast_greedy=not legacy)
            if legacy:
                old_s += time.perf_counter() - t
                old_recs += recs
                old_tok += m["tokens_generated"]
            else:
                new_s += time.perf_counter() - t
                new_recs += recs
                new_tok += m["tokens_generated"]
        print(f"{start + len(part)}/{len(examples)}: old {old_s:.1f} s, new {new_s:.1f} s", flush=True)
    diff = [i for i, (a, b) in enumerate(zip(old_recs, new_recs)) if a["extracted"] != b["extracted"]]
    for i in diff[:10]:
        print(f"differs #{i}: old {old_recs[i]['generation']!r} -> new {new_recs[i]['generation']!r}")
    acc = lambda rs: sum(bool(r["correct"]) for r in rs) / max(1, len(rs))  # noqa: E731
    n = len(examples)
    print(f"{'':8}{'ex/s':>8}{'seconds':>9}{'tokens':>8}{'accuracy':>10}")
    print(f"{'old':8}{n / old_s:8.2f}{old_s:9.1f}{old_tok:8d}{acc(old_recs):10.3f}")
    print(f"{'new':8}{n / new_s:8.2f}{new_s:9.1f}{new_tok:8d}{acc(new_recs):10.3f}")
    print(json.dumps({"model": args.model, "task": args.task, "n": n, "batch": args.batch,
                      "threads": torch.get_num_threads(), "max_new_tokens": task.max_new_tokens,
                      "answer_end": task.answer_end, "old_ex_per_s": round(n / old_s, 3),
                      "new_ex_per_s": round(n / new_s, 3), "speedup": round(old_s / new_s, 2),
                      "old_tokens": old_tok, "new_tokens": new_tok, "same_answers": n - len(diff),
                      "old_accuracy": acc(old_recs), "new_accuracy": acc(new_recs)}))


if __name__ == "__main__":
    main()
