"""Evaluation harness: batched generation (left padding), answer extraction, scoring, outputs.

Every method is evaluated by `evaluate()`, with the same generation settings, so numbers are
comparable. A method that changes the actor per query (MetaTuner's generated LoRA) passes
`batch_context(indices)`, a context manager entered around each batch's generation.

Inference strategies: greedy (default), `majority` (self-consistency: the most frequent
extracted answer over N samples), `best_of_n` (the sample the scorer likes best: the task's
verifier when given, else the actor's own mean token log-probability) and `early_majority`
(majority vote that stops sampling a query once its vote is settled, `metatuner.voting`, N = cap).
Every record says how many samples it cost (`samples`); sampled records keep them (`generations`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from metatuner.errors import MetatunerError
from metatuner.io import write_json, write_jsonl
from metatuner.tasks import Example, Task
from metatuner.voting import best_of_n, majority_vote, vote_settled  # noqa: F401 (re-exported)


def chat_text(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render chat messages with the tokenizer's template (plain text fallback without one)."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "\n\n".join(m["content"] for m in messages)
    return text + ("\nAnswer:" if add_generation_prompt else "")


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's end token and every end token of the model's generation config (chat models often
    list several, e.g. <|im_end|> and <|endoftext|>); passing only one to generate would drop the others."""
    gc_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stop = [tokenizer.eos_token_id] + (list(gc_eos) if isinstance(gc_eos, (list, tuple)) else [gc_eos])
    return list(dict.fromkeys(t for t in stop if t is not None))


def _forward(model, cache, **kw):
    """One forward pass that extends `cache`, returning only the last position's logits where the model allows."""
    before = cache.get_seq_length()
    try:
        out = model(**kw, cache=cache, use_cache=True, logits_to_keep=1)
    except TypeError:  # an older forward signature (past_key_values, no logits_to_keep)
        out = None
    if out is None or cache.get_seq_length() == before:  # the model ignored `cache` (took it as **kwargs)
        out = model(**kw, past_key_values=cache, use_cache=True)
    return out


@torch.no_grad()
def greedy_texts(
    model,
    tokenizer,
    texts: list[str],
    max_new_tokens: int,
    answer_end: str = "",
    share_prefix: bool = True,
    drop_finished: bool = True,
) -> tuple[list[list[str]], list[list[int]]]:
    """Greedy decoding of one batch, with the same outputs as `generate_texts` (up to float rounding) but
    less work: the token prefix all rows share (chat header, task prompt) is run once and its cache copied;
    a row stops at an end token, at max_new_tokens, or as soon as its decoded text matches the regex
    `answer_end`; finished rows leave the batch (drop_finished), so later steps cost only the live rows.
    Keep share_prefix and drop_finished off when the model's weights differ per row (per-query LoRA).
    Returns (generations[b][1], n_tokens[b][1]); an end token counts as generated, as in generate_texts."""
    from transformers import DynamicCache

    stop = set(stop_token_ids(model, tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(stop), 0)
    end_re = re.compile(answer_end) if answer_end else None
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    b, dev = len(ids), model.device
    shared = 0
    if share_prefix and b > 1:
        shortest = min(len(x) for x in ids)
        while shared < shortest - 1 and all(x[shared] == ids[0][shared] for x in ids):
            shared += 1
    cache = DynamicCache()
    if shared:
        _forward(model, input_ids=torch.tensor([ids[0][:shared]], device=dev), cache=cache)
        cache.batch_repeat_interleave(b)
    width = max(len(x) for x in ids) - shared
    inp = torch.full((b, width), pad, dtype=torch.long)
    mask = torch.zeros((b, shared + width), dtype=torch.long)
    mask[:, :shared] = 1
    for i, x in enumerate(ids):
        suffix = x[shared:]
        inp[i, width - len(suffix):] = torch.tensor(suffix, dtype=torch.long)
        mask[i, shared + width - len(suffix):] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    inp, mask, pos = inp.to(dev), mask.to(dev), pos.to(dev)
    out = _forward(model, input_ids=inp, attention_mask=mask, position_ids=pos[:, shared:], cache=cache)
    rows = list(range(b))  # the batch row of each sequence still in the batch
    new: list[list[int]] = [[] for _ in range(b)]
    fin = [False] * b
    last = pos[:, -1:]
    for _ in range(max_new_tokens):
        nxt = out.logits[:, -1, :].argmax(-1).tolist()
        keep = []
        for j, r in enumerate(rows):
            if not fin[r]:
                new[r].append(nxt[j])
                fin[r] = (nxt[j] in stop or len(new[r]) >= max_new_tokens or bool(
                    end_re and end_re.search(tokenizer.decode(new[r], skip_special_tokens=True))))
            if not (fin[r] and drop_finished):
                keep.append(j)
        if all(fin):
            break
        step = torch.tensor(nxt, device=dev)
        if len(keep) < len(rows):
            sel = torch.tensor(keep, device=dev)
            cache.batch_select_indices(sel)
            step, mask, last = step[sel], mask[sel], last[sel]
            rows = [rows[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        last = last + 1
        out = _forward(model, input_ids=step[:, None], attention_mask=mask, position_ids=last, cache=cache)
    gens = [[tokenizer.decode(x, skip_special_tokens=True)] for x in new]  # end tokens are special: not decoded
    return gens, [[len(x)] for x in new]


class PromptCache:
    """Every prompt of a batch but its last token, run through the model once (left padding; positions
    count real tokens only, as generate's do). `take(rows, n)` hands out the inputs and a copy of the
    cache for those rows, each repeated n times in place (as generate's num_return_sequences orders
    them), so generate feeds only the last prompt token. Build it under the weights the samples use
    (a per-query LoRA's batch_context over the same rows)."""

    def __init__(self, model, tokenizer, texts: list[str]):
        from transformers import DynamicCache

        tokenizer.padding_side = "left"
        self.enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        ids, mask = self.enc["input_ids"], self.enc["attention_mask"]
        self.cache = DynamicCache()
        if ids.shape[1] > 1:
            pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
            with torch.no_grad():
                _forward(model, input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1],
                         cache=self.cache)

    def take(self, rows: list[int] | None, n: int):
        ids, mask = self.enc["input_ids"], self.enc["attention_mask"]
        cache = copy.deepcopy(self.cache)
        if rows is not None and list(rows) != list(range(ids.shape[0])):
            sel = torch.tensor(rows, device=ids.device)
            ids, mask = ids[sel], mask[sel]
            if cache.get_seq_length():
                cache.batch_select_indices(sel)
        if n > 1 and cache.get_seq_length():
            cache.batch_repeat_interleave(n)
        enc = {"input_ids": ids.repeat_interleave(n, dim=0), "attention_mask": mask.repeat_interleave(n, dim=0)}
        return enc, (cache if cache.get_seq_length() else None)


class AnswerEnd(StoppingCriteria):
    """Per-row stop once the generated text (after `start` input tokens) matches the regex `pattern`."""

    def __init__(self, tokenizer, pattern: str, start: int):
        self.tokenizer, self.pattern, self.start = tokenizer, re.compile(pattern), start

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        return torch.tensor([bool(self.pattern.search(t)) for t in texts], device=input_ids.device)


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
    answer_end: str = "",
    share_prompt: bool = True,
    prompt_cache: tuple[PromptCache, list[int] | None] | None = None,
):
    """Generate for one batch of already-rendered texts. Returns (generations[b][n], n_tokens[b][n], mean_logprob[b][n]).
    A row stops at an end token, at max_new_tokens, or once its text matches the regex `answer_end` (as
    in greedy_texts, so sampled and greedy answers are cut by the same rule).
    With n = num_return_sequences > 1 and `share_prompt`, each prompt is run once and its cache copied to
    its n samples (Hugging Face's num_return_sequences runs every prompt n times); the rows, their order,
    the sampling and so the outputs for a seed are the same (up to float rounding). A per-query LoRA
    (metatuner.lora) stays right: its factors repeat over the n copies as they do under generate.
    `prompt_cache=(PromptCache, rows)`: those rows of a cache built earlier for these texts (rounds of
    sampling from the same prompts, as early stopping draws them) instead of running the prompts again."""
    stop = stop_token_ids(model, tokenizer)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, num_return_sequences=num_return_sequences,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=stop)
    if prompt_cache is None and share_prompt and num_return_sequences > 1:
        prompt_cache = (PromptCache(model, tokenizer, texts), None)
    if prompt_cache is not None:
        enc, cache = prompt_cache[0].take(prompt_cache[1], num_return_sequences)
        kwargs["num_return_sequences"] = 1
        if cache is not None:
            kwargs["past_key_values"] = cache
    else:
        tokenizer.padding_side = "left"
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    if answer_end:
        kwargs["stopping_criteria"] = StoppingCriteriaList([AnswerEnd(tokenizer, answer_end, enc["input_ids"].shape[1])])
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with warnings.catch_warnings():  # transformers 5 renames past_key_values to cache; 4.x knows only the old name
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
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
    sort_by_length: bool = True,
    stop_at_answer: bool = True,
    fast_greedy: bool = True,
    max_new_tokens: int | None = None,
    diagnose: bool = True,
    stop_threshold: float = 0.95, stop_min: int = 2, stop_chunk: int = 1, stop_score: float | None = None,
) -> tuple[list[dict], dict]:
    """Generate, extract, score. Writes predictions.jsonl and metrics.json when output_dir is set (on the
    main process only). Records come back in the order of `examples`, each with its `index` there.

    Speed (greedy; the old harness is sort_by_length=False, stop_at_answer=False, fast_greedy=False):
    batches are formed from examples sorted by prompt length (less padding); `fast_greedy` decodes with
    `greedy_texts` (shared prefix run once, finished rows leave the batch); `stop_at_answer` ends a row
    once its text matches the task's `answer_end` regex. max_new_tokens defaults to the task's.
    With several processes (torchrun / accelerate launch) each evaluates a contiguous slice of the
    examples and the records are gathered in order on every process. `diagnose` adds the floor and
    collapse diagnostics (metatuner.diagnostics) when the task has a train split.
    early_majority samples in rounds: stop_min samples first (one with stop_score), then stop_chunk more
    per round for the rows of the batch whose vote is not settled (metatuner.voting.vote_settled: the Beta
    rule at stop_threshold, or the confidence gate stop_score on the samples' verifier score or mean token
    log-probability), never more than n per query. Sampled records keep their samples' `scores` when
    computed (best_of_n: the verifier's or the mean log-probabilities; early_majority with a gate)."""
    if strategy not in STRATEGIES:
        raise MetatunerError(f"inference.strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if batch_size < 1:
        raise MetatunerError(f"eval.batch_size: expected an integer >= 1, got {batch_size!r}")
    if prompts is None:
        prompts = task.prompt
    if isinstance(prompts, str):
        prompts = [prompts] * len(examples)
    sample = strategy != "greedy"
    k = max(1, n) if sample else 1
    max_new = max_new_tokens or task.max_new_tokens
    answer_end = getattr(task, "answer_end", "") if stop_at_answer else ""
    t0 = time.time()
    state = _process_state()
    mine = list(range(len(examples)))
    if state is not None:
        with state.split_between_processes(mine) as part:
            mine = list(part)
    texts = {i: chat_text(tokenizer, task.render(prompts[i], examples[i].query)) for i in mine}
    if sort_by_length:  # longest first (stable), so each batch holds similar lengths; order restored below
        mine = sorted(mine, key=lambda i: -len(texts[i]))
    records: dict[int, dict] = {}
    tokens = 0
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(mine), desc=desc, unit="ex", disable=not progress, leave=False)
    for start in range(0, len(mine), batch_size):
        idx = mine[start : start + batch_size]
        batch = [texts[i] for i in idx]
        if strategy == "early_majority":  # rounds of samples, each round in its own batch_context
            gens, ntoks, logps = _sample_until_settled(model, tokenizer, task, examples, idx, texts, max_new,
                                                       temperature, top_p, k, (stop_threshold, stop_min, stop_chunk),
                                                       batch_context, answer_end, stop_score, verifier)
        else:
            with batch_context(idx) if batch_context else contextlib.nullcontext():
                if not sample and (fast_greedy or answer_end):
                    per_row = batch_context is not None  # weights may differ per row: keep the batch whole
                    gens, ntoks = greedy_texts(model, tokenizer, batch, max_new, answer_end=answer_end,
                                               share_prefix=fast_greedy and not per_row,
                                               drop_finished=fast_greedy and not per_row)
                    logps = None
                else:
                    gens, ntoks, logps = generate_texts(model, tokenizer, batch, max_new, do_sample=sample,
                                                        temperature=temperature, top_p=top_p, num_return_sequences=k,
                                                        return_logprobs=(strategy == "best_of_n" and verifier is None),
                                                        answer_end=answer_end)
        for j, i in enumerate(idx):
            ex = examples[i]
            tokens += sum(ntoks[j])
            answers = [task.extract_for(g, ex) for g in gens[j]]
            scores = logps[j] if logps is not None else None
            if strategy in ("majority", "early_majority"):
                pred = majority_vote(answers)
                pick = answers.index(pred) if pred in answers else 0
            elif strategy == "best_of_n":
                scores = [verifier(g, ex) for g in gens[j]] if verifier else logps[j]
                pick = best_of_n(gens[j], scores)
                pred = answers[pick]
            else:
                pick, pred = 0, answers[0]
            sc = task.score(pred, ex)
            rec = {"index": i, "query": ex.query, "prompt": prompts[i], "generation": gens[j][pick],
                   "extracted": pred, "reference": ex.answer, **{k_: v for k_, v in sc.items()}, "samples": len(gens[j])}
            if sample:
                rec["generations"] = gens[j]
                if scores is not None:
                    rec["scores"] = scores
            records[i] = rec
        bar.update(len(idx))
    bar.close()
    model.train(was_training)
    ordered = [records[i] for i in sorted(records)]
    if state is not None:
        from accelerate.utils import gather_object

        ordered = gather_object(ordered)
        tokens = sum(gather_object([tokens]))
    records = ordered
    wall = time.time() - t0
    n_ex = len(records)
    metrics = {"task": task.name, "n": n_ex, "accuracy": sum(bool(r["correct"]) for r in records) / max(1, n_ex)}
    for key in ("em", "f1", "score"):
        if records and key in records[0]:
            metrics[key] = sum(r[key] for r in records) / n_ex
    spent = sum(r["samples"] for r in records)
    metrics.update({"strategy": strategy, "samples_per_query": k, "total_samples": spent,
                    "mean_samples": spent / max(1, n_ex), "tokens_generated": tokens,
                    "wall_seconds": round(wall, 2), "peak_memory_mb": peak_memory_mb(model.device)})
    if diagnose:
        from metatuner.diagnostics import task_diagnostics

        metrics.update(task_diagnostics(task, records))
    if extra_metrics:
        metrics.update(extra_metrics)
    if output_dir is not None and (state is None or state.is_main_process):
        write_jsonl(Path(output_dir) / "predictions.jsonl", records)
        write_json(Path(output_dir) / "metrics.json", metrics)
    return records, metrics


STRATEGIES = ("greedy", "best_of_n", "majority", "early_majority")


def _sample_until_settled(model, tokenizer, task, examples, idx, texts, max_new, temperature, top_p, cap, rule,
                          batch_context, answer_end, stop_score=None, verifier=None):
    """early_majority for one batch (rows `idx`): draw stop_min samples per row (one with a stop_score
    gate, which may settle a single sample), then stop_chunk more per round for the rows whose vote
    (metatuner.voting.vote_settled) is not settled, at most `cap` per row. Each round's generation runs
    inside batch_context(rows still sampling), so a per-query LoRA follows its rows (generate repeats it
    across the round's samples). Returns every row's samples in order, their token counts, and with a
    gate their scores (verifier, else mean token log-probability; None without a gate)."""
    threshold, min_samples, chunk = rule
    first = 1 if stop_score is not None else min_samples
    gens: list[list[str]] = [[] for _ in idx]
    ntoks: list[list[int]] = [[] for _ in idx]
    answers: list[list] = [[] for _ in idx]
    scores: list[list[float]] = [[] for _ in idx]
    active = list(range(len(idx)))
    with batch_context(idx) if batch_context else contextlib.nullcontext():
        prompts = PromptCache(model, tokenizer, [texts[i] for i in idx])  # run once, copied to every round
    while active:
        done = len(gens[active[0]])  # every active row has drawn the same number so far
        k = min(cap - done, first - done if done < first else chunk)
        rows = [idx[a] for a in active]
        with batch_context(rows) if batch_context else contextlib.nullcontext():
            g, nt, lp = generate_texts(model, tokenizer, [texts[i] for i in rows], max_new, do_sample=True,
                                       temperature=temperature, top_p=top_p, num_return_sequences=k,
                                       return_logprobs=stop_score is not None and verifier is None,
                                       answer_end=answer_end, prompt_cache=(prompts, active))
        for r, (a, gs, ns) in enumerate(zip(active, g, nt)):
            gens[a] += gs
            ntoks[a] += ns
            answers[a] += [task.extract_for(x, examples[idx[a]]) for x in gs]
            if stop_score is not None:
                scores[a] += [verifier(x, examples[idx[a]]) for x in gs] if verifier else lp[r]
        active = [a for a in active if len(gens[a]) < cap
                  and not vote_settled(answers[a], threshold, min_samples, scores[a], stop_score)]
    return gens, ntoks, (scores if stop_score is not None else None)


def peak_memory_mb(device) -> float:
    """Peak memory so far: the accelerator's allocated peak on CUDA, else this process's peak resident size."""
    if torch.device(device).type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def _process_state():
    """accelerate's PartialState when several processes run (torchrun / accelerate launch), else None,
    so one plain process never initialises anything distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    # without an accelerator, accelerate runs several processes only when told cpu=True (gloo)
    state = PartialState(cpu=not torch.cuda.is_available())
    return state if state.num_processes > 1 else None
