"""What every method's run shares: seeding, the resolved config, the task, the final evaluation."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from metatuner.config import Config, save_config
from metatuner.errors import MetatunerError
from metatuner.evaluate import evaluate
from metatuner.tasks import Task, load_task


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def start_run(cfg: Config) -> Task:
    """Seed everything, write output_dir/config.yaml (main process), load the task."""
    set_seed(cfg.seed)
    if is_main_process():
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    task = load_task(cfg.task, cfg.seed)
    if not task.train and cfg.method not in ("zero_shot",):
        raise MetatunerError(f"task {cfg.task.name!r}: the train split is empty (task.train_size={cfg.task.train_size})")
    return task


def eval_examples(cfg: Config, task: Task):
    examples = task.split(cfg.eval.split)
    if cfg.eval.limit:
        examples = examples[: cfg.eval.limit]
    if not examples:
        raise MetatunerError(f"task {cfg.task.name!r}: the {cfg.eval.split} split is empty")
    return examples


def final_eval(cfg: Config, model, tokenizer, task: Task, prompts=None, batch_context=None, extra: dict | None = None,
               output_dir: str | Path | None = None) -> dict:
    """Evaluate with the run's inference settings and write predictions.jsonl + metrics.json."""
    examples = eval_examples(cfg, task)
    if callable(prompts):
        prompts = prompts(examples)
    metrics_extra = {"model": cfg.model.name, "method": cfg.method, "split": cfg.eval.split, "seed": cfg.seed,
                     "p_tilde": task.prompt}
    metrics_extra.update(extra or {})
    from metatuner.inference import resolve_verifier

    _, metrics = evaluate(model, tokenizer, task, examples, prompts, batch_size=cfg.eval.batch_size,
                          strategy=cfg.inference.strategy, n=cfg.inference.n, temperature=cfg.inference.temperature,
                          top_p=cfg.inference.top_p, batch_context=batch_context,
                          verifier=resolve_verifier(cfg.inference.verifier, task),
                          output_dir=(output_dir or cfg.output_dir) if is_main_process() else None,
                          extra_metrics=metrics_extra, progress=is_main_process())
    return metrics
