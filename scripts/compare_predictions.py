"""Two evaluations of the same test queries, side by side: accuracy of each, how many generations
differ, how many answers changed from right to wrong and back.

    .venv/bin/python scripts/compare_predictions.py runs/pool_autocast/sft/seed_0 runs/pool/sft/seed_0

Each argument is a run folder (its predictions.jsonl) or a predictions.jsonl file. Rows are matched
by query; queries in only one of them are counted and left out. `--without RUN` (repeatable) also leaves
out every query of RUN's test and validation splits (rebuilt from its config.yaml; `RUN@S` at split seed
S, as scripts/split_overlap.py; a bare predictions.jsonl: its queries): the part of a test split that no
other run read (seeds whose random splits overlap).

    .venv/bin/python scripts/compare_predictions.py runs/ptilde_ba/zero_shot/seed_2 runs/ptilde_ba/inference_select/seed_2 \
        --without runs/weighted_ba_ptilde/zero_shot/seed_1
"""

from __future__ import annotations

import json
from pathlib import Path


def read(path: str) -> dict:
    p = Path(path)
    p = p / "predictions.jsonl" if p.is_dir() else p
    rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return {r["query"]: r for r in rows}


def seen_queries(arg: str) -> set[str]:
    """The test and validation queries of a run (RUN or RUN@SPLIT_SEED, rebuilt from its config.yaml), or
    the queries of a predictions file."""
    run = Path(arg.partition("@")[0])
    if run.is_dir() and (run / "config.yaml").is_file():
        import runpy

        splits = runpy.run_path(str(Path(__file__).with_name("split_overlap.py")))["splits"]
        return set().union(*splits(arg)[1].values())
    return set(read(arg))


def main(a_path: str, b_path: str, without: list[str] = ()) -> None:
    a, b = read(a_path), read(b_path)
    drop = {q for path in without for q in seen_queries(path)}
    both = [q for q in a if q in b]
    print(f"{len(both)} queries in both ({len(a) - len(both)} only in A, {len(b) - len(both)} only in B)")
    if without:
        print(f"leaving out the {sum(q in drop for q in both)} queries also in {', '.join(without)}: "
              f"{sum(q not in drop for q in both)} compared")
        both = [q for q in both if q not in drop]
    acc = lambda rows: 100 * sum(bool(rows[q]["correct"]) for q in both) / max(1, len(both))  # noqa: E731
    gen = sum(a[q]["generation"] != b[q]["generation"] for q in both)
    lost = sum(bool(a[q]["correct"]) and not b[q]["correct"] for q in both)
    won = sum(not a[q]["correct"] and bool(b[q]["correct"]) for q in both)
    print(f"accuracy: A {acc(a):.1f}%  B {acc(b):.1f}%")
    print(f"generations that differ: {gen}; right in A only: {lost}; right in B only: {won}")
    from metatuner.stats import mcnemar_exact

    p = mcnemar_exact([bool(a[q]["correct"]) for q in both], [bool(b[q]["correct"]) for q in both])
    print(f"exact McNemar p (paired, same queries): {p:.3g}")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="run folder or predictions.jsonl (A)")
    ap.add_argument("b", help="run folder or predictions.jsonl (B)")
    ap.add_argument("--without", action="append", default=[], metavar="RUN",
                    help="leave out the queries of this run's predictions (repeatable)")
    args = ap.parse_args()
    main(args.a, args.b, args.without)
