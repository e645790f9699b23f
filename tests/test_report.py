"""The comparison report on hand-made run folders (metrics.json + predictions.jsonl + config.yaml): the
verdict, the paired columns, floor and collapse marks, failed methods, costs, provenance and the plot."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from scipy.stats import binomtest

from metatuner.config import Config, save_config
from metatuner.plot import pareto_front, plot
from metatuner.report import markdown
from metatuner.results import summarize
from metatuner.stats import holm, wilson


def fake_run(root: Path, name: str, seed: int, correct: list[int], method: str | None = None, order=None,
             **metrics) -> Path:
    d = root / name / f"seed_{seed}"
    d.mkdir(parents=True)
    order = order or list(range(len(correct)))
    preds = [{"index": i, "query": f"q{i}", "prompt": "P~", "correct": correct[i], "extracted": "x",
              "reference": "y"} for i in order]
    (d / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    m = {"n": len(correct), "accuracy": sum(correct) / len(correct), "tokens_generated": 100,
         "method": method or name, **metrics}
    (d / "metrics.json").write_text(json.dumps(m))
    cfg = Config()
    cfg.method, cfg.seed, cfg.output_dir = method or name, seed, str(d)
    save_config(cfg, d / "config.yaml")
    return d


def spec_of(root: Path, names: list[str], seeds=(0,), methods: dict | None = None) -> dict:
    methods = methods or {}
    return {"path": "c.yaml", "title": "t", "output_dir": str(root), "seeds": list(seeds),
            "methods": [{"name": n, "method": methods.get(n, n)} for n in names]}


def outcomes(n: int, k: int, seed: int) -> list[int]:
    xs = [1] * k + [0] * (n - k)
    random.Random(seed).shuffle(xs)
    return xs


def verdict_line(md: str, question: str) -> str:
    return next(ln for ln in md.splitlines() if ln.startswith(f"- **{question}**"))


def test_verdict_conclusive_and_inconclusive(tmp_path):
    """200 examples: MetaTuner right on every example SFT gets plus 60 more -> conclusive; against OPRO, which
    differs from it on 4 examples each way -> inconclusive, with no size that would tell them apart."""
    root, n = tmp_path / "cmp", 200
    sft = [1] * 60 + [0] * 140
    mt = [1] * 120 + [0] * 80
    opro = [1] * 116 + [0] * 4 + [1] * 4 + [0] * 76  # same accuracy as mt, 4 discordant each way
    zs = [1] * 30 + [0] * 170
    fake_run(root, "zero_shot", 0, zs, train_tokens=0)
    fake_run(root, "opro", 0, opro, train_tokens=0, train_tokens_generated=5000)
    fake_run(root, "sft", 0, sft, train_tokens=1000, peak_memory_mb=512.0)
    fake_run(root, "metatuner_j", 0, mt, train_tokens=3000, peak_memory_mb=900.0)
    res = summarize(spec_of(root, ["zero_shot", "opro", "sft", "metatuner_j"]), {})
    assert res["best_baseline"] == "opro" and res["sft"] == "sft"
    v = {x["question"]: x for x in res["verdict"]}
    vs_prompt = v["co-optimization vs prompt optimization alone"]
    vs_ft = v["co-optimization vs fine-tuning alone"]
    assert vs_prompt["b"] == "opro" and vs_prompt["inconclusive"] and vs_prompt["diff"] == 0
    assert vs_ft["b"] == "sft" and not vs_ft["inconclusive"] and vs_ft["diff"] == pytest.approx(0.3)
    assert vs_ft["p"] == pytest.approx(binomtest(60, 60).pvalue)
    assert vs_ft["cost_ratio_train_tokens"] == pytest.approx(3.0)
    assert [x["p_holm"] for x in res["verdict"]] == pytest.approx(holm([x["p"] for x in res["verdict"]]))
    md = markdown(res)
    assert md.index("## Verdict") < md.index("## Accuracy")
    line = verdict_line(md, "co-optimization vs prompt optimization alone")
    assert "metatuner_j vs opro: +0.0 points" in line and "**Inconclusive**" in line
    line = verdict_line(md, "co-optimization vs fine-tuning alone")
    assert "metatuner_j vs sft: +30.0 points" in line and "Inconclusive" not in line
    assert "x3 training tokens" in line and "metatuner_j is better" in line
    # costs: train tokens, generated tokens (training + eval), peak memory
    rows = {r["name"]: r for r in res["methods"]}
    assert rows["opro"]["tokens_generated"] == 5100 and rows["sft"]["peak_memory_mb"] == 512.0
    assert "| opro | - | - | 0 | 5100 (5000 + 100) |" in md
    assert "| sft | - | - | 1000 | 100 (- + 100) | - | - | 512 / - |" in md  # training generations not counted


def test_inconclusive_says_how_many_examples_would_tell(tmp_path):
    root = tmp_path / "cmp"
    a = [1] * 12 + [0] * 28  # 40 examples: 4 only a gets right (6-9), 2 only sft (12, 13)
    b = [1] * 6 + [0] * 4 + [1] * 4 + [0] * 26
    fake_run(root, "sft", 0, b)
    fake_run(root, "metatuner_j", 0, a)
    res = summarize(spec_of(root, ["sft", "metatuner_j"]), {})
    v = res["verdict"][1]
    assert v["inconclusive"] and (v["only_a"], v["only_b"]) == (4, 2) and v["diff"] == pytest.approx(0.05)
    c = res["vs_sft"]["metatuner_j"]
    assert c["inconclusive"] and c["examples_needed"] > 40
    line = verdict_line(markdown(res), "co-optimization vs fine-tuning alone")
    assert f"about {c['examples_needed']} test examples would tell them apart" in line and "this run has 40" in line
    assert "not answered (no prompt-optimization method" in markdown(res)


def test_paired_columns_and_holm_across_methods(tmp_path):
    root, n = tmp_path / "cmp", 100
    accs = {"zero_shot": 20, "opro": 30, "sft": 40, "dpo": 45, "metatuner_j": 55}
    for i, (name, k) in enumerate(accs.items()):
        # pair by index: write predictions in shuffled order
        fake_run(root, name, 0, outcomes(n, k, i), order=random.Random(9 + i).sample(range(n), n))
    res = summarize(spec_of(root, list(accs)), {})
    assert res["best_baseline"] == "dpo"
    vs = res["vs_best_baseline"]
    assert set(vs) == {"zero_shot", "opro", "sft", "metatuner_j"}
    assert [vs[k]["p_holm"] for k in vs] == pytest.approx(holm([vs[k]["p"] for k in vs]))
    mt, dpo = outcomes(n, 55, 4), outcomes(n, 45, 3)
    only_a = sum(x and not y for x, y in zip(mt, dpo))
    only_b = sum(y and not x for x, y in zip(mt, dpo))
    assert vs["metatuner_j"]["p"] == pytest.approx(binomtest(only_a, only_a + only_b).pvalue)
    assert vs["metatuner_j"]["diff"] == pytest.approx(0.10)
    md = markdown(res)
    header = next(ln for ln in md.splitlines() if ln.startswith("| method | accuracy"))
    assert "vs best baseline (dpo)" in header and "vs sft" in header
    row = next(ln for ln in md.splitlines() if ln.startswith("| dpo |"))
    assert "| reference |" in row
    row = next(ln for ln in md.splitlines() if ln.startswith("| metatuner_j |"))
    c = vs["metatuner_j"]
    assert f"+10.0 ({100 * c['ci95'][0]:+.1f} to {100 * c['ci95'][1]:+.1f})" in row


def test_floor_and_collapse_marked(tmp_path):
    """A method within the trivial floor's interval is marked in the table and the verdict; a collapsed one
    is flagged; multiple-choice letter distributions are shown against the labels'."""
    root, n = tmp_path / "cmp", 100
    diag = {"floor_accuracy": 0.26, "floor_answer": "1", "floor_letter_accuracy": 0.30, "floor_letter": "C",
            "no_answer_rate": 0.05, "distinct_answers": 3, "distinct_references": 12, "top_answer": "C",
            "top_answer_share": 0.8, "top_reference_share": 0.3,
            "letter_distribution": {"A": 0.1, "B": 0.05, "C": 0.8, "D": 0.05},
            "label_distribution": {"A": 0.25, "B": 0.25, "C": 0.3, "D": 0.2}}
    fake_run(root, "sft", 0, outcomes(n, 33, 1), collapsed=True, **diag)
    fake_run(root, "metatuner_j", 0, outcomes(n, 60, 2), collapsed=False, **diag)
    res = summarize(spec_of(root, ["sft", "metatuner_j"]), {})
    rows = {r["name"]: r for r in res["methods"]}
    lo, hi = wilson(30, 100)
    assert rows["sft"]["floor"] == 0.30 and rows["sft"]["floor_ci95"] == pytest.approx([lo, hi])
    assert rows["sft"]["at_floor"] and not rows["metatuner_j"]["at_floor"]  # 33% < upper bound 39.5%
    assert rows["sft"]["collapsed"] and not rows["metatuner_j"]["collapsed"]
    md = markdown(res)
    assert "## Floor and answer collapse" in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| sft | 33.0 |"))
    assert "30.0 (" in row and "letter 'C'" in row and "3 / 12" in row and "'C' (80 / 30)" in row
    assert "A:10 B:5 C:80 D:5 vs A:25 B:25 C:30 D:20" in row and "at floor, collapsed" in row
    acc_row = next(ln for ln in md.splitlines() if ln.startswith("| sft | 33.0 ("))
    assert "at floor, collapsed" in acc_row
    assert "Within the trivial floor's interval: sft." in verdict_line(md, "co-optimization vs fine-tuning alone")


def test_old_runs_without_new_keys_do_not_crash(tmp_path):
    """Runs from before the diagnostics, cost keys and `index`: the report still renders."""
    root = tmp_path / "cmp"
    for name, k in (("sft", 2), ("metatuner_j", 3)):
        d = fake_run(root, name, 0, [1] * k + [0] * (4 - k))
        rows = [json.loads(x) for x in (d / "predictions.jsonl").read_text().splitlines()]
        (d / "predictions.jsonl").write_text("".join(json.dumps({k_: v for k_, v in r.items() if k_ != "index"})
                                                     + "\n" for r in rows))
        (d / "metrics.json").write_text(json.dumps({"n": 4, "accuracy": k / 4}))
        (d / "config.yaml").unlink()
    res = summarize(spec_of(root, ["sft", "metatuner_j"]), {})
    assert res["vs_sft"]["metatuner_j"]["diff"] == pytest.approx(0.25)  # paired by row order
    md = markdown(res)
    assert "## Floor and answer collapse" not in md and "| sft |" in md
    assert res["provenance"]["run_configs"] == {"sft/seed_0": None, "metatuner_j/seed_0": None}
    plot(res, tmp_path / "r.png")


def test_failed_methods_marked_in_report_and_plot(tmp_path):
    root = tmp_path / "cmp"
    fake_run(root, "sft", 0, [1, 0, 1, 0])
    fake_run(root, "metatuner_j", 0, [1, 1, 1, 0])
    res = summarize(spec_of(root, ["sft", "metatuner_j", "dpo"]),
                    {("metatuner_j", 0): {"status": "failed", "error": "error: out of memory"},
                     ("dpo", 0): {"status": "failed", "error": "ValueError: boom"}})
    rows = {r["name"]: r for r in res["methods"]}
    # a failed run's folder (e.g. an old metrics.json) is not read as a result
    assert rows["metatuner_j"]["status"] == "failed" and "accuracy" not in rows["metatuner_j"]
    assert rows["dpo"]["error"] == "ValueError: boom"
    assert res["verdict"][1]["missing"] == "no complete MetaTuner method"
    md = markdown(res)
    row = next(ln for ln in md.splitlines() if ln.startswith("| metatuner_j | - |"))
    assert row.rstrip(" |").endswith("failed: error: out of memory")
    png = tmp_path / "r.png"
    plot(res, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_provenance(tmp_path):
    root = tmp_path / "cmp"
    fake_run(root, "sft", 0, [1, 0])
    fake_run(root, "sft", 1, [1, 1])
    res = summarize(spec_of(root, ["sft"], seeds=(0, 1)), {})
    prov = res["provenance"]
    for pkg in ("torch", "transformers", "peft", "trl", "accelerate", "datasets"):
        assert prov["versions"][pkg], pkg
    assert set(prov["git"]) == {"commit", "dirty"}
    assert prov["machine"]["cpu_cores"] >= 1 and "gpus" in prov["machine"]
    assert prov["seeds"] == [0, 1]
    assert prov["run_configs"]["sft/seed_1"]["seed"] == 1 and prov["run_configs"]["sft/seed_0"]["method"] == "sft"


def test_pareto_front():
    pts = [(0, 20.0), (0, 30.0), (100, 25.0), (200, 40.0), (300, 40.0), (50, 35.0)]
    assert pareto_front(pts) == [1, 5, 3]
    assert pareto_front([]) == []


def test_prompt_choices_per_method(tmp_path):
    """results.md shows, per method, the share of test prompts that differ from p~, how often each pool
    candidate was chosen (pooled over seeds) and examples; the pool comes from the run that saved it."""
    pool = ["P~", "Be careful.", "Answer only."]
    for seed in (0, 1):
        fake_run(tmp_path, "zero_shot", seed, [1, 0, 0, 1], p_tilde="P~")
        d = fake_run(tmp_path, "metatuner_j", seed, [1, 1, 0, 1], p_tilde="P~", pool=pool)
        rows = [json.loads(x) for x in (d / "predictions.jsonl").read_text().splitlines()]
        chosen = ["P~", "Be careful.", "Be careful.", "Answer only."] if seed == 0 else ["Be careful."] * 4
        for r, p in zip(rows, chosen):
            r["prompt"] = p
        (d / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = summarize(spec_of(tmp_path, ["zero_shot", "metatuner_j"], seeds=(0, 1)), {})
    mt = next(r for r in res["methods"] if r["name"] == "metatuner_j")
    assert mt["prompt_differs_from_p_tilde"] == pytest.approx(7 / 8)  # pooled over seeds
    shares = {c["prompt"]: (c["share"], c["pool_index"]) for c in mt["prompt_choices"]}
    assert shares == {"Be careful.": (6 / 8, 1), "P~": (1 / 8, 0), "Answer only.": (1 / 8, 2)}
    assert all(e["prompt"] != "P~" for e in mt["prompt_examples"])
    zs = next(r for r in res["methods"] if r["name"] == "zero_shot")
    assert zs["distinct_prompts"] == 1 and zs["prompt_choices"][0]["is_p_tilde"]
    md = markdown(res)
    section = md.split("## Prompts the test queries got")[1].split("##")[0]
    line = next(ln for ln in section.splitlines() if ln.startswith("| metatuner_j"))
    assert "75%" in line and "pool #1" in line and "of a pool of 3" in line
    assert "| zero_shot | 0% | 1 |" in section
    assert "metatuner_j: query 'q1' -> prompt 'Be careful.' (correct)" in section


def test_no_prompt_section_when_everyone_used_p_tilde(tmp_path):
    for n in ("zero_shot", "sft"):
        fake_run(tmp_path, n, 0, [1, 0, 1, 1], p_tilde="P~")
    assert "## Prompts the test queries got" not in markdown(summarize(spec_of(tmp_path, ["zero_shot", "sft"]), {}))


def test_compare_predictions_leaves_out_the_queries_of_another_split(tmp_path, capsys):
    import json
    import runpy
    from pathlib import Path

    def write(name, rows):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"query": q, "correct": c, "generation": g}) + "\n" for q, c, g in rows))
        return str(path)

    a = write("a", [("q1", False, "x"), ("q2", False, "x"), ("q3", True, "y"), ("q4", False, "z")])
    b = write("b", [("q1", True, "x1"), ("q2", True, "x2"), ("q3", True, "y"), ("q4", False, "z")])
    other = write("other", [("q1", False, "-"), ("q9", True, "-")])
    main = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "compare_predictions.py"))["main"]
    main(a, b)
    out = capsys.readouterr().out
    assert "4 queries in both" in out and "A 25.0%  B 75.0%" in out and "right in B only: 2" in out
    main(a, b, [other])
    out = capsys.readouterr().out
    assert "leaving out the 1 queries" in out and "A 33.3%  B 66.7%" in out and "right in B only: 1" in out
    run = tmp_path / "run"  # a run folder: its rebuilt test and validation splits are left out
    run.mkdir()
    from metatuner.config import load_config, save_config
    from metatuner.tasks import load_task

    cfg = load_config(None, ["task.name=chain_sum", "task.train_size=6", "task.val_size=2", "task.test_size=3"])
    save_config(cfg, run / "config.yaml")
    task = load_task(cfg.task, 0)
    held = [e.query for e in task.test + task.validation]
    c = write("c", [(q, False, "x") for q in held] + [("fresh", True, "y")])
    main(c, c, [str(run)])
    out = capsys.readouterr().out
    assert "6 queries in both" in out and "leaving out the 5 queries" in out and "1 compared" in out and "A 100.0%" in out


def test_prompt_choices_count_a_pool_member_whose_text_differs_by_seed_as_one(tmp_path):
    """Each seed has its own pool (OPRO's member is run per seed): a prompt counts as its index in the pool of
    its own seed, also for methods that do not save the pool (zero_shot takes its seed's pool from the
    runs that did), never as 'new' because another seed's pool came first."""
    for seed in (0, 1):
        pool = ["P~", "Be careful.", f"opro instruction of seed {seed}"]
        fake_run(tmp_path, "zero_shot", seed, [1, 0, 0, 1], p_tilde="P~")
        fake_run(tmp_path, "metatuner_j", seed, [1, 1, 0, 1], p_tilde="P~", pool=pool)
        for name, chosen in (("zero_shot", [pool[2]] * 4), ("metatuner_j", [pool[2]] * 3 + ["Be careful."])):
            d = tmp_path / name / f"seed_{seed}"
            rows = [json.loads(x) for x in (d / "predictions.jsonl").read_text().splitlines()]
            for r, p in zip(rows, chosen):
                r["prompt"] = p
            (d / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = summarize(spec_of(tmp_path, ["zero_shot", "metatuner_j"], seeds=(0, 1)), {})
    rows = {r["name"]: r for r in res["methods"]}
    mt, zs = rows["metatuner_j"], rows["zero_shot"]
    assert [(c["pool_index"], c["share"], c["texts"]) for c in mt["prompt_choices"]] == [(2, 6 / 8, 2), (1, 2 / 8, 1)]
    assert mt["distinct_prompts"] == 2 and mt["prompt_differs_from_p_tilde"] == 1.0
    assert [(c["pool_index"], c["share"], c["texts"]) for c in zs["prompt_choices"]] == [(2, 1.0, 2)]
    # a seed where no run saved a pool names its prompts by another seed's pool (its shared members)
    d = fake_run(tmp_path, "zero_shot", 2, [1, 0, 0, 1], p_tilde="P~")
    rows3 = [json.loads(x) for x in (d / "predictions.jsonl").read_text().splitlines()]
    (d / "predictions.jsonl").write_text("".join(json.dumps({**r, "prompt": "Be careful."}) + "\n" for r in rows3))
    zs3 = summarize(spec_of(tmp_path, ["zero_shot", "metatuner_j"], seeds=(0, 1, 2)), {})["methods"][0]
    assert [(c["pool_index"], c["share"]) for c in zs3["prompt_choices"]] == [(2, 8 / 12), (1, 4 / 12)]
    section = markdown(res).split("## Prompts the test queries got")[1].split("##")[0]
    line = next(ln for ln in section.splitlines() if ln.startswith("| zero_shot"))
    assert "pool #2 'opro instruction of seed 0' (its text differs by seed) 100%" in line and "new" not in line
