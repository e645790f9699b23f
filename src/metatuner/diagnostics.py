"""Diagnostics beside accuracy: the floor a trivial rule reaches, and whether the answers collapsed.

Pure functions over lists of answer strings (None = no extractable answer):

    d = diagnostics(train_answers, references, predictions, multiple_choice=False)
    d["floor_accuracy"]   # accuracy on these references of always answering the training split's
                          # most frequent answer (d["floor_answer"])
    d["collapsed"]        # the top answer takes far more of the predictions than of the references,
                          # or the answers are far less varied than the references

Answers are compared by a key (`answer_key`: stripped, lower-cased, numbers canonical, "1,000" ==
"1000.0" == "1e3"), or by the task's own `Task.answer_key` when it has one.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable, Iterable

_LETTER = re.compile(r"^[A-Ja-j]$")


def answer_key(answer: str | None) -> str | None:
    """A comparison key for an answer: None for no answer, numbers canonical, text lower-cased."""
    if answer is None:
        return None
    s = " ".join(str(answer).strip().split()).rstrip(".").lower()
    if not s:
        return None
    try:
        x = float(s.replace(",", "").replace("$", ""))
        return str(int(x)) if x.is_integer() else repr(x)
    except ValueError:
        return s


def looks_multiple_choice(references: Iterable[str]) -> bool:
    """True when every reference is a single option letter (A-J)."""
    refs = [str(r).strip() for r in references]
    return bool(refs) and all(_LETTER.match(r) for r in refs)


def most_frequent(keys: Iterable[str | None]) -> tuple[str | None, int]:
    """The most frequent non-None key (ties: the one seen first) and its count."""
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None, 0
    best = max(counts.values())
    for k in counts:  # Counter keeps first-seen order
        if counts[k] == best:
            return k, best
    return None, 0  # unreachable


def distribution(keys: list[str | None], labels: Iterable[str]) -> dict[str, float]:
    """Share of `keys` equal to each label (over all keys, so no-answers lower every share)."""
    n = max(1, len(keys))
    counts = Counter(keys)
    return {lab: counts.get(lab, 0) / n for lab in labels}


def floor(train_answers: list[str], references: list[str], key: Callable = answer_key) -> tuple[str | None, float]:
    """(the training split's most frequent answer, the accuracy on `references` of always answering it)."""
    top, _ = most_frequent(key(a) for a in train_answers)
    if top is None or not references:
        return top, 0.0
    return top, sum(key(r) == top for r in references) / len(references)


def is_collapsed(top_answer_share: float, top_reference_share: float, distinct_answers: int,
                 distinct_references: int) -> bool:
    """Top answer share > max(0.5, 2 x the top reference share), or fewer than a quarter as many
    distinct answers as distinct references."""
    return top_answer_share > max(0.5, 2 * top_reference_share) or distinct_answers < distinct_references / 4


def diagnostics(train_answers: list[str], references: list[str], predictions: list[str | None],
                multiple_choice: bool | None = None, key: Callable = answer_key) -> dict:
    """Floor, no-answer rate and collapse diagnostics (the metrics.json keys)."""
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    if multiple_choice is None:
        multiple_choice = looks_multiple_choice(references)
    n = max(1, len(predictions))
    pk = [key(p) for p in predictions]
    rk = [key(r) for r in references]
    top_answer, top_count = most_frequent(pk)
    _, top_ref_count = most_frequent(rk)
    floor_answer, floor_acc = floor(train_answers, references, key) if train_answers else (None, None)
    d = {
        "floor_answer": floor_answer,
        "floor_accuracy": floor_acc,
        "no_answer_rate": sum(k is None for k in pk) / n,
        "distinct_answers": len({k for k in pk if k is not None}),
        "distinct_references": len({k for k in rk if k is not None}),
        "top_answer": top_answer,
        "top_answer_share": top_count / n,
        "top_reference_share": top_ref_count / n,
    }
    d["collapsed"] = is_collapsed(d["top_answer_share"], d["top_reference_share"], d["distinct_answers"],
                                  d["distinct_references"])
    if multiple_choice:
        letters = sorted({k.upper() for k in pk + rk + [key(a) for a in train_answers]
                          if k is not None and _LETTER.match(k)})
        up = lambda ks: [k.upper() if k is not None else None for k in ks]  # noqa: E731
        d["letter_distribution"] = distribution(up(pk), letters)
        d["label_distribution"] = distribution(up(rk), letters)
        d["floor_letter"] = floor_answer.upper() if floor_answer else None
        d["floor_letter_accuracy"] = floor_acc
        d["floor_answer"] = d["floor_letter"]
    return d


def task_diagnostics(task, records: list[dict]) -> dict:
    """metatuner.diagnostics over the task's train answers and the records' references and extractions
    (no floor when the task has no train split): what evaluate() adds to metrics.json."""
    task_key = getattr(task, "answer_key", None)

    def key(a):  # no answer stays None (counted in no_answer_rate); an empty key is no answer too
        if a is None or task_key is None:
            return answer_key(a)
        return task_key(a) or None

    mc = getattr(task, "is_multiple_choice", None)
    mc = mc() if callable(mc) else mc
    return diagnostics([e.answer for e in task.train], [r["reference"] for r in records],
                       [r["extracted"] for r in records], multiple_choice=mc, key=key)
