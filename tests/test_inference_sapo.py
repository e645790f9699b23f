"""SAPO selection, inference-strategy estimates, (prompt, N) selection and the adaptive budget."""

import itertools
import json
from collections import Counter

import pytest
import torch

from metatuner import inference, sapo
from metatuner.config import load_config
from metatuner.errors import MetatunerError
from metatuner.tasks import Example


def toy_task():
    from metatuner.tasks import Task, extract_rg, score_numeric

    exs = [Example(query=f"{a} + {b} =", answer=str(a + b), target=f"Answer: {a + b}") for a, b in
           [(1, 2), (3, 4), (5, 1), (2, 2), (7, 1), (4, 4)]]
    return Task(name="toy", prompt="Add.", train=exs, validation=exs[:2], test=exs[:3], max_new_tokens=4,
                extract=lambda t: extract_rg(t, True), score_fn=score_numeric)


# ----------------------------------------------------------------------------- estimates


def brute_majority(answers, correct, n):
    """Independent reference: average over all n-subsets of 'majority answer is correct' (ties -> earliest)."""
    vals = []
    for idx in itertools.combinations(range(len(answers)), n):
        sub = [answers[i] for i in idx if answers[i] is not None]
        if not sub:
            vals.append(0.0)
            continue
        counts = Counter(sub)
        top = max(counts.values())
        first = next(i for i in idx if answers[i] is not None and counts[answers[i]] == top)
        vals.append(float(correct[first]))
    return sum(vals) / len(vals)


def test_subsampling_estimate_equals_exact_on_small_case():
    samples = [
        {"answers": ["3", "4", "3", "5"], "correct": [True, False, True, False], "scores": [0.1, 0.9, 0.2, 0.3]},
        {"answers": ["7", None, "8", "8"], "correct": [False, False, True, True], "scores": [0.5, 0.0, 0.9, 0.2]},
    ]
    for n in (1, 2, 3, 4):
        exact = sum(brute_majority(s["answers"], s["correct"], n) for s in samples) / len(samples)
        assert inference.estimate_accuracy(samples, n, "majority", max_subsets=1000) == pytest.approx(exact)
    # best-of-N by score: with N = all samples the pick is the argmax score
    assert inference.estimate_accuracy(samples, 4, "best_of_n") == pytest.approx((0 + 1) / 2)
    # N=1 equals the mean per-sample correctness
    mean1 = sum(sum(s["correct"]) / 4 for s in samples) / 2
    assert inference.estimate_accuracy(samples, 1, "best_of_n") == pytest.approx(mean1)
    # weighted majority: query 0 "4" (e^.9 = 2.46) beats "3" (e^.1 + e^.2 = 2.33), which majority picks;
    # query 1 "8" (e^.9 + e^.2) beats "7" (e^.5)
    assert inference.estimate_accuracy(samples, 4, "weighted_majority") == pytest.approx(0.5)
    assert inference.estimate_accuracy(samples, 4, "majority") == pytest.approx(1.0)
    assert inference.estimate_accuracy(samples, 1, "weighted_majority") == pytest.approx(mean1)
    # on the pair {"3" at 0.1, "4" at 0.9} the confident wrong sample wins, as best-of-N would pick it
    pair = [{"answers": ["3", "4"], "correct": [True, False], "scores": [0.1, 0.9]}]
    assert inference.estimate_accuracy(pair, 2, "weighted_majority") == 0.0
    # best-of-N passes over an answerless sample, however high it scores, while another sample parses
    unparsed = [{"answers": [None, "4", "5"], "correct": [False, True, False], "scores": [0.0, -1.0, -2.0]}]
    assert inference.estimate_accuracy(unparsed, 3, "best_of_n") == 1.0
    assert inference.estimate_accuracy(unparsed, 2, "best_of_n") == pytest.approx(2 / 3)  # {0,1} {0,2} {1,2}


def test_random_subsets_approach_exact():
    samples = [{"answers": list("aabacbdaab"), "correct": [c == "a" for c in "aabacbdaab"], "scores": [0.0] * 10}]
    exact = brute_majority(samples[0]["answers"], samples[0]["correct"], 5)
    est = inference.estimate_accuracy(samples, 5, "majority", max_subsets=3000, seed=1)  # C(10,5)=252 -> exact
    assert est == pytest.approx(exact)
    est_mc = inference.estimate_accuracy(samples, 5, "majority", max_subsets=200, seed=1)  # 200 < 252 -> sampled
    assert abs(est_mc - exact) < 0.1


def test_per_query_accuracy_is_the_estimate_query_by_query():
    samples = [{"answers": ["1", "1", "2"], "correct": [True, True, False]},
               {"answers": ["3", "4", "4"], "correct": [False, True, True]}]
    per = inference.per_query_accuracy(samples, 1, "majority")
    assert per == pytest.approx([2 / 3, 2 / 3])
    assert inference.per_query_accuracy(samples, 3, "majority") == [1.0, 1.0]
    assert sum(per) / 2 == pytest.approx(inference.estimate_accuracy(samples, 1, "majority"))


def test_allocator_spends_exact_budget_and_favours_uncertain():
    p = [0.02, 0.5, 0.98, 0.45, 0.6]
    alloc = inference.allocate_budget(p, total=15, max_per_query=8)
    assert sum(alloc) == 15 and all(1 <= a <= 8 for a in alloc)
    assert alloc[1] > alloc[0] and alloc[1] > alloc[2]
    assert alloc[3] > alloc[2]
    # infeasible totals are clipped to [Q*min, Q*max]
    assert sum(inference.allocate_budget(p, total=100, max_per_query=4)) == 20
    assert sum(inference.allocate_budget(p, total=1, max_per_query=4)) == 5


def test_accuracy_with_allocation_uses_first_k_samples():
    samples = [{"answers": ["1", "2", "2"], "correct": [True, False, False], "scores": [0, 0, 0]}]
    assert inference.accuracy_with_allocation(samples, [1], "majority") == 1.0
    assert inference.accuracy_with_allocation(samples, [3], "majority") == 0.0


def test_probe_learns_separable_outcomes():
    torch.manual_seed(0)
    x = torch.randn(40, 6)
    y = (x[:, 0] > 0).float()
    with torch.no_grad():  # as inference_select calls it
        predict = inference.fit_probe(x, y)
    p = torch.tensor(predict(x))
    assert ((p > 0.5).float() == y).float().mean() > 0.9


def test_resolve_verifier():
    task = toy_task()
    assert inference.resolve_verifier("", task) is None
    v = inference.resolve_verifier("oracle", task)
    ex = task.test[0]
    assert v(f"Answer: {ex.answer}", ex) == 1.0
    assert inference.resolve_verifier("json:dumps", task) is json.dumps
    with pytest.raises(MetatunerError, match="inference.verifier"):
        inference.resolve_verifier("nocolon", task)
    with pytest.raises(MetatunerError, match="cannot import"):
        inference.resolve_verifier("no_such_mod_xyz:f", task)


# ----------------------------------------------------------------------------- SAPO


def test_sapo_picks_lowest_measured_loss(tiny_model):
    model, tok = tiny_model
    task = toy_task()
    cfg = load_config(None, ["sapo.subset=4", "train.bf16=false"])
    cands = ["Answer.", "Give the number only.", "Think, then reply as 'Answer: <n>'."]
    losses = sapo.prompt_losses(model, tok, task, task.train[:4], cands, bf16=False)
    res = sapo.select_prompt(cfg, model, tok, task, candidates=cands)
    assert res["losses"] == pytest.approx(losses)
    assert res["prompt"] == cands[min(range(3), key=lambda i: losses[i])]
    assert len(set(round(x, 6) for x in losses)) == 3  # the candidates really score differently


def test_sapo_reselects_before_each_stage(monkeypatch, tiny_model, tmp_path):
    from metatuner import lora_sft

    model, tok = tiny_model
    task = toy_task()
    cfg = load_config(None, ["method=sft", "prompt_selection=sapo", "sapo.reselect_steps=1", "sapo.subset=2",
                             "train.bf16=false"])
    calls = []
    real = sapo.prompt_losses

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    class Trained:
        train_metrics = {"train_tokens": 7, "train_steps": 1}

        def merge_and_unload(self):
            return model

    monkeypatch.setattr(sapo, "prompt_losses", counting)
    monkeypatch.setattr(lora_sft, "train_sft", lambda *a, **k: Trained())
    _, sels, stats = sapo.staged_sft(cfg, model, tok, task, 3, tmp_path)
    assert len(calls) == 3 and [s["at_step"] for s in sels] == [0, 1, 2]
    assert stats == {"tokens": 3 * 7, "steps": 3}  # tokens and steps, summed over the sub-stages


def test_sapo_bad_setting(tiny_model):
    model, tok = tiny_model
    task = toy_task()
    with pytest.raises(MetatunerError, match="prompt_selection = 'best': expected one of none, sapo"):
        load_config(None, ["prompt_selection=best"])
    cfg = load_config(None, ["method=sft"])
    cfg.prompt_selection = "best"  # set past validation: the selection itself refuses it too
    with pytest.raises(MetatunerError, match="prompt_selection"):
        sapo.maybe_select(cfg, model, tok, task)


def test_parse_paraphrase():
    assert sapo.parse_paraphrase("x <START> Add the numbers. </START> y") == "Add the numbers."
    assert sapo.parse_paraphrase("<START>Sum them") == "Sum them"
    assert sapo.parse_paraphrase("plain") == "plain"


def test_forgetting():
    from metatuner.methods.continual import forgetting

    assert forgetting([[0.5], [0.3, 0.6], [0.2, 0.4, 0.7]]) == pytest.approx([0.3, 0.2])


def test_continual_stages_get_their_own_params():
    from metatuner.config import load_config
    from metatuner.methods.continual import task_config

    cfg = load_config(None, ["task.name=chain_sum", "task.params.max_terms=2", "task.prompt=Add.",
                             "task.params_by_task.products.max_digits=1", "task.train_tasks=[products]"])
    first, second, third = (task_config(cfg, n) for n in ("chain_sum", "products", "basic_arithmetic"))
    assert first.params == {"max_terms": 2} and first.prompt == "Add." and first.train_tasks == []
    assert second.params == {"max_digits": 1} and second.prompt == "" and second.train_tasks == []
    assert third.params == {}
