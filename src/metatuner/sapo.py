"""SAPO: state-adaptive training-prompt selection (pick the paraphrase with the lowest pre-update loss).

Before a training stage, the generator writes `sapo.candidates` paraphrases of the training prompt
(users may add their own in `sapo.prompts`); the current actor scores every candidate by its
teacher-forced mean NLL of the reference on `sapo.subset` training examples, without gradients;
the lowest-loss candidate is the prompt the stage trains (and is evaluated) with. In staged
training (tasks in sequence, or `sapo.reselect_steps`), selection runs again before each stage
with the model as it is then.

    metatuner train method=sft prompt_selection=sapo sapo.candidates=4
"""

from __future__ import annotations

from pathlib import Path

import torch

from metatuner.config import Config
from metatuner.errors import MetatunerError
from metatuner.tasks import Example, Task
from metatuner.pool import PARAPHRASE, build_pool, paraphrases, parse_paraphrase, pool_requested  # noqa: F401
from metatuner.training import actor_batch, autocast, forward_nll, use_bf16

@torch.no_grad()
def prompt_losses(model, tok, task: Task, examples: list[Example], candidates: list[str], batch_size: int = 8,
                  max_length: int = 512, bf16: bool = True) -> list[float]:
    """Teacher-forced mean NLL of the references under each candidate prompt (pre-update, no grads)."""
    was = model.training
    model.eval()
    losses = []
    for cand in candidates:
        tot, n = 0.0, 0
        for s in range(0, len(examples), batch_size):
            exs = examples[s : s + batch_size]
            with autocast(bf16, model.device):
                batch = actor_batch(tok, task, [cand] * len(exs), exs, max_length, model.device)
                rows = forward_nll(model, batch)[0].float()
            tot += rows.sum().item()
            n += len(exs)
        losses.append(tot / max(1, n))
    model.train(was)
    return losses


def select_prompt(cfg: Config, model, tok, task: Task, candidates: list[str] | None = None, gen=None, gtok=None) -> dict:
    """Run SAPO once: -> {"prompt", "candidates", "losses"}; candidates default to p~ + paraphrases +
    sapo.prompts + the candidate pool (prompts.*: the same prompts MetaTuner's pool modes choose among)."""
    if candidates is None:
        candidates = [task.prompt]
        if gen is not None:
            candidates += paraphrases(gen, gtok, task.prompt, cfg.sapo.candidates, cfg.sapo.temperature,
                                      cfg.sapo.max_new_tokens)
        candidates += list(cfg.sapo.prompts)
        if pool_requested(cfg):
            candidates += build_pool(cfg, task, gen, gtok)
        candidates = list(dict.fromkeys(candidates))
    if not candidates:
        raise MetatunerError("prompt_selection=sapo: no candidate prompts")
    examples = task.train[: cfg.sapo.subset]
    if not examples:
        raise MetatunerError(f"prompt_selection=sapo: task {task.name!r} has no training examples to score on")
    losses = prompt_losses(model, tok, task, examples, candidates, cfg.eval.batch_size, cfg.train.max_length,
                          use_bf16(cfg.train, model.device))
    best = min(range(len(candidates)), key=lambda i: (losses[i], i))
    return {"prompt": candidates[best], "candidates": candidates, "losses": losses}


def maybe_select(cfg: Config, model, tok, task: Task, gen=None, gtok=None, candidates=None) -> dict | None:
    """SAPO when cfg.prompt_selection == 'sapo' (sets task.prompt), else None."""
    if cfg.prompt_selection == "none":
        return None
    if cfg.prompt_selection != "sapo":
        raise MetatunerError(f"prompt_selection: expected none or sapo, got {cfg.prompt_selection!r}")
    res = select_prompt(cfg, model, tok, task, candidates, gen, gtok)
    task.prompt = res["prompt"]
    return res


def staged_sft(cfg: Config, model, tok, task: Task, steps: int, out_dir: Path, gen=None, gtok=None, log=None,
               phase: str = "sft"):
    """LoRA SFT for `steps` optimizer steps in sub-stages of sapo.reselect_steps, SAPO before each when
    enabled; each sub-stage's adapter is merged before the next. -> (merged model, selection records,
    {"steps": steps taken, "tokens": tokens trained on})."""
    from metatuner import lora_sft

    every = cfg.sapo.reselect_steps if (cfg.prompt_selection == "sapo" and cfg.sapo.reselect_steps > 0) else steps
    done, selections, candidates, tokens, taken = 0, [], None, 0, 0
    while done < steps:
        n = min(every, steps - done)
        sel = maybe_select(cfg, model, tok, task, gen, gtok, candidates)
        if sel is not None:
            candidates = sel["candidates"]  # one candidate pool per task, re-scored by the model as it is now
            selections.append({"at_step": done, **sel})
        peft_model = lora_sft.train_sft(cfg, model, tok, task, task.train, task.prompt, Path(out_dir) / f"stage_step{done}",
                                        n, cfg.train.lr, log=log, phase=f"{phase}@{done}", first_step=done)
        tokens += peft_model.train_metrics.get("train_tokens", 0)
        taken += peft_model.train_metrics.get("train_steps", 0)
        model = peft_model.merge_and_unload()
        model.eval()
        done += n
    return model, selections, {"steps": taken, "tokens": tokens}
