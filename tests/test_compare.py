"""`metatuner compare`: a failing method is reported and the others complete, re-runs skip finished
runs, the report matches results.json, config errors are one line, and the interval arithmetic."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from metatuner.cli import main
from metatuner.compare import load_compare, summarize, t_interval, wilson
from metatuner.errors import MetatunerError

BASE = {"task.name": "chain_sum", "task.train_size": 16, "task.val_size": 4, "task.test_size": 4, "eval.limit": 2,
        "eval.batch_size": 2, "task.max_new_tokens": 4, "train.max_steps": 2, "train.batch_size": 2, "lora.rank": 2}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the child `metatuner train` processes: one torch thread each on a small shared CPU
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "1")


def one_line_error(capsys) -> str:
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err + cap.out
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), cap.err
    return lines[0]


def write_spec(path: Path, **spec) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def table_rows(md: str) -> dict[str, list[str]]:
    rows = {}
    for ln in md.splitlines():
        if ln.startswith("| ") and not ln.startswith("| method ") and not ln.startswith("|---"):
            cells = [c.strip() for c in ln.strip().strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def test_compare_end_to_end_failure_skip_and_report(tiny_model_path, tmp_path, capsys):
    out = tmp_path / "cmp"
    spec = write_spec(tmp_path / "c.yaml", title="tiny compare", output_dir=str(out), seeds=[0],
                      base={"model.name": str(tiny_model_path), **BASE},
                      methods=[{"name": "zero_shot", "method": "zero_shot"},
                               {"name": "sft", "method": "sft", "overrides": {"train.max_steps": 1}},
                               {"name": "broken", "method": "sft", "overrides": {"lora": {"target_modules": ["nope"]}}}])
    assert main(["compare", "--config", str(spec)]) == 0
    capsys.readouterr()

    # (a) the failed method is reported with its error; the others complete
    res = json.loads((out / "results.json").read_text())
    by = {r["name"]: r for r in res["methods"]}
    assert [r["name"] for r in res["methods"]] == ["zero_shot", "sft", "broken"]
    assert by["zero_shot"]["status"] == by["sft"]["status"] == "complete"
    assert by["broken"]["status"] == "failed"
    assert "lora.target_modules" in by["broken"]["error"] and "'nope'" in by["broken"]["error"]
    assert not (out / "broken" / "seed_0" / "COMPLETE").exists()
    md = (out / "results.md").read_text()
    assert md.startswith("# tiny compare")
    rows = table_rows(md)
    assert rows["broken"][-1].startswith("failed: ") and "lora.target_modules" in rows["broken"][-1]
    assert by["sft"]["train_steps"] == 1 and by["sft"]["train_examples"] == 2 and by["zero_shot"]["train_steps"] == 0

    # (c) the table matches results.json
    for name in ("zero_shot", "sft"):
        r = by[name]
        m = re.match(r"([\d.]+) \(([\d.]+)-([\d.]+)\)", rows[name][1])
        assert m, rows[name][1]
        acc, lo, hi = (float(x) for x in m.groups())
        assert acc == pytest.approx(100 * r["accuracy"], abs=0.051)
        assert (lo, hi) == pytest.approx([100 * x for x in r["accuracy_ci95_examples"]], abs=0.051)
        assert float(rows[name][3]) == pytest.approx(r["train_steps"], abs=0.5)
        assert rows[name][-1] == "complete"
        metrics = json.loads((out / name / "seed_0" / "metrics.json").read_text())
        assert r["accuracy"] == metrics["accuracy"] and r["n_test"] == 2
        assert r["prompt_differs_from_p_tilde"] == 0.0  # neither method rewrites p~ (zero_shot included)
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    gallery = (out / "gallery.md").read_text()
    for name in ("zero_shot", "sft"):
        assert f"## {name}" in gallery
        for p in by[name]["prompts"]:
            assert repr(p["prompt"][:300]) in gallery
    assert "## broken" not in gallery

    # (b) re-running skips completed runs (outputs untouched) and retries the failed one
    mtimes = {n: (out / n / "seed_0" / "metrics.json").stat().st_mtime_ns for n in ("zero_shot", "sft")}
    assert main(["compare", "--config", str(spec)]) == 0
    printed = capsys.readouterr().out
    for n in ("zero_shot", "sft"):
        assert f"[compare] {n} seed 0: already complete, skipped" in printed
        assert (out / n / "seed_0" / "metrics.json").stat().st_mtime_ns == mtimes[n]
    assert "[compare] broken seed 0: running" in printed
    res2 = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in res2["methods"]] == ["complete", "complete", "failed"]
    assert res2["methods"][1]["accuracy"] == by["sft"]["accuracy"]


def _fake_run(root: Path, name: str, seed: int, correct: list[bool], method: str = "sft", **metrics) -> None:
    d = root / name / f"seed_{seed}"
    d.mkdir(parents=True)
    preds = [{"query": f"q{i}", "prompt": "P~", "correct": c} for i, c in enumerate(correct)]
    (d / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    m = {"n": len(correct), "accuracy": sum(correct) / len(correct), "tokens_generated": 10, "method": method,
         **metrics}
    (d / "metrics.json").write_text(json.dumps(m))
    (d / "COMPLETE").write_text(json.dumps({"wall_seconds": 3.0}))


def test_summarize_over_seeds(tmp_path):
    """seeds: [0, 1] -> mean accuracy, a t interval over seeds and a Wilson interval over all predictions."""
    root = tmp_path / "cmp"
    _fake_run(root, "sft", 0, [True, True, False, False], train_steps=2, p_tilde="P~")
    _fake_run(root, "sft", 1, [True, True, True, False], train_steps=4, p_tilde="P~")
    _fake_run(root, "zs", 0, [True, False, False, False], method="zero_shot")
    spec = {"path": "c.yaml", "output_dir": str(root), "seeds": [0, 1],
            "methods": [{"name": "sft", "method": "sft"}, {"name": "zs", "method": "zero_shot"},
                        {"name": "bad", "method": "dpo"}]}
    res = summarize(spec, {("zs", 1): {"status": "failed", "error": "error: boom"},
                           ("bad", 0): {"status": "failed", "error": "error: no"}})
    sft, zs, bad = res["methods"]
    assert sft["accuracy"] == pytest.approx(0.625) and sft["accuracy_per_seed"] == [0.5, 0.75]
    lo, hi = t_interval([0.5, 0.75])
    assert lo < 0 and hi > 1  # two seeds: t = 12.7, so the interval is clipped to [0, 1]
    assert sft["accuracy_ci95_seeds"] == [0.0, 1.0]
    assert sft["accuracy_ci95_examples"] == pytest.approx(list(wilson(5, 8)))
    assert sft["train_steps"] == 3 and sft["seeds_complete"] == [0, 1]
    assert zs["status"] == "failed" and zs["error"] == "seed 1: error: boom" and zs["seeds_complete"] == [0]
    assert bad["status"] == "failed"
    from metatuner.compare import table

    row = table_rows(table(res))["sft"]
    assert "seeds" in row[1]


def test_compare_seeds_override(tmp_path):
    spec = write_spec(tmp_path / "c.yaml", methods=[{"method": "zero_shot"}])
    assert load_compare(str(spec), ["seeds=[0, 1]"])["seeds"] == [0, 1]
    assert load_compare(str(spec), [])["seeds"] == [0]
    with pytest.raises(MetatunerError, match="seeds"):
        load_compare(str(spec), ["seeds=[a]"])


@pytest.mark.parametrize("spec, needles", [
    ({"methods": [{"method": "sft"}], "metods": []}, ["unknown compare key", "'metods'"]),
    ({"methods": [{"method": "sft"}, {"method": "sft"}]}, ["unique", "'sft'"]),
    ({"methods": [{"name": "a", "method": "sft"}, {"name": "a", "method": "dpo"}]}, ["unique", "'a'"]),
    ({"methods": []}, ["methods"]),
    ({"methods": ["sft"]}, ["methods[0]"]),
    ({"methods": {"sft": {}}}, ["methods"]),
    ({"methods": [{"method": "sft", "overides": {}}]}, ["methods[0]", "'overides'"]),
    ({"methods": [{"method": "sft"}], "seeds": "zero"}, ["seeds"]),
    ({"methods": [{"method": "sft"}], "seeds": [0, 0]}, ["seeds"]),
    ({"methods": [{"method": "sft"}], "base": ["x"]}, ["base"]),
    ({"methods": [{"method": "sft", "overrides": {"train.max_stesp": 3}}]}, ["train.max_stesp", "train.max_steps"]),
    ({"methods": [{"method": "sft"}], "base": {"eval.limit": "many"}}, ["eval.limit", "int"]),
    (["not", "a", "mapping"], ["mapping"]),
])
def test_compare_config_errors_are_one_line(spec, needles, tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(spec))
    assert main(["compare", "--config", str(p), f"output_dir={tmp_path / 'out'}"]) == 2
    line = one_line_error(capsys)
    for n in needles:
        assert n in line, line
    assert not (tmp_path / "out").exists()  # nothing ran


def test_compare_missing_config_is_one_line(tmp_path, capsys):
    assert main(["compare", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in one_line_error(capsys)
    assert main(["compare"]) == 2
    assert "--config" in one_line_error(capsys)


def test_wilson_by_hand():
    z = 1.96
    for k, n in [(8, 10), (0, 10), (10, 10), (37, 100), (1, 1)]:
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        lo, hi = wilson(k, n)
        assert lo == pytest.approx(max(0.0, centre - half)) and hi == pytest.approx(min(1.0, centre + half))
    assert wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # textbook values
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(0, 0) == (0.0, 0.0)


def test_t_interval_by_hand():
    # two seeds: t(0.975, df=1) = 12.706; mean 0.6, sd 0.1414
    lo, hi = t_interval([0.5, 0.7])
    h = 12.706 * math.sqrt(0.02) / math.sqrt(2)
    assert (lo, hi) == pytest.approx((0.6 - h, 0.6 + h))
    # three seeds: df=2 -> 4.303; mean 0.4, sd 0.2
    assert t_interval([0.2, 0.4, 0.6]) == pytest.approx((0.4 - 4.303 * 0.2 / math.sqrt(3), 0.4 + 4.303 * 0.2 / math.sqrt(3)))
    # twelve seeds: df=11 -> 2.201 (not the normal 1.96 or a flat 2.0)
    xs = [0.1 * (i % 4) for i in range(12)]
    import statistics

    m, s = statistics.mean(xs), statistics.stdev(xs)
    assert t_interval(xs) == pytest.approx((m - 2.201 * s / math.sqrt(12), m + 2.201 * s / math.sqrt(12)))
    assert t_interval([0.3]) == (0.3, 0.3) and t_interval([]) == (0.0, 0.0)
    assert t_interval([0.5, 0.5]) == (0.5, 0.5)


def test_completed_run_with_changed_settings_runs_again(tmp_path):
    """A completed run is reused only when it was requested with the same settings."""
    from metatuner.compare import _same_config, method_config
    from metatuner.config import save_config

    spec = load_compare(str(write_spec(tmp_path / "c.yaml", methods=[{"method": "sft", "overrides": {"train.max_steps": 3}}],
                                       base=BASE)), [])
    run_dir = tmp_path / "sft" / "seed_0"
    cfg = method_config(spec, spec["methods"][0], 0, run_dir)
    run_dir.mkdir(parents=True)
    assert not _same_config(cfg, run_dir)  # no requested.yaml
    save_config(cfg, run_dir / "requested.yaml")
    assert _same_config(cfg, run_dir)
    assert _same_config(method_config(spec, spec["methods"][0], 0, run_dir), run_dir)
    spec["methods"][0]["overrides"]["train.max_steps"] = 4
    assert not _same_config(method_config(spec, spec["methods"][0], 0, run_dir), run_dir)
    assert not _same_config(method_config(load_compare(str(tmp_path / "c.yaml"), ["train.lr=0.5"]),
                                          spec["methods"][0], 0, run_dir), run_dir)


def test_report_shows_inference_strategy_and_method_notes(tmp_path):
    """Issue 6 methods report in the same table: strategy@N, SAPO's prompt, forgetting, adaptive vs uniform."""
    from metatuner.compare import table

    root = tmp_path / "cmp"
    _fake_run(root, "sft_sapo", 0, [True, False], prompt="Be brief | exact.", sapo_losses={"a": 1.0, "b": 0.5})
    _fake_run(root, "continual", 0, [True, True], method="continual", accuracy_matrix=[[0.4], [0.3, 0.5]],
              mean_forgetting=0.1)
    _fake_run(root, "select", 0, [False, True], method="inference_select", strategy="majority", samples_per_query=4,
              chosen_n=4, best_prompt_changes_with_n=True, adaptive_accuracy=0.35, uniform_accuracy=0.3,
              budget_samples=200)
    spec = {"path": "c.yaml", "output_dir": str(root), "seeds": [0],
            "methods": [{"name": n, "method": n} for n in ("sft_sapo", "continual", "select")]}
    res = summarize(spec, {})
    by = {r["name"]: r for r in res["methods"]}
    rows = table_rows(table(res))
    assert by["sft_sapo"]["inference"] == rows["sft_sapo"][9] == "greedy@1"
    assert by["select"]["inference"] == rows["select"][9] == "majority@4"
    assert "SAPO prompt: 'Be brief / exact.'" in rows["sft_sapo"][10]
    assert "after each stage: 40; 30/50" in rows["continual"][10] and "mean forgetting 10.0 pts" in rows["continual"][10]
    assert "adaptive 35.0 vs uniform 30.0 at 200 samples" in rows["select"][10]
    assert "best prompt changes with N: True" in rows["select"][10]
    assert all(len(r) == 12 and r[-1] == "complete" for r in rows.values())
