"""LoRA SFT of a model through TRL's SFTTrainer, and the TrainingArguments our TRL trainers share.

Completion-only loss on conversational prompt/completion pairs rendered by the actor's own chat
template, exactly as evaluation renders them. Used by the SFT and DPO baselines, BetterTogether's
w steps, continual stages and MetaTuner's actor warm-up; `trl_common_args` is also what DPO and
BPO's rewriter train with. Progress and train_log.jsonl come from `metatuner.train_log`; resume
goes through `metatuner.checkpoints.find_resume_checkpoint` (see `trainer_resume_path`).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from metatuner.config import Config
from metatuner.lora import peft_lora_config
from metatuner.tasks import Example, Task
from metatuner.train_log import attach, open_train_log
from metatuner.training import TrainLog, use_bf16


def sft_dataset(task: Task, examples: list[Example], prompts: list[str] | str):
    """TRL conversational prompt-completion dataset."""
    from datasets import Dataset

    if isinstance(prompts, str):
        prompts = [prompts] * len(examples)
    return Dataset.from_list([
        {"prompt": task.render(p, ex.query), "completion": [{"role": "assistant", "content": ex.target}]}
        for p, ex in zip(prompts, examples)
    ])


def trained_model(trainer):
    """The trainer's model without accelerate's mixed-precision wrapper. With train.bf16 the Trainer
    wraps the model's forward in bf16 autocast, and the wrapper stays after training: every later
    evaluation would run in bf16 (unlike the zero-shot and MetaTuner runs, and unlike the saved
    adapter loaded again, whose greedy answers then differ)."""
    return trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)


def is_sharded(model) -> bool:
    """Whether FSDP2 (accelerate's FSDP config) sharded the model's parameters (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def unsharded(model):
    """The trained PeftModel as a plain one on this process's device: every process gathers the full
    state dict and loads it into a fresh copy (same config, same LoRA). A sharded model trains, but
    `generate` runs the inner model outside FSDP's root forward (root parameters stay sharded), and
    safetensors cannot save DTensors; evaluation and export use this copy. Base weights come from the
    state dict itself, so adapters merged earlier (BetterTogether's w steps) are kept. Plain models pass through."""
    if not is_sharded(model):
        return model
    from peft import get_peft_model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    inner = model.get_base_model()
    emb = inner.get_input_embeddings().weight  # the base weights' dtype (PEFT may keep LoRA in float32)
    with torch.device(next(iter(state.values())).device):
        fresh = AutoModelForCausalLM.from_config(inner.config, dtype=emb.dtype)
    fresh.generation_config = copy.deepcopy(inner.generation_config)
    plain = get_peft_model(fresh, copy.deepcopy(model.peft_config["default"]))
    plain.load_state_dict(state, strict=True)
    return plain


def trl_common_args(cfg: Config, output_dir: str | Path, max_steps: int, lr: float, device: torch.device) -> dict:
    """TrainingArguments shared by our TRL-based trainers (progress and logging: metatuner.train_log);
    `device`: the trained model's (CPU training, and whether bf16 is native there: training.use_bf16)."""
    use_cpu = device.type == "cpu"
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
        bf16=use_bf16(cfg.train, device),
        use_cpu=use_cpu,
        logging_steps=max(1, cfg.train.log_steps),
        save_strategy="steps" if cfg.train.save_steps else "no",
        save_steps=cfg.train.save_steps or 500,
        save_total_limit=cfg.train.save_total_limit,
        report_to=["tensorboard"] if cfg.train.report_to == "tensorboard" else "none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        disable_tqdm=True,  # train_log.TrainLogCallback draws the bar and writes the log instead
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        gradient_checkpointing=cfg.train.gradient_checkpointing,
    )


def examples_per_step(cfg: Config) -> int:
    """Training examples one optimizer step consumes: per-device batch x accumulation x processes."""
    accum = max(1, cfg.train.grad_accum)
    return max(1, cfg.train.batch_size // accum) * accum * int(os.environ.get("WORLD_SIZE", "1"))


def trainer_resume_path(cfg: Config, trainer_dir: str | Path) -> str | None:
    """The checkpoint-N/ a TRL trainer writing to `trainer_dir` resumes from (None: start fresh), as
    metatuner.checkpoints.find_resume_checkpoint decides under cfg.resume_from_checkpoint (false/true/auto)."""
    from metatuner.checkpoints import find_resume_checkpoint

    found = find_resume_checkpoint(cfg, Path(trainer_dir))
    return str(found) if found else None


def finite_grads_callback(phase: str):
    """A TrainerCallback that stops training with a MetatunerError naming the phase, the step and the last
    checkpoint-N/ when a trained parameter's gradient is NaN/inf before the optimizer step (the Trainer would
    step on, hide the NaN loss in its logs and save broken weights). Checked on every process at once
    (training.check_finite with everywhere=True), so under DDP/FSDP all of them stop together."""
    from transformers import TrainerCallback

    from metatuner.training import check_finite

    class FiniteGrads(TrainerCallback):
        def __init__(self):
            self.model = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.model = model

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            grads = [p.grad for p in self.model.parameters() if p.requires_grad and p.grad is not None]
            grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP2: this process's shard
            # one flag for all of them (one device sync, not one per tensor): 0 when finite, NaN otherwise
            ok = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else \
                torch.ones((), dtype=torch.bool, device=args.device)
            flag = torch.where(ok, 0.0, float("nan"))
            ckpts = sorted(Path(args.output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])
                           if p.name.split("-")[-1].isdigit() else -1)
            check_finite(flag, state.global_step + 1, str(ckpts[-1]) if ckpts else None,
                         what=f"{phase}: the gradient", everywhere=True)

    return FiniteGrads()


def add_callbacks(trainer, cfg: Config, log: TrainLog, phase: str):
    """Progress bar + train_log.jsonl lines (train_log.attach), a stop at the first non-finite gradient
    (finite_grads_callback) and, where checkpoints are saved, the run's settings inside every checkpoint-N/
    (checkpoints.config_saver, so resume=auto compares them)."""
    attach(trainer, log, phase)
    from metatuner.checkpoints import config_saver

    trainer.add_callback(finite_grads_callback(phase))
    trainer.add_callback(config_saver(cfg))
    return trainer


def step_ordered(cfg: Config, examples: list[Example], prompts: list[str] | str, first_step: int, steps: int):
    """(examples, prompts) in the order optimizer steps first_step .. first_step+steps-1 consume them
    (training.step_indices: the stream MetaTuner's joint phase continues), for a sequential sampler."""
    from metatuner.errors import MetatunerError
    from metatuner.training import step_indices

    if not examples:
        raise MetatunerError("LoRA SFT: no training examples (the train split or the traces to train on are empty)")
    per_step = examples_per_step(cfg)
    idx = [i for s in range(first_step, first_step + steps) for i in step_indices(len(examples), cfg.seed, s, per_step)]
    return [examples[i] for i in idx], (prompts if isinstance(prompts, str) else [prompts[i] for i in idx])


def train_sft(cfg: Config, model, tokenizer, task: Task, examples: list[Example], prompts: list[str] | str,
              output_dir: str | Path, max_steps: int, lr: float, resume_from: str | None = None,
              log: TrainLog | None = None, phase: str = "sft", first_step: int = 0):
    """LoRA SFT with TRL for exactly `max_steps` optimizer steps; returns the trained PeftModel (adapter
    saved to output_dir/adapter) with `.train_metrics`. `resume_from`: a checkpoint-N/ to continue from
    (see trainer_resume_path); `log`: the run's train_log.jsonl (default: one in output_dir).
    The examples are taken in the order of `step_ordered` from step `first_step` of the run's data stream
    (a later stage of one run continues where the earlier stopped), not in TRL's own random order."""
    from trl import SFTConfig, SFTTrainer

    if max_steps <= 0:  # no training (the HF Trainer would treat max_steps=0 as "use epochs"): an identity LoRA
        from peft import get_peft_model

        peft_model = get_peft_model(model, peft_lora_config(model, cfg.lora, cfg.model.name))  # B = 0: no change
        if int(os.environ.get("RANK", "0")) == 0:
            peft_model.save_pretrained(Path(output_dir) / "adapter")
            tokenizer.save_pretrained(Path(output_dir) / "adapter")
        peft_model.eval()
        peft_model.train_metrics = {"train_loss": None, "train_steps": 0, "train_examples": 0,
                                    "train_tokens": 0, "train_seconds": 0.0, "train_rows_dropped": 0}
        return peft_model
    args = SFTConfig(**trl_common_args(cfg, output_dir, max_steps, lr, model.device),
                     max_length=cfg.train.max_length, completion_only_loss=True, packing=False,
                     train_sampling_strategy="sequential")
    model.train()
    ordered, ordered_prompts = step_ordered(cfg, examples, prompts, first_step, max_steps)
    trainer = SFTTrainer(model=model, args=args, train_dataset=sft_dataset(task, ordered, ordered_prompts),
                         processing_class=tokenizer, peft_config=peft_lora_config(model, cfg.lora, cfg.model.name))
    dropped = len(ordered) - len(trainer.train_dataset)
    if dropped:  # TRL drops examples whose completion train.max_length truncated away: the stream shifts
        import warnings

        from metatuner.errors import MetatunerWarning

        warnings.warn(f"LoRA SFT ({phase}): {dropped} of {len(ordered)} training rows have no completion token left "
                      f"within train.max_length={cfg.train.max_length} and were dropped, so the run no longer trains "
                      f"on the examples of the shared data stream step by step; raise train.max_length",
                      MetatunerWarning, stacklevel=2)
    add_callbacks(trainer, cfg, log if log is not None else open_train_log(output_dir, append=resume_from is not None),
                  phase)
    result = trainer.train(resume_from_checkpoint=resume_from)
    peft_model = unsharded(trained_model(trainer))
    if trainer.is_world_process_zero():
        peft_model.save_pretrained(Path(output_dir) / "adapter")
        tokenizer.save_pretrained(Path(output_dir) / "adapter")
    peft_model.eval()
    peft_model.train_metrics = {"train_loss": float(result.training_loss), "train_steps": int(result.global_step),
                                "train_examples": int(result.global_step) * examples_per_step(cfg),
                                "train_tokens": int(trainer.state.num_input_tokens_seen or 0),
                                "train_seconds": float(result.metrics.get("train_runtime", 0.0)),
                                "train_rows_dropped": dropped}
    return peft_model


def split_steps(total: int, parts: int) -> list[int]:
    """`total` optimizer steps split as evenly as possible over `parts` (earlier parts take the remainder)."""
    if parts <= 0:
        return []
    base, rest = divmod(max(0, total), parts)
    return [base + (i < rest) for i in range(parts)]
