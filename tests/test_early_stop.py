"""Early-stopping majority: the stopping rule (metatuner.voting) and inference.strategy=early_majority in
evaluate(), with canned samples, real sampling on a tiny random model, and per-query LoRA."""

from __future__ import annotations

import contextlib

import pytest
import torch

import metatuner.evaluate as ev
from metatuner.evaluate import evaluate
from metatuner.voting import (agreed_score, early_expectation, early_outcome, fit_stop_rule, lead_probability,
                              score_gates, stop_point, vote_settled)


# ----------------------------------------------------------------------------- the stopping rule


def test_lead_probability_is_the_beta_tail():
    # P(X > 1/2) for X ~ Beta(c1+1, 1) is 1 - 2^-(c1+1)
    for c1 in range(1, 8):
        assert lead_probability(c1, 0) == pytest.approx(1 - 0.5 ** (c1 + 1))
    assert lead_probability(3, 3) == pytest.approx(0.5)
    assert lead_probability(5, 1) > lead_probability(4, 2) > lead_probability(3, 3)


def test_unanimous_votes_stop_and_split_votes_continue():
    assert vote_settled(["7"] * 4, 0.95, 2)  # 1 - 2^-5 = 0.969
    assert not vote_settled(["7"] * 3, 0.95, 2)  # 0.9375
    assert vote_settled(["7", "7"], 0.85, 2)  # 0.875
    assert not vote_settled(["7"], 0.5, 2)  # fewer than stop_min samples: never
    assert vote_settled(["7"], 0.5, 1)
    for threshold in (0.6, 0.8, 0.95, 0.99):
        assert not vote_settled(["7", "8", "7", "8"], threshold, 2)  # a 2-2 split
        assert not vote_settled(["7", "8"], threshold, 2)
    # unparsable samples are ignored: they do not settle a vote
    assert not vote_settled([None, None, None, None], 0.6, 2)
    assert vote_settled([None, "3", "3", "3", "3"], 0.95, 2) and not vote_settled([None, "3", "3", "3"], 0.95, 2)


def test_a_higher_threshold_never_stops_earlier():
    seqs = [["1", "1", "2", "1", "1", "1", "1", "1"], ["1", "2", "3", "1", "1", "1", "2", "1"], ["4"] * 8,
            ["1", "2"] * 4, [None, "5", "5", "6", "5", "5", "5", "5"]]
    for seq in seqs:
        points = [stop_point(seq, t, 2, 8) for t in (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)]
        assert points == sorted(points) and all(2 <= p <= 8 for p in points)
        assert not vote_settled(seq[: points[-1] - 1], 0.99, 2) or points[-1] == 2
    assert stop_point(["1", "2"] * 4, 0.95, 2, 8) == 8  # never settled: the cap
    assert stop_point(["1", "2"] * 4, 0.95, 2, 5) == 5


def test_replay_of_the_rule_over_orders():
    answers, correct = ["7", "7", "7", "7", "8"], [True, True, True, True, False]
    ok, k = early_outcome(answers, correct, [4, 0, 1, 2, 3], 0.9, 2, 5)
    assert k == 5 and ok  # 8 first: 7 needs 4 votes against 1 to reach 0.9 -> cap
    ok, k = early_outcome(answers, correct, [0, 1, 2, 3, 4], 0.9, 2, 5)
    assert (ok, k) == (True, 3)
    acc, spent = early_expectation(answers, correct, 0.9, 2, 5, orders=300)
    assert acc == 1.0 and 3 <= spent <= 5
    acc, spent = early_expectation(["8"] * 4, [False] * 4, 0.85, 2, 4)
    assert (acc, spent) == (0.0, 2.0)


def _query(answers, right):
    return {"answers": answers, "correct": [a == right for a in answers]}


def test_confidence_gate_settles_agreeing_confident_samples_from_the_first_on():
    # the gate ignores stop_min and the Beta threshold: one sample scoring >= stop_score settles
    assert vote_settled(["7"], 0.99, 4, [-0.1], -0.2)
    assert not vote_settled(["7"], 0.99, 4, [-0.3], -0.2)  # not confident enough
    assert not vote_settled(["7"], 0.99, 4, None, -0.2)  # no scores: no gate
    assert not vote_settled(["7"], 0.99, 4, [-0.1], None)  # no gate
    assert vote_settled(["7", "7"], 0.99, 4, [-0.1, -0.15], -0.2)
    assert not vote_settled(["7", "7"], 0.99, 4, [-0.1, -0.25], -0.2)  # every sample must pass
    assert not vote_settled(["7", "8"], 0.99, 4, [-0.1, -0.1], -0.2)  # disagreement never passes the gate
    assert not vote_settled([None], 0.5, 1, [-0.01], -1.0) and not vote_settled([""], 0.5, 1, [-0.01], -1.0)
    assert agreed_score(["3", "3", "3"], [-0.5, -0.2, -0.9]) == -0.9 and agreed_score(["3", "4"], [0, 0]) is None
    # no agreement, a missing or a NaN score never passes, whatever the gate
    for answers, scores in ((["7", "8"], [-0.1, -0.1]), ([None], [-0.1]), (["7", "7"], [-0.1, float("nan")]),
                            (["7", "7"], [float("nan"), -0.1]), (["7", "7"], [-0.1]), (["7"], [])):
        assert agreed_score(answers, scores) is None
        assert not vote_settled(answers, 0.999, 9, scores, -1e30)
    # the Beta rule still applies beside the gate
    assert vote_settled(["7"] * 4, 0.95, 2, [-5.0] * 4, -0.2)
    assert stop_point(["7", "7", "8", "7"], 0.99, 4, 4, [-0.5, -0.1, -0.1, -0.1], -0.2) == 4
    assert stop_point(["7", "7", "8", "7"], 0.99, 4, 4, [-0.1, -0.1, -0.1, -0.1], -0.2) == 1
    ok, k = early_outcome(["8", "7", "7"], [False, True, True], [1, 0, 2], 0.99, 3, 3, [-0.5, -0.1, -0.1], -0.2)
    assert (ok, k) == (True, 1)  # order [1, 0, 2]: the confident 7 arrives first


def _scored(answers, scores, right):
    return {"answers": answers, "correct": [a == right for a in answers], "scores": scores}


def test_fitted_rule_uses_the_gate_only_when_confidence_tells_right_from_wrong():
    # the majority answer's samples are confident (-0.1), the stray ones not (-1.0): when a confident
    # sample arrives first the gate stops at once and picks the majority answer
    informative = [_scored(["7"] * 5 + ["1", "2", "3"], [-0.1] * 5 + [-1.0] * 3, "7") for _ in range(10)]
    beta_only = fit_stop_rule(informative, 8, 0.0, orders=100, gates=[])
    gated = fit_stop_rule(informative, 8, 0.0, orders=100)
    assert gated["stop_score"] is not None and gated["accuracy"] == 1.0 == gated["fixed_majority_accuracy"]
    assert gated["mean_samples"] < beta_only["mean_samples"] and beta_only["stop_score"] is None
    assert gated["gates_tried"] == score_gates(informative) and gated["gates_tried"]
    # the reported rule is what its replay gives
    acc, spent = zip(*(early_expectation(s["answers"], s["correct"], gated["threshold"], gated["min_samples"], 8,
                                         100, i, s["scores"], gated["stop_score"]) for i, s in enumerate(informative)))
    assert sum(acc) / 10 == pytest.approx(gated["accuracy"]) and sum(spent) / 10 == pytest.approx(gated["mean_samples"])
    # confidence that says nothing (the wrong strays are the confident ones): a gate would lose, none is fit
    misleading = [_scored(["7"] * 5 + ["1", "2", "3"], [-1.0] * 5 + [-0.1] * 3, "7") for _ in range(10)]
    fit = fit_stop_rule(misleading, 8, 0.0, orders=100)
    assert fit["accuracy"] == 1.0 and fit["stop_score"] is None and fit["gates_tried"] == [-1.0, -0.1]
    # samples without scores: no gate is tried
    assert score_gates([_query(["7"] * 8, "7")]) == []
    assert fit_stop_rule([_query(["7"] * 8, "7")], 8, 0.0, orders=10)["stop_score"] is None


def test_fitted_rule_stops_at_one_sample_when_votes_are_unanimous():
    samples = [_query([str(i)] * 8, str(i if i % 3 else -1)) for i in range(12)]
    fit = fit_stop_rule(samples, 8, 0.01, orders=20)
    assert fit["mean_samples"] == 1.0 and fit["min_samples"] == 1
    assert fit["accuracy"] == fit["fixed_majority_accuracy"] == 8 / 12


def test_fitted_rule_keeps_the_accuracy_of_fixed_majority_within_the_tolerance():
    # majority is right on every query, but a single sample only 5 times in 8: stopping after one loses
    samples = [_query(["7"] * 5 + ["1", "2", "3"], "7") for _ in range(10)]
    strict = fit_stop_rule(samples, 8, 0.01, orders=100)
    assert strict["fixed_majority_accuracy"] == 1.0
    assert strict["accuracy"] >= 0.99 and strict["mean_samples"] > 1
    loose = fit_stop_rule(samples, 8, 1.0, orders=100)  # any loss allowed: the cheapest rule
    assert loose["mean_samples"] == 1.0 and loose["accuracy"] < 0.99
    mid = fit_stop_rule(samples, 8, 0.2, orders=100)
    assert loose["mean_samples"] <= mid["mean_samples"] <= strict["mean_samples"]
    assert mid["accuracy"] >= 0.8 - 1e-9
    # the rule reported is what a replay of it gives
    acc = sum(early_expectation(s["answers"], s["correct"], mid["threshold"], mid["min_samples"], 8, 100, i)[0]
              for i, s in enumerate(samples)) / 10
    assert acc == pytest.approx(mid["accuracy"])


def test_fitted_rule_with_confidence_rejects_a_loss_that_only_the_point_estimate_hides():
    # 98 unanimous queries and 2 where one sample is right 5 times in 8: stopping at once loses 0.75 points
    # on average (within 1), but a resample holding 3+ of those 2 queries loses more than 1
    samples = [_query(["0"] * 8, "9") for _ in range(98)] + [_query(["7"] * 5 + ["1", "2", "3"], "7")] * 2
    point = fit_stop_rule(samples, 8, 0.01, orders=100)
    assert point["mean_samples"] == 1.0 and 0.005 < point["loss_bound"] < 0.01
    bound = fit_stop_rule(samples, 8, 0.01, orders=100, confidence=0.9)
    assert bound["mean_samples"] > 1.0 and bound["loss_bound"] <= 0.01 + 1e-12
    assert bound["accuracy"] > point["accuracy"] and bound["confidence"] == 0.9


def test_fitted_rule_at_zero_tolerance_never_loses_a_query():
    # three 7s against two 1s and singles: stopping at 2 (two 1s first) or at (1,0) can pick a wrong answer;
    # only 7 can lead by three, so some cautious rules never err; tolerance 0 must take one of them
    samples = [_query(["7", "7", "7", "1", "1", "2", "3", "4"], "7")]
    fit = fit_stop_rule(samples, 8, 0.0, orders=300)
    assert fit["fixed_majority_accuracy"] == 1.0 and fit["accuracy"] == 1.0
    assert fit["mean_samples"] < 8
    assert fit_stop_rule(samples, 8, 1.0, orders=300)["mean_samples"] < fit["mean_samples"]


# ----------------------------------------------------------------------------- evaluate(strategy=early_majority)


class SequentialGen:
    """Stands in for generate_texts: each query's canned samples are handed out in order, so a query
    that gets k more samples gets its next k; every generation is counted per query."""

    def __init__(self, samples: dict[str, list[str]], scores: dict[str, list[float]] | None = None):
        self.samples, self.given, self.calls, self.scores = samples, {q: 0 for q in samples}, [], scores

    def key(self, text):
        return next(q for q in self.samples if q in text)

    def __call__(self, model, tokenizer, texts, max_new_tokens, **kw):
        k = kw.get("num_return_sequences", 1)
        self.calls.append(([self.key(t) for t in texts], k))
        gens, lps = [], []
        for t in texts:
            q = self.key(t)
            gens.append(self.samples[q][self.given[q] : self.given[q] + k])
            lps.append((self.scores or {}).get(q, [0.0] * 8)[self.given[q] : self.given[q] + k])
            self.given[q] += k
            assert len(gens[-1]) == k, "asked for more samples than exist"
        return gens, [[len(s) for s in g] for g in gens], (lps if kw.get("return_logprobs") else None)


def test_early_majority_spends_exactly_what_it_records(tiny_model, make_task, monkeypatch):
    model, tok = tiny_model
    samples = {"qa": ["5"] * 8,  # unanimous: stops at 4 (threshold 0.95)
               "qb": ["1", "2"] * 4,  # split: runs to the cap
               "qc": ["3", "3", "4", "3", "3", "3", "3", "3"],  # settles once 3 leads 6-1 (0.965)
               "qd": [x for x in "xyzwxyzw"]}  # four answers, two votes each: runs to the cap
    fake = SequentialGen(samples)
    monkeypatch.setattr(ev, "generate_texts", fake)
    seen = []

    @contextlib.contextmanager
    def ctx(idx):
        seen.append(sorted(idx))
        yield

    task = make_task([("qa", "5"), ("qb", "2"), ("qc", "3"), ("qd", "x")])
    recs, m = evaluate(model, tok, task, task.test, strategy="early_majority", n=8, stop_threshold=0.95, stop_min=2,
                       batch_size=4, batch_context=ctx, progress=False)
    assert [r["samples"] for r in recs] == [4, 8, 7, 8]
    assert [r["samples"] for r in recs] == [fake.given[q] for q in ("qa", "qb", "qc", "qd")]
    assert all(r["generations"] == samples[r["query"]][: r["samples"]] for r in recs)
    assert [r["extracted"] for r in recs] == ["5", "1", "3", "x"]
    assert m["total_samples"] == 27 == sum(fake.given.values()) and m["mean_samples"] == pytest.approx(27 / 4)
    assert m["samples_per_query"] == 8 and m["strategy"] == "early_majority"
    # rounds: 2 samples each first, then one more for the rows still open, each round in its own context
    assert fake.calls[0][1] == 2 and all(k == 1 for _, k in fake.calls[1:])
    # first the prompts' cache, built once under every row's weights, then the rounds
    assert seen[0] == [0, 1, 2, 3]
    rounds = seen[1:]
    assert rounds[0] == [0, 1, 2, 3] and rounds[2] == [0, 1, 2, 3] and rounds[3] == [1, 2, 3] and rounds[-1] == [1, 3]
    assert [sorted(task.test.index(e) for e in task.test if e.query in qs) for qs, _ in fake.calls] == rounds
    # stop_chunk and a cap below stop_min
    fake2 = SequentialGen(samples)
    monkeypatch.setattr(ev, "generate_texts", fake2)
    recs, m = evaluate(model, tok, task, task.test, strategy="early_majority", n=8, stop_threshold=0.95, stop_min=2,
                       stop_chunk=3, batch_size=2, progress=False)
    assert [r["samples"] for r in recs] == [5, 8, 8, 8]  # 2, then 3 at a time (capped)
    fake3 = SequentialGen(samples)
    monkeypatch.setattr(ev, "generate_texts", fake3)
    recs, _ = evaluate(model, tok, task, task.test, strategy="early_majority", n=1, batch_size=4, progress=False)
    assert [r["samples"] for r in recs] == [1, 1, 1, 1]
    assert len(fake3.calls) == 1 and sorted(fake3.calls[0][0]) == ["qa", "qb", "qc", "qd"] and fake3.calls[0][1] == 1


def test_early_majority_with_a_confidence_gate_stops_confident_queries_after_one_sample(tiny_model, make_task,
                                                                                   monkeypatch):
    model, tok = tiny_model
    samples = {"qa": ["5"] * 8, "qb": ["5"] * 8, "qc": ["1", "2"] * 4}
    scores = {"qa": [-0.05] * 8, "qb": [-0.9] * 8, "qc": [-0.5] + [-0.01] * 7}
    fake = SequentialGen(samples, scores)
    monkeypatch.setattr(ev, "generate_texts", fake)
    task = make_task([("qa", "5"), ("qb", "5"), ("qc", "1")])
    recs, m = evaluate(model, tok, task, task.test, strategy="early_majority", n=8, stop_threshold=0.95, stop_min=2,
                       stop_score=-0.2, batch_size=3, progress=False)
    # qa: one confident sample settles; qb: not confident, the Beta rule settles at 4; qc: its first sample is
    # not confident and the later confident ones disagree with it: the cap
    assert [r["samples"] for r in recs] == [1, 4, 8]
    assert [r["scores"] for r in recs] == [scores[q][: r["samples"]] for q, r in zip(("qa", "qb", "qc"), recs)]
    assert fake.calls[0][1] == 1  # the first round draws one sample per row when a gate is set
    assert m["total_samples"] == 13 == sum(fake.given.values())
    # a verifier's scores feed the gate instead of the log-probabilities
    fake2 = SequentialGen(samples, scores)
    monkeypatch.setattr(ev, "generate_texts", fake2)
    recs, _ = evaluate(model, tok, task, task.test, strategy="early_majority", n=8, stop_threshold=0.95, stop_min=2,
                       stop_score=0.5, verifier=lambda g, ex: 1.0 if ex.query == "qb" else 0.0, batch_size=3,
                       progress=False)
    assert [r["samples"] for r in recs] == [4, 1, 8]


def test_fixed_strategies_record_their_samples(tiny_model, make_task, monkeypatch):
    model, tok = tiny_model
    fake = SequentialGen({"qa": ["5"] * 8, "qb": ["1"] * 8})
    monkeypatch.setattr(ev, "generate_texts", fake)
    task = make_task([("qa", "5"), ("qb", "2")])
    recs, m = evaluate(model, tok, task, task.test, strategy="majority", n=3, progress=False)
    assert [r["samples"] for r in recs] == [3, 3] and m["total_samples"] == 6 and m["mean_samples"] == 3
    recs, m = evaluate(model, tok, task, task.test, progress=False, fast_greedy=False, stop_at_answer=False)
    assert [r["samples"] for r in recs] == [1, 1] and m["mean_samples"] == 1 and "generations" not in recs[0]


def _counting(monkeypatch):
    """Wrap the real generate_texts, counting generations per rendered text."""
    real, counts = ev.generate_texts, {}

    def wrapped(model, tok, texts, max_new, **kw):
        for t in texts:
            counts[t] = counts.get(t, 0) + kw.get("num_return_sequences", 1)
        return real(model, tok, texts, max_new, **kw)

    monkeypatch.setattr(ev, "generate_texts", wrapped)
    return counts


def test_early_majority_with_real_sampling_never_exceeds_the_cap(tiny_model, make_task, monkeypatch):
    model, tok = tiny_model
    counts = _counting(monkeypatch)
    task = make_task([(q, "x") for q in ["1+2=", "What is 12 + 35?", "abc", "Q", "9 - 4", "zz"]], max_new_tokens=3)
    torch.manual_seed(0)
    recs, m = evaluate(model, tok, task, task.test, strategy="early_majority", n=5, temperature=1.0,
                       stop_threshold=0.9, batch_size=4, progress=False)
    for r in recs:
        assert 2 <= r["samples"] <= 5 and len(r["generations"]) == r["samples"]
        assert r["samples"] == counts[ev.chat_text(tok, task.render("", r["query"]))]
        assert r["extracted"] == ev.majority_vote([task.extract(g) for g in r["generations"]])
    assert m["total_samples"] == sum(counts.values()) == sum(r["samples"] for r in recs)


def test_early_majority_with_per_query_lora(tiny_model_path, make_task, monkeypatch):
    """MetaTuner's per-query LoRA: each round's context gets the rows still sampling; generate repeats
    their factors across the round's samples (a wrong row count raises in PerQueryLoRA)."""
    from metatuner.lora import PerQueryLoRA, find_targets
    from metatuner.models import load_model

    model, tok = load_model(str(tiny_model_path), dtype="float32", device="cpu")
    targets = find_targets(model, ["q_proj", "v_proj"])
    lora = PerQueryLoRA(model, targets, 2, 4.0)
    g = torch.Generator().manual_seed(0)
    per_ex = [{t.key: (torch.randn(1, 2, t.in_features, generator=g), torch.randn(1, t.out_features, 2, generator=g))
               for t in targets} for _ in range(5)]
    rows = []

    @contextlib.contextmanager
    def ctx(idx):
        rows.append(list(idx))
        lora.set_factors({k: (torch.cat([per_ex[i][k][0] for i in idx]), torch.cat([per_ex[i][k][1] for i in idx]))
                          for k in per_ex[0]})
        try:
            yield
        finally:
            lora.clear_factors()

    counts = _counting(monkeypatch)
    task = make_task([(q, "x") for q in ["1+2=", "abc", "Q", "9 - 4", "zz"]], max_new_tokens=3)
    torch.manual_seed(1)
    recs, m = evaluate(model, tok, task, task.test, strategy="early_majority", n=4, temperature=1.0,
                       stop_threshold=0.8, batch_size=5, batch_context=ctx, progress=False)
    assert all(2 <= r["samples"] <= 4 for r in recs) and m["total_samples"] == sum(counts.values())
    assert rows[0] and all(set(b) <= set(rows[0]) for b in rows[1:])
    # the prompts' cache under every row's factors, then the first round (every row), then the open rows
    assert rows[1] == rows[0] and sum(len(b) for b in rows) == 2 * len(rows[0]) + sum(r["samples"] - 2 for r in recs)
    # near-zero temperature: every sample is the greedy answer of its own row's LoRA model
    torch.manual_seed(2)
    low, _ = evaluate(model, tok, task, task.test, strategy="early_majority", n=4, temperature=1e-6,
                      stop_threshold=0.85, batch_size=5, batch_context=ctx, progress=False)
    greedy, _ = evaluate(model, tok, task, task.test, batch_size=5, batch_context=ctx, progress=False,
                         fast_greedy=False, stop_at_answer=False)
    assert [r["generations"] for r in low] == [[g["generation"]] * r["samples"] for r, g in zip(low, greedy)]
    # identical samples settle at stop_min unless they hold no answer (an empty first character)
    assert [r["samples"] for r in low] == [2 if r["extracted"] else 4 for r in greedy]
    # a confidence gate every score passes: one sample settles a parsable answer; scores come back per sample
    torch.manual_seed(2)
    gated, _ = evaluate(model, tok, task, task.test, strategy="early_majority", n=4, temperature=1e-6,
                        stop_threshold=0.85, stop_score=-1e9, batch_size=5, batch_context=ctx, progress=False)
    assert [r["samples"] for r in gated] == [1 if r["extracted"] else 4 for r in greedy]
    assert any(r["extracted"] for r in greedy) and not all(r["extracted"] for r in greedy)  # both kinds of row
    assert all(len(r["scores"]) == r["samples"] and all(x <= 0 for x in r["scores"]) for r in gated)


def test_select_stop_gate_switches_the_gate_fit():
    from metatuner.config import load_config
    from metatuner.methods.inference_select import stop_rules

    data = {("sampled", 0, 0.7): [_scored(["7"] * 5 + ["1", "2", "3"], [-0.1] * 5 + [-1.0] * 3, "7")] * 10,
            ("greedy", 0): [True] * 10}
    on = stop_rules(load_config(None, ["method=inference_select", "select.subsets=50"]), data, 8)
    off = stop_rules(load_config(None, ["method=inference_select", "select.subsets=50", "select.stop_gate=false"]), data, 8)
    assert list(on) == list(off) == [("sampled", 0, 0.7)]  # greedy groups have no stopping rule
    rule_on, rule_off = on[("sampled", 0, 0.7)], off[("sampled", 0, 0.7)]
    assert rule_on["gates_tried"] and rule_on["stop_score"] is not None
    assert rule_off["gates_tried"] == [] and rule_off["stop_score"] is None
    assert rule_on["mean_samples"] < rule_off["mean_samples"]


def test_top_up_reuses_the_chosen_arms_samples_and_draws_the_rest(make_task, monkeypatch):
    import metatuner.methods.inference_select as IS
    from metatuner.config import load_config

    drawn = []

    def fake_draw(actor, tok, task, examples, prompt, n, temperature, top_p, batch_size, verifier=None, engine=None,
                  keys=None):
        drawn.append((len(examples), n))
        assert engine is None and list(keys) == [IS.TOP_UP_KEYS + task.test.index(ex) for ex in examples]
        return [{"answers": ["9"] * n, "correct": [False] * n, "scores": [-0.5] * n} for _ in examples]

    monkeypatch.setattr(IS, "draw_samples", fake_draw)
    cfg = load_config(None, ["method=inference_select"])
    task = make_task([("qa", "5"), ("qb", "2")])
    scored = [{"generations": ["5", "5"], "scores": [-0.1, -0.2]}, {"generations": ["2"], "scores": [-0.3]}]
    out, new = IS.top_up(None, None, task, task.test, "", scored, 4, 0.7, cfg)
    assert [o["answers"] for o in out] == [["5", "5", "9", "9"], ["2", "9", "9", "9"]]
    assert [o["scores"] for o in out] == [[-0.1, -0.2, -0.5, -0.5], [-0.3, -0.5, -0.5, -0.5]]
    assert [o["correct"] for o in out] == [[True, True, False, False], [True, False, False, False]]
    assert new == 5 and sorted(drawn) == [(1, 2), (1, 3)]
    # records without scores (a majority arm) are reused too; their queries carry no scores
    out, new = IS.top_up(None, None, task, task.test, "", [{"generations": ["5"] * 4}, {"generations": ["2"]}], 4, 0.7, cfg)
    assert [o["answers"] for o in out] == [["5"] * 4, ["2", "9", "9", "9"]] and [o["scores"] for o in out] == [None, None]
    assert new == 3
    # no records: everything is drawn, with scores
    drawn.clear()
    out, new = IS.top_up(None, None, task, task.test, "", None, 4, 0.7, cfg)
    assert new == 8 and drawn == [(2, 4)] and all(o["scores"] == [-0.5] * 4 for o in out)


def test_early_groups_picks_the_chosen_and_the_validation_cheapest():
    from metatuner.methods.inference_select import early_groups

    a, b, c = ("sampled", 0, 0.3), ("sampled", 1, 0.3), ("sampled", 1, 0.7)

    def fit(m, acc, q=100):
        return {"threshold": 0.6, "min_samples": 2, "stop_score": None, "mean_samples": m, "accuracy": acc, "queries": q}

    def picks(rules, data, which, chosen, n):
        return [(g, roles) for g, roles, _ in early_groups(rules, data, which, chosen, n)]

    rules = {a: fit(5.0, 0.3), b: fit(2.5, 0.2), c: fit(2.5, 0.4)}
    assert picks(rules, {}, "chosen", a, 8) == [(a, ["chosen"])]  # no "cheapest" label when not asked
    # cheapest: fewest validation samples; the tie between b and c goes to the more accurate c
    assert picks(rules, {}, "cheapest", a, 8) == [(a, ["chosen"]), (c, ["cheapest on validation"])]
    assert picks(rules, {}, "cheapest", c, 8) == [(c, ["chosen", "cheapest on validation"])]
    assert picks(rules, {}, "all", b, 8) == [(b, ["chosen"]), (a, []), (c, ["cheapest on validation"])]
    got = early_groups(rules, {}, "cheapest", a, 8)
    assert got[1][2]["mean_samples"] == 2.5 and got[1][2]["accuracy"] == 0.4 and got[1][2]["queries"] == 100
    # a group fitted on fewer validation queries (halving dropped it early) is not a candidate
    rules[b] = fit(1.0, 0.5, q=3)
    assert picks(rules, {}, "cheapest", a, 8) == [(a, ["chosen"]), (c, ["cheapest on validation"])]
    # select.stop_fit=false: the configured rule, replayed on each group's validation samples
    conf = {"threshold": 0.6, "min_samples": 2, "stop_score": None}
    split = [{"answers": ["1", "2", "3", "4"], "correct": [True, False, False, False], "scores": None}]
    same = [{"answers": ["1"] * 4, "correct": [True] * 4, "scores": None}]
    got = early_groups({a: conf, b: conf}, {a: split, b: same}, "cheapest", a, 4)
    assert [(g, r) for g, r, _ in got] == [(a, ["chosen"]), (b, ["cheapest on validation"])]  # b stops at 2, a never
    assert got[0][2]["mean_samples"] == 4 and got[1][2] == {"accuracy": 1.0, "mean_samples": 2, "queries": 1,
                                                             "fixed_majority_accuracy": 1.0}
