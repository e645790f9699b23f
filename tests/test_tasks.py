"""Tasks: extraction and scoring per benchmark, loaders in original schemas, splits, generic files, errors."""

from __future__ import annotations

import csv
import json
import re

import pytest

from metatuner.config import TaskConfig, load_config
from metatuner.errors import MetatunerError
from metatuner.tasks import (
    Example,
    extract_gsm8k,
    extract_letter,
    extract_math,
    extract_short,
    last_boxed,
    load_task,
    math_equal,
    normalize_answer,
    score_letter,
    score_math,
    score_numeric,
    score_qa,
    token_f1,
)


def ex(answer: str) -> Example:
    return Example(query="q", answer=answer, target="")


def tc(**kw) -> TaskConfig:
    return TaskConfig(**kw)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def read_raw_jsonl(path, n):
    with open(path) as f:
        return [json.loads(next(f)) for _ in range(n)]


# ============================================================================ GSM8K


@pytest.mark.parametrize(
    "text, expected",
    [
        ("So she has 1,234 apples.\n#### 1,234", "1234"),
        ("The answer is 1,234.", "1234"),
        ("The answer is -5", "-5"),
        ("x = -12 after all", "-12"),
        ("She pays $18 in total.", "18"),
        ("#### $1,000", "1000"),
        ("It costs $1,234.50 altogether", "1234.50"),
        ("It is 3.75 dollars", "3.75"),
        ("x = -.5", "-.5"),
        ("2 + 3 = 5\n#### 7\nThen 99 more", "7"),  # '####' beats the last number
        ("First 12, then 30. So the answer is 42 apples.\nCheck: 12 + 30 = 42, not 99", "42"),  # 'answer is' beats the last number
        ("First 12, then 30, total 42", "42"),  # last number
        ("It takes 2-3 hours", "3"),  # a range, not a negative number
        ("10-3=7", "7"),
        ("no numbers here", None),
        ("####\nthen 5", "5"),  # empty '####' line: look further
    ],
)
def test_extract_gsm8k(text, expected):
    assert extract_gsm8k(text) == expected


@pytest.mark.parametrize(
    "pred, gold, correct",
    [
        ("1234", "1234", True),
        ("1,234", "1234", True),
        ("$1,234", "1234", True),
        ("1234.0", "1234", True),
        ("1234.", "1234", True),
        ("0.50", "0.5", True),
        ("-5", "-5", True),
        ("5", "-5", False),
        ("1235", "1234", False),
        ("0.51", "0.5", False),
        (None, "3", False),
        ("three", "3", False),
    ],
)
def test_score_numeric(pred, gold, correct):
    assert score_numeric(pred, ex(gold))["correct"] is correct


def test_gsm8k_real_records(shared_data):
    raw = read_raw_jsonl(shared_data / "gsm8k" / "test.jsonl", 5)
    task = load_task(tc(name="gsm8k", train_size=20, val_size=5, test_size=5), seed=0)
    assert task.max_new_tokens == 256 and "####" in task.prompt
    for r, e in zip(raw, task.test):
        gold = r["answer"].split("####")[-1].strip().replace(",", "")
        assert e.query == r["question"].strip()
        assert e.answer == gold
        assert "<<" not in e.target  # calculator annotations dropped from the training target
        assert e.target.endswith(r["answer"].split("####")[-1].strip())
        assert task.score(task.extract(r["answer"]), e)["correct"]
        assert task.score(task.extract(f"Let me think.\nThe answer is {gold}."), e)["correct"]
        assert not task.score(task.extract(f"#### {float(gold) + 1}"), e)["correct"]
    assert task.test[0].answer == "18"  # Janet's ducks


def test_gsm8k_reference_solutions_score_correct(shared_data):
    task = load_task(tc(name="gsm8k", train_size=200, val_size=0, test_size=1000), seed=0)
    assert len(task.test) == 1000
    for e in task.test + task.train:
        assert task.score(task.extract(e.target), e)["correct"], e.target


# ============================================================================ MATH


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"first \boxed{1} then \boxed{2}", "2"),
        (r"\fbox{7}", "7"),
        (r"\boxed 5", "5"),
        (r"\boxed 5 and later {x}", "5"),
        (r"\boxed { 12 }", "12"),
        (r"The answer is $\frac{3}{4}$.", r"\frac{3}{4}"),
        ("no box here, just 3", None),
        (r"\boxed{1 + {2", None),  # unbalanced
    ],
)
def test_extract_math(text, expected):
    assert extract_math(text) == expected


@pytest.mark.parametrize(
    "pred, gold, equal",
    [
        (r"\frac{1}{2}", r"\frac{1}{2}", True),
        ("0.5", r"\frac{1}{2}", True),
        (r"\dfrac12", r"\frac{1}{2}", True),
        (r"\frac12", "0.5", True),
        (r"\frac{2}{4}", r"\frac{1}{2}", True),
        (r"(3,\pi/2)", r"\left( 3, \frac{\pi}{2} \right)", True),
        (r"\frac{1}{3}", r"\frac{1}{2}", False),
        ("3", "4", False),
        (None, "1", False),
        (r"\frac{{", r"\frac{1}{2}", False),  # unparsable: wrong, no exception
    ],
)
def test_math_equal(pred, gold, equal):
    assert math_equal(pred, gold) is equal
    assert score_math(pred, ex(gold))["correct"] is equal


def test_math_both_schemas_real(shared_data):
    raw_test = read_raw_jsonl(shared_data / "math" / "test.jsonl", 3)
    raw_train = read_raw_jsonl(shared_data / "math" / "train.jsonl", 3)
    task = load_task(tc(name="math", train_size=10000, val_size=10, test_size=3), seed=0)
    for r, e in zip(raw_test, task.test):  # MATH-500 schema: the `answer` field
        assert e.query == r["problem"].strip()
        assert e.answer == r["answer"]
        assert e.meta["type"] == r["subject"] and e.meta["level"] == r["level"]
        assert task.score(task.extract(r["solution"]), e)["correct"]
    by_query = {e.query: e for e in task.train + task.validation}
    assert len(by_query) == 7500
    for r in raw_train:  # original schema: the answer is inside \boxed{} of the solution
        e = by_query[r["problem"].strip()]
        assert e.answer == last_boxed(r["solution"]).strip() and e.answer
        assert e.meta["type"] == r["type"] and e.meta["level"] == r["level"]
        assert task.score(task.extract(r["solution"]), e)["correct"]
        assert not task.score(task.extract(r"\boxed{123456789}"), e)["correct"]


def test_math_both_schemas_local(tmp_path):
    train = [{"problem": f"P{i}", "level": "Level 2", "type": "Algebra",
              "solution": rf"We get $\boxed{{\frac{{{i}}}{{2}}}}$."} for i in range(1, 5)]
    test = [{"problem": "T1", "solution": r"so \boxed{\dfrac{1}{2}}", "answer": r"\frac{1}{2}", "subject": "Algebra",
             "level": 3, "unique_id": "test/a/1.json"}]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "test.jsonl", test)
    task = load_task(tc(name="math", path=str(tmp_path), train_size=10, val_size=1), seed=0)
    assert [e.answer for e in task.test] == [r"\frac{1}{2}"]  # the answer field, not the box
    assert task.test[0].meta == {"level": 3, "type": "Algebra"}
    got = sorted(e.answer for e in task.train + task.validation)
    assert got == sorted(rf"\frac{{{i}}}{{2}}" for i in range(1, 5))
    assert len(task.validation) == 1 and len(task.train) == 3
    assert all(e.meta["level"] == "Level 2" for e in task.train)


# ============================================================================ HotpotQA


@pytest.mark.parametrize(
    "text, expected",
    [("The Eiffel Tower!", "eiffel tower"), ("  A  cat, an owl ", "cat owl"), ("U.S.A.", "usa"),
     ("Theatre", "theatre"), ("the", "")],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    "pred, gold, em, f1",
    [
        ("the eiffel tower.", "Eiffel Tower", 1.0, 1.0),
        ("Eiffel Tower in Paris", "Eiffel Tower", 0.0, 2 * (2 / 4) * 1 / (2 / 4 + 1)),
        ("Paris", "Eiffel Tower", 0.0, 0.0),
        ("Yes.", "yes", 1.0, 1.0),
        ("yes", "no", 0.0, 0.0),
        ("yes it is", "yes", 1.0, 1.0),  # a sentence answer to a yes/no question counts as its first word
        ("No, they are not both American.", "no", 1.0, 1.0),
        ("yes it is", "no", 0.0, 0.0),  # yes/no answers get no partial credit
        ("nobody knows", "no", 0.0, 0.0),  # 'no' must be a word of its own
        (None, "Kansas Song", 0.0, 0.0),
    ],
)
def test_score_qa(pred, gold, em, f1):
    s = score_qa(pred, ex(gold))
    assert s["em"] == em and s["correct"] is bool(em)
    assert s["f1"] == pytest.approx(f1)


def test_token_f1_counts_repeated_tokens_once_each():
    assert token_f1("new new york", "new york") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))


@pytest.mark.parametrize(
    "text, expected",
    [("Answer: The Beatles.", "The Beatles"), ("I think so.\nAnswer: yes\nbye", "yes"),
     ("The answer is: Paris", "Paris"), ("Kansas Song\nmore text", "Kansas Song"), ("  \n ", None)],
)
def test_extract_short(text, expected):
    assert extract_short(text) == expected


def test_hotpotqa_real_records(shared_data):
    raw = json.loads((shared_data / "hotpotqa" / "dev_distractor.json").read_text())
    task = load_task(tc(name="hotpotqa", train_size=1000, val_size=0, test_size=400), seed=0)
    assert len(task.test) == 400
    by_id = {r["_id"]: r for r in raw}
    for e in task.test[:20]:
        r = by_id[e.meta["id"]]
        assert e.answer == r["answer"].strip()
        assert e.query.endswith(f"Question: {r['question'].strip()}")
        for title, sents in r["context"]:  # (two records of the sample have no context at all)
            assert f"[{title}] {''.join(sents).strip()}" in e.query
        assert task.score(task.extract(f"Answer: the {r['answer']}."), e)["correct"]
    yes_no = [e for e in task.test if e.answer in ("yes", "no")]
    assert yes_no, "the sample has comparison questions with yes/no answers"
    e = yes_no[0]
    other = "no" if e.answer == "yes" else "yes"
    assert task.score(task.extract(f"Answer: {other}"), e) == {"correct": False, "em": 0.0, "f1": 0.0}


# ============================================================================ CosmosQA


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Answer: B", "B"),
        ("(C)", "C"),
        ("answer: d", "D"),
        ("The answer is (A).", "A"),
        ("A. The dog ran away", "A"),
        ("Answer: E", None),  # out of range
        ("E", None),
        ("", None),
        ("Answer: Because of the rain", None),
        ("Answer: A. Hmm, wait. Final answer: C", "C"),  # the last stated answer wins
    ],
)
def test_extract_letter(text, expected):
    assert extract_letter(text) == expected


def test_score_letter():
    assert score_letter("B", ex("B"))["correct"]
    assert not score_letter("C", ex("B"))["correct"]
    assert not score_letter(extract_letter("Answer: E"), ex("B"))["correct"]
    assert not score_letter(None, ex("A"))["correct"]


COSMOS_COLS = ["id", "context", "question", "answer0", "answer1", "answer2", "answer3", "label"]


def cosmos_row(i, label):
    return {"id": f"id{i}", "context": f"ctx {i}", "question": f"q {i}?", "answer0": "zero", "answer1": "one",
            "answer2": "two", "answer3": "three", "label": label}


def test_cosmosqa_real_records(shared_data):
    with open(shared_data / "cosmosqa" / "valid.csv", newline="") as f:
        raw = {r["id"]: r for r in csv.DictReader(f)}
    task = load_task(tc(name="cosmosqa", train_size=10, val_size=10, test_size=30), seed=0)
    for e in task.test:
        r = raw[e.meta["id"]]
        assert e.answer == "ABCD"[int(r["label"])]
        for j, letter in enumerate("ABCD"):
            assert f"{letter}. {r[f'answer{j}']}" in e.query
        assert task.score(task.extract(f"Answer: {e.answer}"), e)["correct"]
        assert task.score(task.extract(f"({e.answer.lower()})"), e)["correct"] is False  # lone lowercase: no answer
        wrong = "ABCD"[(int(r["label"]) + 1) % 4]
        assert not task.score(task.extract(f"Answer: {wrong}"), e)["correct"]


@pytest.mark.parametrize("bad", ["7", "-1", "x", ""])
def test_cosmosqa_label_out_of_range_names_file_and_record(tmp_path, bad):
    f = write_csv(tmp_path / "valid.csv", [cosmos_row(0, 1), cosmos_row(1, 2), cosmos_row(2, bad)])
    with pytest.raises(MetatunerError) as e:
        load_task(tc(name="cosmosqa", path=str(tmp_path)), seed=0)
    msg = str(e.value)
    assert str(f) in msg and "record 3" in msg and "label" in msg


def test_cosmosqa_local_file(tmp_path):
    f = write_csv(tmp_path / "mine.csv", [cosmos_row(i, i % 4) for i in range(8)])
    task = load_task(tc(name="cosmosqa", path=str(f), train_size=2, val_size=2, test_size=4), seed=0)
    got = {e.meta["id"]: e.answer for e in task.test + task.validation + task.train}
    assert got == {f"id{i}": "ABCD"[i % 4] for i in range(8)}


# ============================================================================ reasoning-gym


def test_chain_sum_uses_reasoning_gym_scorer(monkeypatch):
    import reasoning_gym

    task = load_task(tc(name="chain_sum", train_size=4, val_size=2, test_size=3), seed=0)
    e = task.test[0]
    assert task.score(e.answer, e) == {"correct": True, "score": 1.0}
    assert task.score(f" {e.answer}.0 ", e)["correct"]  # RG's decimal reward tolerates this
    assert task.score(str(int(e.answer) + 1), e) == {"correct": False, "score": 0.0}
    assert task.score(None, e) == {"correct": False, "score": 0.0}
    assert task.extract(f"Thinking...\nAnswer: {e.answer}.") == e.answer
    assert task.extract(f"<answer> {e.answer} </answer> and 99") == e.answer

    calls = []
    cls = type(reasoning_gym.create_dataset("chain_sum", size=1, seed=0))

    def spy(self, answer, entry):
        calls.append((answer, entry))
        return 0.25

    monkeypatch.setattr(cls, "score_answer", spy)
    assert task.score("17", e) == {"correct": False, "score": 0.25}
    assert calls[0][0] == "17"
    assert calls[0][1]["question"] == e.query and str(calls[0][1]["answer"]) == e.answer


def test_chain_sum_params_reach_the_dataset():
    cfg = load_config(None, ["task.params.min_terms=4", "task.params.max_terms=4", "task.train_size=3",
                             "task.val_size=1", "task.test_size=5"])
    task = load_task(cfg.task, seed=0)
    for e in task.test:
        expr = e.query.rsplit(":", 1)[1].strip().rstrip("=").strip()
        assert len(expr.replace("-", "+").split("+")) == 4, e.query
        assert eval(expr) == int(e.answer)  # noqa: S307 - digits and +/- only


def test_unknown_reasoning_gym_task():
    with pytest.raises(MetatunerError, match="no_such_task"):
        load_task(tc(name="no_such_task"), seed=0)


def test_bad_reasoning_gym_params():
    with pytest.raises(MetatunerError, match="task.params"):
        load_task(tc(name="chain_sum", params={"no_such_param": 1}), seed=0)


# ============================================================================ splits


def _ids(exs, key):
    return [key(e) for e in exs]


SPLIT_CASES = [
    ("hotpotqa", dict(train_size=100, val_size=50, test_size=100), lambda e: e.meta["id"]),
    ("cosmosqa", dict(train_size=100, val_size=50, test_size=100), lambda e: e.meta["id"]),
    ("chain_sum", dict(train_size=60, val_size=20, test_size=30), lambda e: e.query),
]


@pytest.mark.parametrize("name, sizes, key", SPLIT_CASES, ids=[c[0] for c in SPLIT_CASES])
def test_carved_splits_deterministic_and_disjoint(shared_data, name, sizes, key):
    a = load_task(tc(name=name, **sizes), seed=0)
    b = load_task(tc(name=name, **sizes), seed=0)
    c = load_task(tc(name=name, **sizes), seed=1)
    for split in ("train", "validation", "test"):
        assert _ids(a.split(split), key) == _ids(b.split(split), key)
        assert len(a.split(split)) == sizes[{"validation": "val_size"}.get(split, f"{split}_size")]
    assert _ids(a.test, key) != _ids(c.test, key)
    assert _ids(a.train, key) != _ids(c.train, key)
    tr, va, te = (set(_ids(x, key)) for x in (a.train, a.validation, a.test))
    assert len(tr) == len(a.train) and len(va) == len(a.validation) and len(te) == len(a.test)
    assert not (tr & va) and not (tr & te) and not (va & te)


def _small_share(exs):
    return sum(abs(float(e.answer)) < 100 for e in exs) / len(exs)


def test_procedural_splits_shuffled_are_alike_generation_order_is_not():
    """products with 1-2 digit factors repeats its small questions: dropping repeats in generation order
    leaves most of them in the first split (test); the default shuffles before cutting."""
    sizes = dict(name="products", params={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
                 train_size=300, val_size=100, test_size=300)
    gen = load_task(tc(split_order="generation", **sizes), seed=0)
    shuf = load_task(tc(**sizes), seed=0)
    assert abs(_small_share(gen.test) - _small_share(gen.validation)) > 0.15  # the bias the fix removes
    assert abs(_small_share(shuf.test) - _small_share(shuf.validation)) < 0.08
    assert abs(_small_share(shuf.test) - _small_share(shuf.train)) < 0.08
    q = lambda xs: [e.query for e in xs]  # noqa: E731
    assert q(shuf.test) == q(load_task(tc(**sizes), seed=0).test)  # deterministic given the seed
    tr, va, te = set(q(shuf.train)), set(q(shuf.validation)), set(q(shuf.test))
    assert len(tr) == len(shuf.train) == 300 and len(va) == 100 and len(te) == 300
    assert not (tr & va or tr & te or va & te)
    assert "shuffled order" in shuf.origin["test"] and "generation order" in gen.origin["test"]
    with pytest.raises(MetatunerError, match="task.split_order"):
        load_config(None, ["task.split_order=random"])


def test_procedural_splits_refill_a_short_draw():
    """products with 1-2 digit factors has 934 distinct questions among the first 1735 drawn: every split
    is cut from a bigger draw, so all are full and alike; task.fill_short=false keeps the short splits
    (train first), as runs before it did; too few questions even in a big draw: a one-line error."""
    params = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}
    q = lambda xs: [e.query for e in xs]  # noqa: E731
    big = load_task(tc(name="products", params=params, train_size=300, val_size=100, test_size=1000), seed=0)
    assert (len(big.train), len(big.validation), len(big.test)) == (300, 100, 1000)
    allq = q(big.train) + q(big.validation) + q(big.test)
    assert len(set(allq)) == len(allq)
    assert abs(_small_share(big.test) - _small_share(big.train)) < 0.05  # alike, not test first
    assert q(big.test) == q(load_task(tc(name="products", params=params, train_size=300, val_size=100,
                                         test_size=1000), seed=0).test)
    short = load_task(tc(name="products", params=params, train_size=300, val_size=100, test_size=1000,
                         fill_short=False), seed=0)
    assert len(short.test) == 1000 and len(short.validation) < 100 and not short.train  # short, train first
    gen = load_task(tc(name="products", params=params, train_size=50, val_size=100, test_size=300,
                       split_order="generation"), seed=0)
    old = load_task(tc(name="products", params=params, train_size=50, val_size=100, test_size=300,
                       split_order="generation", fill_short=False), seed=0)
    assert len(old.train) < 50 and len(gen.train) == 50  # generation order: the bigger draw extends the first
    assert q(gen.test) == q(old.test) and q(gen.validation) == q(old.validation) and q(gen.train)[:len(old.train)] == q(old.train)
    with pytest.raises(MetatunerError, match=r"only 100 distinct questions .* lower the sizes or widen task.params"):
        load_task(tc(name="products", params={**params, "max_digits": 1}, train_size=50, val_size=10, test_size=300))


def test_runs_saved_before_fill_short_keep_their_splits(tmp_path):
    """A config.yaml saved before task.fill_short existed reloads with false where true would cut other
    splits (the splits it ran on), and with true where both cut the same ones, so that `compare` still
    counts such runs as done with the default."""
    import yaml

    from metatuner.checkpoints import read_config_dict, same_settings
    from metatuner.config import load_saved_config, save_config

    short = ["task.name=products", "task.params.min_terms=2", "task.params.max_terms=2", "task.params.min_digits=1",
             "task.params.max_digits=2", "task.train_size=50", "task.val_size=100", "task.test_size=300"]
    # mixed train tasks in generation order: products' draw is short, but the first 400 train rows it
    # gives the mix are the same either way, so the run counts as true
    mixed = ["task.name=chain_sum", "task.train_tasks=[basic_arithmetic,products]", "task.split_order=generation",
             "task.params_by_task.products={min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 2}",
             "task.train_size=800", "task.test_size=100"]
    from metatuner.tasks.loading import first_draw_short

    assert first_draw_short(load_config(None, mixed).task, 0)
    for overrides, before in ((short, False), (["task.name=chain_sum", "task.train_size=50"], True), (mixed, True)):
        cfg = load_config(None, overrides)
        save_config(cfg, tmp_path / "config.yaml")
        assert load_saved_config(tmp_path / "config.yaml").task.fill_short is True
        data = yaml.safe_load((tmp_path / "config.yaml").read_text())
        del data["task"]["fill_short"]
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
        assert load_saved_config(tmp_path / "config.yaml").task.fill_short is before
        assert same_settings(read_config_dict(tmp_path / "config.yaml"), cfg) is before


def test_gsm8k_splits(shared_data):
    sizes = dict(train_size=300, val_size=50, test_size=40)
    a, b, c = (load_task(tc(name="gsm8k", **sizes), seed=s) for s in (0, 0, 1))
    q = lambda xs: [e.query for e in xs]  # noqa: E731
    assert q(a.train) == q(b.train) and q(a.validation) == q(b.validation)
    assert q(a.train) != q(c.train)
    assert q(a.test) == q(c.test)  # the official test split is fixed: a prefix of the file
    raw = read_raw_jsonl(shared_data / "gsm8k" / "test.jsonl", 40)
    assert q(a.test) == [r["question"].strip() for r in raw]
    tr, va, te = set(q(a.train)), set(q(a.validation)), set(q(a.test))
    assert not (tr & va) and not (tr & te) and not (va & te)


def test_split_names():
    task = load_task(tc(name="chain_sum", train_size=2, val_size=1, test_size=1), seed=0)
    assert task.split("validation") is task.validation
    with pytest.raises(MetatunerError, match="eval.split"):
        task.split("dev")


def test_render():
    task = load_task(tc(name="chain_sum", train_size=2, val_size=1, test_size=1, prompt="My prompt.",
                        max_new_tokens=7), seed=0)
    assert task.prompt == "My prompt." and task.max_new_tokens == 7
    assert task.render(" P ", "Q") == [{"role": "user", "content": "P\n\nQ"}]
    assert task.render("  ", "Q") == [{"role": "user", "content": "Q"}]


# ============================================================================ task.path for benchmarks


def gsm_rows(prefix, n):
    return [{"question": f"{prefix} q{i}", "answer": f"{i} + 1 = <<{i}+1={i + 1}>>{i + 1}\n#### {1000 * i + 1:,}"}
            for i in range(n)]


def test_benchmark_task_path_folder_is_used(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", gsm_rows("test", 3))
    write_jsonl(tmp_path / "train.jsonl", gsm_rows("train", 6))
    task = load_task(tc(name="gsm8k", path=str(tmp_path), train_size=10, val_size=2), seed=0)
    assert [e.query for e in task.test] == ["test q0", "test q1", "test q2"]
    assert [e.answer for e in task.test] == ["1", "1001", "2001"]
    assert sorted(e.query for e in task.train + task.validation) == [f"train q{i}" for i in range(6)]
    assert len(task.validation) == 2
    assert "<<" not in task.test[1].target and task.test[1].target.endswith("#### 1,001")


def test_benchmark_task_path_file_is_the_eval_file(tmp_path):
    f = write_jsonl(tmp_path / "mine.jsonl", gsm_rows("mine", 10))
    task = load_task(tc(name="gsm8k", path=str(f), train_size=3, val_size=2, test_size=5), seed=0)
    assert len(task.test) == 5 and len(task.validation) == 2 and len(task.train) == 3
    allq = {e.query for e in task.test + task.validation + task.train}
    assert allq <= {f"mine q{i}" for i in range(10)} and len(allq) == 10


def test_hotpotqa_task_path_file(tmp_path):
    rows = [{"_id": f"x{i}", "answer": "yes" if i % 2 else "Paris", "question": f"Q{i}?",
             "supporting_facts": [], "context": [["Paris", ["Paris is ", "in France."]], ["Rome", ["Rome."]]],
             "type": "comparison", "level": "hard"} for i in range(4)]
    f = tmp_path / "dev.json"
    f.write_text(json.dumps(rows))
    task = load_task(tc(name="hotpotqa", path=str(f), train_size=1, val_size=1, test_size=2), seed=0)
    assert {e.meta["id"] for e in task.test + task.validation + task.train} == {f"x{i}" for i in range(4)}
    e = task.test[0]
    assert "[Paris] Paris is in France.\n[Rome] Rome." in e.query


def test_hotpotqa_hub_schema_context_in_local_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": f"h{i}", "question": f"Q{i}?", "answer": "Rome",
             "context": {"title": ["Rome", "Milan"], "sentences": [["Rome is ", "old."], ["Milan."]]}}
            for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "validation.parquet")
    task = load_task(tc(name="hotpotqa", path=str(tmp_path / "validation.parquet"), val_size=0, test_size=3), seed=0)
    assert "[Rome] Rome is old.\n[Milan] Milan." in task.test[0].query


def test_benchmark_task_path_missing(tmp_path):
    with pytest.raises(MetatunerError, match="does not exist"):
        load_task(tc(name="gsm8k", path=str(tmp_path / "nope")), seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MetatunerError, match="no evaluation file"):
        load_task(tc(name="gsm8k", path=str(tmp_path / "empty")), seed=0)


def test_benchmark_missing_column_in_a_later_record(tmp_path):
    f = write_jsonl(tmp_path / "test.jsonl", gsm_rows("t", 3) + [{"question": "q only"}])
    with pytest.raises(MetatunerError) as e:
        load_task(tc(name="gsm8k", path=str(f)), seed=0)
    msg = str(e.value)
    assert str(f) in msg and "record 4" in msg and "answer" in msg and "question" in msg


def test_empty_test_split_is_a_clear_error(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", gsm_rows("t", 3))
    with pytest.raises(MetatunerError, match="test split is empty"):
        load_task(tc(name="gsm8k", path=str(tmp_path), test_size=0), seed=0)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(MetatunerError, match=r"empty.jsonl: no records"):
        load_task(tc(name="jsonl", path=str(tmp_path / "empty.jsonl")), seed=0)


# ============================================================================ generic files


def generic_rows(n, numeric=True):
    return [{"problem": f"What is {i} + {i}?", "final": (2 * i if numeric else f"word{i}"), "sol": f"{i}+{i}={2 * i}",
             "extra": i} for i in range(n)]


def test_generic_jsonl_user_named_columns(tmp_path):
    f = write_jsonl(tmp_path / "data.jsonl", generic_rows(10))
    cfg = load_config(None, ["task.name=jsonl", f"task.path={f}", "task.params.query_column=problem",
                             "task.params.answer_column=final", "task.params.target_column=sol",
                             "task.test_size=4", "task.val_size=3", "task.train_size=3"])
    task = load_task(cfg.task, seed=cfg.seed)
    assert len(task.test) == 4 and len(task.validation) == 3 and len(task.train) == 3
    by_q = {f"What is {i} + {i}?": i for i in range(10)}
    for e in task.test + task.validation + task.train:
        i = by_q[e.query]
        assert e.answer == str(2 * i) and e.target == f"{i}+{i}={2 * i}"
    assert len({e.query for e in task.test + task.validation + task.train}) == 10
    e = task.test[0]
    # numeric answers: numeric extraction and scoring
    assert task.score(task.extract(f"Let me add.\nAnswer: {e.answer}."), e)["correct"]
    assert task.score(task.extract(f"so {e.answer}.0"), e)["correct"]
    assert not task.score(task.extract(f"Answer: {int(e.answer) + 1}"), e)["correct"]


def test_generic_default_columns_and_default_target(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"query": "Capital of France?", "answer": "Paris"}])
    task = load_task(tc(name="jsonl", path=str(f), val_size=0), seed=0)
    e = task.test[0]
    assert (e.query, e.answer, e.target) == ("Capital of France?", "Paris", "Answer: Paris")
    # text answers: short-answer extraction and EM/F1 scoring
    assert task.score(task.extract("Answer: the paris."), e) == {"correct": True, "em": 1.0, "f1": 1.0}


def test_generic_csv(tmp_path):
    f = write_csv(tmp_path / "d.csv", generic_rows(6, numeric=False))
    task = load_task(tc(name="jsonl", path=str(f), params={"query_column": "problem", "answer_column": "final"},
                        test_size=6, val_size=0), seed=0)
    assert sorted(e.answer for e in task.test) == [f"word{i}" for i in range(6)]
    e = task.test[0]
    assert task.score(task.extract(f"Answer: {e.answer}"), e)["correct"]
    assert not task.score(task.extract("Answer: word99"), e)["correct"]


def test_generic_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(generic_rows(5)), tmp_path / "d.parquet")
    task = load_task(tc(name="jsonl", path=str(tmp_path / "d.parquet"),
                        params={"query_column": "problem", "answer_column": "final"}, test_size=5, val_size=0), seed=0)
    assert sorted(int(e.answer) for e in task.test) == [0, 2, 4, 6, 8]


def test_generic_folder_with_splits(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"query": f"tr{i}", "answer": str(i)} for i in range(8)])
    write_jsonl(tmp_path / "test.jsonl", [{"query": f"te{i}", "answer": str(i)} for i in range(5)])
    task = load_task(tc(name="jsonl", path=str(tmp_path), val_size=2, test_size=3), seed=0)
    assert [e.query for e in task.test] == ["te0", "te1", "te2"]
    assert len(task.validation) == 2
    assert sorted(e.query for e in task.train + task.validation) == [f"tr{i}" for i in range(8)]
    write_jsonl(tmp_path / "validation.jsonl", [{"query": f"va{i}", "answer": str(i)} for i in range(4)])
    task = load_task(tc(name="jsonl", path=str(tmp_path), val_size=3, test_size=3), seed=0)
    assert [e.query for e in task.validation] == ["va0", "va1", "va2"]
    assert [e.query for e in task.train] == [f"tr{i}" for i in range(8)]


def test_generic_folder_without_test_file(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"query": "q", "answer": "1"}])
    with pytest.raises(MetatunerError, match="no test"):
        load_task(tc(name="jsonl", path=str(tmp_path)), seed=0)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"query": "a", "answer": "1"}\n\n{"query": "b", "answer": \n{"query": "c", "answer": "3"}\n')
    with pytest.raises(MetatunerError) as e:
        load_task(tc(name="jsonl", path=str(f)), seed=0)
    msg = str(e.value)
    assert str(f) in msg and "line 3" in msg and "\n" not in msg


def test_jsonl_line_not_an_object(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"query": "a", "answer": "1"}\n[1, 2]\n')
    with pytest.raises(MetatunerError, match="line 2"):
        load_task(tc(name="jsonl", path=str(f)), seed=0)


def test_missing_column_names_existing_columns(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", generic_rows(3))
    with pytest.raises(MetatunerError) as e:
        load_task(tc(name="jsonl", path=str(f), params={"query_column": "question", "answer_column": "final"}),
                  seed=0)
    msg = str(e.value)
    assert str(f) in msg and "'question'" in msg
    for col in ("problem", "final", "sol", "extra"):
        assert f"'{col}'" in msg


def test_generic_needs_path_and_known_suffix(tmp_path):
    with pytest.raises(MetatunerError, match="task.path"):
        load_task(tc(name="jsonl"), seed=0)
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(MetatunerError, match="unsupported file type"):
        load_task(tc(name="jsonl", path=str(tmp_path / "d.txt")), seed=0)
    with pytest.raises(MetatunerError, match="file not found"):
        load_task(tc(name="jsonl", path=str(tmp_path / "missing.jsonl")), seed=0)


def test_malformed_json_list_names_file_and_line(tmp_path):
    f = tmp_path / "dev.json"
    f.write_text('[\n{"question": "q", "answer": "a",\n "context": []\n,,]\n')
    with pytest.raises(MetatunerError) as e:
        load_task(tc(name="hotpotqa", path=str(f)), seed=0)
    assert str(f) in str(e.value) and "line 4" in str(e.value)


# ============================================================================ train on other tasks (generalization)


def test_train_tasks_mix_other_tasks_and_test_on_target(tmp_path, monkeypatch):
    (tmp_path / "cosmosqa").mkdir()
    write_csv(tmp_path / "cosmosqa" / "valid.csv", [cosmos_row(i, i % 4) for i in range(40)])
    monkeypatch.setenv("METATUNER_DATA", str(tmp_path))
    plain = load_task(tc(name="chain_sum", train_size=20, val_size=4, test_size=6), seed=0)
    task = load_task(tc(name="chain_sum", train_size=20, val_size=4, test_size=6,
                        train_tasks=["cosmosqa", "chain_sum"]), seed=0)
    # test: the target's, unchanged; p~: the target's
    assert [e.query for e in task.test] == [e.query for e in plain.test]
    assert task.prompt == plain.prompt
    # train/validation: both tasks, split evenly, tagged, shuffled together
    src = [e.meta["task"] for e in task.train]
    assert len(task.train) == 20 and src.count("cosmosqa") == 10 and src.count("chain_sum") == 10
    assert src != sorted(src)
    assert sorted(e.meta["task"] for e in task.validation) == ["chain_sum"] * 2 + ["cosmosqa"] * 2
    assert not {e.query for e in task.train + task.validation} & {e.query for e in task.test}
    cos = task.sources["cosmosqa"]
    for e in task.train:
        if e.meta["task"] == "cosmosqa":
            # the other task states its own answer format and is judged by its own rules
            assert e.query.startswith(cos.prompt + "\n\n")
            wrong = "ABCD"[("ABCD".index(e.answer) + 1) % 4]
            assert task.score(task.extract_for(f"Answer: {e.answer}", e), e)["correct"]
            assert not task.score(task.extract_for(f"Answer: {wrong}", e), e)["correct"]
        else:
            assert not e.query.startswith(cos.prompt)
            assert task.score(task.extract_for(f"Answer: {e.answer}", e), e)["correct"]
    # a letter is no number: the target's own rules still score its test examples
    t0 = task.test[0]
    assert task.score(task.extract_for(f"Answer: {t0.answer}", t0), t0)["correct"]
    assert not task.score(task.extract_for("Answer: B", t0), t0)["correct"]
    assert task.max_new_tokens == max(plain.max_new_tokens, cos.max_new_tokens)


def test_train_tasks_errors_name_the_key():
    with pytest.raises(MetatunerError, match=r"task.train_tasks repeats"):
        load_task(tc(name="chain_sum", train_size=4, test_size=2, train_tasks=["chain_sum", "chain_sum"]), seed=0)
    with pytest.raises(MetatunerError, match=r"task.train_tasks\[1\]='no_such_task'"):
        load_task(tc(name="chain_sum", train_size=4, test_size=2, train_tasks=["chain_sum", "no_such_task"]), seed=0)


def test_train_tasks_use_params_by_task():
    task = load_task(tc(name="chain_sum", train_size=6, val_size=0, test_size=2, train_tasks=["products"],
                        params_by_task={"products": {"min_digits": 1, "max_digits": 1}}), seed=0)
    nums = [int(x) for e in task.train for x in re.findall(r"\d+", e.query.split("multiplication:")[-1])]
    assert len(task.train) == 6 and nums and max(nums) <= 9


def test_split_stats_rows_for_full_and_empty_splits():
    """scripts/split_stats.py: a row per split, and an empty split (task.fill_short=false on a short draw)
    gives a row of dashes instead of a crash."""
    import runpy
    from pathlib import Path

    ns = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "split_stats.py"))
    exs = [Example(query="q" * 10, answer=a, target="") for a in ("5", "5", "250")]
    assert ns["split_row"]("test", exs) == "| test | 3 | 10.0 | 2 | '5' 66.7% | 66.7 |"
    assert ns["split_row"]("train", []) == "| train | 0 | - | 0 | - | - |"


def test_generation_order_seeds_are_seed_zero_shifted_and_the_run_says_so():
    """reasoning-gym seeds question i with seed + i: in generation order seed 1's splits are seed 0's shifted
    by one question (the two test splits share all but one); shuffled order cuts each seed's own split."""
    from metatuner.config import load_config
    from metatuner.run import generation_order_shift
    from metatuner.tasks import load_task

    base = ["task.name=chain_sum", "task.train_size=20", "task.val_size=5", "task.test_size=10"]
    tc = load_config(None, base + ["task.split_order=generation"]).task
    a, b = load_task(tc, 0), load_task(tc, 1)
    qa = [e.query for e in a.test + a.validation + a.train]
    qb = [e.query for e in b.test + b.validation + b.train]
    assert qb[:-1] == qa[1:len(qb)]
    assert generation_order_shift(tc, 1) == 1 and generation_order_shift(tc, 0) == 0
    shuffled = load_config(None, base).task
    assert generation_order_shift(shuffled, 1) == 0
    s0, s1 = ({e.query for e in load_task(shuffled, seed).test} for seed in (0, 1))
    assert len(s0 & s1) < 9  # each seed shuffles before cutting: not the same questions shifted
    assert generation_order_shift(load_config(None, ["task.name=gsm8k", "task.split_order=generation"]).task, 3) == 0
