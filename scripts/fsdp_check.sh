#!/usr/bin/env bash
# Sharded training (configs/accelerate/fsdp.yaml) against plain training, on a tiny random model; needs a GPU
# (accelerate runs FSDP only on GPUs). Run from the repository root with metatuner installed:
#   bash scripts/fsdp_check.sh [NPROC]        # NPROC processes under FSDP (default 1: one GPU is enough)
# Checks: SFT under FSDP ends with the same adapter and the same test answers as SFT without it; an FSDP run
# resumed from its checkpoint-4 ends with the same adapter as the uninterrupted one; DPO and BetterTogether
# finish under FSDP; MetaTuner-J finishes under FSDP with NPROC > 1 (its joint phase shards G, metatuner.sharding;
# scripts/fsdp_joint_check.sh compares it with DDP) and refuses one process before any training (nothing to shard).
# With NPROC > 1 each process sees a slice of every batch, so the FSDP adapter matches the plain one only up to
# float rounding (same global batch, different summation order).
set -u
NPROC=${1:-1}
W=${FSDP_CHECK_DIR:-/tmp/metatuner_fsdp_check}
rm -rf "$W" && mkdir -p "$W"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -c "from metatuner.testing import tiny_model_dir; tiny_model_dir('$W/model')" >/dev/null 2>&1 || exit 1
S="model.name=$W/model task.name=chain_sum task.train_size=16 task.test_size=4 eval.limit=2 eval.batch_size=2
   train.batch_size=2 train.max_steps=5 train.save_steps=2 train.bf16=false warmup.max_steps=1
   warmup.generator_steps=1 warmup.queries=4 rollout.n=2 rollout.batch_size=8 train.sync_steps=2
   generator.max_prompt_tokens=6 task.max_new_tokens=4 rollout.criterion=nll lora.rank=2 hypernet.hidden=16
   hypernet.embed_dim=8 generator.lora_rank=4"
A="--config_file configs/accelerate/fsdp.yaml --num_processes $NPROC --mixed_precision no"
fail=0
run() {  # run NAME EXPECTED_RC COMMAND...
  local name=$1 want=$2; shift 2
  timeout 600 "$@" >"$W/$name.log" 2>&1; local rc=$?
  if [ "$rc" = "$want" ]; then echo "ok   $name (exit $rc)"; else echo "FAIL $name: exit $rc, expected $want (log: $W/$name.log)"; fail=1; fi
}
same_adapter() {  # same_adapter DIR_A DIR_B: max abs difference of the saved adapters
  python3 - "$1/adapter/adapter_model.safetensors" "$2/adapter/adapter_model.safetensors" <<'EOF'
import sys
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
assert a.keys() == b.keys(), "adapters hold different tensors"
d = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
print(f"     {len(a)} adapter tensors, max abs difference {d:.3g}")
sys.exit(0 if d <= 1e-5 else 1)
EOF
  [ $? = 0 ] || { echo "FAIL adapters differ: $1 $2"; fail=1; }
}
run sft_plain 0 python3 -m metatuner.cli train $S method=sft output_dir=$W/sft_plain
run sft_fsdp 0 accelerate launch $A -m metatuner.cli train $S method=sft output_dir=$W/sft_fsdp
same_adapter "$W/sft_plain" "$W/sft_fsdp"
if [ "$NPROC" = 1 ]; then
  cmp -s "$W/sft_plain/predictions.jsonl" "$W/sft_fsdp/predictions.jsonl" && echo "ok   same test answers" \
    || { echo "FAIL test answers differ"; fail=1; }
fi
mkdir -p "$W/sft_resume" && cp -r "$W/sft_fsdp/checkpoint-4" "$W/sft_resume/"
run sft_fsdp_resume 0 accelerate launch $A -m metatuner.cli train $S method=sft output_dir=$W/sft_resume resume_from_checkpoint=true
same_adapter "$W/sft_fsdp" "$W/sft_resume"
run dpo_fsdp 0 accelerate launch $A -m metatuner.cli train $S method=dpo output_dir=$W/dpo_fsdp
run bettertogether_fsdp 0 accelerate launch $A -m metatuner.cli train $S method=bettertogether output_dir=$W/bt_fsdp
if [ "$NPROC" = 1 ]; then
  run metatuner_j_fsdp 1 accelerate launch $A -m metatuner.cli train $S method=metatuner_j output_dir=$W/mtj_fsdp
  grep -q "with one process: nothing to shard" "$W/metatuner_j_fsdp.log" || { echo "FAIL metatuner_j: no refusal message"; fail=1; }
  [ -e "$W/mtj_fsdp/warmup" ] && { echo "FAIL metatuner_j trained before refusing"; fail=1; }
else
  run metatuner_j_fsdp 0 accelerate launch $A -m metatuner.cli train $S method=metatuner_j output_dir=$W/mtj_fsdp
  [ -f "$W/mtj_fsdp/final/generator.safetensors" ] || { echo "FAIL metatuner_j wrote no final/"; fail=1; }
fi
[ $fail = 0 ] && echo "all FSDP checks passed" || echo "some FSDP checks failed"
exit $fail
