"""Atomic file writes and JSONL reading with errors that name file and line."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Iterator

from metatuner.errors import MetatunerError, MetatunerWarning


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without error, move it into place.

    The one write-then-rename of the project: readers never see half a file or half a folder, and a
    failed write leaves what was there before. Files end 0644 and folders 0755 (umask permitting),
    like everything else a run writes. With directory=True the caller fills a temporary folder; an
    existing folder at `path` is replaced (moved aside, then removed).

        with atomic_path(out / "adapter", directory=True) as tmp:
            model.save_pretrained(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    else:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, (0o777 if directory else 0o666) & ~umask)
        if directory and path.exists():
            old = path.with_name(f".{path.name}.old.{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a UTF-8 text file atomically (see atomic_path)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file atomically (see atomic_path), synced to disk before the rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def finite_json(obj, path: str | os.PathLike = "", key: str = ""):
    """obj with every NaN/inf float replaced by None (JSON null), warning once per value with its key:
    NaN is not JSON, and most parsers reject the `NaN` token Python would write."""
    if isinstance(obj, float) and not math.isfinite(obj):
        warnings.warn(f"{path}: {key or 'value'} is {obj}; written as null", MetatunerWarning, stacklevel=3)
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v, path, f"{key}.{k}" if key else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v, path, f"{key}[{i}]") for i, v in enumerate(obj)]
    return obj


def write_json(path: str | os.PathLike, obj) -> None:
    """Write JSON atomically; NaN/inf become null with a warning (see finite_json)."""
    atomic_write_text(path, json.dumps(finite_json(obj, path), indent=2, default=str, allow_nan=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(finite_json(r, path), default=str, allow_nan=False) + "\n" for r in rows))


def parse_jsonl(path: str | os.PathLike, text: str) -> list[dict]:
    """Rows of JSONL text read from `path`; a line that is not JSON or not an object is a one-line error
    naming the file and the line."""
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MetatunerError(f"{path} line {i}: malformed JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise MetatunerError(f"{path} line {i}: expected a JSON object, got {type(obj).__name__}")
        rows.append(obj)
    return rows


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL file; a line that is not UTF-8, not JSON or not an object is a one-line error
    naming the file and the line."""
    return parse_jsonl(path, read_text(path))


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file; one-line error naming the file and line when it is not UTF-8."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise MetatunerError(f"{path} line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8") from None
