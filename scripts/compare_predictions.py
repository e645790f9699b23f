"""Two evaluations of the same test queries, side by side: accuracy of each, how many generations
differ, how many answers changed from right to wrong and back.

    .venv/bin/python scripts/compare_predictions.py runs/pool_autocast/sft/seed_0 runs/pool/sft/seed_0

Each argument is a run folder (its predictions.jsonl) or a predictions.jsonl file. Rows are matched
by query; queries in only one of them are counted and left out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def read(path: str) -> dict:
    p = Path(path)
    p = p / "predictions.jsonl" if p.is_dir() else p
    rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return {r["query"]: r for r in rows}


def main(a_path: str, b_path: str) -> None:
    a, b = read(a_path), read(b_path)
    both = [q for q in a if q in b]
    acc = lambda rows: 100 * sum(bool(rows[q]["correct"]) for q in both) / max(1, len(both))  # noqa: E731
    gen = sum(a[q]["generation"] != b[q]["generation"] for q in both)
    lost = sum(bool(a[q]["correct"]) and not b[q]["correct"] for q in both)
    won = sum(not a[q]["correct"] and bool(b[q]["correct"]) for q in both)
    print(f"{len(both)} queries in both ({len(a) - len(both)} only in A, {len(b) - len(both)} only in B)")
    print(f"accuracy: A {acc(a):.1f}%  B {acc(b):.1f}%")
    print(f"generations that differ: {gen}; right in A only: {lost}; right in B only: {won}")
    from metatuner.stats import mcnemar_exact

    p = mcnemar_exact([bool(a[q]["correct"]) for q in both], [bool(b[q]["correct"]) for q in both])
    print(f"exact McNemar p (paired, same queries): {p:.3g}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: compare_predictions.py RUN_OR_FILE_A RUN_OR_FILE_B")
    main(sys.argv[1], sys.argv[2])
