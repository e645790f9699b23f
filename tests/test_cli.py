"""The `metatuner eval` command line end to end with the tiny model."""

from __future__ import annotations

import json

import pytest
import yaml

from metatuner.cli import main
from metatuner.config import load_config


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing lands in the checkout even if a default output_dir is used


def one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    lines = err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ")
    return lines[0]


def test_eval_writes_outputs(tiny_model_path, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["eval", f"model.name={tiny_model_path}", "task.name=chain_sum", "eval.limit=5", f"output_dir={out}",
               "task.train_size=10", "task.val_size=5", "task.test_size=20", "task.max_new_tokens=8"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "| task | model | n | accuracy |" in stdout and "predictions.jsonl" in stdout

    cfg = load_config(out / "config.yaml")
    assert cfg.model.name == str(tiny_model_path) and cfg.task.name == "chain_sum" and cfg.eval.limit == 5
    assert yaml.safe_load((out / "config.yaml").read_text())["output_dir"] == str(out)

    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 5
    for p in preds:
        assert {"query", "prompt", "generation", "extracted", "reference", "correct", "score"} <= set(p)
        assert "arithmetic problem" in p["query"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 5 and metrics["task"] == "chain_sum"
    assert metrics["model"] == str(tiny_model_path) and metrics["method"] == "zero_shot"
    assert metrics["split"] == "test" and metrics["seed"] == 0
    assert metrics["accuracy"] == pytest.approx(sum(p["correct"] for p in preds) / 5)
    assert 0 < metrics["tokens_generated"] <= 5 * 8


def test_eval_with_config_file_and_overrides(tiny_model_path, tmp_path):
    out = tmp_path / "run2"
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"q": f"{i}+{i}", "a": 2 * i}) + "\n" for i in range(6)))
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"model": {"name": str(tiny_model_path)}, "eval": {"limit": 5},
                                        "task": {"name": "jsonl", "path": str(data), "max_new_tokens": 4,
                                                 "params": {"query_column": "q", "answer_column": "a"}}}))
    rc = main(["eval", "--config", str(cfg_file), "eval.limit=3", "task.val_size=0", f"output_dir={out}"])
    assert rc == 0
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3  # the override beats the file
    assert json.loads((out / "metrics.json").read_text())["task"] == "jsonl"


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["eval", "evl.limit=3"], ["'evl.limit'", "eval.limit"]),
        (["eval", "eval.limit=abc"], ["'eval.limit'", "int"]),
        (["eval", "seed"], ["key=value"]),
        (["eval", "--config", "/nonexistent/c.yaml"], ["not found"]),
        (["eval", "inference.strategy=beam", "task.train_size=2", "task.val_size=1", "task.test_size=2"],
         ["inference.strategy"]),
        (["eval", "eval.split=dev", "task.train_size=2", "task.val_size=1", "task.test_size=2"], ["eval.split"]),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, needles, tiny_model_path, tmp_path, capsys):
    if any(a.startswith(("inference.", "eval.split")) for a in argv):
        argv = argv + [f"model.name={tiny_model_path}", f"output_dir={tmp_path / 'o'}"]
    assert main(argv) == 2
    line = one_line_error(capsys)
    for n in needles:
        assert n in line


def test_jsonl_task_with_bad_file(tiny_model_path, tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    assert main(["eval", "task.name=jsonl", f"task.path={missing}", f"model.name={tiny_model_path}",
                 f"output_dir={tmp_path / 'o'}"]) == 2
    assert str(missing) in one_line_error(capsys)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a", "answer": "1"}\n{"query": \n')
    assert main(["eval", "task.name=jsonl", f"task.path={bad}", f"model.name={tiny_model_path}",
                 f"output_dir={tmp_path / 'o'}"]) == 2
    line = one_line_error(capsys)
    assert str(bad) in line and "line 2" in line

    cols = tmp_path / "cols.jsonl"
    cols.write_text('{"question": "a", "answer": "1"}\n')
    assert main(["eval", "task.name=jsonl", f"task.path={cols}", f"model.name={tiny_model_path}",
                 f"output_dir={tmp_path / 'o'}"]) == 2
    line = one_line_error(capsys)
    assert "'query'" in line and "'question'" in line


def test_bad_model_name_is_one_line(tmp_path, capsys):
    assert main(["eval", f"model.name={tmp_path / 'no_model_here'}", "task.train_size=2", "task.val_size=1",
                 "task.test_size=2", f"output_dir={tmp_path / 'o'}"]) == 2
    assert "model.name" in one_line_error(capsys)
