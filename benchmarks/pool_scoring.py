"""The prompt decoder's pool scores (MetaTuner's test-time prompt choice) with the candidates run in groups
of similar length, against all padded to the longest candidate.

pool|mixed mode scores every candidate of the pool for every test query under the live decoder and, with
generator.pool_score=gain, under G without its LoRA: two teacher-forced passes per query (pool.candidate_
logprobs -> generation.prefix_nll, each query's (p~, x) prefix run once). A pool with one long candidate
(the demonstrations prompt: 126 tokens against 14-29 for the others on products) padded every candidate of
the batch to that length. Now (on) the (query, candidate) rows run in groups of similar length
(generation.length_groups); before (off) all in one padded batch. Both score the same queries of the run's
test split with the run's trained system; the script prints the seconds of each, the speedup, how many
test-time choices (the argmax) agree and the largest score difference (float rounding only).

The queries are cut into chunks; each chunk runs both ways in the order off-on, on-off, ... (ABBA), so
changing load from other processes falls on both alike. On a shared machine use --threads 1.

    .venv/bin/python benchmarks/pool_scoring.py RUN [--n 48] [--chunk 8]

RUN: a finished MetaTuner pool run (final/), e.g. runs/pool_products/metatuner_j_pool/seed_1 from the
products command in configs/compare/pool.yaml. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a finished MetaTuner run folder in pool or mixed mode (with final/)")
    ap.add_argument("--n", type=int, default=48, help="test queries scored (each both ways)")
    ap.add_argument("--chunk", type=int, default=8, help="queries per off/on alternation")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (Path(args.run_dir) / "final" / "generator.safetensors").is_file():
        raise SystemExit(f"error: {args.run_dir}: no final/generator.safetensors (expected a finished MetaTuner run)")

    import metatuner.generation as G
    from metatuner.methods.metatuner.inference import load_system
    from metatuner.methods.metatuner.rollouts import pool_scores
    from metatuner.tasks import load_task

    system = load_system(args.run_dir)
    cfg = system.cfg
    if not system.pool:
        raise SystemExit(f"error: {args.run_dir}: generator.prompt_space={cfg.generator.prompt_space} has no pool")
    task = load_task(cfg.task, cfg.seed)
    examples = task.test[: args.n]
    pool = list(system.pool)
    real = G.prefix_nll

    def use(on: bool) -> None:
        G.prefix_nll = (lambda *a, **k: real(*a, **{**k, "group": on}))

    secs = {False: 0.0, True: 0.0}
    scores: dict[bool, list] = {False: [], True: []}
    try:
        for c, start in enumerate(range(0, len(examples), args.chunk)):
            part = examples[start : start + args.chunk]
            for on in ((False, True) if c % 2 == 0 else (True, False)):
                use(on)
                t = time.perf_counter()
                with torch.no_grad():
                    scores[on].append(pool_scores(system, part, [pool] * len(part), frozen=False))
                secs[on] += time.perf_counter() - t
            print(f"{start + len(part)}/{len(examples)} queries: off {secs[False]:.1f} s, on {secs[True]:.1f} s",
                  flush=True)
    finally:
        G.prefix_nll = real
    a, b = torch.cat(scores[False]), torch.cat(scores[True])
    lengths = [len(system.gen_tok(p, add_special_tokens=False)["input_ids"]) for p in pool]
    print(json.dumps({"run": str(args.run_dir), "task": cfg.task.name, "queries": len(examples),
                      "candidates": len(pool), "candidate_tokens": lengths, "pool_score": cfg.generator.pool_score,
                      "batch": cfg.rollout.batch_size, "bf16": bool(cfg.train.bf16),
                      "threads": torch.get_num_threads(),
                      "off_seconds": round(secs[False], 2), "on_seconds": round(secs[True], 2),
                      "off_queries_per_s": round(len(examples) / secs[False], 3),
                      "on_queries_per_s": round(len(examples) / secs[True], 3),
                      "speedup": round(secs[False] / secs[True], 2),
                      "same_argmax": int((a.argmax(-1) == b.argmax(-1)).sum()),
                      "max_score_diff": round(float((a - b).abs().max()), 6)}))


if __name__ == "__main__":
    main()
