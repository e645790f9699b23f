#!/usr/bin/env bash
# The runs behind the numbers in the README and the issue notes, on the embedded model (2-core CPU).
#   scripts/experiments.sh [step ...]    steps: zero_shot quickstart all_methods metatuner_vs_sft
#                                               sapo_continual inference_select benchmarks
set -uo pipefail
cd "$(dirname "$0")/.."
M=.venv/bin/metatuner
steps=${@:-zero_shot quickstart all_methods metatuner_vs_sft sapo_continual inference_select benchmarks}
for s in $steps; do
  echo "=== $s ($(date -u +%H:%M:%S))"
  case $s in
    zero_shot) scripts/zero_shot_benchmarks.sh ;;
    quickstart) $M compare --config configs/compare/quickstart.yaml ;;
    all_methods) $M compare --config configs/compare/all_methods.yaml ;;
    metatuner_vs_sft) $M compare --config configs/compare/metatuner_vs_sft.yaml ;;
    sapo_continual)
      for sel in none sapo; do
        $M train method=continual prompt_selection=$sel continual.tasks=[chain_sum,basic_arithmetic] \
          train.max_steps=30 task.train_size=400 eval.limit=100 sapo.candidates=4 sapo.subset=32 \
          output_dir=runs/continual_$sel > runs/continual_$sel.log 2>&1
        cat runs/continual_$sel/continual.md
      done ;;
    inference_select)
      $M train method=inference_select inference.strategy=majority inference.temperature=0.8 \
        select.n_values=[1,2,4,8] select.val_examples=48 select.opro_prompts=1 select.rewrites=2 \
        opro.steps=1 opro.candidates=3 opro.subset=16 select.budget=2 select.max_per_query=8 \
        eval.limit=100 output_dir=runs/inference_select > runs/inference_select.log 2>&1
      .venv/bin/python -c "import json; d=json.load(open('runs/inference_select/select.json')); print(json.dumps({k: d[k] for k in ('curves','chosen','best_prompt_changes_with_n','adaptive_budget')}, indent=1))" ;;
    benchmarks)
      .venv/bin/python benchmarks/lora_overhead.py 2>/dev/null | tail -1
      .venv/bin/python benchmarks/step_cost.py 2>/dev/null | tail -1 ;;
  esac
done
