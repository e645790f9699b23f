"""OPRO baseline (Yang et al., 2023): an LLM optimizer proposes instructions from a meta-prompt.

Each step the meta-prompt lists the best previous instructions with their scores in ascending
order, a few training problems with their answers, and asks for a new, different, better
instruction in <INS></INS>. Several candidates are sampled at temperature 1; each is scored by
the actor's greedy accuracy on a training subset; the best by training accuracy is kept and
evaluated on the test split. The generator is the optimizer LLM; the actor is never trained.
The meta-prompt and the search loop live in metatuner.metaprompt (BetterTogether and
inference_select use them too).

    metatuner train method=opro opro.steps=3 opro.candidates=4 opro.subset=32
"""

from __future__ import annotations

import time

import torch

from metatuner.config import Config
from metatuner.metaprompt import optimize
from metatuner.pool import build_pool, pool_requested
from metatuner.prompts import optimizer_llm
from metatuner.vllm_backend import actor_engine


def run(cfg: Config) -> dict:
    from metatuner.models import load_from_config
    from metatuner.run import final_eval, is_main_process, start_run

    t0 = time.time()
    task = start_run(cfg)
    actor, tok = load_from_config(cfg.model)
    gen, gtok = optimizer_llm(cfg, actor, tok)
    path = f"{cfg.output_dir}/opro_history.jsonl" if is_main_process() else None
    engine = actor_engine(cfg, actor, tok)  # None with generation.backend=hf
    with torch.no_grad():
        seeds = build_pool(cfg, task, gen, gtok, actor, tok) if pool_requested(cfg) else None  # the pool seeds OPRO
        best, acc, rows, calls = optimize(cfg, actor, tok, gen, gtok, task, path, seeds=seeds, engine=engine)
        scored = len(rows) * min(cfg.opro.subset, len(task.train))
        return final_eval(cfg, actor, tok, task, best, extra={
            "prompt": best, "train_accuracy": acc, "instructions_scored": len(rows), "generation_calls": calls + scored,
            "train_steps": 0, "train_examples": 0, "train_seconds": round(time.time() - t0, 1)})
