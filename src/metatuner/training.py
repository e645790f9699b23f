"""Pieces every training recipe uses: batches, sequence NLL, optimizer/schedule, checkpoints, logs.

Checkpoints are written to a hidden temporary folder and renamed to `step_N/` only when complete,
so a run killed at any moment (kill -9) never leaves a half-written checkpoint that resume picks.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from metatuner.errors import MetatunerError
from metatuner.generation import chat_text
from metatuner.tasks import Example, Task


# ----------------------------------------------------------------------------- batches


def step_indices(n: int, seed: int, step: int, global_batch: int) -> list[int]:
    """The training examples (indices into a train set of n) that optimizer step `step` consumes, counted
    from the first step of training: one seeded permutation per epoch, walked `global_batch` at a time.
    Every recipe that trains the actor on the task draws from this one stream: SFT and the actor warm-up
    (through TRL, `lora_sft.train_sft`, steps 0..W-1) and MetaTuner's joint phase (steps W..W+J-1), so a
    MetaTuner run of W warm-up and J joint steps trains on exactly the examples of W + J SFT steps."""
    out, perms = [], {}
    for j in range(step * global_batch, (step + 1) * global_batch):
        epoch, pos = divmod(j, n)
        if epoch not in perms:
            perms[epoch] = list(range(n))
            random.Random(seed * 1000 + epoch).shuffle(perms[epoch])
        out.append(perms[epoch][pos])
    return out


def completion_text(tokenizer, messages: list[dict], completion: str) -> tuple[str, str]:
    """(prefix, completion) strings such that prefix + completion is the full chat with the answer
    and the completion ends with the template's end-of-turn (so the model learns to stop)."""
    prefix = chat_text(tokenizer, messages, add_generation_prompt=True)
    if tokenizer.chat_template:
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}], tokenize=False)
        if full.startswith(prefix):
            return prefix, full[len(prefix):]
    return prefix, " " + completion + (tokenizer.eos_token or "")


def lm_batch(tokenizer, prefixes: list[str], completions: list[str], max_length: int = 512, device=None) -> dict:
    """Right-padded input_ids/attention_mask/labels (labels -100 on the prefix and padding) and
    prefix_mask (1 on prefix tokens). Over-long rows lose prefix tokens from the left."""
    rows = []
    for p, c in zip(prefixes, completions):
        pi = tokenizer(p, add_special_tokens=False)["input_ids"]
        ci = tokenizer(c, add_special_tokens=False)["input_ids"]
        ci = ci[: max_length - 1]
        pi = pi[max(0, len(pi) + len(ci) - max_length):]
        rows.append((pi, ci))
    T = max(len(p) + len(c) for p, c in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    pmask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        mask[i, :n] = 1
        labels[i, len(p):n] = torch.tensor(c)
        pmask[i, : len(p)] = 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels, "prefix_mask": pmask}
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out


def actor_batch(tokenizer, task: Task, prompts: list[str], examples: list[Example], max_length: int = 512, device=None) -> dict:
    """The actor's SFT batch: chat(prompt, query) -> reference target."""
    pairs = [completion_text(tokenizer, task.render(p, ex.query), ex.target) for p, ex in zip(prompts, examples)]
    return lm_batch(tokenizer, [a for a, _ in pairs], [b for _, b in pairs], max_length, device)


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token NLL per row [B] of labels (-100 ignored) under next-token logits [B, T, V]."""
    lg = logits[:, :-1].float()
    lb = labels[:, 1:]
    tok = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=-100, reduction="none")
    tok = tok.view(lb.shape)
    n = (lb != -100).sum(1).clamp(min=1)
    return tok.sum(1) / n


def logits_to_keep(labels: torch.Tensor) -> int:
    """How many trailing positions need logits: from the token before the first label to the end.
    Skipping the LM head on prompt tokens saves a V x d matmul per token (large for small models)."""
    has = (labels != -100).any(0).nonzero()
    if has.numel() == 0:
        return 1
    return labels.shape[1] - int(has[0]) + 1


def forward_nll(model, batch: dict, **kwargs):
    """Per-row mean NLL of the labels [B]; logits only where labels need them. Extra kwargs go to
    the model (e.g. output_hidden_states); returns (nll, model output)."""
    keep = logits_to_keep(batch["labels"])
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep,
                use_cache=False, **kwargs)
    return sequence_nll(out.logits, batch["labels"][:, -keep:]), out


# ----------------------------------------------------------------------------- optimisation


def make_scheduler(optimizer, kind: str, max_steps: int, warmup_ratio: float):
    warm = int(round(warmup_ratio * max_steps))

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        frac = (step - warm) / max(1, max_steps - warm)
        if kind == "linear":
            return max(0.0, 1.0 - frac)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        raise MetatunerError(f"train.scheduler: expected constant, linear or cosine, got {kind!r}")

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(enabled: bool, device: torch.device):
    dtype = torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def bf16_native(device: torch.device) -> bool:
    """Whether the device computes in bf16 in hardware: CUDA GPUs that support it, CPUs with AVX512-BF16
    or AMX. Elsewhere torch emulates bf16 (on a 2-core AVX2 CPU a training step of the embedded model
    under bf16 autocast is about 18x slower than in fp32: benchmarks/bf16_cpu.py)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        if not any(checks):  # torch without these probes: assume native, as before
            return True
        return any(c() for c in checks if c)
    return True  # other devices: the user's train.bf16 decides


def use_bf16(tc, device: torch.device) -> bool:
    """train.bf16 as it applies on `device`: on a device without native bf16 only with train.bf16_emulated."""
    return bool(tc.bf16) and (bool(tc.bf16_emulated) or bf16_native(device))


def finite_everywhere(value: torch.Tensor) -> bool:
    """True when `value` is finite on this process and, under torch.distributed with several processes, on
    every other one too (one all-reduce of a flag): every process then takes the same branch, so a value that
    went NaN on one process stops them all instead of leaving the others waiting in the next collective."""
    ok = bool(torch.isfinite(value).all())
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([1.0 if ok else 0.0], device=value.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)
    return ok


def check_finite(value: torch.Tensor, step: int, last_ckpt: str | None, what: str = "loss",
                 everywhere: bool = False) -> None:
    """Stop with a MetatunerError naming the step and the last good checkpoint when `value` is NaN/inf.
    `step` is the 1-based number of the step being computed (checkpoint step_N holds N finished steps).
    `everywhere`: a per-process value (a loss) checked on every process at once (finite_everywhere), so
    they all stop together; every process must then call this at the same point."""
    ok = finite_everywhere(value) if everywhere else bool(torch.isfinite(value).all())
    if not ok:
        where = (f"; the last good checkpoint is {last_ckpt} (continue from it with resume_from_checkpoint=true "
                 "after changing the settings)") if last_ckpt else "; no checkpoint was written yet"
        if bool(torch.isfinite(value).all()):
            v = "non-finite on another process"
        else:
            v = value.item() if value.numel() == 1 else "non-finite"
        raise MetatunerError(f"{what} became {v} at step {step}: stopping{where}; "
                             "try a lower train.lr / train.generator_lr or train.bf16=false")


# ----------------------------------------------------------------------------- RNG and checkpoints


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def write_checkpoint(output_dir: str | Path, step: int, write_fn, keep: int = 2) -> Path:
    """Call write_fn(tmp_dir) then rename tmp_dir -> output_dir/step_{step}; prune old ones."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"step_{step}"
    tmp = Path(tempfile.mkdtemp(dir=output_dir, prefix=f".step_{step}."))
    try:
        write_fn(tmp)
        (tmp / "COMPLETE").write_text(str(step))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep > 0:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete step_N/ checkpoints, oldest first (temporary folders are never listed)."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    cks = [p for p in d.glob("step_*") if p.is_dir() and (p / "COMPLETE").is_file() and p.name[5:].isdigit()]
    return sorted(cks, key=lambda p: int(p.name[5:]))


def newest_checkpoint(output_dir: str | Path) -> Path | None:
    cks = list_checkpoints(output_dir)
    return cks[-1] if cks else None


class TrainLog:
    """train_log.jsonl (always) plus TensorBoard when asked; only the main process writes."""

    def __init__(self, output_dir: str | Path, report_to: str = "jsonl", enabled: bool = True, append: bool = False):
        self.enabled = enabled
        self.path = Path(output_dir) / "train_log.jsonl"
        self.tb = None
        if not enabled:
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        if not append and self.path.exists():
            self.path.unlink()
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        elif report_to not in ("jsonl", "none"):
            raise MetatunerError(f"train.report_to: expected jsonl or tensorboard, got {report_to!r}")

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def keep(self, predicate) -> None:
        """Keep only the logged rows for which predicate(row) is true (e.g. drop what a killed run
        logged after the checkpoint it is resumed from)."""
        if not self.enabled or not self.path.exists():
            return
        rows = [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]
        from metatuner.io import write_jsonl

        write_jsonl(self.path, [r for r in rows if predicate(r)])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
