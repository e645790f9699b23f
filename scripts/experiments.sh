#!/usr/bin/env bash
# The runs behind the numbers in the README and the issue notes, on the embedded model (2-core CPU).
#   scripts/experiments.sh [step ...]    steps: zero_shot quickstart all_methods basic_arithmetic
#                                               metatuner_vs_sft sapo_continual inference generalization benchmarks
set -uo pipefail
cd "$(dirname "$0")/.."
M=.venv/bin/metatuner
steps=${@:-zero_shot quickstart all_methods basic_arithmetic metatuner_vs_sft sapo_continual inference generalization benchmarks}
for s in $steps; do
  echo "=== $s ($(date -u +%H:%M:%S))"
  case $s in
    zero_shot) scripts/zero_shot_benchmarks.sh ;;
    quickstart) $M compare --config configs/compare/quickstart.yaml ;;
    all_methods) $M compare --config configs/compare/all_methods.yaml ;;
    metatuner_vs_sft) $M compare --config configs/compare/metatuner_vs_sft.yaml ;;
    basic_arithmetic) $M compare --config configs/compare/basic_arithmetic.yaml
      .venv/bin/python scripts/rewrite_breakdown.py runs/basic_arithmetic/metatuner_j/seed_0 runs/basic_arithmetic/sft/seed_0 ;;
    generalization) $M compare --config configs/compare/generalization_cpu.yaml ;;
    sapo_continual) $M compare --config configs/compare/sapo_continual.yaml
      for r in sft_p_tilde sft_sapo; do echo "$r:"; cat runs/sapo_continual/$r/seed_0/continual.md; done ;;
    inference) $M compare --config configs/compare/inference.yaml
      .venv/bin/python -c "import json; d=json.load(open('runs/inference/inference_select/seed_0/select.json')); print(json.dumps({k: d[k] for k in ('curves','chosen','best_prompt_at_n1','best_prompt_at_nmax','adaptive_budget')}, indent=1))" ;;
    benchmarks)
      .venv/bin/python benchmarks/lora_overhead.py 2>/dev/null | tail -1
      .venv/bin/python benchmarks/step_cost.py 2>/dev/null | tail -1 ;;
  esac
done
