"""Finished runs are safe: earlier runs refused, overwrite, the lock, stale locks, output_dir a file,
config.yaml untouched by a command that fails validation, default output_dir, NaN-free metrics."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest

from metatuner.cli import main
from metatuner.config import Config
from metatuner.errors import MetatunerError
from metatuner.io import write_json, write_jsonl
from metatuner.rundir import LOCK_NAME, acquire_lock, claim, default_output_dir, release_lock


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def eval_argv(model, out, *extra):
    return ["eval", f"model.name={model}", "task.name=chain_sum", "eval.limit=2", f"output_dir={out}",
            "task.train_size=4", "task.val_size=2", "task.test_size=4", "task.max_new_tokens=4", *extra]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def test_refuses_an_earlier_run_and_overwrite_replaces_it(tiny_model_path, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(eval_argv(tiny_model_path, out)) == 0
    first_metrics = (out / "metrics.json").read_text()
    first_config = (out / "config.yaml").read_text()
    assert not (out / LOCK_NAME).exists()  # released at the end
    capsys.readouterr()

    assert main(eval_argv(tiny_model_path, out, "seed=3")) == 2
    line = one_line_error(capsys)
    assert str(out) in line and "overwrite=true" in line and "config.yaml" in line
    assert (out / "metrics.json").read_text() == first_metrics  # nothing lost
    assert (out / "config.yaml").read_text() == first_config

    assert main(eval_argv(tiny_model_path, out, "seed=3", "overwrite=true")) == 0
    assert "seed: 3" in (out / "config.yaml").read_text()
    assert json.loads((out / "metrics.json").read_text())["seed"] == 3


def test_metrics_alone_marks_an_earlier_run(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    cfg = Config(output_dir=str(out))
    with pytest.raises(MetatunerError, match="metrics.json"):
        with claim(cfg):
            pass
    assert not (out / LOCK_NAME).exists()


def test_resume_is_allowed_into_an_earlier_run(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 0\n")
    cfg = Config(output_dir=str(out), resume_from_checkpoint=True)
    with claim(cfg):
        assert (out / LOCK_NAME).is_file()
    assert not (out / LOCK_NAME).exists()


def test_lock_blocks_a_second_writer(tmp_path):
    out = tmp_path / "live"
    # a live process (not this one) holds the lock
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out.mkdir()
        (out / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "x"}))
        with pytest.raises(MetatunerError, match=f"in use by pid {holder.pid}"):
            with claim(Config(output_dir=str(out))):
                pass
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid  # left alone
    finally:
        holder.kill()
        holder.wait()


def test_two_claims_in_one_folder_exclude_each_other(tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    lock = acquire_lock(out)
    try:
        # same pid cannot be told apart from a live run: refused, not cleared
        with pytest.raises(MetatunerError, match="in use"):
            acquire_lock(out)
    finally:
        release_lock(lock)
    assert not lock.exists()


def test_stale_lock_is_cleared_with_a_warning(tmp_path):
    out = tmp_path / "stale"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    with pytest.warns(UserWarning, match="stale lock"):
        with claim(Config(output_dir=str(out))):
            assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (out / LOCK_NAME).exists()


def test_lock_of_another_host_is_not_cleared(tmp_path):
    out = tmp_path / "other"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "some-other-host", "started": "x"}))
    with pytest.raises(MetatunerError, match="some-other-host"):
        with claim(Config(output_dir=str(out))):
            pass


def test_output_dir_that_is_a_file_is_one_line(tiny_model_path, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("not a folder")
    assert main(eval_argv(tiny_model_path, f)) == 2
    line = one_line_error(capsys)
    assert str(f) in line and "existing file" in line
    assert f.read_text() == "not a folder"


def test_failed_validation_leaves_the_earlier_run_untouched(tiny_model_path, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(eval_argv(tiny_model_path, out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a", "answer": "1"}\n{"query": \n')
    # overwrite=true, but the data is bad: nothing may change
    assert main(eval_argv(tiny_model_path, out, "task.name=jsonl", f"task.path={bad}", "overwrite=true")) == 2
    assert "line 2" in one_line_error(capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # a bad model name is a setting too
    assert main(eval_argv(tiny_model_path, out, f"model.name={tmp_path / 'nope'}", "overwrite=true")) == 2
    assert "model.name" in one_line_error(capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_failed_command_into_a_new_folder_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "new"
    assert main(["eval", f"model.name={tmp_path / 'nope'}", f"output_dir={out}", "task.train_size=2",
                 "task.val_size=1", "task.test_size=2"]) == 2
    one_line_error(capsys)
    assert not out.exists()


def test_default_output_dir_is_new_per_run(tiny_model_path, tmp_path, capsys):
    cfg = Config(method="sft")
    cfg.task.name = "gsm8k"
    d = default_output_dir(cfg)
    assert d.startswith(os.path.join("runs", "sft-gsm8k-")) and d != "runs/default"
    argv = [a for a in eval_argv(tiny_model_path, "x") if not a.startswith("output_dir=")]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("zero_shot-chain_sum-")
    assert (runs[0] / "metrics.json").is_file()
    assert f"output_dir: {os.path.join('runs', runs[0].name)}" in stdout  # progress names the folder


def test_json_never_holds_nan(tmp_path):
    p = tmp_path / "m.json"
    with pytest.warns(UserWarning, match="train_loss is nan"):
        write_json(p, {"train_loss": float("nan"), "nested": {"x": [1.0, float("inf")]}, "ok": 0.5})
    text = p.read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data == {"train_loss": None, "nested": {"x": [1.0, None]}, "ok": 0.5}
    q = tmp_path / "p.jsonl"
    with pytest.warns(UserWarning):
        write_jsonl(q, [{"score": math.nan}])
    assert json.loads(q.read_text()) == {"score": None}


def test_only_the_main_process_takes_the_lock(tmp_path, monkeypatch):
    out = tmp_path / "mp"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 0\n")  # rank 0 may already have written the new config
    monkeypatch.setenv("RANK", "1")
    with claim(Config(output_dir=str(out))):
        assert not (out / LOCK_NAME).exists()
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(MetatunerError, match="earlier run"):
        with claim(Config(output_dir=str(out))):
            pass


def test_read_jsonl_and_text_name_the_line_that_is_not_utf8(tmp_path):
    from metatuner.io import read_jsonl, read_text

    p = tmp_path / "latin1.jsonl"
    p.write_bytes('{"query": "a"}\n{"query": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(MetatunerError, match=f"{p} line 2: not UTF-8.*0xe9"):
        read_jsonl(p)
    q = tmp_path / "q.txt"
    q.write_bytes("one\ntwo\nthr\u00e9e\n".encode("latin-1"))
    with pytest.raises(MetatunerError, match=f"{q} line 3: not UTF-8"):
        read_text(q)


@pytest.mark.parametrize("name, content, needle", [
    ("q.txt", "caf\u00e9\n".encode("latin-1"), "line 1: not UTF-8"),
    ("q.txt", b"\n\n", "holds no queries"),
    ("q.jsonl", b"", "holds no queries"),
    ("q.jsonl", b'{"question": "x"}\n', "no 'query' field"),
])
def test_bad_query_files_are_one_line(tmp_path, capsys, name, content, needle):
    run = tmp_path / "run"
    run.mkdir()
    f = tmp_path / name
    f.write_bytes(content)
    assert main(["infer", f"run_dir={run}", f"query_file={f}"]) == 2
    line = one_line_error(capsys)
    assert needle in line and str(f) in line


def test_resuming_with_other_settings_drops_the_earlier_results(tiny_model_path, tmp_path):
    """auto into a finished run whose settings differ starts afresh: the old metrics must not sit beside
    the new config.yaml while the new run works."""
    from metatuner.config import load_config
    from metatuner.run import start_run

    out = tmp_path / "run"
    assert main(eval_argv(tiny_model_path, out)) == 0
    argv = eval_argv(tiny_model_path, out)[1:]
    same = load_config(None, argv)
    same.resume_from_checkpoint = "auto"
    start_run(same)
    assert (out / "metrics.json").is_file()  # same settings: kept until the run rewrites it
    other = load_config(None, argv + ["seed=4"])
    other.resume_from_checkpoint = "auto"
    start_run(other)
    assert not (out / "metrics.json").exists() and not (out / "predictions.jsonl").exists()
    assert "seed: 4" in (out / "config.yaml").read_text()


def test_cli_prints_the_stale_lock_warning(tiny_model_path, tmp_path, capsys):
    out = tmp_path / "k"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    assert main(eval_argv(tiny_model_path, out)) == 0
    err = capsys.readouterr().err
    assert f"warning: removing stale lock {out / LOCK_NAME} (pid {dead.pid}" in err
    assert (out / "metrics.json").is_file() and not (out / LOCK_NAME).exists()
