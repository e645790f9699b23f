"""Split a prompt-rewriting run's test accuracy by whether its prompt differs from p~, and score a
second run (e.g. SFT) on the same queries.

    .venv/bin/python scripts/rewrite_breakdown.py runs/basic_arithmetic/metatuner_j/seed_0 runs/basic_arithmetic/sft/seed_0
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(run: Path) -> tuple[list[dict], str]:
    preds = [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines() if x.strip()]
    return preds, json.loads((run / "metrics.json").read_text()).get("p_tilde", "")


def main(a: str, b: str) -> None:
    pa, p_tilde = load(Path(a))
    pb, _ = load(Path(b))
    other = {p["query"]: p for p in pb}
    missing = [p["query"] for p in pa if p["query"] not in other]
    if missing:
        sys.exit(f"error: {b}/predictions.jsonl lacks {len(missing)} of {a}'s test queries (first: {missing[0]!r})")
    print(f"| test queries of {Path(a).parent.name} | n | {Path(a).parent.name} correct | {Path(b).parent.name} correct |")
    print("|---|---|---|---|")
    for label, rows in (("prompt rewritten", [p for p in pa if p["prompt"] != p_tilde]),
                        ("prompt kept (p~)", [p for p in pa if p["prompt"] == p_tilde])):
        print(f"| {label} | {len(rows)} | {sum(bool(p['correct']) for p in rows)} | "
              f"{sum(bool(other[p['query']]['correct']) for p in rows)} |")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
