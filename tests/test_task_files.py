"""Files a user can hand us: each loads or fails with one line naming the file, the line or record and
the problem; over-long queries are truncated with one counting warning; splits too small say which
split, how many rows and which setting to change; the README's own-data example loads on 20 rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metatuner.config import TaskConfig, load_config
from metatuner.errors import MetatunerError
from metatuner.tasks import auto_val_size, load_task, read_table

ASSETS = Path(__file__).parent / "assets"


def rows(n, start=0):
    return [{"query": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(start, start + n)]


def write_jsonl(path, rs):
    path.write_text("".join(json.dumps(r) + "\n" for r in rs))
    return path


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


# ============================================================================ bad files


def test_jsonl_not_utf8_names_file_and_line(tmp_path):
    f = tmp_path / "test.jsonl"
    f.write_bytes(b'{"query": "ok", "answer": "1"}\n{"query": "caf\xe9", "answer": "2"}\n')
    with pytest.raises(MetatunerError) as e:
        load_task(TaskConfig(name="jsonl", path=str(f)), seed=0)
    assert one_line(e) == f"{f} line 2: not UTF-8 text (byte 0xe9); re-save the file as UTF-8"


def test_csv_not_utf8_names_file_and_line(tmp_path):
    f = tmp_path / "test.csv"
    f.write_bytes(b"query,answer\nq1,1\nq2,2\nq\xff3,3\n")
    with pytest.raises(MetatunerError) as e:
        read_table(f)
    assert one_line(e) == f"{f} line 4: not UTF-8 text (byte 0xff); re-save the file as UTF-8"


def test_utf8_bom_is_accepted(tmp_path):
    f = tmp_path / "test.csv"
    f.write_bytes("query,answer\nqé,1\n".encode("utf-8-sig"))
    assert read_table(f) == [{"query": "qé", "answer": "1"}]


def test_parquet_that_is_text(tmp_path):
    f = tmp_path / "test.parquet"
    f.write_text('{"query": "q", "answer": "1"}\n')
    with pytest.raises(MetatunerError) as e:
        load_task(TaskConfig(name="jsonl", path=str(f)), seed=0)
    assert one_line(e).startswith(f"{f}: not a Parquet file")


def test_corrupt_parquet(tmp_path):
    f = tmp_path / "test.parquet"
    f.write_bytes(b"PAR1" + b"\x00garbage" * 10 + b"PAR1")
    with pytest.raises(MetatunerError) as e:
        read_table(f)
    assert one_line(e).startswith(f"{f}: corrupt Parquet file")


def test_parquet_loads(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "test.parquet"
    pq.write_table(pa.Table.from_pylist(rows(3)), f)
    task = load_task(TaskConfig(name="jsonl", path=str(f), test_size=3, val_size=0), seed=0)
    assert sorted(e.answer for e in task.test) == ["1", "2", "3"]


@pytest.mark.parametrize("name, content, expected", [
    ("test.jsonl", b"", "the file is empty"),
    ("test.csv", b"", "the file is empty"),
    ("test.json", b"", "the file is empty"),
    ("test.parquet", b"", "the file is empty"),
    ("test.jsonl", b"\n\n  \n", "no records (the file holds only blank lines or a header)"),
    ("test.csv", b"query,answer\n", "no records (the file holds only blank lines or a header)"),
    ("test.json", b"[]", "no records (the file holds only blank lines or a header)"),
])
def test_empty_files(tmp_path, name, content, expected):
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(MetatunerError) as e:
        load_task(TaskConfig(name="jsonl", path=str(f)), seed=0)
    assert one_line(e) == f"{f}: {expected}"


def test_ragged_csv_rows(tmp_path):
    f = tmp_path / "test.csv"
    f.write_text("query,answer\nq1,1\nq2,2,extra\n")
    with pytest.raises(MetatunerError) as e:
        read_table(f)
    assert one_line(e) == f"{f} line 3: 3 fields, the header has 2"
    f.write_text("query,answer\nq1,1\nq2\n")
    with pytest.raises(MetatunerError) as e:
        read_table(f)
    assert one_line(e) == f"{f} line 3: 1 fields, the header has 2"


def test_json_record_not_an_object(tmp_path):
    f = tmp_path / "test.json"
    f.write_text(json.dumps([{"query": "q", "answer": "1"}, "oops"]))
    with pytest.raises(MetatunerError) as e:
        read_table(f)
    assert one_line(e) == f"{f} record 2: expected a JSON object, got str"


def test_missing_column_names_record(tmp_path):
    f = write_jsonl(tmp_path / "test.jsonl", rows(2) + [{"query": "q"}])
    with pytest.raises(MetatunerError) as e:
        load_task(TaskConfig(name="jsonl", path=str(f)), seed=0)
    assert one_line(e) == f"{f} record 3: missing column(s) ['answer']; columns present: ['query']"


# ============================================================================ over-long records


def test_overlong_queries_are_truncated_with_one_counting_warning(tmp_path, capsys):
    long_q = "x" * 5_000_000 + " Question: what is 1 + 1?"
    rs = rows(3) + [{"query": long_q, "answer": "2"}, {"query": "y" * 40_000, "answer": "3"}]
    f = write_jsonl(tmp_path / "test.jsonl", rs)
    task = load_task(TaskConfig(name="jsonl", path=str(f), test_size=5, val_size=0), seed=0)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1
    assert f"{f}: 2 record(s) longer than 32000 characters were truncated to 32000 (first: record 4)" in err
    cut = [e for e in task.test if len(e.query) > 100]
    assert len(cut) == 2 and all(len(e.query) <= 32000 for e in cut)
    assert any(e.query.endswith("Question: what is 1 + 1?") for e in cut)  # the end of the query survives
    assert sorted(e.query for e in task.test if len(e.query) < 100) == [r["query"] for r in rows(3)]


def test_max_query_chars_setting(tmp_path, capsys):
    f = write_jsonl(tmp_path / "test.jsonl", [{"query": "z" * 500, "answer": "1"}])
    task = load_task(TaskConfig(name="jsonl", path=str(f), params={"max_query_chars": 200}, val_size=0), seed=0)
    assert len(task.test[0].query) <= 200 and "1 record(s)" in capsys.readouterr().err
    with pytest.raises(MetatunerError, match=r"task.params.max_query_chars: expected an integer >= 100, got 'x'"):
        load_task(TaskConfig(name="jsonl", path=str(f), params={"max_query_chars": "x"}), seed=0)


def test_max_query_chars_is_not_passed_to_reasoning_gym():
    task = load_task(TaskConfig(name="chain_sum", params={"max_query_chars": 1000}, train_size=2, val_size=1,
                                test_size=2), seed=0)
    assert len(task.test) == 2


# ============================================================================ split sizes


def test_auto_val_size():
    assert [auto_val_size(n) for n in (0, 1, 3, 20, 100, 499, 501, 10_000)] == [0, 0, 1, 4, 20, 100, 100, 100]


def test_train_file_too_small_for_explicit_val_size(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", rows(20))
    write_jsonl(tmp_path / "test.jsonl", rows(5, 100))
    with pytest.raises(MetatunerError) as e:
        load_task(TaskConfig(name="jsonl", path=str(tmp_path), val_size=100, train_size=800), seed=0)
    msg = one_line(e)
    assert msg.startswith(f"{tmp_path / 'train.jsonl'}: the training file has 20 rows and task.val_size=100 takes all")
    assert "task.train_size=800" in msg and "lower task.val_size" in msg


def test_carved_file_too_small_for_explicit_val_size(tmp_path):
    f = write_jsonl(tmp_path / "all.jsonl", rows(30))
    with pytest.raises(MetatunerError) as e:
        load_task(TaskConfig(name="jsonl", path=str(f), test_size=20, val_size=10, train_size=100), seed=0)
    assert "the file (30 rows) after the test split (task.test_size=20) has 10 rows and task.val_size=10" in one_line(e)
    # auto: 20% of the 10 rows left after test
    task = load_task(TaskConfig(name="jsonl", path=str(f), test_size=20, train_size=100), seed=0)
    assert (len(task.test), len(task.validation), len(task.train)) == (20, 2, 8)


def test_split_origin_names_file_rows_and_settings(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", rows(20))
    write_jsonl(tmp_path / "test.jsonl", rows(5, 100))
    task = load_task(TaskConfig(name="jsonl", path=str(tmp_path)), seed=0)
    assert task.describe_split("train") == f"{tmp_path / 'train.jsonl'}: 16 of 20 rows (task.train_size=1000, task.val_size=-1)"
    assert task.describe_split("test") == f"{tmp_path / 'test.jsonl'}: the first 5 of 5 rows (task.test_size=200)"


def test_readme_own_data_example_on_20_rows():
    """`metatuner compare --config configs/compare/quickstart.yaml task.name=jsonl task.path=data ...`
    with data/train.jsonl of 20 rows: every method gets 16 training and 4 validation rows."""
    overrides = ["task.train_size=800", "task.test_size=100",  # quickstart.yaml's base
                 "task.name=jsonl", f"task.path={ASSETS / 'own_data'}", "task.params.query_column=question",
                 "task.params.answer_column=answer", "task.prompt=Answer the question. Reply as 'Answer: <answer>'."]
    cfg = load_config(None, overrides)
    assert cfg.task.val_size == -1  # the default: auto
    task = load_task(cfg.task, seed=0)
    assert (len(task.train), len(task.validation), len(task.test)) == (16, 4, 10)
    assert not {e.query for e in task.train} & {e.query for e in task.validation}
    assert task.prompt == "Answer the question. Reply as 'Answer: <answer>'."
    ex = task.test[0]
    assert task.score(task.extract(f"He has ... Answer: {ex.answer}\n"), ex)["correct"]


def test_negative_sizes_are_errors():
    with pytest.raises(MetatunerError, match=r"task.val_size: expected an integer >= 0, or -1 \(auto\), got -3"):
        load_task(TaskConfig(name="chain_sum", val_size=-3), seed=0)
    with pytest.raises(MetatunerError, match=r"task.test_size: expected an integer >= 0, got -1"):
        load_task(TaskConfig(name="chain_sum", test_size=-1), seed=0)
