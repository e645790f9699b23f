"""A run folder is claimed before anything is written into it.

    with claim(cfg):          # resolves the default output_dir, takes output_dir/.lock, refuses a finished run
        metrics = run(cfg)

- The default output_dir (`output_dir` empty) is `runs/<method>-<task>-<YYYYmmdd-HHMMSS>`, new for every
  command, so runs never land in a shared folder.
- An output_dir that holds an earlier run (its config.yaml or metrics.json) is refused unless
  `overwrite=true` or the run resumes (`resume_from_checkpoint=true|auto`).
- `.lock` (JSON: pid, host, started) stops a second process from writing into a live run; a lock whose
  process is gone (same host, pid dead) is stale: it is removed with a warning.
- Only the main process (RANK 0) takes the lock; the others write nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Iterator

from metatuner.errors import MetatunerError, MetatunerWarning

LOCK_NAME = ".lock"
RUN_FILES = ("config.yaml", "metrics.json")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def default_output_dir(cfg) -> str:
    """runs/<method>-<task>-<timestamp>. Under torchrun every process must agree: the launcher's pid
    (all ranks' parent) replaces the seconds, which differ between processes."""
    name = f"{cfg.method}-{Path(str(cfg.task.name)).name or 'task'}".replace(os.sep, "_")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return str(Path("runs") / f"{name}-{time.strftime('%Y%m%d')}-launch{os.getppid()}")
    return str(Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def resolve_output_dir(cfg) -> Path:
    """Fill in the default output_dir; an output_dir that is an existing file is an error."""
    if not str(cfg.output_dir or "").strip():
        cfg.output_dir = default_output_dir(cfg)
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise MetatunerError(f"output_dir={cfg.output_dir}: is an existing file; expected a folder (or a path that does not exist yet)")
    return out


def earlier_run(out: Path) -> str | None:
    """The file that shows `out` holds an earlier run, or None."""
    for name in RUN_FILES:
        if (out / name).is_file():
            return name
    return None


def check_not_finished(cfg, out: Path) -> None:
    from metatuner.checkpoints import resume_mode

    found = earlier_run(out)
    if found and not getattr(cfg, "overwrite", False) and resume_mode(cfg.resume_from_checkpoint) == "false":
        raise MetatunerError(f"output_dir={out} holds an earlier run ({found}); choose another output_dir, "
                             "pass overwrite=true to replace it, or resume_from_checkpoint=true to continue it")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_lock(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def acquire_lock(out: Path) -> Path:
    """Create out/.lock atomically (O_EXCL) or fail naming the process that holds it."""
    path = out / LOCK_NAME
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = read_lock(path)
            pid, host = held.get("pid"), held.get("host")
            if host == info["host"] and isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid):
                warnings.warn(f"removing stale lock {path} (pid {pid} on {host} is no longer running)", MetatunerWarning, stacklevel=2)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            who = f"pid {pid} on {host}" if pid else "another process (unreadable lock file)"
            raise MetatunerError(f"output_dir={out} is in use by {who} since {held.get('started', '?')} (lock file {path}); "
                                 "wait for it to finish, or remove the lock file if that process is gone") from None
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        return path
    raise MetatunerError(f"output_dir={out}: could not take the lock file {path}")


def release_lock(path: Path) -> None:
    """Remove the lock if this process holds it."""
    if read_lock(path).get("pid") == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def claim(cfg) -> Iterator[Path]:
    """Resolve cfg.output_dir, take its lock (main process) and refuse an earlier run; release at exit.
    A folder this command created and left empty (e.g. bad settings) is removed again."""
    out = resolve_output_dir(cfg)
    if not is_main_process():
        yield out
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = acquire_lock(out)
    try:
        check_not_finished(cfg, out)
        print(f"[metatuner] output_dir: {out}", flush=True)
        yield out
    finally:
        release_lock(lock)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when empty
