#!/usr/bin/env bash
# MetaTuner's joint phase sharded (FSDP2, `metatuner.sharding`) against the same run on DDP, on a tiny random
# model, two processes on this machine's CPU (gloo) or GPUs. Run from the repository root with metatuner installed:
#   bash scripts/fsdp_joint_check.sh [VARIANT ...]     # default: every variant below
# Each variant trains twice under `torchrun --nproc_per_node 2`: plain (DDP) and with ACCELERATE_USE_FSDP=true,
# which is what `accelerate launch --config_file configs/accelerate/fsdp.yaml` sets (accelerate itself applies FSDP
# only on GPUs; MetaTuner shards G itself, so the same code runs here). Printed per variant: the largest absolute
# difference between the two runs' trained tensors (final/generator.safetensors: G's LoRA, phi_p', F) and whether
# D2 and the test answers are the same. Then the sharded j run is resumed from its step-2 checkpoint and must end
# with the same tensors. Each run has its own METATUNER_CACHE, so every run trains its actor warm-up.
set -u
W=${FSDP_CHECK_DIR:-/tmp/metatuner_fsdp_joint_check}
PY=${PYTHON:-python3}
TORCHRUN=${TORCHRUN:-torchrun}
rm -rf "$W" && mkdir -p "$W"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
$PY -c "from metatuner.testing import tiny_model_dir; tiny_model_dir('$W/model')" >/dev/null 2>&1 || exit 1
S="model.name=$W/model task.name=chain_sum task.train_size=16 task.test_size=4 eval.limit=2 eval.batch_size=2
   train.batch_size=2 train.max_steps=5 train.save_steps=2 train.bf16=false warmup.max_steps=1
   warmup.generator_steps=1 warmup.queries=4 rollout.n=2 rollout.batch_size=8 train.sync_steps=2
   generator.max_prompt_tokens=6 task.max_new_tokens=4 rollout.criterion=nll lora.rank=2 hypernet.hidden=16
   hypernet.embed_dim=8 generator.lora_rank=4 train.generator_lr=1e-3 method=metatuner_j"
declare -A V=(
  [j]=""
  [i]="method=metatuner_i"
  [wo_f]="train.param_decoder=false"
  [wo_p]="train.prompt_rewrite=false"
  [grad_accum]="train.grad_accum=2"
  [answer]="rollout.criterion=answer"
  [decisive]="rollout.criterion=answer rollout.targets=decisive"
  [pool]="generator.prompt_space=pool rollout.n=0"
  [listwise]="generator.prompt_space=pool rollout.n=0 rollout.criterion=answer generator.pool_loss=listwise"
  [mixed]="generator.prompt_space=mixed"
  [full_g]="generator.lora_rank=0"
  [full_g_mixed]="generator.lora_rank=0 generator.prompt_space=mixed generator.pool_score=likelihood"
  [full_g_wo_f]="generator.lora_rank=0 train.param_decoder=false"
)
NAMES=("$@")
[ ${#NAMES[@]} = 0 ] && NAMES=(j i wo_f wo_p grad_accum answer decisive pool listwise mixed full_g full_g_mixed full_g_wo_f)
fail=0
train() {  # train OUT ENV... -- OVERRIDES...
  local out=$1; shift
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  env "${envs[@]}" METATUNER_CACHE="$out.cache" timeout 600 $TORCHRUN --standalone --nproc_per_node 2 \
    -m metatuner.cli train $S "$@" output_dir="$out" >"$out.log" 2>&1
}
compare() {  # compare DIR_A DIR_B NAME
  $PY - "$1" "$2" "$3" <<'EOF'
import sys
from pathlib import Path
from safetensors.torch import load_file
a, b, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
x, y = load_file(a / "final/generator.safetensors"), load_file(b / "final/generator.safetensors")
assert x.keys() == y.keys(), "different tensors saved"
d = max((x[k].float() - y[k].float()).abs().max().item() for k in x)
same_d2 = (a / "final/d2.jsonl").read_text() == (b / "final/d2.jsonl").read_text()
same_answers = (a / "predictions.jsonl").read_text() == (b / "predictions.jsonl").read_text()
print(f"{name:<12} {len(x):>4} tensors  max abs difference {d:.3g}  same D2 {same_d2}  same test answers {same_answers}")
sys.exit(0 if d <= 1e-5 and same_d2 and same_answers else 1)
EOF
}
for name in "${NAMES[@]}"; do
  [ -n "${V[$name]+x}" ] || { echo "unknown variant $name (known: ${!V[*]})"; exit 2; }
  train "$W/${name}_ddp" -- ${V[$name]} || { echo "FAIL $name: DDP run failed ($W/${name}_ddp.log)"; fail=1; continue; }
  train "$W/${name}_fsdp" ACCELERATE_USE_FSDP=true -- ${V[$name]} \
    || { echo "FAIL $name: sharded run failed ($W/${name}_fsdp.log)"; fail=1; continue; }
  compare "$W/${name}_ddp" "$W/${name}_fsdp" "$name" || { echo "FAIL $name: the runs differ"; fail=1; }
done
if [ -d "$W/j_fsdp/step_2" ]; then
  mkdir -p "$W/j_resumed" && cp -r "$W/j_fsdp/step_2" "$W/j_resumed/"
  train "$W/j_resumed" ACCELERATE_USE_FSDP=true -- resume_from_checkpoint=true \
    || { echo "FAIL resume: run failed ($W/j_resumed.log)"; fail=1; }
  compare "$W/j_fsdp" "$W/j_resumed" "j resumed" || { echo "FAIL resume: the resumed run ended elsewhere"; fail=1; }
fi
[ $fail = 0 ] && echo "all sharded joint-phase checks passed" || echo "some sharded joint-phase checks failed"
exit $fail
