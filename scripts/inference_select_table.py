"""The inference-strategy selection results of finished `method=inference_select` runs, as markdown tables.

    .venv/bin/python scripts/inference_select_table.py runs/inference_select runs/inference_select_ba ...

Each argument is a compare output_dir (its inference_select/seed_*/ folders are read) or a run folder
holding select.json. Table 1: the chosen arm against greedy decoding on the test split (paired bootstrap
interval and exact McNemar p-value, from select.json `vs_greedy`; Holm's adjustment over the runs given,
the family of comparisons this table makes). Table 2: early-stopping majority against
fixed majority at the cap, on the same test samples (rule: threshold, minimum samples, confidence gate).
Table 3: the budget comparison (validation decides). Table 4: the stopping rule fitted per (prompt,
temperature) on validation, with its accuracy and samples there. Table 5 (runs with early_stop_groups.json:
select.early_test=cheapest|all or scripts/early_stop_test.py): early stopping against fixed majority on
test at every compared group, with its role (chosen arm's group, cheapest on validation).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from metatuner.stats import holm


def runs(arg: str) -> list[Path]:
    p = Path(arg)
    if (p / "select.json").is_file():
        return [p]
    found = sorted(p.glob("*/seed_*/select.json"))
    if not found:
        sys.exit(f"{arg}: no select.json in it or in */seed_*/ (is the inference_select run finished?)")
    return [f.parent for f in found]


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def gate(x) -> str:
    return "no gate" if x is None else f"gate {x:.3f}"


def main(args: list[str]) -> None:
    rows = []
    for a in args:
        for d in runs(a):
            sel = json.loads((d / "select.json").read_text())
            task = json.loads((d / "metrics.json").read_text()).get("task", "?")
            rows.append((task, d, sel))
    print("| task | run | chosen arm (validation acc %) | test acc % | greedy same prompt % | diff (95% CI) | McNemar p | "
          f"Holm p ({len(rows)} runs) |")
    print("|---|---|---|---|---|---|---|---|")
    adjusted = holm([s["vs_greedy"]["vs_same_prompt"]["p_value"] for _, _, s in rows])
    for (task, d, s), p_holm in zip(rows, adjusted):
        c, v = s["chosen"], s["vs_greedy"]
        same = v["vs_same_prompt"]
        print(f"| {task} | {d} | {c['label']} ({pct(c['accuracy'])}) | {pct(v['chosen_accuracy'])} | "
              f"{pct(v['greedy_same_prompt_accuracy'])} | {100 * same['diff']:+.1f} ({100 * same['ci95'][0]:+.1f} to "
              f"{100 * same['ci95'][1]:+.1f}) | {same['p_value']:.3g} | {p_holm:.3g} |")
    print()
    print("| task | prompt | T | rule (threshold, min, gate; fitted on validation?) | fixed majority@cap % | early stop % | "
          "gap (pts) | early mean samples | share of fixed's samples |")
    print("|---|---|---|---|---|---|---|---|---|")
    for task, d, s in rows:
        e = s["early_stop_vs_fixed"]
        rule = (f"{e['threshold']}, {e['min_samples']}, {gate(e.get('stop_score'))}; "
                f"{'yes' if e.get('rule_fitted_on_validation') else 'no'}")
        print(f"| {task} | {e['prompt'][:40]!r} | {e['temperature']} | {rule} | {pct(e['fixed_majority_accuracy'])} | "
              f"{pct(e['early_accuracy'])} | {100 * (e['early_accuracy'] - e['fixed_majority_accuracy']):+.1f} | "
              f"{e['early_mean_samples']:.2f} of {e['cap']} | {100 * e['sample_ratio']:.0f}% |")
    print()
    print("| task | budget/query | validation: probe / uniform / early stop % | used | test: probe / uniform / early stop % |")
    print("|---|---|---|---|---|")
    for task, d, s in rows:
        b = s["budget"]
        val = " / ".join(pct(b["validation"][k]["accuracy"]) for k in ("probe", "uniform", "early_stop"))
        test = " / ".join(pct(b["test"][k]["accuracy"]) for k in ("probe", "uniform", "early_stop"))
        print(f"| {task} | {b['budget_per_query']} | {val} | {b['used']} | {test} |")
    print()
    print("| task | prompt | T | rule (threshold, min, gate) | validation: fixed majority@cap % | early stop % | "
          "mean samples (share) |")
    print("|---|---|---|---|---|---|---|")
    for task, d, s in rows:
        for g in s["stop_rule"]["per_group"]:
            if "accuracy" not in g:  # select.stop_fit=false: the configured rule, not fitted
                continue
            print(f"| {task} | P{g['prompt']} | {g['temperature']} | {g['threshold']}, {g['min_samples']}, "
                  f"{gate(g.get('stop_score'))} | {pct(g['fixed_majority_accuracy'])} | {pct(g['accuracy'])} | "
                  f"{g['mean_samples']:.2f} of {g['cap']} ({100 * g['mean_samples'] / g['cap']:.0f}%) |")

    groups = [(task, d, json.loads((d / "early_stop_groups.json").read_text())) for task, d, _ in rows
              if (d / "early_stop_groups.json").is_file()]
    if not groups:
        return
    print()
    print("| task | prompt | T | role (chosen on validation) | rule (threshold, min, gate) | validation: early % at share | "
          "test: fixed majority@cap % | early stop % | gap (pts) | mean samples (share) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for task, d, eg in groups:
        for e in eg["groups"]:
            v = e["validation"]
            val = f"{pct(v.get('accuracy'))} at {100 * v['mean_samples'] / e['cap']:.0f}%" if "mean_samples" in v else "-"
            print(f"| {task} | P{e['prompt']} | {e['temperature']} | {', '.join(e['roles']) or '-'} | {e['threshold']}, "
                  f"{e['min_samples']}, {gate(e.get('stop_score'))} | {val} | {pct(e['fixed_majority_accuracy'])} | "
                  f"{pct(e['early_accuracy'])} | {100 * (e['early_accuracy'] - e['fixed_majority_accuracy']):+.1f} | "
                  f"{e['early_mean_samples']:.2f} of {e['cap']} ({100 * e['sample_ratio']:.0f}%) |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
