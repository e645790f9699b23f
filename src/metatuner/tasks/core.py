"""The data model: an `Example` (query, reference answer, training target) and a `Task` (its rules
plus three splits). A Task built by `task_rules` has empty splits; `load_task` fills them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from metatuner.errors import MetatunerError


@dataclass
class Example:
    query: str  # what the actor sees after the prompt (question, plus context/options if any)
    answer: str  # reference final answer used for scoring
    target: str  # training completion (reference solution ending in the answer)
    meta: dict = field(default_factory=dict)


def _same(answer: str) -> str:
    return answer.strip()


@dataclass
class Task:
    name: str
    prompt: str  # the hand-written initial prompt p~
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    max_new_tokens: int
    extract: Callable[[str], str | None]  # the final answer in a generation, or None when there is none
    score_fn: Callable[[str | None, Example], dict]
    # train_tasks: the tasks mixed into train/validation; an example whose meta["task"] names one of
    # them is extracted and scored by that task's rules
    sources: dict = field(default_factory=dict)
    # a Python regex searched (re.search) in the text generated so far: generation of a row may stop
    # once it matches (the final answer is complete); "" = stop only at EOS
    answer_end: str = ""
    is_multiple_choice: bool = False  # answers are option letters (A-D)
    key_fn: Callable[[str], str] = _same  # see answer_key
    # where each split came from, for error messages: {"train": "data/train.jsonl: 16 of 20 rows ..."}
    origin: dict = field(default_factory=dict)

    def render(self, prompt: str, query: str) -> list[dict]:
        """Chat messages for the actor: the prompt, then the query, in one user turn."""
        text = f"{prompt.strip()}\n\n{query}" if prompt.strip() else query
        return [{"role": "user", "content": text}]

    def _source(self, ex: Example) -> "Task":
        return self.sources.get(ex.meta.get("task"), self) if self.sources else self

    def extract_for(self, text: str, ex: Example) -> str | None:
        """The final answer in `text`, by the rules of the task `ex` comes from."""
        return self._source(ex).extract(text)

    def score(self, extracted: str | None, ex: Example) -> dict:
        return self._source(ex).score_fn(extracted, ex)

    def has_answer(self, extracted: str | None) -> bool:
        """Whether extraction found an answer (the complement of `no_answer_rate`)."""
        return extracted is not None and extracted.strip() != ""

    def answer_key(self, answer: str) -> str:
        """An answer (reference or extracted) in one normalised spelling, so equal answers count as
        one: a number without commas or trailing zeros, an upper-case letter, a SQuAD-normalised
        short answer. Used for the most-frequent-answer floor and the answer-collapse diagnostics."""
        return self.key_fn(answer)

    def split(self, name: str) -> list[Example]:
        if name not in ("train", "validation", "test"):
            raise MetatunerError(f"eval.split: expected train, validation or test, got {name!r}")
        return getattr(self, name)

    def describe_split(self, name: str) -> str:
        """One line on where a split came from and how big it is (for 'split is empty' errors)."""
        n = len(self.split(name))
        return self.origin.get(name, f"task {self.name!r}: the {name} split has {n} examples")
