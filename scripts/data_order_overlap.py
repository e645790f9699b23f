"""Which training examples MetaTuner's joint phase trained on, against SFT at the same step budget: under
the data order before 2026-12-07 and under the current one (`training.step_indices`).

    .venv/bin/python scripts/data_order_overlap.py --n 800 --batch 8 --warmup 40 --steps 60 --seed 0

Before 2026-12-07 the SFT baseline and the actor warm-up took TRL's own random order (RandomSampler,
data_seed = seed), and the joint phase drew a permutation of its own from step 0 (what
`step_indices(n, seed, s, batch)` gives for s = 0, 1, ...), so it repeated warm-up examples. The script
records the old order by running TRL's SFTTrainer, built as `lora_sft.train_sft` built it then, on a tiny
random model over n numbered examples (the order depends on n, the seed and the batch, not on the text).
Now SFT, the warm-up and the joint phase walk one stream: the joint phase's steps are SFT's steps W..S-1.
"""

from __future__ import annotations

import argparse
import tempfile

from metatuner.config import load_config
from metatuner.lora_sft import sft_dataset, trl_common_args
from metatuner.models import load_model
from metatuner.tasks import Example, Task
from metatuner.testing import tiny_model_dir
from metatuner.training import step_indices


def trl_random_order(n: int, seed: int, batch: int, steps: int) -> list[int]:
    """The example indices TRL's SFTTrainer (default random sampler) consumed in `steps` steps."""
    from transformers import Trainer
    from trl import SFTConfig, SFTTrainer

    tmp = tempfile.mkdtemp()
    tiny_model_dir(f"{tmp}/m")
    cfg = load_config(None, [f"model.name={tmp}/m", f"seed={seed}", f"train.batch_size={batch}", "train.max_length=32",
                             "lora.target_modules=[q_proj]"])
    examples = [Example(query=f"<{i}>", answer="0", target="0") for i in range(n)]
    task = Task("order", "", examples, [], [], 4, lambda s: s, lambda a, e: {"correct": 0.0})
    model, tok = load_model(f"{tmp}/m")
    seen: list[int] = []
    real_step = Trainer.training_step

    def record(self, model, inputs, *args, **kwargs):
        for row in inputs["input_ids"]:
            text = tok.decode(row, skip_special_tokens=True)
            seen.append(int(text[text.index("<") + 1 : text.index(">")]))
        return real_step(self, model, inputs, *args, **kwargs)

    Trainer.training_step = record
    try:
        from metatuner.lora import peft_lora_config

        args = SFTConfig(**trl_common_args(cfg, f"{tmp}/out", steps, 1e-4, model.device), max_length=32,
                         completion_only_loss=True, packing=False)
        SFTTrainer(model=model, args=args, train_dataset=sft_dataset(task, examples, ""), processing_class=tok,
                   peft_config=peft_lora_config(model, cfg.lora, cfg.model.name)).train()
    finally:
        Trainer.training_step = real_step
    return seen


def report(name: str, sft: list[int], warm: list[int], joint: list[int], batch: int, warm_steps: int) -> None:
    sft_tail = sft[warm_steps * batch :]
    print(f"{name}: SFT sees {len(set(sft))} distinct examples in {len(sft)}; MetaTuner {len(set(warm) | set(joint))} "
          f"(warm-up {len(set(warm))}, joint phase {len(joint)} of which {sum(i in set(warm) for i in joint)} repeat the "
          f"warm-up's); joint steps equal to SFT's steps {warm_steps + 1}-{len(sft) // batch}: "
          f"{sum(sorted(joint[s:s + batch]) == sorted(sft_tail[s:s + batch]) for s in range(0, len(joint), batch))} of "
          f"{len(joint) // batch}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=800, help="training examples")
    ap.add_argument("--batch", type=int, default=8, help="examples per optimizer step")
    ap.add_argument("--warmup", type=int, default=40, help="MetaTuner's warm-up steps (warmup.max_steps)")
    ap.add_argument("--steps", type=int, default=60, help="total steps (train.max_steps)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    old_sft = trl_random_order(a.n, a.seed, a.batch, a.steps)
    old_joint = [i for s in range(a.steps - a.warmup) for i in step_indices(a.n, a.seed, s, a.batch)]
    report("before (TRL's order; the joint phase's own)", old_sft, old_sft[: a.warmup * a.batch], old_joint, a.batch,
           a.warmup)
    new_sft = [i for s in range(a.steps) for i in step_indices(a.n, a.seed, s, a.batch)]
    report("now (one stream)", new_sft, new_sft[: a.warmup * a.batch], new_sft[a.warmup * a.batch :], a.batch, a.warmup)


if __name__ == "__main__":
    main()
