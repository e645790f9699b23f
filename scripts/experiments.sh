#!/usr/bin/env bash
# The runs behind the numbers in docs/results.md (summarised in the README) and the issue notes, on the embedded model (2-core CPU).
#   scripts/experiments.sh [step ...]    steps: zero_shot quickstart all_methods basic_arithmetic
#                                               metatuner_vs_sft sapo_continual inference generalization benchmarks
#                                               pool inference_select (not in the default list: hours here)
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
    pool) $M compare --config configs/compare/pool.yaml
      .venv/bin/python scripts/pool_run_summary.py runs/pool/metatuner_j_pool/seed_* ;;
    inference_select)
      BA=(task.name=basic_arithmetic task.params.min_terms=2 task.params.max_terms=2 task.params.min_digits=1
          task.params.max_digits=2 'task.params.operators=["+","-","*"]' task.params.allow_parentheses=false
          task.params.allow_negation=false)
      PR=(task.name=products task.params.min_terms=2 task.params.max_terms=2 task.params.min_digits=1 task.params.max_digits=2)
      C=configs/compare/inference_select.yaml
      $M compare --config $C
      $M compare --config $C "${BA[@]}" output_dir=runs/inference_select_ba
      $M compare --config $C "${PR[@]}" output_dir=runs/inference_select_products
      $M compare --config $C "${PR[@]}" task.split_order=shuffled output_dir=runs/inference_select_products_shuffled
      $M compare --config $C output_dir=runs/inference_select_sft task.train_size=800 model.adapter=runs/pool/sft/seed_0/adapter
      $M train method=sft output_dir=runs/sft_ba_shuffled "${BA[@]}" task.split_order=shuffled task.train_size=800 \
        task.val_size=100 task.test_size=300 train.batch_size=8 train.lr=1.0e-3 train.max_steps=60 eval.batch_size=32
      $M compare --config $C "${BA[@]}" task.split_order=shuffled output_dir=runs/inference_select_sft_ba \
        task.train_size=800 model.adapter=runs/sft_ba_shuffled/adapter
      .venv/bin/python scripts/inference_select_table.py runs/inference_select runs/inference_select_ba \
        runs/inference_select_products runs/inference_select_products_shuffled runs/inference_select_sft runs/inference_select_sft_ba ;;
    benchmarks)
      .venv/bin/python benchmarks/lora_overhead.py 2>/dev/null | tail -1
      .venv/bin/python benchmarks/step_cost.py 2>/dev/null | tail -1
      .venv/bin/python benchmarks/bf16_cpu.py 2>/dev/null | tail -1 ;;
  esac
done
