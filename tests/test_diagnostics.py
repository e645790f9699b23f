"""Floors and collapse diagnostics on hand-made answer lists, against computations written out by hand."""

from __future__ import annotations

import pytest

from metatuner.diagnostics import answer_key, diagnostics, floor, is_collapsed, looks_multiple_choice, most_frequent


def test_answer_key_canonicalises_numbers_and_text():
    assert answer_key("1,000") == answer_key("1000.0") == answer_key(" 1000 ") == "1000"
    assert answer_key("2.50") == answer_key("2.5") != answer_key("2")
    assert answer_key("Paris.") == answer_key("  paris ") == "paris"
    assert answer_key(None) is None and answer_key("  ") is None


def test_floor_is_the_train_mode_scored_on_the_references():
    train = ["7", "3", "7", "2", "7.0", "3"]  # "7" three times (7.0 is 7)
    refs = ["7", "1", "7", "7", "5"]
    top, acc = floor(train, refs)
    assert top == "7" and acc == pytest.approx(3 / 5)
    assert floor(["a", "b"], ["b", "b"]) == ("a", 0.0)  # ties: the first seen
    assert most_frequent([None, None, "x"]) == ("x", 1)


def test_diagnostics_numeric_task_reference_values():
    train = ["1", "2", "2", "3"]
    refs = ["2", "4", "6", "8", "10", "2"]
    preds = ["2", None, "2", "2", "2", ""]
    d = diagnostics(train, refs, preds)
    assert d["floor_answer"] == "2" and d["floor_accuracy"] == pytest.approx(2 / 6)
    assert d["no_answer_rate"] == pytest.approx(2 / 6)
    assert d["distinct_answers"] == 1 and d["distinct_references"] == 5
    assert d["top_answer"] == "2" and d["top_answer_share"] == pytest.approx(4 / 6)
    assert d["top_reference_share"] == pytest.approx(2 / 6)
    # 4/6 > max(0.5, 2 * 2/6): collapsed
    assert d["collapsed"] is True
    assert "letter_distribution" not in d and "floor_letter" not in d


def test_collapse_flag_thresholds():
    assert is_collapsed(0.51, 0.2, 10, 10)  # top share above one half and above twice the references'
    assert not is_collapsed(0.5, 0.2, 10, 10)  # not strictly above one half
    assert not is_collapsed(0.6, 0.4, 10, 10)  # the references are that concentrated too (0.6 <= 0.8)
    assert is_collapsed(0.1, 0.1, 2, 9)  # 2 < 9 / 4
    assert not is_collapsed(0.1, 0.1, 3, 9)
    varied = diagnostics([], [str(i) for i in range(8)], [str(i) for i in range(8)])
    assert varied["collapsed"] is False and varied["floor_accuracy"] is None and varied["no_answer_rate"] == 0


def test_multiple_choice_letters_and_position_bias():
    train = ["A", "C", "C", "B"]
    refs = ["A", "B", "C", "D", "A", "B", "C", "D"]
    preds = ["C", "C", "C", "C", "C", "C", "A", None]
    assert looks_multiple_choice(refs) and not looks_multiple_choice(["A", "12"])
    d = diagnostics(train, refs, preds)  # multiple choice detected from the references
    assert d["floor_letter"] == d["floor_answer"] == "C"
    assert d["floor_letter_accuracy"] == d["floor_accuracy"] == pytest.approx(2 / 8)
    assert d["letter_distribution"] == {"A": 1 / 8, "B": 0.0, "C": 6 / 8, "D": 0.0}
    assert d["label_distribution"] == {"A": 0.25, "B": 0.25, "C": 0.25, "D": 0.25}
    assert d["no_answer_rate"] == pytest.approx(1 / 8)
    assert d["collapsed"] is True  # 6/8 > max(0.5, 2 * 2/8)
    assert sum(d["letter_distribution"].values()) == pytest.approx(1 - d["no_answer_rate"])
    # lower-case extractions count as their letter; the flag can be forced
    d2 = diagnostics(["a"], ["A", "B"], ["b", "b"], multiple_choice=True)
    assert d2["letter_distribution"] == {"A": 0.0, "B": 1.0} and d2["floor_letter"] == "A"
    assert "letter_distribution" not in diagnostics(["A"], ["A", "B"], ["A", "B"], multiple_choice=False)


def test_custom_key_and_length_mismatch():
    d = diagnostics(["Yes"], ["yes", "no"], ["YES!", "no"], key=lambda a: a and a.strip("!").lower())
    assert d["floor_accuracy"] == 0.5 and d["distinct_answers"] == 2 and d["top_answer_share"] == 0.5
    with pytest.raises(ValueError):
        diagnostics([], ["a"], [])
