"""Zero-shot baseline: the model as loaded, answering with the task prompt p~ (nothing is trained).

    metatuner train method=zero_shot            # or: metatuner eval
    metatuner eval eval.split=validation inference.strategy=majority inference.n=8

Evaluates `eval.split` (default test) with the run's inference settings and writes config.yaml,
predictions.jsonl and metrics.json to output_dir. Given a candidate pool (prompts.*), it answers with
the candidate that scores best on prompts.val_examples validation examples, so MetaTuner's pool
modes are compared with a zero-shot baseline that had the same prompts.
"""

from __future__ import annotations

import torch

from metatuner.config import Config


def run(cfg: Config) -> dict:
    """Zero-shot evaluation of cfg.model with the task's prompt (task.prompt when set, else the task's p~)."""
    from metatuner.models import load_from_config
    from metatuner.run import final_eval, start_run

    from metatuner.pool import best_on_validation, pool_for_baseline, pool_requested

    task = start_run(cfg)  # checks the task and the evaluation split before writing config.yaml
    model, tok = load_from_config(cfg.model)
    extra = {"train_steps": 0, "train_examples": 0, "generation_calls": 0}
    prompt = task.prompt
    with torch.no_grad():
        if pool_requested(cfg):
            pool = pool_for_baseline(cfg, task)
            prompt, accs = best_on_validation(model, tok, task, pool, cfg.prompts.val_examples, cfg.eval.batch_size)
            extra.update({"pool": pool, "pool_val_accuracy": accs, "prompt": prompt,
                          "generation_calls": len(pool) * min(cfg.prompts.val_examples, len(task.validation))})
        return final_eval(cfg, model, tok, task, prompt, extra=extra)
