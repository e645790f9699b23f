"""Zero-shot baseline: the model as loaded, answering with the task prompt p~ (nothing is trained).

    metatuner train method=zero_shot            # or: metatuner eval
    metatuner eval eval.split=validation inference.strategy=majority inference.n=8

Evaluates `eval.split` (default test) with the run's inference settings and writes config.yaml,
predictions.jsonl and metrics.json to output_dir.
"""

from __future__ import annotations

import os

from metatuner.config import Config, save_config
from metatuner.errors import MetatunerError


def run(cfg: Config) -> dict:
    """Zero-shot evaluation of cfg.model with the task's prompt (or task.prompt)."""
    from metatuner.evaluate import evaluate
    from metatuner.inference import resolve_verifier
    from metatuner.models import load_from_config
    from metatuner.run import is_main_process, set_seed
    from metatuner.tasks import load_task

    set_seed(cfg.seed)
    if is_main_process():
        os.makedirs(cfg.output_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    task = load_task(cfg.task, cfg.seed)
    examples = task.split(cfg.eval.split)
    if cfg.eval.limit:
        examples = examples[: cfg.eval.limit]
    if not examples:
        raise MetatunerError(f"task {cfg.task.name!r}: the {cfg.eval.split} split is empty")
    model, tok = load_from_config(cfg.model)
    _, metrics = evaluate(model, tok, task, examples, task.prompt, batch_size=cfg.eval.batch_size,
                          strategy=cfg.inference.strategy, n=cfg.inference.n, temperature=cfg.inference.temperature,
                          top_p=cfg.inference.top_p, output_dir=cfg.output_dir if is_main_process() else None,
                          verifier=resolve_verifier(cfg.inference.verifier, task),
                          extra_metrics={"model": cfg.model.name, "method": "zero_shot", "split": cfg.eval.split,
                                         "seed": cfg.seed, "p_tilde": task.prompt, "train_steps": 0,
                                         "train_examples": 0, "generation_calls": 0},
                          progress=is_main_process())
    return metrics
