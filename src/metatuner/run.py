"""What every method's run shares: seeding, the resolved config, the task, the final evaluation.

Order inside `start_run`: the task is loaded and checked first; only then is anything written into
output_dir (config.yaml), so a command that fails on bad settings or data leaves an earlier run as it was.
Which output_dir may be written at all (lock, earlier runs) is `metatuner.rundir.claim`'s job.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from metatuner.config import Config, save_config
from metatuner.errors import MetatunerError
from metatuner.evaluate import evaluate
from metatuner.rundir import is_main_process, resolve_output_dir
from metatuner.tasks import Task, load_task

STALE_OUTPUTS = ("metrics.json", "predictions.jsonl")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def stage(text: str) -> None:
    """One progress line of the top-level command (main process)."""
    if is_main_process():
        print(f"[metatuner] {text}", flush=True)


def start_run(cfg: Config, needs_train: bool | None = None) -> Task:
    """Seed everything, load and check the task, then write output_dir/config.yaml (main process).

    needs_train: the method trains, so an empty train split is an error (default: every method but zero_shot).
    """
    from metatuner.checkpoints import previous_config, remember_previous_config, resume_mode, same_settings

    set_seed(cfg.seed)
    out = resolve_output_dir(cfg)
    stage(f"{cfg.method} on {cfg.task.name}: loading the task")
    task = load_task(cfg.task, cfg.seed)
    shift = generation_order_shift(cfg.task, cfg.seed)
    if shift:
        stage(f"task.split_order=generation: reasoning-gym makes question i of seed {shift} as question i+{shift} of "
              f"seed 0, so these splits are seed 0's shifted by {shift} (nearly the same questions); "
              "task.split_order=shuffled draws a split of its own per seed")
    if needs_train is None:
        needs_train = cfg.method != "zero_shot"
    if not task.train and needs_train:
        raise MetatunerError(f"task {cfg.task.name!r}: the train split is empty ({task.describe_split('train')})")
    eval_examples(cfg, task)  # an empty evaluation split fails now, not after training
    from metatuner.validate import validate_models

    validate_models(cfg)  # model.name / generator depth vs share_ratio / lora.layers: configs only, before any write
    from metatuner.models import resolve_device
    from metatuner.training import bf16_native

    dev = resolve_device(cfg.model.device)
    if needs_train and cfg.train.bf16 and not cfg.train.bf16_emulated and not bf16_native(dev):
        stage(f"train.bf16: this {dev.type} has no native bf16 (AVX512-BF16 or AMX on a CPU), so training runs in "
              "fp32 (emulated bf16 is far slower; train.bf16_emulated=true keeps it)")
    stage(f"task {task.name}: {len(task.train)} train / {len(task.validation)} validation / {len(task.test)} test examples")
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        remember_previous_config(out)
        prev = previous_config(out)
        fresh = getattr(cfg, "overwrite", False) and resume_mode(cfg.resume_from_checkpoint) == "false"
        if fresh or (prev is not None and not same_settings(prev, cfg)):
            for name in STALE_OUTPUTS:  # the earlier run's results must not sit beside the new settings
                (out / name).unlink(missing_ok=True)
        save_config(cfg, out / "config.yaml")
    return task


def generation_order_shift(tc, seed: int) -> int:
    """The split seed of a reasoning-gym task cut in generation order (0: none, or another order or task).
    reasoning-gym seeds question i with seed + i, so such a seed's splits are seed 0's shifted by it."""
    from metatuner.tasks.loading import BENCHMARKS, FILE_TASKS

    if getattr(tc, "split_order", "shuffled") != "generation" or tc.name in BENCHMARKS or tc.name in FILE_TASKS:
        return 0
    return tc.split_seed if tc.split_seed is not None and tc.split_seed >= 0 else seed


def eval_examples(cfg: Config, task: Task):
    examples = task.split(cfg.eval.split)
    if cfg.eval.limit:
        examples = examples[: cfg.eval.limit]
    if not examples:
        raise MetatunerError(f"task {cfg.task.name!r}: the {cfg.eval.split} split is empty")
    return examples


UNTRAINED = ("zero_shot", "opro", "inference_select")  # methods that train no weights


def final_eval(cfg: Config, model, tokenizer, task: Task, prompts=None, batch_context=None, extra: dict | None = None,
               output_dir: str | Path | None = None, return_records: bool = False, engine=None):
    """Evaluate with the run's inference settings and write predictions.jsonl + metrics.json.
    Returns the metrics, or (metrics, records) with return_records. generation.backend=vllm: through
    `engine` when given (the caller's, over the same weights), else `actor_engine`'s."""
    examples = eval_examples(cfg, task)
    if callable(prompts):
        prompts = prompts(examples)
    from metatuner.training import use_bf16

    metrics_extra = {"model": cfg.model.name, "method": cfg.method, "split": cfg.eval.split, "seed": cfg.seed,
                     "p_tilde": task.prompt}
    if cfg.method not in UNTRAINED:  # whether training ran under bf16 (methods that train no weights: no key)
        metrics_extra["train_bf16"] = use_bf16(cfg.train, getattr(model, "device", None) or torch.device("cpu"))
    metrics_extra.update(extra or {})
    from metatuner.inference import resolve_verifier

    stage(f"evaluating on {len(examples)} {cfg.eval.split} examples")
    metrics_extra["generation_backend"] = "hf"
    if cfg.generation.backend == "vllm" and batch_context is None:
        from metatuner.vllm_backend import actor_engine

        engine = engine or actor_engine(cfg, model, tokenizer)
        metrics_extra["generation_backend"] = "vllm"
    else:
        if cfg.generation.backend == "vllm":
            stage("generation.backend=vllm: the per-query-LoRA actor generates through hf")
        engine = None

    inf = cfg.inference
    records, metrics = evaluate(model, tokenizer, task, examples, prompts, batch_size=cfg.eval.batch_size,
                                strategy=inf.strategy, n=inf.n, temperature=inf.temperature, top_p=inf.top_p,
                                stop_threshold=inf.stop_threshold, stop_min=inf.stop_min, stop_chunk=inf.stop_chunk,
                                stop_score=inf.stop_score,
                                batch_context=batch_context,
                                verifier=resolve_verifier(inf.verifier, task),
                                output_dir=(output_dir or cfg.output_dir) if is_main_process() else None,
                                extra_metrics=metrics_extra, progress=is_main_process(), engine=engine)
    return (metrics, records) if return_records else metrics
