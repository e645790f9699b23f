"""Evaluation harness: batched generation (left padding), answer extraction, scoring, outputs.

Every method is evaluated by `evaluate()`, with the same generation settings, so numbers are
comparable. A method that changes the actor per query (MetaTuner's generated LoRA) passes
`batch_context(indices)`, a context manager entered around each batch's generation.

Inference strategies: greedy (default), `majority` (self-consistency: the most frequent
extracted answer over N samples) and `best_of_n` (the sample the scorer likes best: the task's
verifier when given, else the actor's own mean token log-probability).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from metatuner.io import write_json, write_jsonl
from metatuner.tasks import Example, Task


def chat_text(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render chat messages with the tokenizer's template (plain text fallback without one)."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "\n\n".join(m["content"] for m in messages)
    return text + ("\nAnswer:" if add_generation_prompt else "")


@torch.no_grad()
def generate_texts(
    model,
    tokenizer,
    texts: list[str],
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    return_logprobs: bool = False,
):
    """Generate for one batch of already-rendered texts. Returns (generations[b][n], n_tokens[b][n], mean_logprob[b][n])."""
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    # stop at the tokenizer's end token and at every end token of the model's generation config (chat models
    # often list several, e.g. <|im_end|> and <|endoftext|>); passing only one would override the others
    gc_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stop = [tokenizer.eos_token_id] + (list(gc_eos) if isinstance(gc_eos, (list, tuple)) else [gc_eos])
    stop = list(dict.fromkeys(t for t in stop if t is not None))
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, num_return_sequences=num_return_sequences,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=stop)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    out = model.generate(**enc, **kwargs, return_dict_in_generate=True, output_scores=return_logprobs)
    seqs = out.sequences[:, enc["input_ids"].shape[1] :]
    lp = None
    if return_logprobs:
        lp = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    gens, ntoks, logps = [], [], []
    for i in range(seqs.shape[0]):
        ids = seqs[i].tolist()
        n = len(ids)
        for j, t in enumerate(ids):
            if t in stop or t == tokenizer.pad_token_id:
                n = j + (1 if t in stop else 0)  # the end token counts as generated (it is not decoded)
                break
        gens.append(tokenizer.decode(ids[:n], skip_special_tokens=True))
        ntoks.append(n)
        if lp is not None:
            row = lp[i, : max(n, 1)].float()
            row = row[torch.isfinite(row)]
            logps.append(row.mean().item() if row.numel() else -math.inf)
    k = num_return_sequences
    group = lambda xs: [xs[i * k : (i + 1) * k] for i in range(len(texts))]  # noqa: E731
    return group(gens), group(ntoks), (group(logps) if return_logprobs else None)


def majority_vote(answers: list[str | None]) -> str | None:
    """The most frequent non-empty answer; ties go to the one seen first."""
    counts = Counter(a for a in answers if a is not None and a != "")
    if not counts:
        return None
    best = max(counts.values())
    for a in answers:
        if a is not None and counts.get(a) == best:
            return a
    return None


def best_of_n(samples: list[str], scores: list[float]) -> int:
    """Index of the highest-scoring sample (first on ties)."""
    return max(range(len(samples)), key=lambda i: (scores[i], -i))


def evaluate(
    model,
    tokenizer,
    task: Task,
    examples: list[Example],
    prompts: list[str] | str | None = None,
    batch_size: int = 16,
    strategy: str = "greedy",
    n: int = 1,
    temperature: float = 0.7,
    top_p: float = 1.0,
    verifier: Callable[[str, Example], float] | None = None,
    batch_context: Callable[[list[int]], contextlib.AbstractContextManager] | None = None,
    output_dir: str | Path | None = None,
    extra_metrics: dict | None = None,
    progress: bool = True,
    desc: str = "eval",
) -> tuple[list[dict], dict]:
    """Generate, extract, score. Writes predictions.jsonl and metrics.json when output_dir is set."""
    if strategy not in ("greedy", "best_of_n", "majority"):
        from metatuner.errors import MetatunerError

        raise MetatunerError(f"inference.strategy: expected greedy, best_of_n or majority, got {strategy!r}")
    if prompts is None:
        prompts = task.prompt
    if isinstance(prompts, str):
        prompts = [prompts] * len(examples)
    sample = strategy != "greedy"
    k = max(1, n) if sample else 1
    t0 = time.time()
    records, tokens = [], 0
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(examples), desc=desc, disable=not progress, leave=False)
    for start in range(0, len(examples), batch_size):
        idx = list(range(start, min(start + batch_size, len(examples))))
        texts = [chat_text(tokenizer, task.render(prompts[i], examples[i].query)) for i in idx]
        ctx = batch_context(idx) if batch_context else contextlib.nullcontext()
        with ctx:
            gens, ntoks, logps = generate_texts(model, tokenizer, texts, task.max_new_tokens, do_sample=sample,
                                                temperature=temperature, top_p=top_p, num_return_sequences=k,
                                                return_logprobs=(strategy == "best_of_n" and verifier is None))
        for j, i in enumerate(idx):
            ex = examples[i]
            tokens += sum(ntoks[j])
            answers = [task.extract_for(g, ex) for g in gens[j]]
            if strategy == "majority":
                pred = majority_vote(answers)
                pick = answers.index(pred) if pred in answers else 0
            elif strategy == "best_of_n":
                scores = [verifier(g, ex) for g in gens[j]] if verifier else logps[j]
                pick = best_of_n(gens[j], scores)
                pred = answers[pick]
            else:
                pick, pred = 0, answers[0]
            sc = task.score(pred, ex)
            rec = {"query": ex.query, "prompt": prompts[i], "generation": gens[j][pick], "extracted": pred,
                   "reference": ex.answer, **{k_: v for k_, v in sc.items()}}
            if sample:
                rec["samples"] = gens[j]
            records.append(rec)
        bar.update(len(idx))
    bar.close()
    model.train(was_training)
    wall = time.time() - t0
    n_ex = len(records)
    metrics = {"task": task.name, "n": n_ex, "accuracy": sum(bool(r["correct"]) for r in records) / max(1, n_ex)}
    for key in ("em", "f1", "score"):
        if records and key in records[0]:
            metrics[key] = sum(r[key] for r in records) / n_ex
    metrics.update({"strategy": strategy, "samples_per_query": k, "tokens_generated": tokens,
                    "wall_seconds": round(wall, 2)})
    if extra_metrics:
        metrics.update(extra_metrics)
    if output_dir is not None:
        write_jsonl(Path(output_dir) / "predictions.jsonl", records)
        write_json(Path(output_dir) / "metrics.json", metrics)
    return records, metrics
