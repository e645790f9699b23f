"""Zero-shot baseline: the model as loaded, answering with the task prompt p~ (nothing is trained).

    metatuner train method=zero_shot            # or: metatuner eval
    metatuner eval eval.split=validation inference.strategy=majority inference.n=8

Evaluates `eval.split` (default test) with the run's inference settings and writes config.yaml,
predictions.jsonl and metrics.json to output_dir.
"""

from __future__ import annotations

import torch

from metatuner.config import Config


def run(cfg: Config) -> dict:
    """Zero-shot evaluation of cfg.model with the task's prompt (task.prompt when set, else the task's p~)."""
    from metatuner.models import load_from_config
    from metatuner.run import final_eval, start_run

    task = start_run(cfg)  # checks the task and the evaluation split before writing config.yaml
    model, tok = load_from_config(cfg.model)
    with torch.no_grad():
        return final_eval(cfg, model, tok, task, task.prompt,
                          extra={"train_steps": 0, "train_examples": 0, "generation_calls": 0})
