"""Named modules' state dicts in one safetensors file (no pickle), written atomically; tied tensors stored once.

    save_state({"hypernet": F}, "f.safetensors", metadata={"rank": 16})
    load_state({"hypernet": F}, "f.safetensors")      # strict: every key must match
    read_state_metadata("f.safetensors")              # -> {"rank": 16}
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from metatuner.errors import MetatunerError
from metatuner.io import atomic_path


def save_state(modules: dict[str, nn.Module], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Save the state dicts of named modules into one safetensors file (no pickle), atomically.

    Keys are "<name>.<state key>". Tensors that are the same Parameter (tied weights) are stored
    once; the aliases go into the file's metadata and are restored by `load_state`.
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}
    for name, module in modules.items():
        for key, t in module.state_dict(keep_vars=True).items():
            full = f"{name}.{key}"
            if id(t) in seen:
                aliases[full] = seen[id(t)]
                continue
            seen[id(t)] = full
            tensors[full] = t.detach().cpu().contiguous().clone()
    meta = {"aliases": json.dumps(aliases), "user": json.dumps(metadata or {})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_state_metadata(path: str | os.PathLike) -> dict:
    """The `metadata` dict given to `save_state`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("user", "{}"))
    except Exception as e:
        raise MetatunerError(f"{path}: unreadable safetensors file ({str(e).splitlines()[0][:120]})") from None


def load_state(modules: dict[str, nn.Module], path: str | os.PathLike) -> None:
    """Load a `save_state` file into the named modules, strictly (every key must match)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise MetatunerError(f"checkpoint not found: {path}")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    except Exception as e:
        raise MetatunerError(f"{path}: unreadable safetensors file ({str(e).splitlines()[0][:120]})") from None
    try:
        flat = load_file(str(path))
    except Exception as e:  # a truncated or corrupt file
        raise MetatunerError(f"{path}: unreadable safetensors file ({str(e).splitlines()[0][:120]})") from None
    for alias, original in aliases.items():
        flat[alias] = flat[original]
    for name, module in modules.items():
        prefix = name + "."
        sub = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(sub, strict=True)
        except RuntimeError as e:
            raise MetatunerError(f"{path}: part {name!r} does not match this model ({str(e).splitlines()[0]})") from None
    unknown = sorted({k.split(".")[0] for k in flat} - set(modules))
    if unknown:
        raise MetatunerError(f"{path}: holds parts {unknown} that were not asked for")
