"""Reading the files a user can hand us: JSONL, JSON (a list of records), CSV and Parquet.

Each file loads into a list of dict records or fails with one `MetatunerError` line naming the file,
the line or record, and the problem (not UTF-8, malformed JSON, a ragged CSV row, a file that is not
Parquet, an empty file, a missing column). JSON and CSV are read with the standard library rather
than `datasets`, because its errors do not say which line is wrong; Parquet is read by pyarrow.

Over-long queries are truncated, not refused (`cap_queries`): one pathological record in a large
file should not stop a run, and the model's context is the real limit anyway. The middle of the query
is cut, so a question at its end survives, and one warning counts the records cut.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

from metatuner.errors import MetatunerError
from metatuner.io import parse_jsonl

SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")
# characters of a query kept by default: about 8k tokens, more than any record of the shipped
# benchmarks (the longest HotpotQA distractor query is 12,795 characters) and than the embedded model's context
MAX_QUERY_CHARS = 32_000


def _decode(raw: bytes, path: Path) -> str:
    """UTF-8 text (a leading byte-order mark is dropped), or an error naming the line of the bad byte."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise MetatunerError(
            f"{path} line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); re-save the file as UTF-8") from None


def _read_jsonl(path: Path, text: str) -> list[dict]:
    return parse_jsonl(path, text)


def _read_json(path: Path, text: str) -> list[dict]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise MetatunerError(f"{path} line {e.lineno}: malformed JSON ({e.msg})") from None
    if isinstance(data, dict) and "data" in data:
        data = data["data"]
    if not isinstance(data, list):
        raise MetatunerError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for i, r in enumerate(data):
        if not isinstance(r, dict):
            raise MetatunerError(f"{path} record {i + 1}: expected a JSON object, got {type(r).__name__}")
    return data


def _read_csv(path: Path, text: str) -> list[dict]:
    csv.field_size_limit(2**31 - 1)  # long fields are truncated later, with a warning, not refused here
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        for r in reader:
            if None in r:  # more fields than the header
                raise MetatunerError(f"{path} line {reader.line_num}: {len(r) - 1 + len(r[None])} fields, "
                                     f"the header has {len(reader.fieldnames)}")
            if any(v is None for v in r.values()):
                n = sum(v is not None for v in r.values())
                raise MetatunerError(f"{path} line {reader.line_num}: {n} fields, the header has {len(reader.fieldnames)}")
            rows.append(r)
    except csv.Error as e:
        raise MetatunerError(f"{path} line {reader.line_num}: malformed CSV ({e})") from None
    return rows


def _read_parquet(path: Path) -> list[dict]:
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(-4, 2)
        tail = f.read(4)
    if head != b"PAR1" or tail != b"PAR1":
        raise MetatunerError(f"{path}: not a Parquet file (no PAR1 marker at its start and end; is it text?)")
    import pyarrow
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as e:
        raise MetatunerError(f"{path}: corrupt Parquet file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def read_table(path: str | Path) -> list[dict]:
    """The records of a .jsonl/.ndjson, .json, .csv or .parquet file; an empty file is an error."""
    path = Path(path)
    if not path.is_file():
        raise MetatunerError(f"task.path: file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise MetatunerError(f"{path}: unsupported file type {suffix!r} (expected .jsonl, .json, .csv or .parquet)")
    if path.stat().st_size == 0:
        raise MetatunerError(f"{path}: the file is empty")
    if suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        text = _decode(path.read_bytes(), path)
        reader = {".json": _read_json, ".csv": _read_csv}.get(suffix, _read_jsonl)
        rows = reader(path, text)
    if not rows:
        raise MetatunerError(f"{path}: no records (the file holds only blank lines or a header)")
    return rows


def need_columns(row: dict, cols: list[str], where, i: int) -> None:
    """An error naming the record (1-based) when `row` lacks one of `cols`."""
    if not isinstance(row, dict):
        raise MetatunerError(f"{where} record {i + 1}: expected an object with columns {cols}")
    missing = [c for c in cols if c not in row]
    if missing:
        raise MetatunerError(f"{where} record {i + 1}: missing column(s) {missing}; columns present: {sorted(row)}")


def max_query_chars(params: dict) -> int:
    """task.params.max_query_chars (a positive integer), else MAX_QUERY_CHARS."""
    v = params.get("max_query_chars", MAX_QUERY_CHARS)
    if isinstance(v, bool) or not isinstance(v, int) or v < 100:
        raise MetatunerError(f"task.params.max_query_chars: expected an integer >= 100, got {v!r}")
    return v


def cap_queries(examples: list, cap: int, where) -> list:
    """Examples whose query is longer than `cap` characters keep its first and last halves (the
    middle is cut); one warning on stderr counts them."""
    cut = []
    for i, ex in enumerate(examples):
        if len(ex.query) > cap:
            half = (cap - 5) // 2
            ex.query = ex.query[:half] + "\n...\n" + ex.query[-half:]
            cut.append(i + 1)
    if cut:
        print(f"warning: {where}: {len(cut)} record(s) longer than {cap} characters were truncated to {cap} "
              f"(first: record {cut[0]}); set task.params.max_query_chars to change the cap", file=sys.stderr)
    return examples
