"""BPO baseline (Cheng et al., 2023): a prompt rewriter trained by SFT on (prompt, better prompt) pairs.

"Better" comes from rollouts scored by the actor, as MetaTuner's D2: for each training query the
rewriter (the generator) samples rollout.n rewrites of (p~, x); the actor ranks them with p~
(correct first, then lower NLL of the reference); the best is the target. The rewriter is then
LoRA-SFT'd (TRL) on the pairs for bpo.max_steps steps (its own budget key: the actor is never
trained; train_log.jsonl, phase "rewriter"). At test time it rewrites each query's prompt (greedy)
and the actor, unchanged, answers.

    metatuner train method=bpo bpo.queries=64 bpo.max_steps=30 rollout.n=4
"""

from __future__ import annotations

import time

import torch

from metatuner.config import Config
from metatuner.io import write_jsonl
from metatuner.lora_sft import (add_callbacks, examples_per_step, trained_model, trainer_resume_path, trl_common_args,
                                 unsharded)
from metatuner.prompts import rank_prompts
from metatuner.rewrite import clean_prompt, rewrite_messages
from metatuner.sampling import sample_texts
from metatuner.train_log import open_train_log
from metatuner.training import use_bf16
from metatuner.vllm_backend import actor_engine


def rewrite(gen, gtok, p_tilde: str, examples, cfg: Config, n: int = 1, greedy: bool = True,
            desc: str | None = None) -> list[list[str]]:
    msgs = [rewrite_messages(p_tilde, ex.query) for ex in examples]
    outs = sample_texts(gen, gtok, msgs, n, cfg.generator.max_prompt_tokens, cfg.rollout.temperature,
                        cfg.rollout.top_p, cfg.rollout.batch_size, greedy=greedy, desc=desc)
    return [[clean_prompt(t, p_tilde) for t in o] for o in outs]


def run(cfg: Config) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from metatuner.lora import peft_lora_config
    from metatuner.models import load_from_config, load_model
    from metatuner.run import final_eval, is_main_process, start_run

    t0 = time.time()
    task = start_run(cfg)
    actor, tok = load_from_config(cfg.model)
    gen, gtok = load_model(cfg.generator.name or cfg.model.name, cfg.generator.dtype, cfg.model.device,
                           cfg.generator.trust_remote_code)
    queries = task.train[: cfg.bpo.queries]
    with torch.no_grad():
        cands = rewrite(gen, gtok, task.prompt, queries, cfg, n=cfg.rollout.n, greedy=False, desc="bpo rollouts")
        best = rank_prompts(actor, tok, task, queries, [[task.prompt] + c for c in cands], cfg.rollout.criterion,
                            cfg.rollout.batch_size, cfg.train.max_length, use_bf16(cfg.train, actor.device), desc="bpo ranking",
                            engine=actor_engine(cfg, actor, tok))  # vLLM answers with generation.backend=vllm
    pairs = [{"prompt": rewrite_messages(task.prompt, ex.query), "completion": [{"role": "assistant", "content": b[0]}]}
             for ex, b in zip(queries, best)]
    if is_main_process():
        write_jsonl(f"{cfg.output_dir}/bpo_pairs.jsonl", [{"query": ex.query, "better_prompt": b[0], "correct": b[1]}
                                                          for ex, b in zip(queries, best)])
    # the rewriter's LoRA SFT (TRL), LoRA over the generator's own linears
    steps, tokens = 0, 0
    rewriter = gen
    if cfg.bpo.max_steps > 0 and pairs:  # (the HF Trainer would read max_steps=0 as "train by epochs")
        args = SFTConfig(**trl_common_args(cfg, f"{cfg.output_dir}/rewriter", cfg.bpo.max_steps, cfg.bpo.lr, gen.device),
                         max_length=cfg.train.max_length,
                         completion_only_loss=True)
        gen.train()
        trainer = SFTTrainer(model=gen, args=args, train_dataset=Dataset.from_list(pairs), processing_class=gtok,
                             peft_config=peft_lora_config(gen, cfg.lora, cfg.generator.name or cfg.model.name))
        ckpt = trainer_resume_path(cfg, f"{cfg.output_dir}/rewriter")
        add_callbacks(trainer, cfg, open_train_log(cfg.output_dir, append=ckpt is not None), "rewriter")
        steps = int(trainer.train(resume_from_checkpoint=ckpt).global_step)
        tokens = int(trainer.state.num_input_tokens_seen or 0)
        rewriter = unsharded(trained_model(trainer))  # FSDP: a plain copy that can generate and be saved
        if is_main_process():
            rewriter.save_pretrained(f"{cfg.output_dir}/rewriter/adapter")
    rewriter.eval()
    from metatuner.run import eval_examples

    with torch.no_grad():
        exs = eval_examples(cfg, task)
        prompts = [c[0] for c in rewrite(rewriter, gtok, task.prompt, exs, cfg, desc="bpo rewrites (test)")]
        return final_eval(cfg, actor, tok, task, prompts, extra={
            "pairs": len(pairs), "pairs_rewritten": sum(b[0] != task.prompt for b in best) / max(1, len(best)),
            "train_steps": steps, "train_examples": steps * examples_per_step(cfg), "train_tokens": tokens,
            "generation_calls": len(queries) * (cfg.rollout.n + (cfg.rollout.n + 1) * (cfg.rollout.criterion == "answer")),
            "rewrite_calls_eval": len(exs),
            "train_seconds": round(time.time() - t0, 1)})
