"""Tasks trained in sequence (LoRA SFT per stage), with SAPO prompt selection and a forgetting report.

    metatuner train method=continual continual.tasks=[chain_sum,basic_arithmetic] prompt_selection=sapo

Each stage: (SAPO: select the training prompt with the current model) -> LoRA SFT on that task
(TRL) -> merge the adapter -> evaluate on every task seen so far. `train.max_steps` is the total
over all stages, split evenly (earlier stages take the remainder); train_log.jsonl logs every stage.
With sapo.reselect_steps=N a stage is itself split into sub-stages of N steps with re-selection
before each. Writes continual.json (accuracy matrix, forgetting, prompts chosen) and
continual.md; metrics.json/predictions.jsonl hold the last task's evaluation.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from metatuner.config import Config
from metatuner.errors import MetatunerError
from metatuner.io import atomic_write_text, write_json
from metatuner.lora_sft import examples_per_step, split_steps
from metatuner.sapo import staged_sft
from metatuner.tasks import Task, load_task
from metatuner.train_log import open_train_log


def task_config(cfg: Config, name: str):
    tc = copy.deepcopy(cfg.task)
    tc.name = name
    tc.train_tasks = []
    if name != cfg.task.name:
        tc.params = dict(cfg.task.params_by_task.get(name) or {})
        tc.prompt = ""
        tc.path = ""
    return tc


def forgetting(acc: list[list[float]]) -> list[float]:
    """Per task t (all but the last): accuracy right after its own stage minus after the last stage."""
    last = acc[-1]
    return [acc[t][t] - last[t] for t in range(len(acc) - 1)]


def run(cfg: Config) -> dict:
    from metatuner.models import load_from_config
    from metatuner.prompts import optimizer_llm
    from metatuner.evaluate import evaluate
    from metatuner.run import final_eval, is_main_process, start_run

    t0 = time.time()
    if not cfg.continual.tasks:
        raise MetatunerError("continual.tasks: expected at least one task name, got []")
    # every stage's task is loaded and checked before anything is written (start_run writes config.yaml)
    stage_tasks = [load_task(task_config(cfg, name), cfg.seed) for name in cfg.continual.tasks]
    for name, t in zip(cfg.continual.tasks, stage_tasks):
        if not t.train:
            raise MetatunerError(f"continual.tasks: task {name!r} has an empty train split (task.train_size="
                                 f"{cfg.task.train_size})")
    start_run(cfg)
    out = Path(cfg.output_dir)
    model, tok = load_from_config(cfg.model)
    gen, gtok = (None, None)
    if cfg.prompt_selection == "sapo":
        gen, gtok = optimizer_llm(cfg, model, tok)
        if gen is model:  # paraphrase with a frozen copy: the actor changes between stages
            gen, gtok = load_from_config(cfg.model)
    tasks: list[Task] = []
    acc: list[list[float]] = []
    stages, tokens, steps_taken = [], 0, 0
    log = open_train_log(out, append=False)
    budget = split_steps(cfg.train.max_steps, len(cfg.continual.tasks))
    for i, (name, task) in enumerate(zip(cfg.continual.tasks, stage_tasks)):
        p_tilde = task.prompt
        model, sels, st = staged_sft(cfg, model, tok, task, budget[i], out / f"stage{i}_{name}", gen, gtok, log=log,
                                     phase=f"stage{i}_{name}")
        tokens += st["tokens"]
        steps_taken += st["steps"]
        tasks.append(task)
        row = []
        with torch.no_grad():
            for t in tasks:
                exs = t.test[: cfg.eval.limit or None]
                _, m = evaluate(model, tok, t, exs, t.prompt, batch_size=cfg.eval.batch_size, progress=is_main_process(),
                                desc=f"eval {t.name} after stage {i}")
                row.append(m["accuracy"])
        acc.append(row)
        stages.append({"task": name, "p_tilde": p_tilde, "prompt": task.prompt, "train_steps": st["steps"],
                       "selections": [{"at_step": s["at_step"], "prompt": s["prompt"],
                                       "candidates": list(zip(s["candidates"], s["losses"]))} for s in sels],
                       "accuracy_after": dict(zip([t.name for t in tasks], row))})
        print(f"[continual] stage {i} ({name}): " + ", ".join(f"{t.name}={a:.3f}" for t, a in zip(tasks, row)), flush=True)
    fg = forgetting(acc)
    report = {"tasks": list(cfg.continual.tasks), "prompt_selection": cfg.prompt_selection, "accuracy": acc,
              "forgetting": dict(zip(cfg.continual.tasks[:-1], fg)),
              "mean_forgetting": sum(fg) / len(fg) if fg else 0.0, "stages": stages,
              "wall_seconds": round(time.time() - t0, 1)}
    if is_main_process():
        write_json(out / "continual.json", report)
        names = list(cfg.continual.tasks)
        lines = ["| after stage | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for i, row in enumerate(acc):
            cells = [f"{100 * a:.1f}" for a in row] + ["" for _ in names[len(row):]]
            lines.append(f"| {i}: {names[i]} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append(f"forgetting (points): " + ", ".join(f"{n}={100 * f:.1f}" for n, f in zip(names, fg)))
        atomic_write_text(out / "continual.md", "\n".join(lines) + "\n")
    last = tasks[-1]
    with torch.no_grad():
        return final_eval(cfg, model, tok, last, last.prompt, extra={
            "continual_tasks": names if is_main_process() else list(cfg.continual.tasks),
            "accuracy_matrix": acc, "mean_forgetting": report["mean_forgetting"],
            "train_steps": steps_taken, "train_examples": steps_taken * examples_per_step(cfg),
            "train_tokens": tokens, "train_seconds": round(time.time() - t0, 1)})
