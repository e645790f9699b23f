"""scripts/pool_oracle.py: the per-query oracle over the prompt pool, from hand-made correctness and end to
end on a tiny SFT-with-SAPO run."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

from metatuner.cli import main

NS = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "pool_oracle.py"))


def test_oracle_report_by_hand():
    correct = {"validation": [[True, False, False], [False, True, False], [False, True, True], [False, False, False]],
               "test": [[False, True, False], [True, True, True], [False, False, False], [False, False, True]]}
    rep = NS["oracle_report"](correct, ["a", "b", "c"])
    assert rep["validation_accuracy"] == [0.25, 0.5, 0.25] and rep["best_on_validation"] == 1
    assert rep["test_accuracy"] == [0.25, 0.5, 0.5] and rep["best_on_validation_test_accuracy"] == 0.5
    assert rep["oracle_validation_accuracy"] == 0.75 and rep["oracle_test_accuracy"] == 0.75
    assert rep["test_best_wrong_other_right"] == 0.25  # query 3: b wrong, c right
    assert rep["test_all_agree"] == 0.5  # queries 1 (all right) and 2 (all wrong)



def test_resample_report_by_hand():
    test = [[True, False], [False, True], [False, False], [False, True]]  # best: candidate 0
    samples = [[True, False, False], [False, False, False], [False, True, False], [True, True, True]]
    r = NS["resample_report"](test, 0, samples, 0.7)
    assert r["samples"] == 3 and r["pass_at_k"] == 3 / 4 and r["single_sample_accuracy"] == pytest.approx(5 / 12)
    assert r["pool_oracle"] == 3 / 4
    assert r["pool_headroom_queries"] == 2 and r["pool_headroom_sampled_right"] == 1  # queries 1 and 3; 3 sampled right
    assert r["sampling_headroom_queries"] == 2  # queries 2 and 3: wrong greedily, some sample right


@pytest.mark.parametrize("args", [["--resample", "-1"], ["--resample", "3", "--temperature", "0"]])
def test_resample_arguments_are_checked(tmp_path, args):
    with pytest.raises(SystemExit, match="--resample needs K >= 1"):
        NS["main"]([str(tmp_path), *args])


def test_group_chooser_by_hand():
    assert NS["operators"]("Calculate -33 * 4.") == "*" and NS["operators"]("7 + 2 - 3 =") == "+-"
    assert NS["operators"]("What is 5?") == "none"
    correct = {"validation": [[True, False], [True, False], [False, True], [False, True], [True, True]],
               "test": [[True, False], [False, True], [False, True], [True, True]]}
    keys = {"validation": ["+", "+", "*", "*", "-"], "test": ["+", "*", "/", "-"]}
    g = NS["group_chooser"](correct, keys)
    # + -> 0, * -> 1; '-' ties on validation -> the overall best (0, by index on the 3-3 tie); '/' unseen -> 0
    assert g["choice"] == {"+": 0, "*": 1, "-": 0, "/": 0}
    assert g["validation"]["accuracy"] == 1.0
    assert g["test"]["accuracy"] == 0.75 and g["test"]["queries"] == {"*": 1, "+": 1, "-": 1, "/": 1}
    assert g["test_fitted_accuracy"] == 1.0  # '/' -> 1 on test
    assert g["test_by_group"] == {"+": [1.0, 0.0], "*": [0.0, 1.0], "/": [0.0, 1.0], "-": [1.0, 1.0]}

def test_pool_oracle_on_a_tiny_sft_sapo_run(tiny_model_path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    out = tmp_path / "sft_sapo"
    assert main(["train", "method=sft", f"model.name={tiny_model_path}", f"output_dir={out}", "task.train_size=16",
                 "task.val_size=3", "task.test_size=4", "eval.batch_size=4", "task.max_new_tokens=4", "train.batch_size=2",
                 "train.max_steps=2", "lora.rank=2", "train.bf16=false", "prompt_selection=sapo", "sapo.candidates=0",
                 "sapo.subset=2", "sapo.prompts=[Add.,Sum them.]"]) == 0
    rep = NS["main"]([str(out)])
    pool = json.loads((out / "sapo.json").read_text())["candidates"]
    assert rep["pool"] == pool and len(pool) == 3
    assert rep["queries"] == {"validation": 3, "test": 4}
    assert [len(r) for r in rep["correct"]["test"]] == [3] * 4
    assert rep["oracle_test_accuracy"] >= max(rep["test_accuracy"])
    saved = json.loads((out / "pool_oracle.json").read_text())
    assert saved["correct"] == rep["correct"] and "best single on validation" in capsys.readouterr().out
    assert NS["main"]([str(out)]) == saved  # cached: same pool, nothing re-evaluated
    assert not (out / "pool_oracle.partial.json").exists()
    # an interrupted run resumes: columns already in the partial file are not evaluated again
    (out / "pool_oracle.json").unlink()
    cols = {f"{s}/{j}": [r[j] for r in saved["correct"][s]] for s in ("validation", "test") for j in range(3)}
    cols["test/2"] = [True] * 4  # a marker only the partial file can supply
    (out / "pool_oracle.partial.json").write_text(json.dumps({"pool": pool, "columns": cols}))
    again = NS["main"]([str(out)])
    assert [r[2] for r in again["correct"]["test"]] == [True] * 4 and again["oracle_test_accuracy"] == 1.0
    with pytest.raises(SystemExit, match="config.yaml: not found"):
        NS["main"]([str(tmp_path)])


def test_pool_oracle_on_a_tiny_metatuner_pool_run(tiny_model_path, tmp_path, monkeypatch, capsys):
    """A MetaTuner run with a pool: every candidate is answered by the run's own system (per-query LoRA),
    and the prompt decoder's own picks, scored against the same matrix, reproduce the run's test accuracy."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("METATUNER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "mt"
    assert main(["train", "method=metatuner_j", f"model.name={tiny_model_path}", f"output_dir={out}",
                 "task.train_size=16", "task.val_size=3", "task.test_size=5", "eval.batch_size=4",
                 "task.max_new_tokens=4", "train.batch_size=2", "train.max_steps=3", "warmup.max_steps=1",
                 "warmup.generator_steps=1", "warmup.queries=4", "rollout.n=2", "rollout.batch_size=8",
                 "train.sync_steps=2", "generator.max_prompt_tokens=6", "lora.rank=2", "hypernet.hidden=16",
                 "hypernet.embed_dim=8", "generator.lora_rank=4", "train.bf16=false", "rollout.criterion=nll",
                 "generator.prompt_space=pool", "prompts.candidates=[Add.,Sum them.]",
                 "generator.pool_score=likelihood"]) == 0
    pool = json.loads((out / "final" / "pool.json").read_text())["pool"]
    rep = NS["main"]([str(out)])
    assert rep["pool"] == pool and len(pool) == 3
    assert rep["queries"] == {"validation": 3, "test": 5}
    picks = rep["picks"]
    assert len(picks["test"]) == 5 and all(0 <= j < 3 for j in picks["test"])
    # the decoder's choice on test is what the run evaluated
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [pool[j] for j in picks["test"]] == [r["prompt"] for r in sorted(preds, key=lambda r: r["index"])]
    ch = rep["chooser"]["test"]
    assert ch["picks"] == [picks["test"].count(j) for j in range(3)]
    assert ch["accuracy"] == sum(r[j] for r, j in zip(rep["correct"]["test"], picks["test"])) / 5
    assert ch["accuracy"] == rep["run_test_accuracy"]
    assert "the prompt decoder's choice on test" in capsys.readouterr().out
    # scripts/pool_distribution.py on the same run: the decoder's scores, argmax and sampling distribution
    dist = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "pool_distribution.py"))["main"]
    d = dist([str(out), "--split", "test", "--n", "5", "--temperatures", "1,0.001"])
    assert d["queries"] == 5 and sum(d["argmax_counts"]) == 5
    assert d["argmax_counts"] == [picks["test"].count(j) for j in range(3)]  # the test-time choice
    for probs in d["mean_probability"].values():
        assert sum(probs) == pytest.approx(1.0, abs=1e-3)
    assert d["mean_probability"]["0.001"] == pytest.approx([c / 5 for c in d["argmax_counts"]], abs=1e-3)
    for bad in (["--n", "0"], ["--temperatures", "1,0"], ["--temperatures", "x"]):
        with pytest.raises(SystemExit, match="error"):
            dist([str(out), *bad])
    capsys.readouterr()
    # interrupted after the pool was scored: the saved picks are used, the decoder is not run again
    (out / "pool_oracle.json").unlink()
    marker = {"validation": [1] * 3, "test": [2] * 5}
    (out / "pool_oracle.partial.json").write_text(json.dumps({"pool": pool, "columns": {}, "picks": marker}))
    import metatuner.methods.metatuner.rollouts as rollouts

    monkeypatch.setattr(rollouts, "test_prompts", lambda *a, **k: pytest.fail("the pool was scored again"))
    assert NS["main"]([str(out)])["picks"] == marker
    # against a run on the same test queries: here itself (the run's own predictions follow its real picks)
    (out / "pool_oracle.json").unlink()
    (out / "pool_oracle.partial.json").write_text(json.dumps({"pool": pool, "columns": {}, "picks": picks}))
    v = NS["main"]([str(out), "--versus", str(out)])["versus"]
    assert v["n_examples"] == 5 and v["accuracy"] == v["other_accuracy"] == rep["run_test_accuracy"]
    assert v["diff"] == 0 and v["p"] == 1.0
    # --learned: the finished report's columns are kept, only the training queries are answered; the chooser
    # reads the run's own meta encoder
    done = json.loads((out / "pool_oracle.json").read_text())
    import metatuner.evaluate as E

    calls, how = [], []
    real = E.evaluate
    monkeypatch.setattr(E, "evaluate", lambda *a, **k: (calls.append(len(a[3])), how.append((a[4], k)), real(*a, **k))[2])
    rep = NS["main"]([str(out), "--learned", "6"])
    assert calls == [6, 6, 6] and rep["correct"]["test"] == done["correct"]["test"] and len(rep["correct"]["train"]) == 6
    lc = rep["learned_chooser"]
    assert lc["train_queries"] == 6 and sum(lc["test"]["picks"]) == 5 and lc["versus_best_single"]["n_examples"] == 5
    assert "linear chooser on h_i" in capsys.readouterr().out
    assert NS["main"]([str(out), "--learned", "6"])["learned_chooser"] == lc and calls == [6, 6, 6]  # read back
    rep = NS["main"]([str(out), "--learned", "8"])  # more training queries: their columns are answered again
    assert calls == [6, 6, 6, 8, 8, 8] and len(rep["correct"]["train"]) == 8 and rep["learned_chooser"]["train_queries"] == 8
    # --resample: the best candidate sampled 3 times per test query by the same system; nothing else is answered
    kept = rep["correct"]
    rep = NS["main"]([str(out), "--resample", "3", "--temperature", "1.0"])
    r = rep["resample"]
    assert calls[6:] == [5] and rep["correct"] == kept
    prompt, k = how[6]  # sampled with the validation-best candidate, through the run's own per-query LoRA
    assert prompt == pool[rep["best_on_validation"]] and k["batch_context"] is not None
    assert (k["strategy"], k["n"], k["temperature"]) == ("majority", 3, 1.0)
    assert r["candidate"] == rep["best_on_validation"] and r["samples"] == 3 and r["temperature"] == 1.0
    assert len(r["samples_correct"]) == 5 and all(len(x) == 3 for x in r["samples_correct"])
    assert r["pass_at_k"] == sum(any(x) for x in r["samples_correct"]) / 5
    assert "pass@3" in capsys.readouterr().out
    assert NS["main"]([str(out), "--resample", "3", "--temperature", "1.0"])["resample"] == r and len(calls) == 7
    NS["main"]([str(out), "--resample", "2", "--temperature", "1.0"])  # another K: sampled again
    assert calls[7:] == [5]


def test_learned_chooser_finds_a_choice_the_features_carry_and_none_they_do_not():
    """Candidate 0 is right when feature 0 is positive, candidate 1 otherwise: the chooser learns it (test
    100% against 50-ish for one candidate for all); with the outcomes shuffled against the features, it
    gains nothing beyond chance."""
    import torch

    g = torch.Generator().manual_seed(0)
    feats = {k: torch.randn(n, 5, generator=g) for k, n in (("train", 200), ("validation", 60), ("test", 100))}
    correct = {k: [[bool(x[0] > 0), bool(x[0] <= 0)] for x in v] for k, v in feats.items()}
    lc = NS["learned_chooser"](feats, correct)
    assert lc["test"]["accuracy"] >= 0.97 and lc["test_best_single_accuracy"] < 0.65
    assert lc["versus_best_single"]["p"] < 0.001 and lc["train_decisive"] == 200
    perm = torch.randperm(200, generator=g)
    shuffled = dict(correct, train=[correct["train"][i] for i in perm])
    lc = NS["learned_chooser"](feats, shuffled)
    assert lc["test"]["accuracy"] <= lc["test_best_single_accuracy"] + 0.12


def test_pool_run_summary_without_test_predictions(tmp_path):
    """A run stopped during its test evaluation: D2's composition per rollout is still reported."""
    import runpy

    run = tmp_path / "run"
    run.mkdir()
    (run / "pool.json").write_text(json.dumps({"pool": ["p0", "p1"]}))
    rows = [{"step": 0, "stage": "rollout", "d2_correct": 0.25, "d2_targets": 1.0, "d2_rewritten": 0.5,
             "d2_pool_counts": [3, 1]},
            {"step": 1, "stage": "joint", "task_loss": 0.5, "reg": 1.0}]
    (run / "train_log.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    summary = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "pool_run_summary.py"))["summary"]
    text = summary(run)
    assert "| 0 | 25.0 | 100.0 | 50.0 | [3, 1] |" in text
    assert "no predictions.jsonl" in text and "| test prompt |" not in text


def test_sampling_headroom_on_a_tiny_model(tiny_model_path, monkeypatch, capsys):
    """scripts/sampling_headroom.py: greedy and every sampled strategy on the train split; each strategy's
    pick is one of the samples (so never above pass@N), and its rows replay the drawn samples."""
    from metatuner.evaluate import majority_vote
    from metatuner.voting import best_of_n, weighted_vote

    monkeypatch.setenv("TQDM_DISABLE", "1")
    hr = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "sampling_headroom.py"))
    res = hr["main"]([f"model.name={tiny_model_path}", "task.max_new_tokens=4", "--examples", "3", "--n", "3",
                      "--temperatures", "1.0", "--batch-size", "2"])
    assert len(res["greedy"]) == 3 and set(res["greedy"]) <= {0.0, 1.0}
    got = res["by_temperature"][1.0]
    for q, s in enumerate(got["samples"]):
        assert len(s["answers"]) == len(s["correct"]) == len(s["scores"]) == 3
        rows = {k: v[q] for k, v in got["rows"].items()}
        assert rows["pass"] == float(any(s["correct"])) and rows["single sample"] == sum(s["correct"]) / 3
        m = majority_vote(s["answers"])
        assert rows["majority"] == float(m is not None and s["correct"][s["answers"].index(m)])
        assert rows["best_of_n"] == float(s["correct"][best_of_n(s["answers"], s["scores"], s["answers"])])
        w = weighted_vote(s["answers"], s["scores"])
        assert rows["weighted_majority"] == float(w is not None and s["correct"][w])
        assert all(rows[k] <= rows["pass"] for k in ("majority", "best_of_n", "weighted_majority"))
    printed = capsys.readouterr().out
    assert "| 1 | majority@3 |" in printed and "| 1 | pass |" in printed
    import torch

    assert torch.is_grad_enabled()  # the script leaves the caller's grad mode alone
    with pytest.raises(SystemExit, match="unknown arguments"):
        hr["main"](["train.max_steps=3"])


def test_grouped_demos_pool_by_hand():
    from metatuner.pool import demo_prompt
    from metatuner.tasks.core import Example, Task

    qs = ["Calculate 1 + 2.", "Calculate 3 * 4.", "Calculate 5 + 6.", "Calculate 7 - 8.", "Calculate 9 * 2.",
          "Calculate 4 + 4."]
    train = [Example(q, str(i), str(i)) for i, q in enumerate(qs)]
    task = Task("t", "Solve.", train, [], [], 8, lambda s: s, lambda a, ex: {})
    pool = NS["grouped_demos_pool"](task, 2)
    # p~, the mixed demonstrations (prompts.demos' candidate), then '*' and '+' (sorted); '-' has 1 < 2 queries
    assert pool[0] == "Solve." and pool[1] == demo_prompt(task, 2) and len(pool) == 4
    assert "3 * 4" in pool[2] and "9 * 2" in pool[2] and "+" not in pool[2].split("Examples:")[1]
    assert "1 + 2" in pool[3] and "5 + 6" in pool[3] and "4 + 4" not in pool[3] and "*" not in pool[3]
    # k=1: every group qualifies; the '+' group's candidate equals the mixed one (first training query) and is dropped
    pool1 = NS["grouped_demos_pool"](task, 1)
    assert len(pool1) == 4 and len(set(pool1)) == 4 and any("7 - 8" in p for p in pool1)


def test_pool_oracle_grouped_demos_on_a_base_model_run(tiny_model_path, tmp_path, monkeypatch):
    """A run without adapter/ (a zero-shot eval) answers with its base model: p~'s column reproduces the
    run's own predictions; --grouped-demos builds the pool from the run's task."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    out = tmp_path / "base"
    assert main(["eval", f"model.name={tiny_model_path}", f"output_dir={out}", "task.name=basic_arithmetic",
                 "task.params.min_terms=2", "task.params.max_terms=2", "task.params.max_digits=1",
                 'task.params.operators=["+","*"]', "task.train_size=12", "task.val_size=3", "task.test_size=4",
                 "eval.batch_size=4", "task.max_new_tokens=4"]) == 0
    rep = NS["main"]([str(out), "--grouped-demos", "2", "--groups", "operators"])
    pool = rep["pool"]
    assert 3 <= len(pool) <= 4 and all(c.startswith(pool[0] + "\n\nExamples:") for c in pool[1:])
    demo_ops = [{NS["operators"](ln) for ln in c.splitlines() if ln.startswith("Question:")} for c in pool[1:]]
    assert {"*"} in demo_ops and {"+"} in demo_ops  # one candidate shows only '*', one only '+'
    preds = sorted((json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()), key=lambda r: r["index"])
    assert [r[0] for r in rep["correct"]["test"]] == [bool(r["correct"]) for r in preds]
    assert set(rep["group_chooser"]["choice"]) <= {"+", "*"}
    with pytest.raises(SystemExit, match="--grouped-demos builds the pool itself"):
        NS["main"]([str(out), "--grouped-demos", "2", "--pool", str(out / "x.json")])
    with pytest.raises(SystemExit, match="--grouped-demos needs K >= 1"):
        NS["main"]([str(out), "--grouped-demos", "-1"])
    # a weight-training run whose adapter/ is missing is refused, not scored with the base model
    cfg = (out / "config.yaml").read_text()
    assert "method: zero_shot" in cfg
    (out / "config.yaml").write_text(cfg.replace("method: zero_shot", "method: sft"))
    (out / "pool_oracle.json").unlink()
    with pytest.raises(SystemExit, match="adapter: not found"):
        NS["main"]([str(out), "--grouped-demos", "2"])
