"""SFT baseline: LoRA SFT of the actor with the task prompt p~, through TRL's SFTTrainer.

Completion-only loss on conversational prompt/completion pairs rendered by the actor's own chat
template, exactly as evaluation renders them. The adapter is saved in PEFT format
(`output_dir/adapter/`). `train_sft()` is also MetaTuner's actor warm-up.

    metatuner train method=sft train.max_steps=50
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from metatuner.config import Config
from metatuner.lora import peft_lora_config
from metatuner.tasks import Example, Task


def sft_dataset(task: Task, examples: list[Example], prompts: list[str] | str):
    """TRL conversational prompt-completion dataset."""
    from datasets import Dataset

    if isinstance(prompts, str):
        prompts = [prompts] * len(examples)
    return Dataset.from_list([
        {"prompt": task.render(p, ex.query), "completion": [{"role": "assistant", "content": ex.target}]}
        for p, ex in zip(prompts, examples)
    ])


def trl_common_args(cfg: Config, output_dir: str | Path, max_steps: int, lr: float, use_cpu: bool) -> dict:
    """TrainingArguments shared by our TRL-based trainers."""
    accum = max(1, cfg.train.grad_accum)
    return dict(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=max(1, cfg.train.batch_size // accum),
        gradient_accumulation_steps=accum,
        learning_rate=lr,
        lr_scheduler_type=cfg.train.scheduler if cfg.train.scheduler != "constant" else "constant",
        warmup_steps=int(round(cfg.train.lr_warmup_ratio * max_steps)),
        weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.max_grad_norm or 1e9,
        bf16=cfg.train.bf16,
        use_cpu=use_cpu,
        logging_steps=cfg.train.log_steps,
        save_strategy="steps" if cfg.train.save_steps else "no",
        save_steps=cfg.train.save_steps or 500,
        save_total_limit=cfg.train.save_total_limit,
        report_to=["tensorboard"] if cfg.train.report_to == "tensorboard" else "none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        disable_tqdm=int(os.environ.get("RANK", "0")) != 0,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        gradient_checkpointing=cfg.train.gradient_checkpointing,
    )


def train_sft(cfg: Config, model, tokenizer, task: Task, examples: list[Example], prompts: list[str] | str,
              output_dir: str | Path, max_steps: int, lr: float, resume: bool = False):
    """LoRA SFT with TRL; returns the trained PeftModel (adapter saved to output_dir/adapter)."""
    from trl import SFTConfig, SFTTrainer

    if max_steps <= 0:  # no training (the HF Trainer would treat max_steps=0 as "use epochs"): an identity LoRA
        from peft import get_peft_model

        peft_model = get_peft_model(model, peft_lora_config(model, cfg.lora, cfg.model.name))  # B = 0: no change
        if int(os.environ.get("RANK", "0")) == 0:
            peft_model.save_pretrained(Path(output_dir) / "adapter")
            tokenizer.save_pretrained(Path(output_dir) / "adapter")
        peft_model.eval()
        peft_model.train_metrics = {"train_loss": float("nan"), "train_steps": 0, "train_examples": 0,
                                    "train_tokens": 0, "train_seconds": 0.0}
        return peft_model
    use_cpu = model.device.type == "cpu"
    args = SFTConfig(**trl_common_args(cfg, output_dir, max_steps, lr, use_cpu),
                     max_length=cfg.train.max_length, completion_only_loss=True, packing=False)
    model.train()
    trainer = SFTTrainer(model=model, args=args, train_dataset=sft_dataset(task, examples, prompts),
                         processing_class=tokenizer, peft_config=peft_lora_config(model, cfg.lora, cfg.model.name))
    has_ckpt = resume and any(Path(output_dir).glob("checkpoint-*"))
    result = trainer.train(resume_from_checkpoint=True if has_ckpt else None)
    peft_model = trainer.model
    if trainer.is_world_process_zero():
        peft_model.save_pretrained(Path(output_dir) / "adapter")
        tokenizer.save_pretrained(Path(output_dir) / "adapter")
    peft_model.eval()
    peft_model.train_metrics = {"train_loss": float(result.training_loss), "train_steps": int(result.global_step),
                                "train_examples": int(result.global_step) * cfg.train.batch_size,
                                "train_tokens": int(trainer.state.num_input_tokens_seen or 0),
                                "train_seconds": float(result.metrics.get("train_runtime", 0.0))}
    return peft_model


def train_examples(cfg: Config, task: Task) -> list[Example]:
    if not task.train:
        from metatuner.errors import MetatunerError

        raise MetatunerError(f"task {task.name!r}: the train split is empty")
    return task.train


def run(cfg: Config) -> dict:
    from metatuner.models import load_from_config
    from metatuner.run import final_eval, start_run

    task = start_run(cfg)
    model, tok = load_from_config(cfg.model)
    extra = {}
    if cfg.prompt_selection != "none":
        # SAPO: train (and evaluate) with the paraphrase of p~ that has the lowest pre-update loss
        from metatuner.io import write_json
        from metatuner.methods.continual import staged_sft
        from metatuner.prompts import optimizer_llm
        from metatuner.run import is_main_process
        from metatuner.sapo import maybe_select

        gen, gtok = optimizer_llm(cfg, model, tok)
        if gen is model:  # a frozen copy writes paraphrases (the actor changes between stages)
            gen, gtok = load_from_config(cfg.model)
        if cfg.sapo.reselect_steps > 0:
            model, sels, n_tokens = staged_sft(cfg, model, tok, task, cfg.train.max_steps, Path(cfg.output_dir), gen, gtok)
            extra = {"train_steps": cfg.train.max_steps, "train_examples": cfg.train.max_steps * cfg.train.batch_size,
                     "train_tokens": n_tokens,
                     "sapo_selections": [s["prompt"] for s in sels]}
            sel = sels[0] if sels else None
        else:
            sel = maybe_select(cfg, model, tok, task, gen, gtok)
        if is_main_process() and sel is not None:
            write_json(Path(cfg.output_dir) / "sapo.json", sel)
        extra["sapo_losses"] = dict(zip(sel["candidates"], sel["losses"])) if sel else {}
    prompt = task.prompt
    if not extra.get("sapo_selections"):
        model = train_sft(cfg, model, tok, task, train_examples(cfg, task), prompt, cfg.output_dir,
                          cfg.train.max_steps, cfg.train.lr, resume=cfg.resume_from_checkpoint)
        extra.update(model.train_metrics)
    with torch.no_grad():
        return final_eval(cfg, model, tok, task, prompt, extra={**extra, "prompt": prompt})
