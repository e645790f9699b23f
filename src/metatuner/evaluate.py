"""Evaluation harness: batched generation (metatuner.generation), answer extraction, scoring, outputs.

Every method is evaluated by `evaluate()`, with the same generation settings, so numbers are
comparable. A method that changes the actor per query (MetaTuner's generated LoRA) passes
`batch_context(indices)`, a context manager entered around each batch's generation.

Inference strategies: greedy (default), `majority` (self-consistency: the most frequent
extracted answer over N samples), `best_of_n` (the sample the scorer likes best among those
whose answer parses: the task's verifier when given, else the actor's own mean token log-probability), `weighted_majority` (the
answer whose samples' exp(score) sum highest: confidence-weighted self-consistency, same scorer) and `early_majority`
(majority vote that stops sampling a query once its vote is settled, `metatuner.voting`, N = cap).
Every record says how many samples it cost (`samples`); sampled records keep them (`generations`).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from metatuner.errors import MetatunerError
from metatuner.generation import (AnswerEnd, PromptCache, chat_text, generate_texts,  # noqa: F401 (re-exported)
                                  greedy_texts, stop_token_ids)
from metatuner.io import write_json, write_jsonl
from metatuner.tasks import Example, Task
from metatuner.voting import best_of_n, majority_vote, vote_settled, weighted_vote  # noqa: F401 (re-exported)


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
    engine=None,
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
    computed (best_of_n and weighted_majority: the verifier's or the mean log-probabilities; early_majority
    with a gate).
    `engine` (metatuner.vllm_backend.VllmActor, generation.backend=vllm): it generates instead of `model`,
    every example of this process in one request (vLLM batches them itself); not with batch_context."""
    if engine is not None and batch_context is not None:
        raise MetatunerError("generation.backend=vllm: an actor whose weights change per query (batch_context) "
                             "generates through hf")
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
    step = max(1, len(mine)) if engine is not None else batch_size
    for start in range(0, len(mine), step):
        idx = mine[start : start + step]
        batch = [texts[i] for i in idx]
        if strategy == "early_majority":  # rounds of samples, each round in its own batch_context
            gens, ntoks, logps = _sample_until_settled(model, tokenizer, task, examples, idx, texts, max_new,
                                                       temperature, top_p, k, (stop_threshold, stop_min, stop_chunk),
                                                       batch_context, answer_end, stop_score, verifier, engine)
        elif engine is not None:
            gens, ntoks, logps = engine.generate(batch, max_new, do_sample=sample, temperature=temperature, top_p=top_p,
                                                 num_return_sequences=k,
                                                 return_logprobs=(strategy in SCORED and verifier is None),
                                                 answer_end=answer_end, keys=idx)
        else:
            with batch_context(idx) if batch_context else contextlib.nullcontext() as lora:
                if not sample and (fast_greedy or answer_end):
                    per_row = batch_context is not None  # weights may differ per row: no shared prefix
                    keep = getattr(lora, "keep_rows", None)  # a per-query LoRA follows the rows that stay
                    gens, ntoks = greedy_texts(model, tokenizer, batch, max_new, answer_end=answer_end,
                                               share_prefix=fast_greedy and not per_row,
                                               drop_finished=fast_greedy and (not per_row or keep is not None),
                                               keep_rows=keep)
                    logps = None
                else:
                    gens, ntoks, logps = generate_texts(model, tokenizer, batch, max_new, do_sample=sample,
                                                        temperature=temperature, top_p=top_p, num_return_sequences=k,
                                                        return_logprobs=(strategy in SCORED and verifier is None),
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
                pick = best_of_n(gens[j], scores, answers)
                pred = answers[pick]
            elif strategy == "weighted_majority":
                scores = [verifier(g, ex) for g in gens[j]] if verifier else logps[j]
                w = weighted_vote(answers, scores)
                pick, pred = (0, None) if w is None else (w, answers[w])
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


STRATEGIES = ("greedy", "best_of_n", "majority", "weighted_majority", "early_majority")
SCORED = ("best_of_n", "weighted_majority")  # strategies that read a score per sample


def _sample_until_settled(model, tokenizer, task, examples, idx, texts, max_new, temperature, top_p, cap, rule,
                          batch_context, answer_end, stop_score=None, verifier=None, engine=None):
    """early_majority for one batch (rows `idx`): draw stop_min samples per row (one with a stop_score
    gate, which may settle a single sample), then stop_chunk more per round for the rows whose vote
    (metatuner.voting.vote_settled) is not settled, at most `cap` per row. Each round's generation runs
    inside batch_context(rows still sampling), so a per-query LoRA follows its rows (generate repeats it
    across the round's samples). Returns every row's samples in order, their token counts, and with a
    gate their scores (verifier, else mean token log-probability; None without a gate). With a vLLM `engine`
    each round is one request, every row's samples seeded by (row, samples drawn so far)."""
    threshold, min_samples, chunk = rule
    first = 1 if stop_score is not None else min_samples
    gens: list[list[str]] = [[] for _ in idx]
    ntoks: list[list[int]] = [[] for _ in idx]
    answers: list[list] = [[] for _ in idx]
    scores: list[list[float]] = [[] for _ in idx]
    active = list(range(len(idx)))
    if engine is None:
        with batch_context(idx) if batch_context else contextlib.nullcontext():
            prompts = PromptCache(model, tokenizer, [texts[i] for i in idx])  # run once, copied to every round
    while active:
        done = len(gens[active[0]])  # every active row has drawn the same number so far
        k = min(cap - done, first - done if done < first else chunk)
        rows = [idx[a] for a in active]
        if engine is not None:
            g, nt, lp = engine.generate([texts[i] for i in rows], max_new, do_sample=True, temperature=temperature,
                                        top_p=top_p, num_return_sequences=k,
                                        return_logprobs=stop_score is not None and verifier is None,
                                        answer_end=answer_end, keys=[i * (cap + 1) + done for i in rows])
        else:
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
