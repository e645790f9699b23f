"""Task rules without data (task_rules), short-answer extraction with yes/no, answer_end regexes,
answer keys, has_answer and is_multiple_choice."""

from __future__ import annotations

import json
import re

import pytest

from metatuner.config import TaskConfig
from metatuner.tasks import Example, extract_short, load_task, score_qa, task_rules, yes_no


@pytest.fixture
def no_data(tmp_path, monkeypatch):
    """No shared data folder, no hub: anything that tries to read a dataset fails."""
    monkeypatch.setenv("METATUNER_DATA", str(tmp_path / "nothing_here"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_read(*a, **k):
        raise AssertionError("task_rules read data")

    monkeypatch.setattr("metatuner.tasks.sources.read_table", no_read)
    monkeypatch.setattr("metatuner.tasks.sources.hub_rows", no_read)
    return tmp_path


@pytest.mark.parametrize("name", ["gsm8k", "math", "hotpotqa", "cosmosqa", "jsonl", "chain_sum"])
def test_task_rules_read_no_data(no_data, name):
    rules = task_rules(TaskConfig(name=name, path=str(no_data / "moved_away")))
    assert rules.train == rules.validation == rules.test == []
    assert rules.prompt and rules.max_new_tokens > 0 and rules.answer_end
    re.compile(rules.answer_end)
    assert rules.is_multiple_choice == (name == "cosmosqa")


def test_task_rules_equal_load_task_rules(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"{i} apples\n#### {i}"} for i in range(6)]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TaskConfig(name="gsm8k", path=str(tmp_path), prompt="P~", max_new_tokens=77)
    full, rules = load_task(cfg, seed=0), task_rules(cfg)
    assert (rules.prompt, rules.max_new_tokens, rules.answer_end) == (full.prompt, full.max_new_tokens, full.answer_end) == \
        ("P~", 77, full.answer_end)
    text = "2 + 3 = 5\n#### 5\n"
    assert rules.extract(text) == full.extract(text) == "5"
    assert rules.render(rules.prompt, "Q") == full.render(full.prompt, "Q")


def test_reasoning_gym_rules_score_without_the_loaded_data():
    cfg = TaskConfig(name="chain_sum", train_size=3, val_size=1, test_size=3)
    full, rules = load_task(cfg, seed=0), task_rules(cfg)
    for e in full.test:
        assert rules.score(e.answer, e) == full.score(e.answer, e) == {"correct": True, "score": 1.0}
        assert rules.score(str(int(e.answer) + 1), e)["correct"] is False
    assert rules.answer_key(" 1,000.0 ") == "1000"


def test_train_tasks_rules_have_sources(no_data):
    rules = task_rules(TaskConfig(name="gsm8k", train_tasks=["math", "cosmosqa"]))
    assert set(rules.sources) == {"math", "cosmosqa"}
    assert rules.max_new_tokens == 384  # math's, the largest
    ex = Example(query="q", answer="B", target="", meta={"task": "cosmosqa"})
    assert rules.score(rules.extract_for("Answer: B", ex), ex)["correct"]


# ============================================================================ HotpotQA short answers


@pytest.mark.parametrize("text, expected", [
    ("The two bands formed in different countries.\nAnswer: No, they are not both American.", "no"),
    ("No, Ed Wood and Scott Derrickson are not of the same nationality.", "no"),
    ("Yes.", "yes"),
    ("**Answer:** Chief of Protocol", "Chief of Protocol"),
    ("Answer: No Doubt", "No Doubt"),  # a band called No Doubt stays itself
    ("Answer: \"Animorphs\".\nThe series follows...", "Animorphs"),
    ("Answer:\n\nAnswer: 1999", "1999"),  # an empty Answer: line is skipped
    ("The answer is:\nMartin O'Malley\n", "Martin O'Malley"),  # the answer on the line after the colon
    ("The answer is:", None),  # an announced answer that never came
    ("Sure.\nThe answer is:\n", "Sure"),
    ("", None),
    ("   \n  ", None),
])
def test_extract_short(text, expected):
    assert extract_short(text) == expected


def test_correct_sentence_answer_to_yes_no_question_scores_em_1():
    task = task_rules(TaskConfig(name="hotpotqa"))
    ex = Example(query="Context: ...\n\nQuestion: Were Scott Derrickson and Ed Wood of the same nationality?",
                 answer="yes", target="Answer: yes")
    gen = "Yes, Scott Derrickson and Ed Wood were both American.\nAnswer: Yes, they were both American."
    s = task.score(task.extract(gen), ex)
    assert s == {"correct": True, "em": 1.0, "f1": 1.0}
    # without an Answer: line, the first line is the answer
    assert task.score(task.extract("Yes, both were American filmmakers."), ex)["em"] == 1.0
    assert task.score(task.extract("No, they were not."), ex)["em"] == 0.0


def test_yes_no():
    assert [yes_no(s) for s in ("yes", "No.", "no, never", "No Doubt", "nope", "Yes it is")] == \
        ["yes", "no", "no", None, None, None]
    # scoring is looser against a yes/no reference: the first word decides
    assert score_qa("Yes it is", Example("q", "yes", ""))["em"] == 1.0


# ============================================================================ answer_end: where generation may stop


@pytest.mark.parametrize("name, stops, runs_on", [
    ("gsm8k", ["so 5 in all.\n#### 5\n", "#### $1,234.50 dollars\n", "So, the answer is 90.\n"],
     ["#### 12", "#### \n", "so 5 in all.\n", "The answer is 9"]),
    ("math", ["so $\\boxed{\\frac{1}{2}}$", "\\boxed{x^{2}+\\sqrt{3}}"], ["\\boxed{\\frac{1}{2", "\\boxed{"]),
    ("hotpotqa", ["Answer: Chicago\n", "**Answer:** no\n"], ["Answer: Chic", "Answer: \n", "Chicago\n"]),
    ("cosmosqa", ["Answer: B", "answer: (C)"], ["Answer: ", "B"]),
    ("chain_sum", ["Answer: 42\n", "<answer>42</answer>"], ["Answer: 4", "42\n"]),
])
def test_answer_end(name, stops, runs_on):
    end = re.compile(task_rules(TaskConfig(name=name)).answer_end)
    for text in stops:
        assert end.search(text), (name, text)
    for text in runs_on:
        assert not end.search(text), (name, text)


# ============================================================================ answer keys, has_answer, multiple choice


@pytest.mark.parametrize("name, pairs", [
    ("gsm8k", [("1,000", "1000"), ("1000.00", "1000"), ("-3.5", "-3.5"), ("$18", "18")]),
    ("math", [("\\frac{1}{2}", "\\frac{1}{2}"), ("\\left( 3, 4 \\right)", "(3,4)"), ("$x + 1$", "x+1")]),
    ("hotpotqa", [("The Eiffel Tower.", "eiffel tower"), ("No, they are not.", "no"), ("No Doubt", "no doubt")]),
    ("cosmosqa", [(" b", "B"), ("C", "C")]),
])
def test_answer_key(name, pairs):
    task = task_rules(TaskConfig(name=name))
    for answer, key in pairs:
        assert task.answer_key(answer) == key, (name, answer)


def test_has_answer():
    task = task_rules(TaskConfig(name="gsm8k"))
    assert task.has_answer(task.extract("so 12 apples")) and task.has_answer("0")
    assert not task.has_answer(task.extract("no numbers at all")) and not task.has_answer(None)
    assert not task.has_answer("  ")
    math = task_rules(TaskConfig(name="math"))
    assert not math.has_answer(math.extract("I think it is big"))


def test_is_multiple_choice_survives_train_task_mixes(tmp_path, monkeypatch):
    assert task_rules(TaskConfig(name="cosmosqa")).is_multiple_choice
    assert not task_rules(TaskConfig(name="hotpotqa")).is_multiple_choice
    assert task_rules(TaskConfig(name="cosmosqa", train_tasks=["gsm8k"])).is_multiple_choice
