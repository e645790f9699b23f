"""Where task data comes from and how its records become Examples.

Benchmarks load from `../shared/data/<name>/` (or `$METATUNER_DATA`) when present, from the Hugging
Face hub by dataset name when reachable, or from `task.path` in the original schema; a user's file
(task.name=jsonl) names its columns in task.params. Each source returns `Pools`: the examples of
each file it found, before splits are carved (see splits.py).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from metatuner.errors import MetatunerError
from metatuner.tasks.answers import LETTERS, last_boxed
from metatuner.tasks.core import Example
from metatuner.tasks.readers import cap_queries, max_query_chars, need_columns, read_table


@dataclass
class Pools:
    test: list[Example]  # the evaluation file (or the only file)
    train: list[Example] | None = None  # a training file, when there is one
    validation: list[Example] | None = None  # a validation file (user folders only)
    where: dict = field(default_factory=dict)  # pool name -> file (or hub dataset) it came from


def data_root() -> Path | None:
    """The shared benchmark folder: $METATUNER_DATA, else ../shared/data beside the checkout or cwd."""
    env = os.environ.get("METATUNER_DATA")
    cands = [Path(env)] if env else []
    here = Path(__file__).resolve()
    cands += [p / "shared" / "data" for p in here.parents] + [Path.cwd().parent / "shared" / "data"]
    for c in cands:
        if c.is_dir():
            return c
    return None


def _find_file(folder: Path, names: list[str]) -> Path | None:
    for n in names:
        if (folder / n).is_file():
            return folder / n
    return None


def benchmark_files(name: str, path: str, train_names: list[str], eval_names: list[str]):
    """(train_file or None, eval_file or None) from task.path or the shared data folder."""
    if path:
        p = Path(path)
        if p.is_file():
            return None, p
        if not p.is_dir():
            raise MetatunerError(f"task.path: {p} does not exist")
        folder = p
    else:
        root = data_root()
        folder = root / name if root else None
        if folder is None or not folder.is_dir():
            return None, None
    ev = _find_file(folder, eval_names)
    if ev is None:
        raise MetatunerError(f"task.path: no evaluation file in {folder} (looked for {eval_names})")
    return _find_file(folder, train_names), ev


def hub_rows(name: str, *args, split: str) -> list[dict]:
    try:
        from datasets import load_dataset

        return [dict(r) for r in load_dataset(name, *args, split=split)]
    except Exception as e:  # offline or missing: say where we looked
        raise MetatunerError(
            f"task data not found: no local files (../shared/data, $METATUNER_DATA or task.path) and the hub "
            f"dataset {name!r} is unreachable ({type(e).__name__})"
        ) from None


def convert(rows: list[dict], cols: list[str], to_example, where, cap: int) -> list[Example]:
    """Examples from records: every record has `cols` (else an error naming it), `to_example(row, i)`
    builds each, over-long queries are truncated to `cap` characters."""
    out = []
    for i, r in enumerate(rows):
        need_columns(r, cols, where, i)
        out.append(to_example(r, i))
    return cap_queries(out, cap, where)


# ----------------------------------------------------------------------------- benchmark records


def gsm8k_example(row: dict, i: int = 0) -> Example:
    sol = re.sub(r"<<[^>]*>>", "", str(row["answer"]))  # drop calculator annotations
    gold = sol.split("####")[-1].strip().replace(",", "")
    return Example(query=str(row["question"]).strip(), answer=gold, target=sol.strip())


def math_example(row: dict, i: int = 0) -> Example:
    gold = row.get("answer") or last_boxed(row["solution"]) or ""
    return Example(query=row["problem"].strip(), answer=str(gold).strip(), target=row["solution"].strip(),
                   meta={"level": row.get("level"), "type": row.get("type") or row.get("subject")})


def hotpot_example(row: dict, i: int = 0) -> Example:
    ctx = row["context"]
    if isinstance(ctx, dict):  # hub schema (also in local parquet copies): columns of lists
        ctx = list(zip(ctx["title"], ctx["sentences"]))
    paras = [f"[{title}] " + "".join(sents).strip() for title, sents in ctx]
    query = "Context:\n" + "\n".join(paras) + f"\n\nQuestion: {row['question'].strip()}"
    return Example(query=query, answer=row["answer"].strip(), target=f"Answer: {row['answer'].strip()}",
                   meta={"id": row.get("_id"), "type": row.get("type"), "level": row.get("level")})


def cosmos_example(row: dict, i: int = 0, where="cosmosqa") -> Example:
    try:
        label = int(row["label"])
    except (TypeError, ValueError):
        raise MetatunerError(f"{where} record {i + 1}: label must be 0-3, got {row['label']!r}") from None
    if not 0 <= label <= 3:
        raise MetatunerError(f"{where} record {i + 1}: label must be 0-3, got {label}")
    opts = "\n".join(f"{LETTERS[j]}. {row[f'answer{j}']}" for j in range(4))
    query = f"Context: {row['context'].strip()}\nQuestion: {row['question'].strip()}\nOptions:\n{opts}"
    return Example(query=query, answer=LETTERS[label], target=f"Answer: {LETTERS[label]}", meta={"id": row.get("id")})


@dataclass
class BenchmarkSource:
    train_names: list[str]
    eval_names: list[str]
    cols: list[str]
    hub: tuple  # (dataset name, config...) on the Hugging Face hub
    hub_eval_split: str
    hub_train: bool  # whether the hub's training split is used when nothing is local
    to_example: object


SOURCES = {
    "gsm8k": BenchmarkSource(["train.jsonl"], ["test.jsonl"], ["question", "answer"], ("openai/gsm8k", "main"),
                             "test", True, gsm8k_example),
    "math": BenchmarkSource(["train.jsonl"], ["test.jsonl"], ["problem", "solution"], ("HuggingFaceH4/MATH-500",),
                            "test", False, math_example),
    "hotpotqa": BenchmarkSource(["train.json", "train.jsonl"], ["dev_distractor.json", "dev.json", "validation.jsonl", "dev.jsonl"],
                                ["question", "answer", "context"], ("hotpotqa/hotpot_qa", "distractor"), "validation",
                                False, hotpot_example),
    "cosmosqa": BenchmarkSource(["train.csv", "train.jsonl"], ["valid.csv", "validation.jsonl", "dev.csv", "valid.jsonl"],
                                ["context", "question", "answer0", "answer1", "answer2", "answer3", "label"],
                                ("allenai/cosmos_qa",), "validation", False, None),
}


def benchmark_pools(tc) -> Pools:
    """The examples of a benchmark's evaluation file and training file (if any), in file order."""
    src = SOURCES[tc.name]
    cap = max_query_chars(tc.params)
    tr_f, ev_f = benchmark_files(tc.name, tc.path, src.train_names, src.eval_names)

    def pool(path, hub_split):
        where = path if path is not None else f"hub dataset {src.hub[0]} ({hub_split})"
        rows = read_table(path) if path is not None else hub_rows(*src.hub, split=hub_split)
        to_ex = src.to_example or (lambda r, i: cosmos_example(r, i, where))
        return convert(rows, src.cols, to_ex, where, cap), str(where)

    test, where_test = pool(ev_f, src.hub_eval_split)
    pools = Pools(test=test, where={"test": where_test})
    if tr_f is not None or (ev_f is None and src.hub_train):
        pools.train, pools.where["train"] = pool(tr_f, "train")
    return pools


# ----------------------------------------------------------------------------- a user's files


def file_pools(tc) -> Pools:
    """A user's file (the test pool) or folder of train/validation/test files, with the columns
    named by task.params query_column/answer_column/target_column."""
    if not tc.path:
        raise MetatunerError("task.name=jsonl needs task.path (a .jsonl, .csv or .parquet file, or a folder with train/test files)")
    qcol = tc.params.get("query_column", "query")
    acol = tc.params.get("answer_column", "answer")
    tcol = tc.params.get("target_column", "")
    cols = [qcol, acol] + ([tcol] if tcol else [])
    cap = max_query_chars(tc.params)
    p = Path(tc.path)
    files = {}
    if p.is_dir():
        for split in ("train", "validation", "test"):
            for ext in (".jsonl", ".csv", ".parquet", ".json"):
                if (p / f"{split}{ext}").is_file():
                    files[split] = p / f"{split}{ext}"
                    break
        if "test" not in files:
            raise MetatunerError(f"task.path: {p} has no test.jsonl/.csv/.parquet/.json")
    else:
        files["test"] = p  # read_table says when it is missing

    def to_example(r, i):
        target = str(r[tcol]) if tcol else f"Answer: {r[acol]}"
        return Example(query=str(r[qcol]), answer=str(r[acol]), target=target)

    loaded = {s: convert(read_table(f), cols, to_example, f, cap) for s, f in files.items()}
    return Pools(test=loaded["test"], train=loaded.get("train"), validation=loaded.get("validation"),
                 where={s: str(f) for s, f in files.items()})
