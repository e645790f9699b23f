"""method=continual (with SAPO) and method=inference_select end to end on a tiny random Llama: the
files a user reads are complete and agree with each other."""

from __future__ import annotations

import json

import pytest

from metatuner.cli import main

SMALL = ["task.train_size=16", "task.val_size=4", "task.test_size=4", "eval.limit=3", "eval.batch_size=4",
         "task.max_new_tokens=4", "train.batch_size=2", "lora.rank=2", "sapo.candidates=2", "sapo.subset=2",
         "sapo.max_new_tokens=6", "train.bf16=false"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TQDM_DISABLE", "1")


def test_continual_with_sapo_end_to_end(tiny_model_path, tmp_path):
    out = tmp_path / "cont"
    args = ["train", "method=continual", f"model.name={tiny_model_path}", f"output_dir={out}", *SMALL,
            "train.max_steps=3", "prompt_selection=sapo", "sapo.prompts=[Add the numbers.]",
            "continual.tasks=[chain_sum,products]", "task.params_by_task.products.max_digits=1"]
    assert main(args) == 0
    rep = json.loads((out / "continual.json").read_text())
    assert rep["tasks"] == ["chain_sum", "products"] and len(rep["accuracy"]) == 2
    assert [len(r) for r in rep["accuracy"]] == [1, 2]
    assert rep["forgetting"]["chain_sum"] == pytest.approx(rep["accuracy"][0][0] - rep["accuracy"][1][0])
    for st in rep["stages"]:
        (sel,) = st["selections"]  # SAPO once per stage, with the model as it is before the stage
        cands = dict(sel["candidates"])
        assert "Add the numbers." in cands and st["p_tilde"] in cands
        assert st["prompt"] == min(cands, key=cands.get)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "products" and metrics["accuracy_matrix"] == rep["accuracy"]
    # train.max_steps=3 is the total: 2 steps on the first stage, 1 on the second
    assert metrics["train_steps"] == 3 and metrics["train_tokens"] > 0
    assert [st["train_steps"] for st in rep["stages"]] == [2, 1]
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in log] == [("stage0_chain_sum@0", 1), ("stage0_chain_sum@0", 2),
                                                      ("stage1_products@0", 1)]
    assert "forgetting (points): chain_sum=" in (out / "continual.md").read_text()
    # the second stage really used products with the per-task params (1-digit factors)
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert preds and all("multiplication" in p["query"] for p in preds)


def test_inference_select_end_to_end(tiny_model_path, tmp_path, capsys):
    out = tmp_path / "sel"
    args = ["train", "method=inference_select", f"model.name={tiny_model_path}", f"output_dir={out}", *SMALL,
            "select.n_values=[1,2,4]", "select.temperatures=[0.5,1.0]", "select.val_examples=4", "select.opro_prompts=0",
            "select.rewrites=1", "select.prompts=[Add.,Sum them.]", "select.budget=2", "select.max_per_query=4",
            "select.subsets=20", "inference.stop_threshold=0.85"]
    assert main(args) == 0
    rep = json.loads((out / "select.json").read_text())
    prompts = rep["prompts"]
    assert len(prompts) >= 3 and "Add." in prompts and "Sum them." in prompts
    arms = rep["arms"]
    assert arms[0]["label"] == "P0 greedy" and sum(a["strategy"] == "greedy" for a in arms) == len(prompts)
    # per prompt: greedy + per temperature majority@1,2,4, best_of_n@2,4, weighted_majority@2,4, early_majority@4
    assert len(arms) == len(prompts) * (1 + 2 * (3 + 2 + 2 + 1))
    assert {a["strategy"] for a in arms} == {"greedy", "majority", "best_of_n", "weighted_majority", "early_majority"}
    for a in arms:
        lo, hi = a["interval"]
        assert a["queries"] == 4 and 0 <= lo <= a["accuracy"] <= hi <= 1
        assert 1 <= a["mean_samples"] <= a["n"]
    # the choice: eligible (not below greedy with its prompt nor with p~), best score among eligible arms
    ch = rep["chosen"]
    same = next(a for a in arms if a["strategy"] == "greedy" and a["prompt"] == ch["prompt"])
    assert ch["eligible"] and ch["accuracy"] >= same["accuracy"] and ch["accuracy"] >= arms[0]["accuracy"]
    assert ch["score"] == pytest.approx(max(a["score"] for a in arms if a["eligible"]))
    assert rep["validation_samples"] == 4 * len(prompts) * (1 + 2 * 4)
    # test: the chosen arm through the harness, greedy baselines on the same examples, early stop vs fixed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["chosen_arm"] == ch["label"] and metrics["strategy"] == ch["strategy"] and metrics["n"] == 3
    assert metrics["prompt"] == ch["prompt_text"] == prompts[ch["prompt"]]
    vs = rep["vs_greedy"]
    assert vs["chosen_accuracy"] == metrics["accuracy"]
    assert metrics["greedy_same_prompt_accuracy"] == vs["greedy_same_prompt_accuracy"]
    assert metrics["vs_greedy_p_value"] == vs["vs_same_prompt"]["p_value"] and 0 <= metrics["vs_greedy_p_value"] <= 1
    assert vs["vs_same_prompt"]["n_examples"] == 3
    e = rep["early_stop_vs_fixed"]
    assert e["cap"] == 4 and e["fixed_mean_samples"] == 4 and 1 <= e["early_mean_samples"] <= 4
    assert e["sample_ratio"] == pytest.approx(e["early_mean_samples"] / 4) and e["rule_fitted_on_validation"]
    # the stopping rule: fitted per (prompt, temperature) on validation, within 1 point of fixed majority@4
    sr = rep["stop_rule"]
    assert sr["configured"] == {"threshold": 0.85, "min_samples": 2, "stop_score": None} and sr["fit_on_validation"]
    assert len(sr["per_group"]) == 2 * len(prompts)
    for g in sr["per_group"]:
        assert g["accuracy"] >= g["fixed_majority_accuracy"] - 0.01 - 1e-9 or g["min_samples"] == 4
        early = next(a for a in arms if a["strategy"] == "early_majority" and a["prompt"] == g["prompt"]
                     and a["temperature"] == g["temperature"])
        assert early["accuracy"] == pytest.approx(g["accuracy"]) and early["mean_samples"] == pytest.approx(g["mean_samples"])
    test_rule = next(g for g in sr["per_group"] if g["prompt"] == ch["prompt"] and g["temperature"] == e["temperature"])
    assert (e["threshold"], e["min_samples"], e["stop_score"]) == (test_rule["threshold"], test_rule["min_samples"],
                                                                   test_rule["stop_score"])
    b = rep["budget"]
    assert b["used"] in ("probe", "uniform", "early_stop") and b["why"]
    for split, q in (("validation", 4), ("test", 3)):
        assert b[split]["probe"]["total_samples"] == b[split]["uniform"]["total_samples"] == 2 * q
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 3 and all(p["samples"] <= max(1, ch["n"]) for p in preds)
    assert metrics["total_samples"] == sum(p["samples"] for p in preds)
    # every replayed sample is on disk with its score: validation per (prompt, temperature), test for the chosen
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    val_rows = [r for r in rows if r["split"] == "validation"]
    assert len(val_rows) == 4 * 2 * len(prompts) and all(len(r["answers"]) == len(r["scores"]) == 4 for r in rows)
    test_rows = [r for r in rows if r["split"] == "test"]
    assert [r["query"] for r in test_rows] == [0, 1, 2] and {r["temperature"] for r in test_rows} == {e["temperature"]}
    png = (out / "select_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    shown = capsys.readouterr().out
    assert "P0 greedy" in shown and "<- chosen" in shown and "McNemar" in shown


def test_inference_select_halving_and_greedy_only(tiny_model_path, tmp_path):
    out = tmp_path / "halving"
    args = ["train", "method=inference_select", f"model.name={tiny_model_path}", f"output_dir={out}", *SMALL,
            "select.n_values=[1,2]", "select.temperatures=[0.7]", "select.val_examples=4", "select.opro_prompts=0",
            "select.rewrites=0", "select.prompts=[Add.]", "select.rule=halving", "select.explore_budget=30",
            "select.max_per_query=2", "select.subsets=10", "select.stop_fit=false", "inference.stop_threshold=0.9",
            "inference.stop_min=3"]
    assert main(args) == 0
    rep = json.loads((out / "select.json").read_text())
    assert rep["rule"] == "halving" and rep["explore_budget"] == 30 and rep["validation_samples"] <= 30
    assert rep["halving_rounds"] and rep["chosen"]["eligible"]
    # select.stop_fit=false: the configured rule everywhere
    chosen_prompt = rep["prompts"].index(rep["early_stop_vs_fixed"]["prompt"])
    assert rep["stop_rule"]["per_group"] == [{"prompt": chosen_prompt, "temperature": 0.7, "threshold": 0.9,
                                              "min_samples": 3, "stop_score": None}]
    assert (rep["early_stop_vs_fixed"]["threshold"], rep["early_stop_vs_fixed"]["min_samples"]) == (0.9, 3)
    # scripts/early_stop_test.py on a halving run: every group it sampled gets a rule and a comparison
    import runpy
    from pathlib import Path

    add = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "early_stop_test.py"))["add_early_groups"]
    sampled = {(r["prompt"], r["temperature"]) for r in map(json.loads, (out / "samples.jsonl").read_text().splitlines())
               if r["split"] == "validation"}
    eg = add(out, "all")
    assert {(g["prompt"], g["temperature"]) for g in eg["groups"]} == sampled | {(chosen_prompt, 0.7)}
    assert eg["groups"][0]["prompt"] == chosen_prompt and "chosen" in eg["groups"][0]["roles"]
    assert sum("cheapest on validation" in g["roles"] for g in eg["groups"]) == 1
    bad = ["train", "method=inference_select", f"model.name={tiny_model_path}", f"output_dir={tmp_path / 'bad'}",
           *SMALL, "select.n_values=[1,2]", "select.temperatures=[0.7]", "select.val_examples=4",
           "select.opro_prompts=0", "select.rewrites=0", "select.rule=halving", "select.explore_budget=5"]
    assert main(bad) == 2


def test_inference_select_early_test_groups_and_script(tiny_model_path, tmp_path, capsys):
    """select.early_test=cheapest compares early stopping on test at the chosen group and at the group
    whose rule is cheapest on validation; scripts/early_stop_test.py adds every other group to the
    finished run, reusing the samples on disk."""
    import runpy
    from pathlib import Path

    from metatuner.errors import MetatunerError

    out = tmp_path / "early"
    args = ["train", "method=inference_select", f"model.name={tiny_model_path}", f"output_dir={out}", *SMALL,
            "select.n_values=[1,2]", "select.temperatures=[0.5,1.0]", "select.val_examples=4", "select.opro_prompts=0",
            "select.rewrites=0", "select.prompts=[Add.]", "select.max_per_query=2", "select.subsets=10",
            "select.early_test=cheapest"]
    assert main(args) == 0
    rep = json.loads((out / "select.json").read_text())
    eg = json.loads((out / "early_stop_groups.json").read_text())
    assert eg["which"] == "cheapest" and eg["cap"] == 2
    first, e = eg["groups"][0], rep["early_stop_vs_fixed"]
    assert "chosen" in first["roles"] and first["temperature"] == e["temperature"]
    for k in ("fixed_majority_accuracy", "early_accuracy", "early_mean_samples", "threshold", "min_samples"):
        assert first[k] == e[k]
    per = rep["stop_rule"]["per_group"]
    assert len(per) == 4  # 2 prompts x 2 temperatures, fitted on validation
    cheap = min(per, key=lambda g: (g["mean_samples"], -g["accuracy"], g["prompt"], g["temperature"]))
    (marked,) = [g for g in eg["groups"] if "cheapest on validation" in g["roles"]]
    assert (marked["prompt"], marked["temperature"]) == (cheap["prompt"], cheap["temperature"])
    assert marked["validation"]["mean_samples"] == cheap["mean_samples"]
    assert len(eg["groups"]) == 1 + ((cheap["prompt"], cheap["temperature"]) != (first["prompt"], first["temperature"]))
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    test_groups = {(r["prompt"], r["temperature"]) for r in rows if r["split"] == "test"}
    assert test_groups == {(g["prompt"], g["temperature"]) for g in eg["groups"]}
    assert sum(r["split"] == "test" for r in rows) == 3 * len(test_groups)

    add = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "early_stop_test.py"))["add_early_groups"]
    rep2 = add(out, "all")
    assert rep2["which"] == "all" and rep2["added_by"] == "scripts/early_stop_test.py"
    assert {(g["prompt"], g["temperature"]) for g in rep2["groups"]} == {(g["prompt"], g["temperature"]) for g in per}
    before = {(g["prompt"], g["temperature"]): g for g in eg["groups"]}
    for g in rep2["groups"]:  # groups that had test samples are replayed on the same ones
        if (g["prompt"], g["temperature"]) in before:
            same = {k: v for k, v in before[(g["prompt"], g["temperature"])].items() if k != "roles"}
            assert {k: v for k, v in g.items() if k != "roles"} == same
        assert 1 <= g["early_mean_samples"] <= 2 and g["fixed_mean_samples"] == 2
        assert g["validation"]["queries"] == 4 and g["validation"]["mean_samples"] >= 1
    rows2 = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert rows2[: len(rows)] == rows  # nothing on disk lost
    new = rows2[len(rows):]
    assert len(new) == 3 * (4 - len(test_groups)) and all(r["split"] == "test" and len(r["answers"]) == 2 for r in new)
    text = (out / "samples.jsonl").read_text()
    assert add(out, "all")["groups"] == rep2["groups"] and (out / "samples.jsonl").read_text() == text  # no new draws
    (tmp_path / "config.yaml").write_text((out / "config.yaml").read_text())
    with pytest.raises(MetatunerError, match="select.json: not found"):
        add(tmp_path, "all")
    with pytest.raises(MetatunerError, match="expected chosen, cheapest or all"):
        add(out, "some")
    with pytest.raises(MetatunerError, match="already compares more groups"):  # never shrinks the report
        add(out, "cheapest")
    assert (out / "samples.jsonl").read_text() == text
    # new samples only for the run's own test queries
    import shutil

    other = tmp_path / "other"
    shutil.copytree(out, other)
    (other / "early_stop_groups.json").unlink()
    kept = [r for r in rows2 if r["split"] == "validation" or (r["prompt"], r["temperature"]) in before]
    (other / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    preds = (other / "predictions.jsonl").read_text().splitlines()
    (other / "predictions.jsonl").write_text("\n".join([json.dumps({**json.loads(preds[0]), "query": "x"})] + preds[1:]))
    with pytest.raises(MetatunerError, match="test queries differ"):
        add(other, "all")
    # scripts/inference_select_table.py: one row per run, Holm's adjustment over the runs given
    table = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "inference_select_table.py"))["main"]
    capsys.readouterr()
    table([str(out), str(out)])
    first_table = capsys.readouterr().out.split("\n\n")[0].splitlines()
    assert "Holm p (2 runs)" in first_table[0] and len(first_table) == 4
    p = rep["vs_greedy"]["vs_same_prompt"]["p_value"]
    for line in first_table[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[-2] == f"{p:.3g}" and cells[-1] == f"{min(1.0, 2 * p):.3g}"


def test_compare_early_groups_draws_only_what_is_missing():
    from metatuner.config import load_config
    from metatuner.methods.inference_select import compare_early_groups

    a, b = ("sampled", 0, 0.3), ("sampled", 1, 0.7)
    rule = {"threshold": 0.6, "min_samples": 2, "stop_score": None}
    have = {a: [{"answers": ["1"] * 4, "correct": [True] * 4, "scores": None}] * 2}
    drawn = []

    def draw(g):
        drawn.append(g)
        return [{"answers": ["1", "2", "3", "4"], "correct": [False, True, False, False], "scores": None}] * 2

    cfg = load_config(None, ["method=inference_select", "select.early_test=all"])
    rep, rows = compare_early_groups(cfg, [(a, ["chosen"], {}), (b, [], {"queries": 5})], {a: rule, b: rule}, have,
                                     draw, 4)
    assert drawn == [b] and rep["which"] == "all" and rep["cap"] == 4
    assert [(r["split"], r["prompt"], r["temperature"], r["query"]) for r in rows] == [("test", 1, 0.7, 0), ("test", 1, 0.7, 1)]
    ga, gb = rep["groups"]
    assert (ga["early_mean_samples"], ga["early_accuracy"], ga["fixed_majority_accuracy"]) == (2, 1.0, 1.0)
    assert (gb["early_mean_samples"], gb["early_accuracy"]) == (4, 0.0)  # never settles: all 4, majority of ties
    assert gb["validation"] == {"queries": 5} and gb["roles"] == []
