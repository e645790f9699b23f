"""The prompt decoder's distribution over the pool in a finished MetaTuner pool run: what the joint phase's
task-prompt sampling draws from, and how much of the choice depends on the query.

    .venv/bin/python scripts/pool_distribution.py runs/pool_products/metatuner_j_pool/seed_1 [--n 16] \
        [--split train] [--temperatures 1,0.3,0.1]

For the first N queries of the run's split (train by default: the queries the joint phase samples prompts
for), the run's trained decoder scores every pool candidate (`rollouts.pool_scores`, the live decoder: the
test-time argmax reads the same scores; generator.pool_score as the run used). Prints per candidate: the mean
score, its standard deviation across the queries (how much the query moves it), how many queries it is the
argmax for, and, per temperature, its mean sampling probability softmax(score / T), the distribution
generator.pool_temperature=T samples the actor's training prompt from. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a finished MetaTuner run with generator.prompt_space=pool (final/pool.json)")
    ap.add_argument("--n", type=int, default=16, help="queries scored (the first N of the split)")
    ap.add_argument("--split", choices=["train", "validation", "test"], default="train")
    ap.add_argument("--temperatures", default="1,0.3,0.1", help="comma-separated sampling temperatures")
    args = ap.parse_args(argv)
    d = Path(args.run_dir)
    if not (d / "final" / "generator.safetensors").is_file() or not (d / "final" / "pool.json").is_file():
        raise SystemExit(f"error: {d}: expected a finished MetaTuner pool run (final/generator.safetensors and "
                         "final/pool.json)")
    try:
        temps = [float(t) for t in args.temperatures.split(",")]
    except ValueError:
        raise SystemExit(f"error: --temperatures {args.temperatures!r}: expected numbers separated by commas") from None
    if args.n < 1 or any(t <= 0 for t in temps):
        raise SystemExit(f"error: need --n >= 1 (got {args.n}) and temperatures > 0 (got {args.temperatures})")

    import torch

    from metatuner.methods.metatuner.inference import load_system
    from metatuner.methods.metatuner.rollouts import pool_scores
    from metatuner.tasks import load_task

    system = load_system(d)
    pool = list(system.pool)
    examples = load_task(system.cfg.task, system.cfg.seed).split(args.split)[: args.n]  # the run's own splits
    with torch.no_grad():
        s = pool_scores(system, examples, [pool] * len(examples), frozen=False).float().cpu()
    top = s.argmax(-1)
    rep = {"run": str(d), "split": args.split, "queries": len(examples), "pool_score": system.cfg.generator.pool_score,
           "mean_score": [round(float(x), 4) for x in s.mean(0)],
           "std_across_queries": [round(float(x), 4) for x in (s.std(0) if len(examples) > 1 else torch.zeros(len(pool)))],
           "argmax_counts": [int((top == j).sum()) for j in range(len(pool))],
           "mean_probability": {str(t): [round(float(x), 4) for x in torch.softmax(s / t, -1).mean(0)] for t in temps}}
    print(f"{args.split}, first {len(examples)} queries; scores: generator.pool_score={rep['pool_score']}")
    head = f"{'candidate':52} {'score':>7} {'sd':>6} {'argmax':>6}" + "".join(f" {'p@T=' + str(t):>8}" for t in temps)
    print(head)
    for j, p in enumerate(pool):
        label = f"#{j} " + p.replace("\n", " ")[:48]
        probs = "".join(f" {100 * rep['mean_probability'][str(t)][j]:7.1f}%" for t in temps)
        print(f"{label:52} {rep['mean_score'][j]:7.3f} {rep['std_across_queries'][j]:6.3f} {rep['argmax_counts'][j]:6d}{probs}")
    print(json.dumps(rep))
    return rep


if __name__ == "__main__":
    main()
