"""Which checkpoint a run resumes from: `find_resume_checkpoint(cfg)`.

`resume_from_checkpoint` takes false (start fresh), true (resume from the newest complete checkpoint
in output_dir; an error if there is none) or auto (resume only when a complete checkpoint exists and
the settings it was written with equal the current ones, ignoring the keys in IGNORED_KEYS; otherwise
start fresh). Two kinds of checkpoint folder are recognised:

- `step_N/` (metatuner.training.write_checkpoint): complete when it holds the `COMPLETE` marker;
- `checkpoint-N/` (Hugging Face / TRL Trainer): complete when it holds `trainer_state.json`, which the
  Trainer writes last.

A complete-looking checkpoint whose weight files are truncated or unreadable is skipped with a
warning in favour of the previous complete one; orphaned temporary folders (`.step_N.*`, left by a
killed write) are removed. A checkpoint carries the settings it was written with in `config.yaml`
(`save_checkpoint_config`, or `SaveConfigCallback` for Trainer checkpoints); without one, `auto`
compares against the run's config.yaml as it was before this run started.
"""

from __future__ import annotations

import re
import shutil
import warnings
import zipfile
from pathlib import Path

import yaml

from metatuner.errors import MetatunerError, MetatunerWarning

IGNORED_KEYS = ("output_dir", "resume_from_checkpoint", "overwrite", "run_dir", "query", "query_file", "export_dir")
CHECKPOINT_RE = re.compile(r"^(?:step_|checkpoint-)(\d+)$")
ORPHAN_RE = re.compile(r"^\.step_\d+\..+")
CONFIG_NAME = "config.yaml"

# output_dir -> the run's config.yaml (as a dict) read before this process replaced it (see start_run)
_previous_configs: dict[str, dict | None] = {}


def resume_mode(value) -> str:
    """'false', 'true' or 'auto' from a bool or a string setting."""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value).strip().lower()
    if text in ("false", "no", "0", "", "none"):
        return "false"
    if text in ("true", "yes", "1"):
        return "true"
    if text == "auto":
        return "auto"
    raise MetatunerError(f"resume_from_checkpoint: expected false, true or auto, got {value!r}")


def comparable(config: dict) -> dict:
    """The settings that must match for `auto` to resume (IGNORED_KEYS dropped)."""
    return {k: v for k, v in config.items() if k not in IGNORED_KEYS}


def same_settings(saved: dict | None, cfg) -> bool:
    """Whether a saved config.yaml (as a dict) holds the same settings as cfg, ignoring IGNORED_KEYS."""
    from metatuner.config import to_dict

    if saved is None:
        return False
    current = yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False))  # the types config.yaml round-trips to
    return comparable(saved) == comparable(current)


def previous_config(output_dir: str | Path) -> dict | None:
    """The run's config.yaml as remembered by remember_previous_config (None: there was none)."""
    return _previous_configs.get(str(Path(output_dir).resolve()))


def remember_previous_config(output_dir: str | Path) -> None:
    """Read output_dir/config.yaml before a run replaces it, so `auto` can compare a checkpoint that
    carries no config of its own with the settings of the run that wrote it."""
    path = Path(output_dir) / CONFIG_NAME
    _previous_configs[str(Path(output_dir).resolve())] = read_config_dict(path) if path.is_file() else None


def read_config_dict(path: Path) -> dict | None:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(data, dict):
        return None
    from metatuner.config import saved_settings

    return saved_settings(data)


def save_checkpoint_config(cfg, ckpt_dir: str | Path) -> None:
    """Write the resolved settings into a checkpoint folder (call from the checkpoint's write_fn)."""
    from metatuner.config import save_config

    save_config(cfg, Path(ckpt_dir) / CONFIG_NAME)


def check_weights_file(path: Path) -> None:
    """One-line MetatunerError naming `path` when a weights file is truncated or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise MetatunerError(f"{path}: missing")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
                for name in names[-1:]:  # the last tensor ends at the end of the data: a truncated file fails here
                    f.get_slice(name)
        except Exception as e:  # safetensors raises its own error type for every kind of damage
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise MetatunerError(f"{path}: unreadable safetensors file ({msg}); the file is truncated or corrupt") from None
        expected = _safetensors_size(path)
        if expected is not None and path.stat().st_size < expected:
            raise MetatunerError(f"{path}: truncated safetensors file ({path.stat().st_size} bytes, expected {expected})")
    elif path.suffix in (".pt", ".bin", ".pth"):
        if not zipfile.is_zipfile(path):
            raise MetatunerError(f"{path}: unreadable torch file (not a complete zip archive); the file is truncated or corrupt")


def _safetensors_size(path: Path) -> int | None:
    """Size the safetensors header promises (8 + header + data), or None when the header is unreadable."""
    import json
    import struct

    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + n + max(ends, default=0)


def check_folder(folder: str | Path) -> None:
    """Check every weights file in `folder` (recursively); a MetatunerError names the first bad one."""
    for p in sorted(Path(folder).rglob("*")):
        if p.suffix in (".safetensors", ".pt", ".bin", ".pth") and p.is_file():
            check_weights_file(p)


def checkpoint_step(path: Path) -> int | None:
    m = CHECKPOINT_RE.match(path.name)
    return int(m.group(1)) if m else None


def is_complete(path: Path) -> bool:
    marker = "COMPLETE" if path.name.startswith("step_") else "trainer_state.json"
    return (path / marker).is_file()


def candidates(directory: str | Path) -> list[Path]:
    """step_N/ and checkpoint-N/ folders in `directory`, newest (highest N) first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p), reverse=True)


def remove_orphans(directory: str | Path) -> list[Path]:
    """Remove temporary checkpoint folders a killed write left behind; returns what was removed."""
    d = Path(directory)
    removed = []
    if d.is_dir():
        for p in d.iterdir():
            if p.is_dir() and ORPHAN_RE.match(p.name):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    for p in removed:
        warnings.warn(f"removed {p}: an unfinished checkpoint write of an earlier run", MetatunerWarning, stacklevel=3)
    return removed


def newest_complete(directory: str | Path) -> Path | None:
    """The newest checkpoint that is complete and whose weight files are readable; damaged newer ones
    are skipped with a warning naming the file."""
    for ck in candidates(directory):
        if not is_complete(ck):
            warnings.warn(f"skipping {ck}: incomplete (no {'COMPLETE' if ck.name.startswith('step_') else 'trainer_state.json'} marker)",
                          MetatunerWarning, stacklevel=3)
            continue
        try:
            check_folder(ck)
        except MetatunerError as e:
            warnings.warn(f"skipping {ck}: {e}; falling back to the previous complete checkpoint", MetatunerWarning, stacklevel=3)
            continue
        return ck
    return None


def _saved_config(ck: Path) -> dict | None:
    """The settings a checkpoint was written with: its own config.yaml, else the config.yaml of the run
    folder holding it (the checkpoint folder's parent or grandparent, e.g. output_dir/sft/checkpoint-N),
    as it was before this run replaced it."""
    own = ck / CONFIG_NAME
    if own.is_file():
        return read_config_dict(own)
    for d in (ck.parent, ck.parent.parent):
        key = str(d.resolve())
        if key in _previous_configs:
            return _previous_configs[key]
        if (d / CONFIG_NAME).is_file():
            return read_config_dict(d / CONFIG_NAME)
    return None


def _main_process() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def _agree(path: Path | None) -> Path | None:
    """Every process resumes from what the main process found."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return path
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [str(path) if path is not None else None]
        dist.broadcast_object_list(box, src=0)
        return Path(box[0]) if box[0] is not None else None
    return path


def find_resume_checkpoint(cfg, directory: str | Path | None = None) -> Path | None:
    """The checkpoint to resume from under cfg.resume_from_checkpoint, or None to start fresh.

    `directory` is where the checkpoints live (default cfg.output_dir; a method whose Trainer writes
    into a subfolder passes it). Removes orphaned temporary checkpoint folders (main process).
    """
    mode = resume_mode(cfg.resume_from_checkpoint)
    out = Path(cfg.output_dir)
    d = Path(directory) if directory is not None else out
    if _main_process():
        remove_orphans(d)
    if mode == "false":
        return None
    ck = newest_complete(d)
    if mode == "true":
        if ck is None:
            damaged = candidates(d)
            why = (f"the checkpoints there are incomplete or damaged ({', '.join(p.name for p in damaged)})"
                   if damaged else "there is none")
            raise MetatunerError(f"resume_from_checkpoint=true: no complete checkpoint (step_N/ or checkpoint-N/) in {d}: "
                                 f"{why}; run without resume_from_checkpoint to start afresh")
        return _agree(ck)
    # auto
    if ck is not None:
        if not same_settings(_saved_config(ck), cfg):
            print(f"resume_from_checkpoint=auto: {ck} was written with other settings; starting afresh", flush=True)
            ck = None
    return _agree(ck)


def config_saver(cfg):
    """A transformers TrainerCallback that writes the run's settings into every checkpoint-N/ the
    Trainer saves, so `resume_from_checkpoint=auto` can compare them."""
    from transformers import TrainerCallback

    class SaveConfigCallback(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            ck = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and ck.is_dir():
                save_checkpoint_config(cfg, ck)

    return SaveConfigCallback()
