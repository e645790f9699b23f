#!/usr/bin/env bash
# Zero-shot accuracy of a model (default: the embedded SmolLM2-135M-Instruct) on 100 test examples
# of each of the paper's four benchmarks and the default task; prints one table.
#   scripts/zero_shot_benchmarks.sh [extra key=value overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-100}
OUT=${OUT:-runs/zero_shot}
for task in chain_sum gsm8k math hotpotqa cosmosqa; do
  .venv/bin/metatuner eval task.name=$task eval.limit=$N output_dir=$OUT/$task "$@" > $OUT.$task.log 2>&1 || { echo "$task failed: see $OUT.$task.log"; }
done
.venv/bin/python - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print("| task | n | accuracy % | F1 % | tokens generated | wall s |")
print("|---|---|---|---|---|---|")
for t in ["chain_sum", "gsm8k", "math", "hotpotqa", "cosmosqa"]:
    p = out / t / "metrics.json"
    if not p.exists():
        print(f"| {t} | - | failed | | | |"); continue
    m = json.loads(p.read_text())
    f1 = f"{100*m['f1']:.1f}" if "f1" in m else ""
    print(f"| {t} | {m['n']} | {100*m['accuracy']:.1f} | {f1} | {m['tokens_generated']} | {m['wall_seconds']:.0f} |")
PY
