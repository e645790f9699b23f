"""Print the zero-shot table of the benchmarks from run folders written by scripts/zero_shot_benchmarks.sh.

    .venv/bin/python scripts/zero_shot_table.py runs/zero_shot [--floor-from OTHER_ROOT]

Columns: accuracy (and token F1 where the task has it), the trivial floor (the training split's most
frequent answer, from metrics.json), the share of predictions with no extractable answer (metrics.json's
no_answer_rate, or counted from predictions.jsonl for runs written before that key existed), the share of
generations that ran to the task's token cap (re-tokenized, within one token), tokens generated and wall seconds. --floor-from takes the floor of
runs that lack it (an older harness) from another root with the same test splits.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TASKS = ["chain_sum", "gsm8k", "math", "hotpotqa", "cosmosqa"]


def at_cap(task: str, preds: list[dict]) -> float:
    """Share of generations that used (within one token, re-tokenized) the task's answer budget."""
    from transformers import AutoTokenizer

    from metatuner.config import load_config
    from metatuner.models import resolve_path
    from metatuner.tasks import task_rules

    cap = task_rules(load_config(None, [f"task.name={task}"]).task).max_new_tokens
    tok = AutoTokenizer.from_pretrained(resolve_path("smollm2-135m-instruct"))
    return sum(len(tok(p["generation"], add_special_tokens=False)["input_ids"]) >= cap - 1 for p in preds) / max(1, len(preds))


def row(root: Path, task: str, floor_root: Path | None) -> str:
    m_path = root / task / "metrics.json"
    if not m_path.is_file():
        return f"| {task} | - | failed or missing | | | | | | |"
    m = json.loads(m_path.read_text())
    preds = [json.loads(ln) for ln in (root / task / "predictions.jsonl").read_text().splitlines() if ln.strip()]
    f1 = f"{100 * m['f1']:.1f}" if "f1" in m else ""
    floor = m.get("floor_accuracy")
    if floor is None and floor_root is not None and (floor_root / task / "metrics.json").is_file():
        floor = json.loads((floor_root / task / "metrics.json").read_text()).get("floor_accuracy")
    floor_s = "-" if floor is None else f"{100 * floor:.1f}"
    no_ans = m.get("no_answer_rate")
    if no_ans is None:
        no_ans = sum(p.get("extracted") in (None, "") for p in preds) / max(1, len(preds))
    capped = f"{100 * at_cap(task, preds):.0f}"
    return (f"| {task} | {m['n']} | {100 * m['accuracy']:.1f} | {f1} | {floor_s} | {100 * no_ans:.0f} | {capped} | "
            f"{m['tokens_generated']} | {m['wall_seconds']:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--floor-from", default=None)
    a = ap.parse_args()
    root, fr = Path(a.root), (Path(a.floor_from) if a.floor_from else None)
    print("| task | n | accuracy % | F1 % | floor % | no answer % | at token cap % | tokens generated | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t in TASKS:
        print(row(root, t, fr))


if __name__ == "__main__":
    main()
