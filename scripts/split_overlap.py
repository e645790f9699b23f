"""How many questions do the splits of two runs share? For every pair of runs given: test with test,
validation with validation, and each one's test with the other's validation (a choice made on one run's
validation split that saw the other's test questions).

    .venv/bin/python scripts/split_overlap.py runs/weighted_ba_ptilde/zero_shot/seed_1 runs/ptilde_ba/zero_shot/seed_2 \
        runs/ptilde_ba/zero_shot/seed_2@0

Each argument is a run folder; its splits are rebuilt from its config.yaml. `RUN@S` rebuilds them with
split seed S instead (the same settings at another seed, e.g. a seed whose runs are not on this machine).
reasoning-gym makes question i of seed s as question i+s of seed 0: in task.split_order=generation two
seeds share nearly every question, and in shuffled order their splits are random cuts of nearly the same
questions, so they overlap by chance.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools

from metatuner.config import load_saved_config
from metatuner.tasks import load_task


def splits(arg: str) -> tuple[str, dict[str, set[str]]]:
    run, _, seed = arg.partition("@")
    cfg = load_saved_config(f"{run}/config.yaml")
    s = int(seed) if seed else (cfg.task.split_seed if cfg.task.split_seed is not None and cfg.task.split_seed >= 0
                                else cfg.seed)
    task = load_task(dataclasses.replace(cfg.task, split_seed=s), s)
    return f"{arg} ({cfg.task.name}, {cfg.task.split_order}, split seed {s})", {
        k: {e.query for e in getattr(task, k)} for k in ("test", "validation")}


def overlap_rows(args: list[str]) -> list[dict]:
    got = [splits(a) for a in args]
    rows = []
    for (na, a), (nb, b) in itertools.combinations(got, 2):
        rows.append({"a": na, "b": nb, "test": (len(a["test"] & b["test"]), len(a["test"]), len(b["test"])),
                     "validation": (len(a["validation"] & b["validation"]), len(a["validation"]), len(b["validation"])),
                     "a_test_in_b_validation": len(a["test"] & b["validation"]),
                     "b_test_in_a_validation": len(b["test"] & a["validation"])})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders (RUN or RUN@SPLIT_SEED); at least two")
    args = ap.parse_args(argv)
    if len(args.runs) < 2:
        ap.error("give at least two runs")
    rows = overlap_rows(args.runs)
    for r in rows:
        print(f"A: {r['a']}\nB: {r['b']}")
        print(f"  test shared {r['test'][0]} (A {r['test'][1]}, B {r['test'][2]}); validation shared "
              f"{r['validation'][0]} (A {r['validation'][1]}, B {r['validation'][2]}); A's test in B's validation "
              f"{r['a_test_in_b_validation']}, B's test in A's validation {r['b_test_in_a_validation']}")
    return rows


if __name__ == "__main__":
    main()
