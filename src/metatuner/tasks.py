"""Tasks: splits of (query, reference answer), the initial prompt p~, rendering, extraction, scoring.

A `Task` holds three lists of `Example`s and the task's rules. The four benchmarks of the paper
(GSM8K, MATH, HotpotQA distractor, CosmosQA), any reasoning-gym dataset, and a generic
JSONL/CSV/Parquet file with user-named columns all produce the same `Task`:

    task = load_task(cfg.task, seed=0)
    chat = task.render(task.prompt, task.test[0].query)        # chat messages for the actor
    answer = task.extract(generation)                          # the final answer, or None
    scores = task.score(answer, task.test[0])                  # {"correct": bool, ...}

Benchmarks load from `../shared/data/<name>/` (or `$METATUNER_DATA`) when present, from the
Hugging Face hub by dataset name when reachable, or from `task.path` in the original schema.
Splits are deterministic given the seed; a benchmark without a training split carves one out of
the data it has, never overlapping the evaluation split.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from metatuner.errors import MetatunerError
from metatuner.io import read_jsonl


@dataclass
class Example:
    query: str  # what the actor sees after the prompt (question, plus context/options if any)
    answer: str  # reference final answer used for scoring
    target: str  # training completion (reference solution ending in the answer)
    meta: dict = field(default_factory=dict)


@dataclass
class Task:
    name: str
    prompt: str  # the hand-written initial prompt p~
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    max_new_tokens: int
    extract: Callable[[str], str | None]
    score_fn: Callable[[str | None, Example], dict]
    # train_tasks: the tasks mixed into train/validation; an example whose meta["task"] names one of
    # them is extracted and scored by that task's rules
    sources: dict = field(default_factory=dict)

    def render(self, prompt: str, query: str) -> list[dict]:
        """Chat messages for the actor: the prompt, then the query, in one user turn."""
        text = f"{prompt.strip()}\n\n{query}" if prompt.strip() else query
        return [{"role": "user", "content": text}]

    def _source(self, ex: Example) -> "Task":
        return self.sources.get(ex.meta.get("task"), self) if self.sources else self

    def extract_for(self, text: str, ex: Example) -> str | None:
        """The final answer in `text`, by the rules of the task `ex` comes from."""
        return self._source(ex).extract(text)

    def score(self, extracted: str | None, ex: Example) -> dict:
        return self._source(ex).score_fn(extracted, ex)

    def split(self, name: str) -> list[Example]:
        if name not in ("train", "validation", "test"):
            raise MetatunerError(f"eval.split: expected train, validation or test, got {name!r}")
        return getattr(self, name)


# ----------------------------------------------------------------------------- answer helpers

# a "-" right after a digit, letter or ")" is subtraction or a range ("2-3 hours"), not a minus sign
_NUM = re.compile(r"(?:(?<![\w)])-)?\$?\d[\d,]*(?:\.\d+)?|(?:(?<![\w)])-)?\.\d+")


def parse_number(text: str | None) -> float | None:
    if text is None:
        return None
    t = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return float(t)
    except ValueError:
        return None


def last_number(text: str) -> str | None:
    nums = _NUM.findall(text)
    if not nums:
        return None
    return nums[-1].replace(",", "").replace("$", "").rstrip(".")


def extract_gsm8k(text: str) -> str | None:
    """The number after the last '####', else after 'answer is/:', else the last number."""
    if "####" in text:
        n = last_number(text.split("####")[-1].split("\n")[0]) or last_number(text.split("####")[-1])
        if n is not None:
            return n
    m = re.findall(r"answer(?: is)?\s*[:=]?\s*(.*)", text, flags=re.IGNORECASE)
    if m:
        n = last_number(m[-1].split("\n")[0])
        if n is not None:
            return n
    return last_number(text)


def score_numeric(pred: str | None, ex: Example) -> dict:
    a, b = parse_number(pred), parse_number(ex.answer)
    return {"correct": a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))}


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) with balanced braces."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    m = re.match(r"\\(?:boxed|fbox)\s*\{", text[idx:])
    i = idx + m.end() - 1 if m else -1
    if i < 0:
        # \boxed 5
        m = re.match(r"\\boxed\s+([^\s$]+)", text[idx:])
        return m.group(1) if m else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def extract_math(text: str) -> str | None:
    box = last_boxed(text)
    if box is not None:
        return box.strip()
    m = re.findall(r"answer is\s*:?\s*\$?([^\n$]+)\$?", text, flags=re.IGNORECASE)
    return m[-1].strip().rstrip(".") if m else None


def math_equal(pred: str | None, gold: str) -> bool:
    """Symbolic equivalence by math-verify (string match as a fast path)."""
    if pred is None:
        return False
    if pred.strip() == gold.strip():
        return True
    from math_verify import parse, verify

    try:
        g = parse(f"${gold}$")
        p = parse(f"${pred}$")
        return bool(g) and bool(p) and bool(verify(g, p))
    except Exception:  # math-verify raises on exotic LaTeX or timeouts: count as wrong
        return False


def score_math(pred: str | None, ex: Example) -> dict:
    return {"correct": math_equal(pred, ex.answer)}


def normalize_answer(s: str) -> str:
    """SQuAD/HotpotQA normalization: lower, drop punctuation and articles, squeeze spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def token_f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred), normalize_answer(gold)
    if p in ("yes", "no", "noanswer") or g in ("yes", "no", "noanswer"):
        if p != g:
            return 0.0
    pt, gt = p.split(), g.split()
    common = Counter(pt) & Counter(gt)
    same = sum(common.values())
    if same == 0:
        return 0.0
    prec, rec = same / len(pt), same / len(gt)
    return 2 * prec * rec / (prec + rec)


def extract_short(text: str) -> str | None:
    """Text after the last 'Answer:' (first line), else the first non-empty line."""
    m = re.findall(r"answer\s*(?:is)?\s*:\s*(.*)", text, flags=re.IGNORECASE)
    if m and m[-1].strip():
        return m[-1].strip().split("\n")[0].strip().rstrip(".")
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0].rstrip(".") if lines else None


def score_qa(pred: str | None, ex: Example) -> dict:
    pred = pred or ""
    em = normalize_answer(pred) == normalize_answer(ex.answer)
    return {"correct": em, "em": float(em), "f1": token_f1(pred, ex.answer)}


LETTERS = "ABCD"


def extract_letter(text: str) -> str | None:
    """The chosen option letter A-D: 'Answer: B', '(B)', 'B.' or a lone letter; else None."""
    m = re.findall(r"answer\s*(?:is)?\s*:?\s*\(?([A-Za-z])\b\)?", text, flags=re.IGNORECASE)
    if m:
        c = m[-1].upper()
        return c if c in LETTERS else None
    cands = re.findall(r"(?:^|[\s(])([A-D])(?:[).:\s]|$)", text.strip())
    return cands[0] if cands else None


def score_letter(pred: str | None, ex: Example) -> dict:
    return {"correct": pred is not None and pred == ex.answer}


# ----------------------------------------------------------------------------- data location


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


def _read_table(path: Path) -> list[dict]:
    """Rows of a JSONL, JSON (list), CSV or Parquet file."""
    if not path.is_file():
        raise MetatunerError(f"task.path: file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return read_jsonl(path)
    if suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise MetatunerError(f"{path} line {e.lineno}: malformed JSON ({e.msg})") from None
        if isinstance(data, dict) and "data" in data:
            data = data["data"]
        if not isinstance(data, list):
            raise MetatunerError(f"{path}: expected a JSON list of records")
        return data
    if suffix == ".csv":
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise MetatunerError(f"{path}: unsupported file type {suffix!r} (expected .jsonl, .json, .csv or .parquet)")


def _need(row: dict, cols: list[str], path, i: int) -> None:
    missing = [c for c in cols if c not in row]
    if missing:
        raise MetatunerError(f"{path} record {i + 1}: missing column(s) {missing}; columns present: {sorted(row)}")


def _find_file(folder: Path, names: list[str]) -> Path | None:
    for n in names:
        if (folder / n).is_file():
            return folder / n
    return None


def _benchmark_files(name: str, path: str, train_names: list[str], eval_names: list[str]):
    """(train_file or None, eval_file) from task.path or the shared data folder."""
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


def _from_hub(name: str, *args, split: str):
    try:
        from datasets import load_dataset

        return [dict(r) for r in load_dataset(name, *args, split=split)]
    except Exception as e:  # offline or missing: say where we looked
        raise MetatunerError(
            f"task data not found: no local files (../shared/data, $METATUNER_DATA or task.path) and the hub "
            f"dataset {name!r} is unreachable ({type(e).__name__})"
        ) from None


# ----------------------------------------------------------------------------- benchmarks


def _gsm8k_example(row: dict) -> Example:
    sol = re.sub(r"<<[^>]*>>", "", row["answer"])  # drop calculator annotations
    gold = sol.split("####")[-1].strip().replace(",", "")
    return Example(query=row["question"].strip(), answer=gold, target=sol.strip())


def _math_example(row: dict) -> Example:
    gold = row.get("answer") or last_boxed(row["solution"]) or ""
    return Example(query=row["problem"].strip(), answer=str(gold).strip(), target=row["solution"].strip(),
                   meta={"level": row.get("level"), "type": row.get("type") or row.get("subject")})


def _hotpot_example(row: dict) -> Example:
    paras = []
    for title, sents in row["context"]:
        paras.append(f"[{title}] " + "".join(sents).strip())
    query = "Context:\n" + "\n".join(paras) + f"\n\nQuestion: {row['question'].strip()}"
    return Example(query=query, answer=row["answer"].strip(), target=f"Answer: {row['answer'].strip()}",
                   meta={"id": row.get("_id"), "type": row.get("type"), "level": row.get("level")})


def _cosmos_example(row: dict, path="cosmosqa", i: int = 0) -> Example:
    try:
        label = int(row["label"])
    except (TypeError, ValueError):
        raise MetatunerError(f"{path} record {i + 1}: label must be 0-3, got {row['label']!r}") from None
    if not 0 <= label <= 3:
        raise MetatunerError(f"{path} record {i + 1}: label must be 0-3, got {label}")
    opts = "\n".join(f"{LETTERS[j]}. {row[f'answer{j}']}" for j in range(4))
    query = f"Context: {row['context'].strip()}\nQuestion: {row['question'].strip()}\nOptions:\n{opts}"
    return Example(query=query, answer=LETTERS[label], target=f"Answer: {LETTERS[label]}", meta={"id": row.get("id")})


def _rows(path: Path | None, cols: list[str], hub: tuple | None, split: str) -> list[dict]:
    rows = _read_table(path) if path is not None else _from_hub(*hub, split=split)
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise MetatunerError(f"{path or hub[0]} record {i + 1}: expected an object with columns {cols}")
        _need(r, cols, path or hub[0], i)
    return rows


def _carve(items: list, seed: int, test_size: int, val_size: int, train_size: int, has_train: bool):
    """Deterministic disjoint splits from one shuffled list (used where no training split exists)."""
    rng = random.Random(seed)
    idx = list(range(len(items)))
    rng.shuffle(idx)
    test = [items[i] for i in idx[:test_size]]
    val = [items[i] for i in idx[test_size : test_size + val_size]]
    train = [items[i] for i in idx[test_size + val_size : test_size + val_size + train_size]] if not has_train else []
    return train, val, test


def _split_train_val(train: list, seed: int, val_size: int, train_size: int):
    rng = random.Random(seed)
    idx = list(range(len(train)))
    rng.shuffle(idx)
    val = [train[i] for i in idx[:val_size]]
    tr = [train[i] for i in idx[val_size : val_size + train_size]]
    return tr, val


def _load_benchmark(tc, seed: int) -> tuple[list[Example], list[Example], list[Example], str, int, Callable, Callable]:
    name = tc.name
    if name == "gsm8k":
        tr_f, ev_f = _benchmark_files("gsm8k", tc.path, ["train.jsonl"], ["test.jsonl"])
        cols = ["question", "answer"]
        test_rows = _rows(ev_f, cols, None if ev_f else ("openai/gsm8k", "main"), "test")
        train_rows = _rows(tr_f, cols, None, "train") if tr_f else ([] if ev_f else _rows(None, cols, ("openai/gsm8k", "main"), "train"))
        conv = [_gsm8k_example]
        prompt = "Solve the math word problem step by step. End with the final answer as '#### <number>'."
        spec = (256, extract_gsm8k, score_numeric)
    elif name == "math":
        tr_f, ev_f = _benchmark_files("math", tc.path, ["train.jsonl"], ["test.jsonl"])
        test_rows = _rows(ev_f, ["problem", "solution"], None if ev_f else ("HuggingFaceH4/MATH-500",), "test")
        train_rows = _rows(tr_f, ["problem", "solution"], None, "train") if tr_f else []
        conv = [_math_example]
        prompt = "Solve the problem step by step. Put the final answer in \\boxed{}."
        spec = (384, extract_math, score_math)
    elif name == "hotpotqa":
        tr_f, ev_f = _benchmark_files("hotpotqa", tc.path, ["train.json", "train.jsonl"],
                                      ["dev_distractor.json", "dev.json", "validation.jsonl", "dev.jsonl"])
        cols = ["question", "answer", "context"]
        test_rows = _rows(ev_f, cols, None if ev_f else ("hotpotqa/hotpot_qa", "distractor"), "validation")
        train_rows = _rows(tr_f, cols, None, "train") if tr_f else []
        for r in test_rows + train_rows:
            if isinstance(r["context"], dict):  # hub schema (also in local parquet copies): columns of lists
                r["context"] = list(zip(r["context"]["title"], r["context"]["sentences"]))
        conv = [_hotpot_example]
        prompt = "Answer the question using the context. Reply with a short answer only, as 'Answer: <answer>'."
        spec = (32, extract_short, score_qa)
    elif name == "cosmosqa":
        tr_f, ev_f = _benchmark_files("cosmosqa", tc.path, ["train.csv", "train.jsonl"], ["valid.csv", "validation.jsonl", "dev.csv", "valid.jsonl"])
        cols = ["context", "question", "answer0", "answer1", "answer2", "answer3", "label"]
        test_rows = _rows(ev_f, cols, None if ev_f else ("allenai/cosmos_qa",), "validation")
        train_rows = _rows(tr_f, cols, None, "train") if tr_f else []
        conv = [_cosmos_example]
        prompt = "Read the context and choose the best option. Reply with the letter only, as 'Answer: <letter>'."
        spec = (16, extract_letter, score_letter)
    else:
        raise AssertionError(name)
    conv_fn = conv[0]

    def convert(rows, path):
        if conv_fn is _cosmos_example:
            return [_cosmos_example(r, path or "cosmosqa", i) for i, r in enumerate(rows)]
        return [conv_fn(r) for r in rows]

    test_all = convert(test_rows, ev_f)
    if train_rows:
        train_all = convert(train_rows, tr_f)
        train, val = _split_train_val(train_all, seed, tc.val_size, tc.train_size)
        test = test_all[: tc.test_size]
    else:
        train, val, test = _carve(test_all, seed, tc.test_size, tc.val_size, tc.train_size, has_train=False)
    return train, val, test, prompt, *spec


# ----------------------------------------------------------------------------- reasoning-gym

RG_DEFAULT_PARAMS = {"chain_sum": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}}


def extract_rg(text: str, numeric: bool) -> str | None:
    """<answer>...</answer>, else the text after the last 'Answer:', else the last number / first line."""
    m = re.findall(r"<answer>(.*?)</answer>", text, flags=re.DOTALL)
    if m:
        return m[-1].strip()
    m = re.findall(r"answer\s*(?:is)?\s*:\s*(.*)", text, flags=re.IGNORECASE)
    if m and m[-1].strip():
        ans = m[-1].strip().split("\n")[0].strip().rstrip(".")
        return (last_number(ans) or ans) if numeric else ans
    if numeric:
        return last_number(text)
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else None


def _load_reasoning_gym(tc, seed: int):
    import reasoning_gym

    params = dict(RG_DEFAULT_PARAMS.get(tc.name, {}))
    params.update(tc.params)
    total = tc.train_size + tc.val_size + tc.test_size
    try:
        # oversample so that dropping duplicate questions still fills every split
        ds = reasoning_gym.create_dataset(tc.name, size=int(total * 1.5) + 10, seed=seed, **params)
    except (KeyError, ValueError, TypeError, AssertionError) as e:
        raise MetatunerError(f"task.name={tc.name!r}: not a known task or bad task.params {params} ({e})") from None
    seen, entries = set(), []
    for e in ds:
        if e["question"] in seen:
            continue
        seen.add(e["question"])
        entries.append(e)
        if len(entries) == total:
            break
    numeric = all(parse_number(str(e["answer"])) is not None for e in entries[:50])
    exs = [Example(query=e["question"], answer=str(e["answer"]), target=f"Answer: {e['answer']}",
                   meta={"entry_index": i}) for i, e in enumerate(entries)]
    test, val, train = exs[: tc.test_size], exs[tc.test_size : tc.test_size + tc.val_size], exs[tc.test_size + tc.val_size :]

    def score(pred, ex, _entries=entries, _ds=ds):
        s = float(_ds.score_answer(pred, _entries[ex.meta["entry_index"]])) if pred is not None else 0.0
        return {"correct": s >= 1.0, "score": s}

    prompt = "Solve the problem. Reply with the final answer only, as 'Answer: <answer>'."
    return train, val, test, prompt, 32, (lambda t: extract_rg(t, numeric)), score


# ----------------------------------------------------------------------------- generic files


def _load_generic(tc, seed: int):
    if not tc.path:
        raise MetatunerError("task.name=jsonl needs task.path (a .jsonl, .csv or .parquet file, or a folder with train/test files)")
    qcol = tc.params.get("query_column", "query")
    acol = tc.params.get("answer_column", "answer")
    tcol = tc.params.get("target_column", "")
    p = Path(tc.path)
    files = {}
    if p.is_dir():
        for split in ("train", "validation", "test"):
            for ext in (".jsonl", ".csv", ".parquet", ".json"):
                if (p / f"{split}{ext}").is_file():
                    files[split] = p / f"{split}{ext}"
                    break
        if "test" not in files:
            raise MetatunerError(f"task.path: {p} has no test.jsonl/.csv/.parquet")
    else:
        files["test"] = p

    def conv(path):
        rows = _read_table(path)
        out = []
        for i, r in enumerate(rows):
            _need(r, [qcol, acol] + ([tcol] if tcol else []), path, i)
            out.append(Example(query=str(r[qcol]), answer=str(r[acol]), target=str(r[tcol]) if tcol else f"Answer: {r[acol]}"))
        return out

    test_all = conv(files["test"])
    if "train" in files:
        train_all = conv(files["train"])
        if "validation" in files:
            val = conv(files["validation"])[: tc.val_size]
            train = train_all[: tc.train_size]
        else:
            train, val = _split_train_val(train_all, seed, tc.val_size, tc.train_size)
        test = test_all[: tc.test_size]
    else:
        train, val, test = _carve(test_all, seed, tc.test_size, tc.val_size, tc.train_size, has_train=False)
    numeric = all(parse_number(e.answer) is not None for e in (test_all[:50] or [Example("", "x", "")]))
    if numeric:
        extract, score = (lambda t: extract_rg(t, True)), score_numeric
    else:
        extract, score = extract_short, score_qa
    prompt = "Answer the question. Reply with the final answer only, as 'Answer: <answer>'."
    return train, val, test, prompt, 64, extract, score


# ----------------------------------------------------------------------------- entry point

BENCHMARKS = ("gsm8k", "math", "hotpotqa", "cosmosqa")


def load_task(tc, seed: int = 0) -> Task:
    """Build a Task from a TaskConfig (name, path, params, prompt, split sizes, max_new_tokens).
    The splits follow task.split_seed when it is set (>= 0), else the run's seed. With
    task.train_tasks, train and validation come from those tasks instead (see `mix_train_tasks`)."""
    split_seed = getattr(tc, "split_seed", -1)
    seed = split_seed if split_seed is not None and split_seed >= 0 else seed
    if getattr(tc, "train_tasks", None):
        return mix_train_tasks(tc, seed)
    return _load_one(tc, seed)


def mix_train_tasks(tc, seed: int) -> Task:
    """Train on task.train_tasks, evaluate on task.name (the paper's generalization experiment).

    Train and validation are the train tasks' splits shuffled together (train_size and val_size are
    split evenly across them); test is task.name's. p~ is task.name's prompt (or task.prompt); a
    training example of another task carries that task's own instruction at the top of its query, so
    its answer format is stated, and is extracted and scored by its own task's rules. When task.name
    is itself in the list, its test split never overlaps the training data (same seed, same splits).
    The answer budget (max_new_tokens) is the largest of the tasks' unless task.max_new_tokens is set,
    so rollouts on a long-answer training task are not cut off."""
    import copy

    names = [str(n) for n in tc.train_tasks]
    if len(set(names)) != len(names):
        raise MetatunerError(f"task.train_tasks repeats a task: {names}")
    target = _load_one(tc, seed)
    sources, train, val = {}, [], []
    k = len(names)
    for j, name in enumerate(names):
        if name == tc.name:
            src = target
        else:
            sc = copy.deepcopy(tc)
            sc.name, sc.prompt, sc.path, sc.max_new_tokens = name, "", "", 0
            sc.params = dict((getattr(tc, "params_by_task", None) or {}).get(name) or {})
            sc.test_size = min(tc.test_size, 10)
            try:
                src = _load_one(sc, seed)
            except MetatunerError as e:
                raise MetatunerError(f"task.train_tasks[{j}]={name!r}: {e}") from None
        sources[name] = src
        n_train = tc.train_size // k + (1 if j < tc.train_size % k else 0)
        n_val = tc.val_size // k + (1 if j < tc.val_size % k else 0)

        def tag(ex: Example, src=src, name=name) -> Example:
            q = ex.query if src.prompt == target.prompt else f"{src.prompt}\n\n{ex.query}"
            return Example(query=q, answer=ex.answer, target=ex.target, meta={**ex.meta, "task": name})

        train += [tag(ex) for ex in src.train[:n_train]]
        val += [tag(ex) for ex in src.validation[:n_val]]
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(val)
    max_new = max([target.max_new_tokens] + [s.max_new_tokens for s in sources.values()])
    return Task(name=tc.name, prompt=target.prompt, train=train, validation=val, test=target.test,
                max_new_tokens=tc.max_new_tokens or max_new, extract=target.extract, score_fn=target.score_fn,
                sources=sources)


def _load_one(tc, seed: int) -> Task:
    if tc.name in BENCHMARKS:
        parts = _load_benchmark(tc, seed)
    elif tc.name in ("jsonl", "csv", "parquet", "file"):
        parts = _load_generic(tc, seed)
    else:
        parts = _load_reasoning_gym(tc, seed)
    train, val, test, prompt, max_new, extract, score = parts
    if not test:
        raise MetatunerError(f"task {tc.name!r}: the test split is empty (task.test_size={tc.test_size})")
    return Task(name=tc.name, prompt=tc.prompt or prompt, train=train, validation=val, test=test,
                max_new_tokens=tc.max_new_tokens or max_new, extract=extract, score_fn=score)
