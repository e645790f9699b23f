"""Are a task's splits alike? Per split: size, mean query length, the answers' spread and the
trivial floor (the share of the most common answer), and for numeric answers the share below 100.

    .venv/bin/python scripts/split_stats.py task.name=products task.params.min_digits=1 \
        task.params.max_digits=2 task.train_size=800 task.test_size=300 task.split_order=generation

Takes the same `key=value` task settings as `metatuner train` (task.* only). A split whose numbers
differ much from the others' (e.g. test holding more short questions than validation) makes a
choice made on validation look wrong on test.
"""

from __future__ import annotations

import statistics
import sys
from collections import Counter

from metatuner.config import load_config
from metatuner.tasks.loading import load_task


def _num(s: str):
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


def split_row(name: str, exs) -> str:
    answers = [e.answer for e in exs]
    top, top_n = Counter(answers).most_common(1)[0] if answers else ("", 0)
    nums = [v for v in map(_num, answers) if v is not None]
    small = f"{100 * sum(abs(v) < 100 for v in nums) / len(nums):.1f}" if nums else "-"
    if not exs:  # a split left empty (task.fill_short=false on a short draw)
        return f"| {name} | 0 | - | 0 | - | - |"
    return (f"| {name} | {len(exs)} | {statistics.mean(len(e.query) for e in exs):.1f} | "
            f"{len(set(answers))} | {top!r} {100 * top_n / max(1, len(exs)):.1f}% | {small} |")


def main(argv: list[str]) -> None:
    cfg = load_config(None, [a for a in argv if a.startswith("task.")] + ["method=zero_shot"])
    task = load_task(cfg.task, seed=cfg.seed)
    print(task.origin.get("test", ""))
    print("| split | n | mean query chars | distinct answers | most common answer (share) | numeric answers < 100 % |")
    print("|---|---|---|---|---|---|")
    for name in ("train", "validation", "test"):
        print(split_row(name, getattr(task, name)))


if __name__ == "__main__":
    main(sys.argv[1:])
