"""Task rules without data: the initial prompt p~, answer extraction, scoring, answer format and the
generation budget. `task_rules(cfg.task)` builds them from the config alone (no dataset is read), so
`infer` can answer a query from a run folder; `load_task` adds the splits.

The generation budgets (`max_new_tokens`) were sized from the embedded model's validation
generations (see docs/session-2026-11-24/NOTES-tasks.md); `answer_end` lets generation stop once the final answer line is
complete.
"""

from __future__ import annotations

import copy

from metatuner.errors import MetatunerError
from metatuner.tasks.answers import (
    END_ANSWER_LINE,
    END_BOXED,
    END_GSM8K,
    END_LETTER,
    extract_gsm8k,
    extract_letter,
    extract_math,
    extract_rg,
    extract_short,
    letter_key,
    math_key,
    number_key,
    parse_number,
    score_letter,
    score_math,
    score_numeric,
    score_qa,
    text_key,
)
from metatuner.tasks.core import Task

BENCHMARKS = ("gsm8k", "math", "hotpotqa", "cosmosqa")
FILE_TASKS = ("jsonl", "csv", "parquet", "file")
RG_DEFAULT_PARAMS = {"chain_sum": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}}
# task.params keys read by the loader itself, never passed on to a reasoning-gym dataset
LOADER_PARAMS = ("max_query_chars", "answer_type")


def _rules(name: str, prompt: str, max_new_tokens: int, extract, score, answer_end: str, key_fn,
           multiple_choice: bool = False) -> Task:
    return Task(name=name, prompt=prompt, train=[], validation=[], test=[], max_new_tokens=max_new_tokens,
                extract=extract, score_fn=score, answer_end=answer_end, is_multiple_choice=multiple_choice,
                key_fn=key_fn)


def gsm8k_rules() -> Task:
    prompt = "Solve the math word problem step by step. End with the final answer as '#### <number>'."
    return _rules("gsm8k", prompt, 256, extract_gsm8k, score_numeric, END_GSM8K, number_key)


def math_rules() -> Task:
    prompt = "Solve the problem step by step. Put the final answer in \\boxed{}."
    return _rules("math", prompt, 384, extract_math, score_math, END_BOXED, math_key)


def hotpotqa_rules() -> Task:
    prompt = ("Answer the question using the context. Reply with one line 'Answer: <short answer>', where the "
              "short answer is a few words from the context, or yes or no.")
    return _rules("hotpotqa", prompt, 48, extract_short, score_qa, END_ANSWER_LINE, text_key)


def cosmosqa_rules() -> Task:
    prompt = "Read the context and choose the best option. Reply with the letter only, as 'Answer: <letter>'."
    return _rules("cosmosqa", prompt, 16, extract_letter, score_letter, END_LETTER, letter_key, multiple_choice=True)


def rg_params(name: str, params: dict) -> dict:
    """The reasoning-gym dataset kwargs: the task's defaults, then task.params (loader keys removed)."""
    out = dict(RG_DEFAULT_PARAMS.get(name, {}))
    out.update({k: v for k, v in params.items() if k not in LOADER_PARAMS})
    return out


def make_rg_dataset(name: str, params: dict, size: int, seed: int):
    """reasoning_gym.create_dataset with a one-line error for an unknown task or bad parameters."""
    import reasoning_gym

    kw = rg_params(name, params)
    try:
        return reasoning_gym.create_dataset(name, size=size, seed=seed, **kw)
    except (KeyError, ValueError, TypeError, AssertionError) as e:
        raise MetatunerError(f"task.name={name!r}: not a known task or bad task.params {kw} ({e})") from None


def reasoning_gym_rules(name: str, params: dict, answers: list[str] | None = None, dataset=None) -> Task:
    """Rules of a reasoning-gym dataset. Scoring is the dataset's own `score_answer` on the entry
    stored in `Example.meta["entry"]`. Numeric answers (decided from `answers`, else from 50
    procedurally generated entries) are extracted as the last number of the answer line."""
    ds = dataset if dataset is not None else make_rg_dataset(name, params, 50, 0)
    if answers is None:
        answers = [str(ds[i]["answer"]) for i in range(min(50, len(ds)))]
    numeric = all(parse_number(a) is not None for a in answers[:50])

    def score(pred, ex, _ds=ds):
        s = float(_ds.score_answer(pred, ex.meta["entry"])) if pred is not None else 0.0
        return {"correct": s >= 1.0, "score": s}

    prompt = "Solve the problem. Reply with the final answer only, as 'Answer: <answer>'."
    return _rules(name, prompt, 32, (lambda t: extract_rg(t, numeric)), score, END_ANSWER_LINE,
                  number_key if numeric else (lambda a: a.strip()))


def file_rules(name: str, params: dict, answers: list[str] | None = None) -> Task:
    """Rules of a user's file: numbers are scored numerically, anything else by EM/F1.
    task.params.answer_type = number | text | auto (default: auto = number when the first 50
    reference answers all parse as numbers; without data, text)."""
    kind = str(params.get("answer_type", "auto"))
    if kind not in ("auto", "number", "text"):
        raise MetatunerError(f"task.params.answer_type: expected auto, number or text, got {kind!r}")
    if kind == "auto":
        kind = "number" if answers and all(parse_number(a) is not None for a in answers[:50]) else "text"
    prompt = "Answer the question. Reply with the final answer only, as 'Answer: <answer>'."
    if kind == "number":
        return _rules(name, prompt, 64, (lambda t: extract_rg(t, True)), score_numeric, END_ANSWER_LINE, number_key)
    return _rules(name, prompt, 64, extract_short, score_qa, END_ANSWER_LINE, text_key)


def base_rules(name: str, params: dict, answers: list[str] | None = None, dataset=None) -> Task:
    """The rules of one task by name, before task.prompt / task.max_new_tokens overrides."""
    if name == "gsm8k":
        return gsm8k_rules()
    if name == "math":
        return math_rules()
    if name == "hotpotqa":
        return hotpotqa_rules()
    if name == "cosmosqa":
        return cosmosqa_rules()
    if name in FILE_TASKS:
        return file_rules(name, params, answers)
    return reasoning_gym_rules(name, params, answers, dataset)


def apply_overrides(task: Task, tc) -> Task:
    """task.prompt and task.max_new_tokens, when set, replace the task's defaults."""
    task.prompt = tc.prompt or task.prompt
    task.max_new_tokens = tc.max_new_tokens or task.max_new_tokens
    return task


def task_rules(tc) -> Task:
    """The rules of cfg.task with empty splits, from the config alone (no dataset is read).
    With task.train_tasks, the other tasks' rules are its `sources` and the answer budget is the
    largest of the tasks' (as `load_task` does)."""
    task = apply_overrides(base_rules(tc.name, dict(tc.params)), tc)
    names = [str(n) for n in (getattr(tc, "train_tasks", None) or [])]
    if names:
        for name in names:
            if name == tc.name:
                own = copy.copy(task)
                own.sources = {}
                task.sources[name] = own
            else:
                task.sources[name] = base_rules(name, dict((getattr(tc, "params_by_task", None) or {}).get(name) or {}))
        if not tc.max_new_tokens:
            task.max_new_tokens = max([task.max_new_tokens] + [s.max_new_tokens for s in task.sources.values()])
    return task
