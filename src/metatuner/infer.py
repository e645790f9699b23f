"""Answer new queries with what a finished run folder holds (`metatuner infer run_dir=DIR query=...`).

The run's config.yaml gives the model and the task's rules (prompt rendering, answer extraction,
generation budget); the training data is never read. What the run trained:

- metatuner_*: final/ (the generator and F) through `metatuner.methods.metatuner.load_system`/`answer`;
- sft, dpo: the PEFT adapter in adapter/ (sft with SAPO: stage_step*/adapter, merged in order);
- bettertogether: w*/adapter (one per w step, merged in order); continual: stage*/stage_step*/adapter;
- zero_shot, opro, bpo, inference_select: the base model.

The prompt is the one the run chose (metrics.json "prompt"), else the task's p~. Damaged files
(truncated safetensors, unreadable config or metrics) end in one line naming the file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from metatuner.checkpoints import check_folder
from metatuner.config import Config, load_saved_config
from metatuner.errors import MetatunerError

PROMPT_ONLY = ("zero_shot", "opro", "bpo", "inference_select")
ADAPTER_GLOBS = {
    "sft": ["adapter", "stage_step*/adapter"],
    "dpo": ["adapter"],
    "bettertogether": ["w*/adapter"],
    "continual": ["stage*/stage_step*/adapter"],
}


def run_config(run_dir: str | Path) -> Config:
    """The run's resolved settings (config.yaml); one-line errors when the folder is not a run."""
    d = Path(run_dir)
    if not d.is_dir():
        raise MetatunerError(f"run_dir={run_dir}: not a folder (expected the output_dir of a finished run)")
    path = d / "config.yaml"
    if not path.is_file():
        raise MetatunerError(f"run_dir={run_dir}: no config.yaml (expected the output_dir of a finished run)")
    try:
        return load_saved_config(path)
    except UnicodeDecodeError:
        raise MetatunerError(f"{path}: not a UTF-8 text file (damaged?)") from None


def task_rules_of(cfg: Config):
    """The task's rules (prompt, rendering, extraction, budget) without its data."""
    if cfg.method == "continual" and cfg.continual.tasks:
        import dataclasses

        last = cfg.continual.tasks[-1]
        params = cfg.task.params if last == cfg.task.name else cfg.task.params_by_task.get(last, {})
        tcfg = dataclasses.replace(cfg.task, name=last, params=params)
    else:
        tcfg = cfg.task
    from metatuner.tasks import task_rules

    return task_rules(tcfg)


def _natural(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def adapter_dirs(run_dir: Path, method: str) -> list[Path]:
    """The PEFT adapters that make up the run's final model, in the order they were merged."""
    for pattern in ADAPTER_GLOBS.get(method, []):
        found = sorted((p for p in run_dir.glob(pattern) if p.is_dir()), key=_natural)
        if found:
            return found
    return []


def chosen_prompt(run_dir: Path, task) -> str:
    path = run_dir / "metrics.json"
    if not path.is_file():
        return task.prompt
    try:
        metrics = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise MetatunerError(f"{path}: unreadable JSON ({e}); the file is damaged") from None
    prompt = metrics.get("prompt") if isinstance(metrics, dict) else None
    return prompt if isinstance(prompt, str) else task.prompt


def load_actor(cfg: Config, run_dir: Path):
    """The base model with the run's adapters merged in; (model, tokenizer, adapters used)."""
    from metatuner.models import load_from_config

    adapters = adapter_dirs(run_dir, cfg.method)
    if not adapters and cfg.method not in PROMPT_ONLY:
        wanted = " or ".join(ADAPTER_GLOBS.get(cfg.method, ["adapter"]))
        raise MetatunerError(f"run_dir={run_dir}: method={cfg.method} but no {wanted}/ folder (did the run finish?)")
    for a in adapters:
        if not (a / "adapter_config.json").is_file():
            raise MetatunerError(f"{a}: no adapter_config.json (the adapter folder is incomplete)")
        check_folder(a)
    model, tok = load_from_config(cfg.model)
    if adapters:
        from peft import PeftModel

        for a in adapters:
            try:
                model = PeftModel.from_pretrained(model, str(a)).merge_and_unload()
            except (OSError, ValueError, RuntimeError) as e:
                raise MetatunerError(f"{a}: cannot load the adapter ({str(e).splitlines()[0]})") from None
        model.eval()
    return model, tok, adapters


@torch.no_grad()
def answer_with_prompt(model, tok, task, prompt: str, queries: list[str], batch_size: int) -> list[dict]:
    from metatuner.generation import chat_text, generate_texts

    out = []
    for s in range(0, len(queries), max(1, batch_size)):
        chunk = queries[s : s + max(1, batch_size)]
        texts = [chat_text(tok, task.render(prompt, q)) for q in chunk]
        gens = generate_texts(model, tok, texts, task.max_new_tokens)[0]
        for q, g in zip(chunk, gens):
            out.append({"query": q, "prompt": prompt, "generation": g[0], "answer": task.extract(g[0])})
    return out


def infer(run_dir: str | Path, queries: list[str]) -> list[dict]:
    """Rows {query, prompt, generation, answer} for `queries`, answered by the run in run_dir."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    if cfg.method.startswith("metatuner"):
        final = run_dir / "final"
        if not final.is_dir():
            raise MetatunerError(f"run_dir={run_dir}: method={cfg.method} but no final/ folder (did the run finish?)")
        check_folder(final)
        from metatuner.methods.metatuner import answer, load_system

        return answer(load_system(run_dir), queries)
    task = task_rules_of(cfg)
    model, tok, _ = load_actor(cfg, run_dir)
    return answer_with_prompt(model, tok, task, chosen_prompt(run_dir, task), queries, cfg.eval.batch_size)
