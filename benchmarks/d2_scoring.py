"""D2's candidate scoring (prompts.prompt_outcomes) before and after it ran the prompts once.

A MetaTuner rollout answers every (query, candidate prompt) with the actor under the query's generated LoRA
(metatuner.lora.PerQueryLoRA) and needs two things from each: the greedy answer and the NLL of the
reference. Before (off), a teacher-forced pass over prompt + reference gave the NLL and a second pass over
the prompt started the greedy loop, which kept every row of the batch to the end because the rows' weights
differ. Now (on) one pass over the prompts serves both (generation.greedy_with_nll: the reference runs on
top of the prompts' cache, which is then cut back) and finished rows leave the batch with their factors
(PerQueryLoRA.keep_rows). Both run on the same trained system, queries and candidates; the answers and the
D2 choice should be the same up to float rounding, and the script counts those that differ.

--baseline unsorted: instead, "off" is today's one-pass path with the (query, candidate) rows batched in
their (query, candidate) order, "on" the same rows batched by prompt length (prompts.prompt_outcomes's
by_length, the default since 2026-12-07): a pool's long demonstrations candidate no longer pads every batch
it falls in. (In the default mode both sides batch by length, so the ratio is the one-pass change alone.
The pool-score part below is the same in both modes; benchmarks/pool_scoring.py times its
grouping by candidate length.)

The queries are cut into chunks; each chunk runs both ways in the order off-on, on-off, ... (ABBA), so
changing load from other processes falls on both alike. On a shared machine use --threads 1.

    .venv/bin/python benchmarks/d2_scoring.py RUN [--n 40] [--batch 16] [--candidates 6] [--baseline unsorted]

RUN: a finished MetaTuner run (final/), e.g. runs/quickstart/metatuner_j/seed_0 after `make demo`, or a
pool run (its candidates are the pool; otherwise p~ alone). Then the prompt decoder's pool scores for the
same queries (the test-time choice and the rollouts' task-prompt sampling), a row per (query, candidate)
as before (off) or each query's (p~, x) prefix run once for all its candidates (on). The last line printed
is JSON: off_rows_per_s, on_rows_per_s, speedup, same_answers, same_best, max_nll_diff, pool_speedup,
pool_same_argmax, pool_max_score_diff, ...
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a finished MetaTuner run folder (with final/)")
    ap.add_argument("--n", type=int, default=40, help="training queries (a D2 window's size in pool.yaml)")
    ap.add_argument("--candidates", type=int, default=6, help="pool candidates per query (at most the pool)")
    ap.add_argument("--batch", type=int, default=16, help="rows per batch (rollout.batch_size)")
    ap.add_argument("--chunk", type=int, default=8, help="queries per off/on alternation")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--baseline", choices=["separate", "unsorted"], default="separate",
                    help="'off' is: separate (the NLL pass and the greedy loop apart, rows in query order) or "
                         "unsorted (one pass, rows in query order, not by length)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (Path(args.run_dir) / "final" / "generator.safetensors").is_file():
        raise SystemExit(f"error: {args.run_dir}: no final/generator.safetensors (expected a finished MetaTuner run)")

    import metatuner.prompts as P
    from metatuner.methods.metatuner.inference import load_system
    from metatuner.tasks import load_task
    from metatuner.training import use_bf16

    system = load_system(args.run_dir)
    cfg = system.cfg
    task = load_task(cfg.task, cfg.seed)
    examples = task.train[: args.n]
    pool = list(system.pool or [system.p_tilde])[: max(1, args.candidates)]
    real_greedy, real_fits = P.greedy_texts, P.fits

    def whole(*a, **kw):  # the loop before: per-row weights kept the batch whole to the end
        return real_greedy(*a, **{**kw, "drop_finished": False, "keep_rows": None})

    def use(on: bool) -> None:  # off: the NLL pass and the greedy loop apart (the path for over-long rows)
        if args.baseline == "separate":
            P.greedy_texts = real_greedy if on else whole
            P.fits = real_fits if on else (lambda *a: False)

    secs = {False: 0.0, True: 0.0}
    outs: dict[bool, list] = {False: [], True: []}
    rows = 0
    for c, start in enumerate(range(0, len(examples), args.chunk)):
        part = examples[start : start + args.chunk]
        for on in ((False, True) if c % 2 == 0 else (True, False)):
            use(on)
            t = time.perf_counter()
            with system.pooled_states(part) if system.use_f else contextlib.nullcontext():  # as d2_rollout does
                res = P.prompt_outcomes(system.actor, system.tok, task, part, [pool] * len(part), "answer",
                                        args.batch, cfg.train.max_length, use_bf16(cfg.train, system.device),
                                        system.with_factors, by_length=on or args.baseline == "separate")
            secs[on] += time.perf_counter() - t
            outs[on] += res
        rows += len(part) * len(pool)
        print(f"{start + len(part)}/{len(examples)} queries: off {secs[False]:.1f} s, on {secs[True]:.1f} s", flush=True)
    use(True)
    flat = {on: [o for q in outs[on] for o in q] for on in outs}
    same = sum(a[:2] == b[:2] for a, b in zip(flat[False], flat[True]))
    same_best = sum(P.best_outcome(a)[0] == P.best_outcome(b)[0] for a, b in zip(outs[False], outs[True]))
    nll_diff = max(abs(a[2] - b[2]) for a, b in zip(flat[False], flat[True]))
    print(f"{'':8}{'rows/s':>8}{'seconds':>9}")
    for on, name in ((False, "off"), (True, "on")):
        print(f"{name:8}{rows / secs[on]:8.2f}{secs[on]:9.1f}")
    # the prompt decoder's pool scores (the test-time choice; the rollouts' task-prompt sampling): a row per
    # (query, candidate) as before, or each query's (p~, x) prefix once for all its candidates (now)
    from metatuner.pool import candidate_logprobs
    from metatuner.rewrite import rewrite_messages
    from metatuner.training import autocast, completion_text, forward_nll, lm_batch

    def rows_apart(msgs):  # candidate_logprobs before: one row per candidate, its prefix included
        from metatuner.generation import chat_text

        pre = [chat_text(system.gen_tok, m) for m in msgs]
        rows = [(i, c) for i in range(len(msgs)) for c in range(len(pool))]
        out = []
        with torch.no_grad(), autocast(bf16, system.device):
            for b in range(0, len(rows), args.batch):
                chunk = rows[b : b + args.batch]
                batch = lm_batch(system.gen_tok, [pre[i] for i, _ in chunk],
                                 [completion_text(system.gen_tok, msgs[i], pool[c])[1] for i, c in chunk],
                                 cfg.train.max_length, system.device)
                out.append(-forward_nll(system.gen.model, batch)[0].float().cpu())
        return torch.cat(out).view(len(msgs), len(pool))

    bf16 = use_bf16(cfg.train, system.device)
    psecs = {False: 0.0, True: 0.0}
    scores: dict[bool, list] = {False: [], True: []}
    for c, start in enumerate(range(0, len(examples), args.chunk)):
        msgs = [rewrite_messages(system.p_tilde, ex.query) for ex in examples[start : start + args.chunk]]
        for on in ((False, True) if c % 2 == 0 else (True, False)):
            t = time.perf_counter()
            scores[on].append(candidate_logprobs(system.gen.model, system.gen_tok, msgs, [pool] * len(msgs), args.batch,
                                                 cfg.train.max_length, bf16) if on else rows_apart(msgs))
            psecs[on] += time.perf_counter() - t
    a, b = torch.cat(scores[False]), torch.cat(scores[True])
    print(f"pool scores: off {psecs[False]:.1f} s, on {psecs[True]:.1f} s")
    pool_rep = {"pool_off_queries_per_s": round(len(examples) / psecs[False], 3),
                "pool_on_queries_per_s": round(len(examples) / psecs[True], 3),
                "pool_speedup": round(psecs[False] / psecs[True], 2),
                "pool_same_argmax": int((a.argmax(-1) == b.argmax(-1)).sum()),
                "pool_max_score_diff": round(float((a - b).abs().max()), 6)}
    print(json.dumps({"run": str(args.run_dir), "baseline": args.baseline, "task": cfg.task.name, "queries": len(examples),
                      "candidates": len(pool), "rows": rows, "batch": args.batch, "threads": torch.get_num_threads(),
                      "max_new_tokens": task.max_new_tokens, "off_rows_per_s": round(rows / secs[False], 3),
                      "on_rows_per_s": round(rows / secs[True], 3), "speedup": round(secs[False] / secs[True], 2),
                      "same_answers": same, "answers": len(flat[True]), "same_best": same_best,
                      "queries_scored": len(outs[True]), "max_nll_diff": round(nll_diff, 6), **pool_rep}))


if __name__ == "__main__":
    main()
