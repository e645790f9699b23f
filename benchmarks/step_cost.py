"""Cost of one MetaTuner-J joint training step vs one LoRA SFT step of the actor.

Same model as generator and actor (default: the embedded SmolLM2-135M), same batch of training
queries, bf16 autocast. Steps are interleaved and repeated; medians are reported. Rollouts
(prompt sampling from phi_p') are excluded from the joint step and timed on their own.

    .venv/bin/python benchmarks/step_cost.py [--batch 8] [--reps 5] [--model NAME] [--device cpu]

The last line printed is JSON: joint_ms, sft_ms, ratio_joint_vs_sft, rollout_prompts_per_s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--task", default="chain_sum")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rollout-prompts", type=int, default=16)
    ap.add_argument("overrides", nargs="*", help="config key=value overrides (e.g. generator.lora_rank=8)")
    args = ap.parse_args()

    from metatuner.config import load_config
    from metatuner.lora import static_lora
    from metatuner.methods.metatuner import MetaTunerSystem, sample_prompts
    from metatuner.models import load_model
    from metatuner.tasks import load_task
    from metatuner.training import actor_batch, autocast, forward_nll

    cfg = load_config(None, [f"model.name={args.model}", f"task.name={args.task}", f"model.device={args.device}", *args.overrides,
                             "task.train_size=64", "task.test_size=8", "task.val_size=8"])
    torch.manual_seed(0)
    task = load_task(cfg.task, 0)
    exs = task.train[: args.batch]

    # joint system: its own actor and generator copies
    actor, tok = load_model(cfg.model.name, device=args.device)
    gen, gtok = load_model(cfg.model.name, device=args.device)
    system = MetaTunerSystem(cfg, actor, tok, gen, gtok, task)
    params = [p for g in system.trainable_groups() for p in g["params"]]
    opt = torch.optim.AdamW(system.trainable_groups())
    system.gen.model.train()
    prompts = [task.prompt] * len(exs)
    best = [task.prompt] * len(exs)

    # SFT: a third copy with a static PEFT LoRA of the same targets and rank
    sft_model, _ = load_model(cfg.model.name, device=args.device)
    sft_model = static_lora(sft_model, cfg.lora)
    sft_model.train()
    sft_opt = torch.optim.AdamW([p for p in sft_model.parameters() if p.requires_grad], lr=1e-4)
    dev = sft_model.device

    def joint_step():
        task_loss, reg = system.joint_losses(exs, prompts, best)
        loss = task_loss + cfg.train.alpha * reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    def sft_step():
        with autocast(True, dev):
            batch = actor_batch(tok, task, prompts, exs, cfg.train.max_length, dev)
            loss = forward_nll(sft_model, batch)[0].mean()
        sft_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in sft_model.parameters() if p.requires_grad], 1.0)
        sft_opt.step()

    def timed(fn):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return (time.perf_counter() - t) * 1000

    joint_step(), sft_step()  # warm-up
    j, s = [], []
    for _ in range(args.reps):
        j.append(timed(joint_step))
        s.append(timed(sft_step))
    system.gen.model.eval()
    rex = task.train[: args.rollout_prompts]
    t = time.perf_counter()
    sample_prompts(system, rex, 1)
    rollout_rate = len(rex) / (time.perf_counter() - t)

    gen_len = len(gtok(system.gen_prefixes(exs[:1]), add_special_tokens=False)["input_ids"][0])
    act_len = actor_batch(tok, task, prompts[:1], exs[:1])["input_ids"].shape[1]
    print(f"batch {args.batch}; generator prefix {gen_len} tokens, actor sequence {act_len} tokens; device {dev}")
    print(f"joint step ms: {[round(x) for x in j]}")
    print(f"sft step ms:   {[round(x) for x in s]}")
    res = {"joint_ms": round(statistics.median(j), 1), "sft_ms": round(statistics.median(s), 1)}
    res["ratio_joint_vs_sft"] = round(res["joint_ms"] / res["sft_ms"], 3)
    res["rollout_prompts_per_s"] = round(rollout_rate, 2)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
