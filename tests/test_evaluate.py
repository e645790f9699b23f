"""Evaluation harness with a tiny random model and a character tokenizer (real generation on CPU)."""

from __future__ import annotations

import contextlib
import json
import math
import re

import pytest
import torch

import metatuner.evaluate as ev
from metatuner.errors import MetatunerError
from metatuner.evaluate import (best_of_n, chat_text, evaluate, generate_texts, greedy_texts, majority_vote,
                                weighted_vote)

# short queries of different lengths, so a batch really is left-padded
QUERIES = ["1+2=", "What is 12 + 35?", "abc", "Hello there, how are you doing today?", "x", "9 - 4 - 3 =", "Q"]


def test_chat_text_uses_template(tiny_model):
    _, tok = tiny_model
    text = chat_text(tok, [{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_evaluate_writes_predictions_and_metrics(tiny_model, make_task, tmp_path):
    model, tok = tiny_model
    task = make_task([(q, "?") for q in QUERIES[:5]], max_new_tokens=6)
    first, _ = evaluate(model, tok, task, task.test, batch_size=1, progress=False)
    # make the references right for examples 0, 2, 4 and wrong for 1, 3
    for i, e in enumerate(task.test):
        e.answer = first[i]["extracted"] if i % 2 == 0 else "\x00never"
    assert all(first[i]["extracted"] is not None for i in (0, 2, 4))

    out = tmp_path / "run"
    records, metrics = evaluate(model, tok, task, task.test, batch_size=2, output_dir=out, progress=False)
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 5
    preds = [json.loads(x) for x in lines]
    assert preds == json.loads(json.dumps(records))
    for p, e in zip(preds, task.test):
        assert {"query", "prompt", "generation", "extracted", "reference", "correct"} <= set(p)
        assert p["query"] == e.query and p["reference"] == e.answer and p["prompt"] == task.prompt
        assert p["extracted"] == (p["generation"][:1] or None)
    assert [p["correct"] for p in preds] == [True, False, True, False, True]

    saved = json.loads((out / "metrics.json").read_text())
    assert saved == metrics
    assert {"task", "n", "accuracy", "tokens_generated", "wall_seconds"} <= set(saved)
    assert saved["task"] == "toy" and saved["n"] == 5
    assert saved["accuracy"] == pytest.approx(sum(p["correct"] for p in preds) / len(preds)) == pytest.approx(0.6)
    # the char tokenizer makes one token per character (+ the end token when the model stopped)
    n_chars = sum(len(p["generation"]) for p in preds)
    assert n_chars <= saved["tokens_generated"] <= 5 * task.max_new_tokens
    assert saved["wall_seconds"] >= 0
    import resource

    assert 0 < saved["peak_memory_mb"] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 + 0.1


def test_extra_metrics_and_qa_means(tiny_model, make_task):
    model, tok = tiny_model

    def score(pred, e):
        return {"correct": False, "em": 0.0, "f1": 0.5}

    task = make_task([(q, "a") for q in QUERIES[:3]], score=score, max_new_tokens=2)
    _, m = evaluate(model, tok, task, task.test, progress=False, extra_metrics={"model": "tiny", "seed": 3})
    assert m["accuracy"] == 0.0 and m["em"] == 0.0 and m["f1"] == pytest.approx(0.5)
    assert m["model"] == "tiny" and m["seed"] == 3 and m["strategy"] == "greedy" and m["samples_per_query"] == 1


def test_batched_left_padding_matches_batch_size_one(tiny_model, make_task):
    model, tok = tiny_model
    texts = [chat_text(tok, [{"role": "user", "content": q}]) for q in QUERIES]
    lengths = {len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts}
    assert len(lengths) > 3  # the batch needs real padding
    tok.padding_side = "right"  # generate_texts must switch to left padding itself
    try:
        batched, ntok_b, _ = generate_texts(model, tok, texts, 12)
    finally:
        tok.padding_side = "left"
    single = [generate_texts(model, tok, [t], 12)[0][0] for t in texts]
    assert batched == single
    assert ntok_b == [generate_texts(model, tok, [t], 12)[1][0] for t in texts]
    assert len({g[0] for g in batched}) > 2  # outputs depend on the input, so the comparison means something

    # the check is sensitive: ignoring the padding (attention on pad tokens) changes some outputs
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert (enc["input_ids"][:, 0] == tok.pad_token_id).any()  # left padded
    with torch.no_grad():
        out = model.generate(input_ids=enc["input_ids"], attention_mask=torch.ones_like(enc["attention_mask"]),
                             max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    unmasked = [tok.decode(o[enc["input_ids"].shape[1]:], skip_special_tokens=True) for o in out]
    assert any(u != s[0] for u, s in zip(unmasked, single))

    # and through evaluate(): same records for batch sizes 1, 3 and 16
    task = make_task([(q, "x") for q in QUERIES], max_new_tokens=8)
    gens = [[r["generation"] for r in evaluate(model, tok, task, task.test, batch_size=b, progress=False)[0]]
            for b in (1, 3, 16)]
    assert gens[0] == gens[1] == gens[2]


def _eos_prone(tiny_model_path, prefix=""):
    """A private copy of the tiny model whose end token wins the argmax in some rows but not in all."""
    from metatuner.models import load_model

    model, tok = load_model(str(tiny_model_path), dtype="float32", device="cpu")
    texts = [chat_text(tok, [{"role": "user", "content": prefix + q}]) for q in QUERIES]
    row = model.lm_head.weight[tok.eos_token_id].detach().clone()
    for scale in (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0):
        with torch.no_grad():
            model.lm_head.weight[tok.eos_token_id] = row * scale
        _, ntoks, _ = generate_texts(model, tok, texts, 20)
        stopped = [n[0] < 20 for n in ntoks]
        if 1 < sum(stopped) < len(texts) - 1 and len({n[0] for n in ntoks}) > 2:
            return model, tok, texts
    pytest.skip("no scale of the end token's logits stops some rows but not all")


def _reference(model, tok, texts, max_new):
    """Hugging Face generate on each text alone: (text before the end token, tokens counted with it)."""
    out = []
    for t in texts:
        enc = tok([t], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)[0, enc["input_ids"].shape[1]:].tolist()
        raw = tok.decode(ids, skip_special_tokens=False)
        n = ids.index(tok.eos_token_id) + 1 if tok.eos_token_id in ids else len(ids)
        out.append((tok.decode(ids[:n], skip_special_tokens=False), n))
    return out


def test_generation_stops_at_eos_and_counts_it(tiny_model_path):
    """Rows stop at <|im_end|>: it is counted as generated and left out of the text, nothing after it is
    kept; checked against raw token ids decoded WITH special tokens, for both generation paths."""
    model, tok, texts = _eos_prone(tiny_model_path)
    ref = _reference(model, tok, texts, 20)
    assert any(r.endswith("<|im_end|>") for r, _ in ref) and not all(r.endswith("<|im_end|>") for r, _ in ref)
    gens, ntoks, logps = generate_texts(model, tok, texts, 20, return_logprobs=True)
    fast, fast_n = greedy_texts(model, tok, texts, 20)
    for (raw, n), g, k, lp, f, fk in zip(ref, gens, ntoks, logps, fast, fast_n):
        want = raw.removesuffix("<|im_end|>")
        assert "<|im_end|>" not in want  # the reference stopped at the first end token
        assert g == [want] and k == [n] and f == [want] and fk == [n]
        assert lp[0] <= 0.0 or lp[0] == -math.inf


@pytest.mark.parametrize("share_prefix,drop_finished", [(True, True), (False, True), (True, False), (False, False)])
def test_greedy_texts_matches_generate(tiny_model_path, share_prefix, drop_finished):
    """The fast greedy loop gives Hugging Face generate's texts and token counts, with rows of different
    lengths (left padding), a shared task prompt (prefix run once) and rows that finish early."""
    model, tok, texts = _eos_prone(tiny_model_path, prefix="Add the numbers. Reply as Answer: <n>\n\n")
    want_g, want_n, _ = generate_texts(model, tok, texts, 16)
    got_g, got_n = greedy_texts(model, tok, texts, 16, share_prefix=share_prefix, drop_finished=drop_finished)
    assert got_g == want_g and got_n == want_n
    assert len({n[0] for n in want_n}) > 1  # some rows finished before others


def test_sampling_runs_each_prompt_once_with_the_same_samples(tiny_model_path):
    """share_prompt (the default for n > 1) gives, for one seed, the texts, token counts and scores of Hugging
    Face's num_return_sequences, with rows of different lengths and rows that end early; and the model
    really sees each prompt once (the forward over the prompt holds b rows, not b * n)."""
    model, tok, texts = _eos_prone(tiny_model_path, prefix="Add the numbers. Reply as Answer: <n>\n\n")
    runs = {}
    for share in (False, True):
        torch.manual_seed(7)
        runs[share] = generate_texts(model, tok, texts, 16, do_sample=True, temperature=0.9, top_p=0.95,
                                     num_return_sequences=3, return_logprobs=True, answer_end="Answer: 1",
                                     share_prompt=share)
    (g0, n0, l0), (g1, n1, l1) = runs[False], runs[True]
    assert g1 == g0 and n1 == n0
    assert len(g1) == len(texts) and all(len(x) == 3 for x in g1)
    assert len({k for row in n1 for k in row}) > 1  # some samples ended before others
    for a, b in zip(l0, l1):
        assert a == pytest.approx(b, abs=1e-5)
    seen = []
    hook = model.model.layers[0].register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape[:2])))
    generate_texts(model, tok, texts, 4, do_sample=True, num_return_sequences=3)
    hook.remove()
    width = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)["input_ids"].shape[1]
    assert seen[0] == (len(texts), width - 1) and all(rows == 3 * len(texts) for rows, _ in seen[1:])


def test_stop_at_answer_line_keeps_the_text_up_to_it(tiny_model, make_task):
    """With task.answer_end, a row ends as soon as its text matches; up to there it equals the free text."""
    model, tok = tiny_model
    texts = [chat_text(tok, [{"role": "user", "content": q}]) for q in QUERIES]
    free, free_n = greedy_texts(model, tok, texts, 24)
    chars = [c for g in free for c in g[0][3:] if c.isalnum()]
    stop_char = max(set(chars), key=chars.count)  # a character most rows produce after a few tokens
    pattern = re.escape(stop_char)
    got, got_n = greedy_texts(model, tok, texts, 24, answer_end=pattern)
    cut = 0
    for (f,), (fn,), (g,), (gn,) in zip(free, free_n, got, got_n):
        m = re.search(pattern, f)
        if m is None:
            assert g == f and gn == fn
        else:
            assert g == f[: m.end()] and gn == m.end()  # the char tokenizer: one token per character
            cut += len(f) > m.end()
    assert cut >= 2  # the stop really shortened some rows

    # through evaluate(): the task's answer_end is used unless stop_at_answer=False
    task = make_task([(q, "?") for q in QUERIES], max_new_tokens=24)
    task.answer_end = pattern
    stopped = [r["generation"] for r in evaluate(model, tok, task, task.test, progress=False)[0]]
    full = [r["generation"] for r in evaluate(model, tok, task, task.test, progress=False, stop_at_answer=False)[0]]
    assert stopped == [g[0] for g in got] and full == [f[0] for f in free]


def test_sorted_batches_restore_the_original_order(tiny_model, make_task, monkeypatch):
    model, tok = tiny_model
    task = make_task([(q, "x") for q in QUERIES], max_new_tokens=8)
    plain, m1 = evaluate(model, tok, task, task.test, batch_size=3, progress=False, sort_by_length=False,
                         fast_greedy=False, stop_at_answer=False)
    fast, m2 = evaluate(model, tok, task, task.test, batch_size=3, progress=False)
    assert [r["index"] for r in fast] == [r["index"] for r in plain] == list(range(len(QUERIES)))
    assert [r["query"] for r in fast] == QUERIES
    assert [r["generation"] for r in fast] == [r["generation"] for r in plain]
    assert m1["tokens_generated"] == m2["tokens_generated"]
    # the batches really were formed longest first
    fake = FakeGen(lambda t: ["x"]).install(monkeypatch)
    evaluate(model, tok, task, task.test, batch_size=3, progress=False)
    lengths = [len(t) for c in fake.calls for t in c["texts"]]
    assert lengths == sorted(lengths, reverse=True) and lengths != [len(chat_text(tok, task.render("", q)))
                                                                     for q in QUERIES]


def test_metrics_carry_diagnostics_when_the_task_has_a_train_split(tiny_model, make_task, monkeypatch):
    from metatuner.tasks import Example

    model, tok = tiny_model
    FakeGen(lambda t: ["7"] if "q0" in t or "q1" in t or "q2" in t else ["nothing"]).install(monkeypatch)
    task = make_task([(f"q{i}", a) for i, a in enumerate(["7", "4", "3", "5"])],
                     extract=lambda t: t if t.isdigit() else None)
    task.train = [Example(query="t", answer=a, target="") for a in ["3", "3", "7"]]
    recs, m = evaluate(model, tok, task, task.test, progress=False)
    assert m["floor_answer"] == "3" and m["floor_accuracy"] == 0.25
    assert m["no_answer_rate"] == 0.25 and m["top_answer"] == "7" and m["top_answer_share"] == 0.75
    assert m["distinct_answers"] == 1 and m["distinct_references"] == 4 and m["top_reference_share"] == 0.25
    assert m["collapsed"] is True  # 0.75 > max(0.5, 2 x 0.25)
    assert [r["correct"] for r in recs] == [True, False, False, False]
    _, m = evaluate(model, tok, task, task.test, progress=False, diagnose=False)
    assert "floor_accuracy" not in m


def test_batch_size_must_be_positive(tiny_model, make_task):
    model, tok = tiny_model
    task = make_task([("q", "x")])
    with pytest.raises(MetatunerError, match="eval.batch_size"):
        evaluate(model, tok, task, task.test, batch_size=0, progress=False)


def test_majority_vote():
    assert majority_vote(["3", "5", "3", "5"]) == "3"  # tie: first seen
    assert majority_vote(["5", "3", "3", "5"]) == "5"
    assert majority_vote(["7", None, "8", "8"]) == "8"
    assert majority_vote([None, "", None, "4"]) == "4"  # empty answers do not vote
    assert majority_vote([None, "", None]) is None
    assert majority_vote([]) is None
    assert majority_vote(["a"]) == "a"


def test_best_of_n():
    assert best_of_n(["a", "b", "c"], [0.1, 0.9, 0.9]) == 1  # tie: first
    assert best_of_n(["a", "b"], [-math.inf, -1.0]) == 1
    assert best_of_n(["a", "b", "c"], [0.0, 0.0, 0.0]) == 0
    assert best_of_n(["a", "b", "c"], [-3.0, -1.0, -2.0]) == 1
    # with answers: an answerless sample never wins while another parses; all answerless -> plain argmax
    assert best_of_n(["a", "b", "c"], [-3.0, -1.0, -2.0], ["1", None, "3"]) == 2
    assert best_of_n(["a", "b", "c"], [-3.0, -1.0, -2.0], ["", None, "3"]) == 2
    assert best_of_n(["a", "b"], [-3.0, -1.0], [None, ""]) == 1


def test_weighted_vote():
    # "1": e^-0.1 = 0.905 against "2": 2 e^-2 = 0.271 -> the confident single sample wins
    assert weighted_vote(["1", "2", "2", None], [-0.1, -2.0, -2.0, 0.0]) == 0
    # equal confidence: the count decides; the index is the winner's first sample
    assert weighted_vote(["1", "2", "2"], [-1.0, -1.0, -1.0]) == 1
    assert weighted_vote(["1", "2", "2"], [-1.0, -0.9, -5.0]) == 1  # 0.368 < 0.407 + 0.007
    assert weighted_vote(["a", "b"], [-1.0, -1.0]) == 0  # tie: the answer seen first
    assert weighted_vote(["a", "b"], [math.nan, -50.0]) == 1  # a non-finite score weighs 0
    assert weighted_vote([None, ""], [0.0, 0.0]) is None
    assert weighted_vote(["x", None, "x"], [-1.0, 0.0, -1.0]) == 0  # unparsable answers do not vote
    assert weighted_vote(["a", "b", "b"], [1000.0, 999.5, 999.5]) == 1  # a verifier's large scores: no overflow


class FakeGen:
    """Stands in for generate_texts: records calls, returns canned samples."""

    def __init__(self, samples_for):
        self.calls = []
        self.samples_for = samples_for  # text -> list of generations
        self.active = None

    def __call__(self, model, tokenizer, texts, max_new_tokens, **kw):
        self.calls.append({"texts": list(texts), "active": self.active, **kw})
        gens = [self.samples_for(t)[: kw.get("num_return_sequences", 1)] for t in texts]
        ntoks = [[len(s) for s in g] for g in gens]
        logps = [[-float(len(s)) for s in g] for g in gens] if kw.get("return_logprobs") else None
        return gens, ntoks, logps

    def greedy(self, model, tokenizer, texts, max_new_tokens, **kw):
        gens, ntoks, _ = self(model, tokenizer, texts, max_new_tokens, **kw)
        return gens, ntoks

    def install(self, monkeypatch):
        monkeypatch.setattr(ev, "generate_texts", self)
        monkeypatch.setattr(ev, "greedy_texts", self.greedy)
        return self


def test_majority_strategy_picks_most_frequent_answer(tiny_model, make_task, monkeypatch):
    model, tok = tiny_model
    samples = {"q0": ["7 a", "8 b", "8 c", "7 d"], "q1": ["1 a", "2 b", "3 c", "2 d"]}
    fake = FakeGen(lambda t: samples["q0" if "q0" in t else "q1"])
    fake.install(monkeypatch)
    task = make_task([("q0", "7"), ("q1", "2")], extract=lambda t: t.split()[0])
    recs, m = evaluate(model, tok, task, task.test, strategy="majority", n=4, temperature=0.5, top_p=0.9,
                       progress=False)
    assert [r["extracted"] for r in recs] == ["7", "2"]  # q0: 7/8 tie -> first seen
    assert [r["generation"] for r in recs] == ["7 a", "2 b"]  # the first sample with the voted answer
    assert [r["correct"] for r in recs] == [True, True]
    assert recs[0]["generations"] == samples["q0"] and recs[0]["samples"] == 4
    call = fake.calls[0]
    assert call["do_sample"] is True and call["num_return_sequences"] == 4
    assert call["temperature"] == 0.5 and call["top_p"] == 0.9
    assert m["samples_per_query"] == 4 and m["tokens_generated"] == sum(len(s) for v in samples.values() for s in v)


def test_best_of_n_strategy_uses_verifier_then_logprob(tiny_model, make_task, monkeypatch):
    model, tok = tiny_model
    fake = FakeGen(lambda t: ["long answer 1", "ok 2", "no 3", "longer answer 4"])
    fake.install(monkeypatch)
    task = make_task([("q", "2")], extract=lambda t: t.split()[-1])

    def verifier(gen, e):
        return -abs(len(gen) - 4)  # prefers 4-character samples: "ok 2" and "no 3" tie -> first

    recs, _ = evaluate(model, tok, task, task.test, strategy="best_of_n", n=4, verifier=verifier, progress=False)
    assert recs[0]["generation"] == "ok 2" and recs[0]["extracted"] == "2" and recs[0]["correct"]
    assert fake.calls[-1]["return_logprobs"] is False
    # without a verifier: the mean log-probability (here -len) picks the shortest, first on ties
    recs, _ = evaluate(model, tok, task, task.test, strategy="best_of_n", n=4, progress=False)
    assert fake.calls[-1]["return_logprobs"] is True
    assert recs[0]["generation"] == "ok 2"
    # the shortest sample holds no answer: the best-scoring sample with one wins
    fake.samples_for = lambda t: ["long answer 1", "ok", "no 3", "longer answer 4"]
    task = make_task([("q", "3")], extract=lambda t: t.split()[-1] if t.split()[-1].isdigit() else None)
    recs, _ = evaluate(model, tok, task, task.test, strategy="best_of_n", n=4, progress=False)
    assert recs[0]["generation"] == "no 3" and recs[0]["extracted"] == "3"


def test_weighted_majority_strategy_sums_confidence(tiny_model, make_task, monkeypatch):
    model, tok = tiny_model
    # FakeGen's log-probability is -len: "9" x2 at -3 each (2 e^-3 = 0.0996) against "77" x2 at -4 and -12
    # (e^-4 + e^-12 = 0.0183): plain majority ties 9/77 -> first seen ("77"); weighted picks "9"
    fake = FakeGen(lambda t: ["77 aaaaaaaaa", "9 a", "77 b", "9 b"])
    fake.install(monkeypatch)
    task = make_task([("q", "9")], extract=lambda t: t.split()[0])
    recs, m = evaluate(model, tok, task, task.test, strategy="majority", n=4, progress=False)
    assert recs[0]["extracted"] == "77" and not recs[0]["correct"]
    recs, m = evaluate(model, tok, task, task.test, strategy="weighted_majority", n=4, progress=False)
    assert fake.calls[-1]["return_logprobs"] is True and fake.calls[-1]["num_return_sequences"] == 4
    assert recs[0]["extracted"] == "9" and recs[0]["generation"] == "9 a" and recs[0]["correct"]
    assert recs[0]["scores"] == [-12.0, -3.0, -4.0, -3.0] and recs[0]["samples"] == 4 and m["strategy"] == "weighted_majority"

    def verifier(gen, e):  # a verifier's score replaces the log-probability
        return 0.0 if gen.startswith("77") else -10.0

    recs, _ = evaluate(model, tok, task, task.test, strategy="weighted_majority", n=4, verifier=verifier, progress=False)
    assert fake.calls[-1]["return_logprobs"] is False and recs[0]["extracted"] == "77"


def test_per_query_prompts_are_honoured(tiny_model, make_task, monkeypatch):
    model, tok = tiny_model
    fake = FakeGen(lambda t: ["Answer"])
    fake.install(monkeypatch)
    task = make_task([(f"query{i}", "A") for i in range(5)], prompt="TASK PROMPT")
    prompts = [f"prompt number {i}" for i in range(5)]
    recs, _ = evaluate(model, tok, task, task.test, prompts=prompts, batch_size=2, progress=False)
    texts = [t for c in fake.calls for t in c["texts"]]
    assert texts == [chat_text(tok, task.render(prompts[i], f"query{i}")) for i in range(5)]
    assert [r["prompt"] for r in recs] == prompts
    assert all("TASK PROMPT" not in t for t in texts)
    # one string prompt for all; None means the task's prompt
    fake.calls.clear()
    recs, _ = evaluate(model, tok, task, task.test, prompts="shared", progress=False)
    assert all(t.startswith("<|im_start|>user\nshared\n\nquery") for t in fake.calls[0]["texts"])
    fake.calls.clear()
    recs, _ = evaluate(model, tok, task, task.test, progress=False)
    assert all("TASK PROMPT\n\nquery" in t for t in fake.calls[0]["texts"]) and recs[0]["prompt"] == "TASK PROMPT"


def test_batch_context_entered_per_batch_with_indices(tiny_model, make_task, monkeypatch):
    model, tok = tiny_model
    fake = FakeGen(lambda t: ["x"])
    fake.install(monkeypatch)
    task = make_task([(f"q{i}", "x") for i in range(7)])
    events = []

    @contextlib.contextmanager
    def ctx(indices):
        events.append(("enter", list(indices)))
        fake.active = list(indices)
        try:
            yield
        finally:
            fake.active = None
            events.append(("exit", list(indices)))

    evaluate(model, tok, task, task.test, batch_size=3, batch_context=ctx, progress=False)
    batches = [[0, 1, 2], [3, 4, 5], [6]]
    assert events == [e for b in batches for e in (("enter", b), ("exit", b))]
    # generation ran inside the context of its own batch, on that batch's queries
    assert [c["active"] for c in fake.calls] == batches
    assert [c["texts"] for c in fake.calls] == [[chat_text(tok, task.render("", f"q{i}")) for i in b] for b in batches]


def test_batch_context_with_real_generation(tiny_model, make_task):
    """A context that changes the actor per batch changes the generations of that batch only."""
    model, tok = tiny_model
    task = make_task([(q, "x") for q in QUERIES[:4]], max_new_tokens=6)
    base = [r["generation"] for r in evaluate(model, tok, task, task.test, batch_size=2, progress=False)[0]]

    seen = []

    @contextlib.contextmanager
    def perturb(indices):
        seen.append(list(indices))
        if 3 not in indices:
            yield
            return
        w = model.lm_head.weight
        saved = w.detach().clone()
        with torch.no_grad():
            w.mul_(-1.0)
        try:
            yield
        finally:
            with torch.no_grad():
                w.copy_(saved)

    got = [r["generation"] for r in evaluate(model, tok, task, task.test, batch_size=2, batch_context=perturb,
                                             progress=False)[0]]
    hit = next(b for b in seen if 3 in b)  # batches are formed by prompt length, not necessarily [0, 1], [2, 3]
    assert sorted(i for b in seen for i in b) == [0, 1, 2, 3] and len(hit) == 2
    assert [got[i] for i in range(4) if i not in hit] == [base[i] for i in range(4) if i not in hit]
    assert all(got[i] != base[i] for i in hit)
    again = [r["generation"] for r in evaluate(model, tok, task, task.test, batch_size=2, progress=False)[0]]
    assert again == base  # the context restored the weights


def test_evaluate_restores_training_mode(tiny_model, make_task, monkeypatch):
    model, tok = tiny_model
    FakeGen(lambda t: ["x"]).install(monkeypatch)
    task = make_task([("q", "x")])
    model.train()
    try:
        evaluate(model, tok, task, task.test, progress=False)
        assert model.training
    finally:
        model.eval()
    evaluate(model, tok, task, task.test, progress=False)
    assert not model.training


def test_unknown_strategy(tiny_model, make_task):
    model, tok = tiny_model
    task = make_task([("q", "x")])
    with pytest.raises(MetatunerError, match="inference.strategy"):
        evaluate(model, tok, task, task.test, strategy="beam", progress=False)


def test_real_sampling_majority_runs(tiny_model, make_task):
    model, tok = tiny_model
    task = make_task([(q, "x") for q in QUERIES[:3]], max_new_tokens=4)
    torch.manual_seed(0)
    recs, m = evaluate(model, tok, task, task.test, strategy="majority", n=3, batch_size=2, progress=False)
    for r in recs:
        assert len(r["generations"]) == r["samples"] == 3
        assert r["extracted"] == majority_vote([task.extract(s) for s in r["generations"]])
        assert r["generation"] in r["generations"]
    assert m["n"] == 3 and m["samples_per_query"] == 3
    torch.manual_seed(0)
    recs2, _ = evaluate(model, tok, task, task.test, strategy="best_of_n", n=3, batch_size=3, progress=False)
    assert all(r["generation"] in r["generations"] for r in recs2)


def test_generation_stops_at_every_end_token_of_the_generation_config(tiny_model_path):
    from metatuner.models import load_model

    model, tok = load_model(str(tiny_model_path), device="cpu")  # a private copy: its config is changed below
    texts = [chat_text(tok, [{"role": "user", "content": q}]) for q in QUERIES[:3]]
    free, free_n, _ = generate_texts(model, tok, texts, 10)
    i = max(range(3), key=lambda k: free_n[k][0])
    g = free[i][0]
    k = next(k for k in range(1, len(g)) if g[k] not in g[:k])  # a character not generated before position k
    # declare it an extra end token, as chat models list e.g. <|endoftext|> beside <|im_end|>
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids(g[k])]
    gens, ntoks, _ = generate_texts(model, tok, texts, 10)
    assert gens[i][0] == g[: k + 1] and ntoks[i][0] == k + 1


DIST_SCRIPT = '''
import json, os, sys
import torch
import metatuner.evaluate as ev
from metatuner.models import load_model
from metatuner.tasks import Example, Task

torch.set_num_threads(1)
model_dir, out, queries = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
model, tok = load_model(model_dir, dtype="float32", device="cpu")
rows = []
real = ev.greedy_texts
def counting(model, tok, texts, *a, **kw):
    rows.extend(texts)
    return real(model, tok, texts, *a, **kw)
ev.greedy_texts = counting
exs = [Example(query=q, answer=q[:1], target="") for q in queries]
task = Task(name="toy", prompt="", train=exs[:2], validation=[], test=exs, max_new_tokens=6,
            extract=lambda t: t[:1] or None, score_fn=lambda p, e: {"correct": p == e.answer})
records, metrics = ev.evaluate(model, tok, task, exs, batch_size=2, output_dir=out, progress=False)
rank = os.environ.get("RANK", "0")
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"rows": len(rows), "n": len(records), "tokens": metrics["tokens_generated"]}, f)
'''


def test_two_processes_split_the_examples_and_gather_them_in_order(tiny_model, tiny_model_path, make_task, tmp_path):
    """torchrun --nproc_per_node 2: each process generates for its own slice; rank 0 writes the same
    predictions and metrics as one process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    model, tok = tiny_model
    queries = QUERIES + ["7 * 6", "ten"]
    task = make_task([(q, q[:1]) for q in queries], max_new_tokens=6)
    task.train = task.test[:2]
    one, _ = evaluate(model, tok, task, task.test, batch_size=2, progress=False)

    script = tmp_path / "dist_eval.py"
    script.write_text(DIST_SCRIPT)
    out = tmp_path / "two"
    out.mkdir()
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(script), str(tiny_model_path),
                        str(out), json.dumps(queries)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert [x["rows"] for x in ranks] == [5, 4]  # each process generated its own slice only
    assert all(x["n"] == len(queries) for x in ranks)  # and every process got all records back
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert preds == json.loads(json.dumps(one))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == len(queries) and metrics["tokens_generated"] == ranks[0]["tokens"] == ranks[1]["tokens"]
    assert metrics["tokens_generated"] == sum(len(p["generation"]) for p in preds) + sum(
        1 for p in preds if len(p["generation"]) < 6)


def test_sampling_stops_at_the_answer_end_like_greedy(tiny_model):
    model, tok = tiny_model
    texts = [chat_text(tok, [{"role": "user", "content": q}]) for q in QUERIES[:3]]
    torch.manual_seed(0)
    free, free_n, _ = generate_texts(model, tok, texts, 8, do_sample=True, num_return_sequences=3)
    torch.manual_seed(0)
    cut, cut_n, _ = generate_texts(model, tok, texts, 8, do_sample=True, num_return_sequences=3, answer_end=r"\S\S")
    for fs, cs, ns, fns in zip(free, cut, cut_n, free_n):
        for f, c, n, fn in zip(fs, cs, ns, fns):
            assert f.startswith(c) and n <= fn
            m = re.search(r"\S\S", f)
            if m:  # a row stops on the token that completes the match (one char per token here)
                assert c == f[: m.end()]
    assert any(len(c) < len(f) for fs, cs in zip(free, cut) for f, c in zip(fs, cs))
