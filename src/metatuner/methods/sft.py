"""SFT baseline: LoRA SFT of the actor with the task prompt p~, through TRL's SFTTrainer.

Completion-only loss on conversational prompt/completion pairs rendered by the actor's own chat
template, exactly as evaluation renders them (metatuner.lora_sft). `train.max_steps` is the whole
budget. The adapter is saved in PEFT format (`output_dir/adapter/`); `train_log.jsonl` holds one
line per logged step. With `prompt_selection=sapo` the training prompt is SAPO's pick (with
`sapo.reselect_steps=N`, re-picked every N steps).

    metatuner train method=sft train.max_steps=50
"""

from __future__ import annotations

from pathlib import Path

import torch

from metatuner.config import Config
from metatuner.errors import MetatunerError
# sft_dataset / trl_common_args / train_sft stay importable from here (the old path) until MetaTuner imports lora_sft
from metatuner.lora_sft import examples_per_step, sft_dataset, train_sft, trl_common_args  # noqa: F401
from metatuner.sapo import maybe_select, staged_sft
from metatuner.tasks import Example, Task
from metatuner.train_log import open_train_log


def train_examples(cfg: Config, task: Task) -> list[Example]:
    if not task.train:
        raise MetatunerError(f"task {task.name!r}: the train split is empty")
    return task.train


def run(cfg: Config) -> dict:
    from metatuner.lora_sft import trainer_resume_path
    from metatuner.models import load_from_config
    from metatuner.run import final_eval, is_main_process, start_run

    task = start_run(cfg)
    model, tok = load_from_config(cfg.model)
    extra = {"p_tilde": task.prompt}  # SAPO below replaces task.prompt; the report compares with the task's own
    out = Path(cfg.output_dir)
    resume_from = trainer_resume_path(cfg, out)
    log = open_train_log(out, append=resume_from is not None)
    if cfg.prompt_selection != "none":
        # SAPO: train (and evaluate) with the paraphrase of p~ that has the lowest pre-update loss
        from metatuner.io import write_json
        from metatuner.prompts import optimizer_llm

        gen, gtok = optimizer_llm(cfg, model, tok)
        if gen is model:  # a frozen copy writes paraphrases (the actor changes between stages)
            gen, gtok = load_from_config(cfg.model)
        if cfg.sapo.reselect_steps > 0:
            model, sels, stats = staged_sft(cfg, model, tok, task, cfg.train.max_steps, out, gen, gtok, log=log)
            extra |= {"train_steps": stats["steps"], "train_examples": stats["steps"] * examples_per_step(cfg),
                     "train_tokens": stats["tokens"], "sapo_selections": [s["prompt"] for s in sels]}
            sel = sels[0] if sels else None
        else:
            sel = maybe_select(cfg, model, tok, task, gen, gtok)
        if is_main_process() and sel is not None:
            write_json(out / "sapo.json", sel)
        extra["sapo_losses"] = dict(zip(sel["candidates"], sel["losses"])) if sel else {}
    prompt = task.prompt
    if not extra.get("sapo_selections"):
        model = train_sft(cfg, model, tok, task, train_examples(cfg, task), prompt, out, cfg.train.max_steps,
                          cfg.train.lr, resume_from=resume_from, log=log)
        extra.update(model.train_metrics)
    with torch.no_grad():
        return final_eval(cfg, model, tok, task, prompt, extra={**extra, "prompt": prompt})
