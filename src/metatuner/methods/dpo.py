"""DPO baseline: LoRA SFT of the actor, then DPO (TRL) on pairs from the actor's own samples.

Budget: `train.max_steps` optimizer steps in all; the first `dpo.sft_steps` are SFT (-1: round(2/3)
of train.max_steps), the rest DPO. train_log.jsonl holds both phases (phase "sft" and "dpo").

For each training query the SFT policy samples dpo.k answers; answers the task scores correct
and incorrect form (chosen, rejected) pairs for that same query (at most dpo.pairs_per_query).
DPO starts from the SFT adapter, and TRL keeps a frozen copy of it as the reference ("ref"
adapter on the same base model, no second model in memory).

    metatuner train method=dpo train.max_steps=30 dpo.sft_steps=20 dpo.k=4
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from metatuner.config import Config
from metatuner.errors import MetatunerError
from metatuner.generation import chat_text
from metatuner.io import write_jsonl
from metatuner.lora_sft import (add_callbacks, examples_per_step, trained_model, train_sft, trainer_resume_path,
                                 trl_common_args, unsharded)
from metatuner.sampling import sample_answers
from metatuner.train_log import open_train_log


def build_pairs(task, examples, samples: list[list[str]], max_pairs: int, seed: int = 0) -> list[dict]:
    """(correct, incorrect) pairs of the same query, deduplicated; queries with no such pair yield none."""
    rng = random.Random(seed)
    pairs = []
    for ex, gens in zip(examples, samples):
        gens = list(dict.fromkeys(gens))
        good = [g for g in gens if task.score(task.extract_for(g, ex), ex)["correct"]]
        bad = [g for g in gens if not task.score(task.extract_for(g, ex), ex)["correct"]]
        combos = [(g, b) for g in good for b in bad]
        rng.shuffle(combos)
        for g, b in combos[:max_pairs]:
            pairs.append({"query": ex.query, "chosen": g, "rejected": b})
    return pairs


def pair_lengths(tok, task, prompt: str, pair: dict) -> tuple[int, int, int]:
    """Token counts of a preference pair: (rendered prompt, chosen, rejected)."""
    n_prompt = len(tok(chat_text(tok, task.render(prompt, pair["query"])), add_special_tokens=False)["input_ids"])
    return (n_prompt, *(len(tok(pair[k], add_special_tokens=False)["input_ids"]) for k in ("chosen", "rejected")))


def pair_tokens(tok, task, prompt: str, pair: dict) -> int:
    """Tokens of one preference pair as DPO trains on it: prompt + chosen and prompt + rejected."""
    n_prompt, n_chosen, n_rejected = pair_lengths(tok, task, prompt, pair)
    return 2 * n_prompt + n_chosen + n_rejected


def drop_long_pairs(tok, task, prompt: str, pairs: list[dict], max_length: int) -> tuple[list[dict], int]:
    """Pairs whose rendered prompt + longer answer fits in max_length tokens (long outliers cause OOM, trl #2452)."""
    kept = []
    for p in pairs:
        n_prompt, n_chosen, n_rejected = pair_lengths(tok, task, prompt, p)
        if n_prompt + max(n_chosen, n_rejected) + 2 <= max_length:
            kept.append(p)
    return kept, len(pairs) - len(kept)


def budget(cfg: Config) -> tuple[int, int]:
    """(SFT steps, DPO steps) out of train.max_steps (common budget: one total for the whole method)."""
    total = cfg.train.max_steps
    sft = int(round(2 * total / 3)) if cfg.dpo.sft_steps < 0 else cfg.dpo.sft_steps
    if sft > total:
        raise MetatunerError(f"dpo.sft_steps: {cfg.dpo.sft_steps} SFT steps exceed train.max_steps={total} "
                             f"(the total of SFT + DPO steps); expected -1 or 0..{total}")
    return sft, total - sft


def run(cfg: Config) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from metatuner.models import load_from_config
    from metatuner.run import final_eval, is_main_process, start_run

    t0 = time.time()
    sft_budget, dpo_budget = budget(cfg)
    task = start_run(cfg)
    model, tok = load_from_config(cfg.model)
    resume_from = trainer_resume_path(cfg, f"{cfg.output_dir}/sft")
    log = open_train_log(cfg.output_dir, append=resume_from is not None)
    policy = train_sft(cfg, model, tok, task, task.train, task.prompt, f"{cfg.output_dir}/sft", sft_budget, cfg.train.lr,
                       resume_from=resume_from, log=log, phase="sft")
    sft_steps = policy.train_metrics["train_steps"]
    sft_tokens = policy.train_metrics.get("train_tokens", 0)
    queries = task.train[: cfg.dpo.queries]
    samples = sample_answers(policy, tok, task, queries, task.prompt, cfg.dpo.k, cfg.dpo.temperature, cfg.eval.batch_size)
    pairs = build_pairs(task, queries, samples, cfg.dpo.pairs_per_query, cfg.seed)
    pairs, dropped = drop_long_pairs(tok, task, task.prompt, pairs, cfg.train.max_length)
    if is_main_process():
        write_jsonl(f"{cfg.output_dir}/dpo_pairs.jsonl", pairs)
    dpo_steps, dpo_tokens = 0, 0
    if pairs and dpo_budget > 0:
        data = Dataset.from_list([{"prompt": task.render(task.prompt, p["query"]),
                                   "chosen": [{"role": "assistant", "content": p["chosen"]}],
                                   "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])
        args = DPOConfig(**trl_common_args(cfg, f"{cfg.output_dir}/dpo", dpo_budget, cfg.dpo.lr, policy.device),
                         beta=cfg.dpo.beta, loss_type=list(cfg.dpo.loss_type), max_length=cfg.train.max_length)
        policy.train()
        for n, p in policy.named_parameters():
            if "lora_" in n:
                p.requires_grad_(True)
        trainer = add_callbacks(DPOTrainer(model=policy, args=args, train_dataset=data, processing_class=tok), cfg, log,
                                "dpo")
        # the DPO phase resumes only if it had started (a run killed during SFT has no dpo/checkpoint-N yet)
        started = any(Path(f"{cfg.output_dir}/dpo").glob("checkpoint-*"))
        ckpt = trainer_resume_path(cfg, f"{cfg.output_dir}/dpo") if started else None
        dpo_steps = int(trainer.train(resume_from_checkpoint=ckpt).global_step)
        policy = unsharded(trained_model(trainer))
        # TRL's DPO batches carry no input_ids, so Trainer does not count tokens: steps x batch x mean pair
        mean_pair = sum(pair_tokens(tok, task, task.prompt, p) for p in pairs) / len(pairs)
        dpo_tokens = int(round(dpo_steps * examples_per_step(cfg) * mean_pair))
    if is_main_process():  # the final policy (the SFT adapter itself when there was nothing to train on)
        policy.save_pretrained(f"{cfg.output_dir}/adapter", selected_adapters=["default"])
        tok.save_pretrained(f"{cfg.output_dir}/adapter")
    policy.eval()
    with torch.no_grad():
        return final_eval(cfg, policy, tok, task, task.prompt, extra={
            "pairs": len(pairs), "pairs_dropped_too_long": dropped, "sft_steps": sft_steps, "dpo_steps": dpo_steps,
            "train_steps": sft_steps + dpo_steps,
            "train_examples": (sft_steps + dpo_steps) * examples_per_step(cfg), "train_tokens": sft_tokens + dpo_tokens,
            "sft_tokens": sft_tokens, "dpo_tokens": dpo_tokens,
            "generation_calls": len(queries) * cfg.dpo.k, "train_seconds": round(time.time() - t0, 1)})
