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


def test_inference_select_end_to_end(tiny_model_path, tmp_path):
    out = tmp_path / "sel"
    args = ["train", "method=inference_select", f"model.name={tiny_model_path}", f"output_dir={out}", *SMALL,
            "inference.strategy=majority", "select.n_values=[1,2,4]", "select.val_examples=4", "select.opro_prompts=0",
            "select.rewrites=1", "select.prompts=[Add.,Sum them.]", "select.budget=2", "select.max_per_query=4"]
    assert main(args) == 0
    rep = json.loads((out / "select.json").read_text())
    prompts = [c["prompt"] for c in rep["curves"].values()]
    assert len(prompts) >= 3 and "Add." in prompts and "Sum them." in prompts
    for c in rep["curves"].values():
        assert sorted(int(n) for n in c["accuracy"]) == [1, 2, 4]
        assert all(0.0 <= a <= 1.0 for a in c["accuracy"].values())
    # the choice maximizes accuracy - cost_weight * N over every (prompt, N)
    w = rep["chosen"]["cost_weight"]
    best = max(c["accuracy"][n] - w * int(n) for c in rep["curves"].values() for n in c["accuracy"])
    assert rep["chosen"]["objective"] == pytest.approx(best)
    b = rep["adaptive_budget"]
    assert b["total_samples"] == b["uniform_total_samples"] == 2 * 3
    png = (out / "select_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["strategy"] == "majority" and metrics["samples_per_query"] == rep["chosen"]["n"]
    assert metrics["prompt"] == rep["chosen"]["prompt"] and metrics["n"] == 3
