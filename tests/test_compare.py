"""`metatuner compare`: a failing method is reported and the others complete (exit non-zero), progress
shows, re-runs skip finished runs with the same settings, the report matches results.json, config errors
are one line. The statistics are in test_stats.py, the report on hand-made runs in test_report.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from metatuner.checkpoints import read_config_dict
from metatuner.cli import main
from metatuner.compare import is_done, load_compare, method_config, run_one
from metatuner.config import save_config
from metatuner.errors import MetatunerError
from metatuner.report import markdown
from metatuner.results import summarize
from metatuner.stats import t_interval, wilson

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


def table_rows(md: str, section: str = "Accuracy") -> dict[str, list[str]]:
    """Rows by method name of one section's table of results.md."""
    rows = {}
    for ln in md.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0].splitlines():
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
    # (a) the failed method is reported with its error, the others complete, and compare exits non-zero
    assert main(["compare", "--config", str(spec)]) == 2
    cap = capsys.readouterr()
    err_lines = [ln for ln in cap.err.splitlines() if ln.startswith("error: ")]
    assert err_lines[-1].startswith("error: 1 of 3 runs failed: broken seed 0 (") and "results.md" in err_lines[-1]
    # progress: which run of how many, its time and the compare's elapsed time; the child's output comes through
    for i, name in enumerate(("zero_shot", "sft", "broken"), 1):
        assert f"[{i}/3] {name} seed 0: running (method=" in cap.out
    assert re.search(r"\[2/3\] sft seed 0: complete in \dm\d\ds \(compare elapsed \dm\d\ds\)", cap.out)
    assert f"wrote {out / 'sft' / 'seed_0'}/" in cap.out  # printed by the child `metatuner train`
    assert (out / "sft" / "seed_0" / "stdout.log").read_text().count("wrote ") == 1

    res = json.loads((out / "results.json").read_text())
    by = {r["name"]: r for r in res["methods"]}
    assert [r["name"] for r in res["methods"]] == ["zero_shot", "sft", "broken"]
    assert by["zero_shot"]["status"] == by["sft"]["status"] == "complete"
    assert by["broken"]["status"] == "failed"
    assert "lora.target_modules" in by["broken"]["error"] and "'nope'" in by["broken"]["error"]
    assert json.loads((out / "broken" / "seed_0" / "compare.json").read_text())["status"] == "failed"
    sft_status = json.loads((out / "sft" / "seed_0" / "compare.json").read_text())
    assert sft_status["wall_seconds"] > 0 and sft_status["peak_rss_mb"] > 50  # a torch process: tens of MB at least
    assert by["sft"]["peak_rss_mb"] == sft_status["peak_rss_mb"]
    assert by["sft"]["wall_seconds"] == sft_status["wall_seconds"]
    md = (out / "results.md").read_text()
    run_peak = json.loads((out / "sft" / "seed_0" / "metrics.json").read_text()).get("peak_memory_mb")
    want = "-" if run_peak is None else f"{run_peak:.0f}"
    assert table_rows(md, "Cost")["sft"][7] == f"{want} / {sft_status['peak_rss_mb']:.0f}"
    assert md.startswith("# tiny compare\n\n## Verdict")
    rows = table_rows(md)
    assert rows["broken"][-1].startswith("failed: ") and "lora.target_modules" in rows["broken"][-1]
    assert by["sft"]["train_steps"] == 1 and by["sft"]["train_examples"] == 2 and by["zero_shot"]["train_steps"] == 0
    assert res["best_baseline"] in ("zero_shot", "sft") and res["sft"] == "sft"
    assert res["provenance"]["run_configs"]["sft/seed_0"]["train"]["max_steps"] == 1

    # (c) the table matches results.json
    for name in ("zero_shot", "sft"):
        r = by[name]
        m = re.match(r"([\d.]+) \(([\d.]+)-([\d.]+)\)", rows[name][1])
        assert m, rows[name][1]
        acc, lo, hi = (float(x) for x in m.groups())
        assert acc == pytest.approx(100 * r["accuracy"], abs=0.051)
        assert (lo, hi) == pytest.approx([100 * x for x in r["accuracy_ci95_examples"]], abs=0.051)
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

    # (b) re-running skips finished runs with the same settings (outputs untouched) and retries the failed one
    mtimes = {n: (out / n / "seed_0" / "metrics.json").stat().st_mtime_ns for n in ("zero_shot", "sft")}
    assert main(["compare", "--config", str(spec)]) == 2
    printed = capsys.readouterr().out
    for i, n in enumerate(("zero_shot", "sft"), 1):
        assert f"[{i}/3] {n} seed 0: already complete with these settings, skipped" in printed
        assert (out / n / "seed_0" / "metrics.json").stat().st_mtime_ns == mtimes[n]
    assert "[3/3] broken seed 0: running" in printed
    res2 = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in res2["methods"]] == ["complete", "complete", "failed"]
    assert res2["methods"][1]["accuracy"] == by["sft"]["accuracy"]


def _fake_run(root: Path, name: str, seed: int, correct: list[bool], method: str = "sft", **metrics) -> None:
    d = root / name / f"seed_{seed}"
    d.mkdir(parents=True)
    preds = [{"index": i, "query": f"q{i}", "prompt": "P~", "correct": c} for i, c in enumerate(correct)]
    (d / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    m = {"n": len(correct), "accuracy": sum(correct) / len(correct), "tokens_generated": 10, "method": method,
         **metrics}
    (d / "metrics.json").write_text(json.dumps(m))
    (d / "compare.json").write_text(json.dumps({"status": "complete", "wall_seconds": 3.0}))


def test_summarize_over_seeds(tmp_path):
    """seeds: [0, 1] -> mean accuracy, a t interval over seeds and a Wilson interval over all predictions;
    a method with a failed seed is reported failed, with the seeds that did complete."""
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
    assert sft["train_steps"] == 3 and sft["seeds_complete"] == [0, 1] and sft["wall_seconds"] == 3.0
    assert zs["status"] == "failed" and zs["error"] == "seed 1: error: boom" and zs["seeds_complete"] == [0]
    assert bad["status"] == "failed"
    assert res["best_baseline"] == "sft" and set(res["vs_best_baseline"]) == set()  # failed methods: no pairs
    row = table_rows(markdown(res))["sft"]
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


def test_finished_run_with_same_settings_is_skipped(tmp_path):
    """A run is skipped only when its metrics.json exists and its saved config.yaml has the settings now
    resolved; where it writes and how it resumes do not count."""
    spec = load_compare(str(write_spec(tmp_path / "c.yaml", methods=[{"method": "sft", "overrides": {"train.max_steps": 3}}],
                                       base=BASE)), [])
    run_dir = tmp_path / "sft" / "seed_0"
    cfg = method_config(spec, spec["methods"][0], 0, run_dir)
    assert cfg.resume_from_checkpoint == "auto"  # common decision 2: resume only a checkpoint of the same settings
    run_dir.mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    assert not is_done(cfg, run_dir)  # no metrics.json: the run did not finish
    (run_dir / "metrics.json").write_text("{}")
    assert is_done(cfg, run_dir)
    moved = method_config(spec, spec["methods"][0], 0, tmp_path / "elsewhere")
    assert is_done(moved, run_dir)
    spec["methods"][0]["overrides"]["train.max_steps"] = 4
    assert not is_done(method_config(spec, spec["methods"][0], 0, run_dir), run_dir)
    assert not is_done(method_config(load_compare(str(tmp_path / "c.yaml"), ["train.lr=0.5"]),
                                     spec["methods"][0], 0, run_dir), run_dir)
    (run_dir / "config.yaml").write_text("train:\n  max_stesp: 3\n")  # an older schema: not the same
    assert not is_done(cfg, run_dir)


def saved_without(cfg, run_dir, section: str, key: str) -> None:
    """A finished run of cfg whose config.yaml was written before `section.key` existed."""
    run_dir.mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    old = yaml.safe_load((run_dir / "config.yaml").read_text())
    del old[section][key]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    (run_dir / "metrics.json").write_text("{}")


def test_run_saved_before_split_order_counts_as_generation_order(tmp_path):
    """A config.yaml written before task.split_order existed ran with the splits in generation order:
    a compare pinned to that order skips it, one with the (new) shuffled default runs it again."""
    spec = load_compare(str(write_spec(tmp_path / "c.yaml", methods=[{"method": "zero_shot"}],
                                       base={**BASE, "task.split_order": "generation"})), [])
    run_dir = tmp_path / "zero_shot" / "seed_0"
    cfg = method_config(spec, spec["methods"][0], 0, run_dir)
    saved_without(cfg, run_dir, "task", "split_order")
    assert is_done(cfg, run_dir)
    cfg.task.split_order = "shuffled"
    assert not is_done(cfg, run_dir)
    assert read_config_dict(run_dir / "config.yaml")["task"]["split_order"] == "generation"  # resume's view


def test_run_saved_before_stop_gate_counts_as_no_gate(tmp_path):
    """inference_select runs saved before select.stop_gate existed fitted no confidence gate: a compare
    pinned to stop_gate=false skips them, the (new) default runs them again."""
    spec = load_compare(str(write_spec(tmp_path / "c.yaml", methods=[{"method": "inference_select"}, {"method": "zero_shot"}],
                                       base={**BASE, "select.stop_gate": False})), [])
    run_dir = tmp_path / "inference_select" / "seed_0"
    cfg = method_config(spec, spec["methods"][0], 0, run_dir)
    saved_without(cfg, run_dir, "select", "stop_gate")
    assert is_done(cfg, run_dir)
    cfg.select.stop_gate = True
    assert not is_done(cfg, run_dir)
    # a method that never reads select.* keeps the default: an old zero_shot run is done under it
    zs_dir = tmp_path / "zero_shot" / "seed_0"
    zs = method_config(spec, spec["methods"][1], 0, zs_dir)
    zs.select.stop_gate = True
    saved_without(zs, zs_dir, "select", "stop_gate")
    assert is_done(zs, zs_dir)


def test_rerun_with_other_settings_drops_old_results(tmp_path):
    """A run that runs again must not leave the earlier settings' metrics to pass for its own if it fails."""
    spec = load_compare(str(write_spec(tmp_path / "c.yaml", methods=[{"method": "sft"}],
                                       base={**BASE, "model.name": str(tmp_path / "no-model")})), [])
    run_dir = tmp_path / "out" / "sft" / "seed_0"
    cfg = method_config(spec, spec["methods"][0], 0, run_dir)
    run_dir.mkdir(parents=True)
    for f in ("metrics.json", "predictions.jsonl"):
        (run_dir / f).write_text("{}\n")
    st = run_one(cfg, run_dir)
    assert st["status"] == "failed" and "no-model" in st["error"], st
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "predictions.jsonl").exists()
    assert json.loads((run_dir / "compare.json").read_text()) == st
    assert "no-model" in (run_dir / "stderr.log").read_text()


def test_report_shows_inference_strategy_and_method_notes(tmp_path):
    """Issue 6 methods report in the same table: strategy@N, SAPO's prompt, forgetting, adaptive vs uniform."""
    root = tmp_path / "cmp"
    _fake_run(root, "sft_sapo", 0, [True, False], prompt="Be brief | exact.", sapo_losses={"a": 1.0, "b": 0.5})
    _fake_run(root, "continual", 0, [True, True], method="continual", accuracy_matrix=[[0.4], [0.3, 0.5]],
              mean_forgetting=0.1)
    _fake_run(root, "select", 0, [False, True], method="inference_select", strategy="majority", samples_per_query=4,
              chosen_arm="P1 majority@4 T=0.7", greedy_same_prompt_accuracy=0.25, vs_greedy_p_value=0.5,
              early_stop_accuracy=0.45, early_stop_mean_samples=2.5, fixed_majority_accuracy=0.5,
              budget_used="uniform", budget_accuracy=0.3, budget_samples=200)
    _fake_run(root, "early", 0, [True, True], strategy="early_majority", samples_per_query=8, mean_samples=2.25)
    spec = {"path": "c.yaml", "output_dir": str(root), "seeds": [0],
            "methods": [{"name": n, "method": n} for n in ("sft_sapo", "continual", "select", "early")]}
    res = summarize(spec, {})
    by = {r["name"]: r for r in res["methods"]}
    md = markdown(res)
    acc, cost = table_rows(md), table_rows(md, "Cost")
    assert by["sft_sapo"]["inference"] == acc["sft_sapo"][-3] == "greedy@1"
    assert by["select"]["inference"] == acc["select"][-3] == "majority@4"
    assert "SAPO prompt: 'Be brief / exact.'" in cost["sft_sapo"][-1]
    assert "after each stage: 40; 30/50" in cost["continual"][-1] and "mean forgetting 10.0 pts" in cost["continual"][-1]
    assert by["early"]["inference"] == acc["early"][-3] == "early_majority@8 (2.2/q)"
    assert "chosen P1 majority@4 T=0.7; greedy same prompt 25.0 (McNemar p=0.5)" in cost["select"][-1]
    assert "early stop 45.0 at 2.50 samples vs fixed majority 50.0" in cost["select"][-1]
    assert "budget: uniform 30.0 at 200 samples" in cost["select"][-1]
    assert all(r[-1] == "complete" for r in acc.values()) and all(len(r) == 9 for r in cost.values())


def test_report_only_runs_nothing_and_reports_what_finished(tmp_path, monkeypatch, capsys):
    """--report-only: the finished run is reported, the unfinished one is listed as not run, nothing runs."""
    import metatuner.compare as C

    spec_path = write_spec(tmp_path / "c.yaml", output_dir=str(tmp_path / "out"),
                           methods=[{"name": "a", "method": "zero_shot"}, {"name": "b", "method": "zero_shot"}],
                           base=BASE)
    spec = load_compare(str(spec_path), [])
    run_dir = tmp_path / "out" / "a" / "seed_0"
    run_dir.mkdir(parents=True)
    save_config(method_config(spec, spec["methods"][0], 0, run_dir), run_dir / "config.yaml")
    preds = [{"index": i, "query": f"q{i}", "prompt": "P", "correct": i % 2, "extracted": "1", "reference": "1"}
             for i in range(4)]
    (run_dir / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    (run_dir / "metrics.json").write_text(json.dumps({"n": 4, "accuracy": 0.5, "method": "zero_shot"}))
    monkeypatch.setattr(C, "run_one", lambda *a, **k: pytest.fail("--report-only must not run anything"))
    assert main(["compare", "--config", str(spec_path), "--report-only"]) == 0
    out = capsys.readouterr().out
    assert "[2/2] b seed 0: not complete, not run (--report-only)" in out
    rows = {r["name"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())["methods"]}
    assert rows["a"]["status"] == "complete" and rows["a"]["accuracy"] == 0.5 and rows["b"]["status"] == "not run"


def test_only_runs_the_named_methods_and_reports_every_one(tmp_path, monkeypatch, capsys):
    """--only b: b runs, a (unfinished) is listed as not run; an unknown name is a one-line error."""
    import metatuner.compare as C

    spec_path = write_spec(tmp_path / "c.yaml", output_dir=str(tmp_path / "out"),
                           methods=[{"name": "a", "method": "zero_shot"}, {"name": "b", "method": "zero_shot"}],
                           base=BASE)
    ran = []

    def fake_run(cfg, run_dir):
        ran.append(run_dir.parent.name)
        return {"status": "failed", "error": "fake", "wall_seconds": 0.0}

    monkeypatch.setattr(C, "run_one", fake_run)
    assert main(["compare", "--config", str(spec_path), "--only", "b"]) != 0  # b "failed": exit non-zero
    assert ran == ["b"]
    assert "[1/2] a seed 0: not complete, not run (--only)" in capsys.readouterr().out
    assert main(["compare", "--config", str(spec_path), "--only", "b,zz"]) != 0
    assert "--only: zz not among" in capsys.readouterr().err and ran == ["b"]
