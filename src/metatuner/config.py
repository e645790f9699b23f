"""Typed run configuration: one YAML per run plus dotted `key=value` overrides.

Every setting is a dataclass field with help text; the dataclasses are the single source for
`--help`, for type checking and for the resolved `config.yaml` written next to a run's outputs.
OmegaConf (structured configs, as torchtune) merges the YAML and the overrides against them and
converts back to the dataclasses; `metatuner.validate` then checks ranges and combinations.

    cfg = load_config("configs/chain_sum/metatuner_j.yaml", ["train.max_steps=20", "seed=1"])
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import typing
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from metatuner.errors import MetatunerError
from metatuner.schema import (  # noqa: F401 - re-exported: `from metatuner.config import TaskConfig`
    ModelConfig,
    GeneratorConfig,
    TaskConfig,
    EvalConfig,
    InferenceConfig,
    GenerationConfig,
    SelectConfig,
    SapoConfig,
    ContinualConfig,
    LoRAConfig,
    HypernetConfig,
    WarmupConfig,
    TrainConfig,
    RolloutConfig,
    OproConfig,
    BpoConfig,
    DpoConfig,
    BetterTogetherConfig,
    Config,
)


# ----------------------------------------------------------------------------- keys and types

REMOVED = {
    "dpo.max_steps": "DPO now takes train.max_steps - dpo.sft_steps steps (train.max_steps is the total)",
}


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def all_keys(cls=Config, prefix: str = "") -> list[tuple[str, Any, Any, str]]:
    """(dotted key, type, default, help) for every leaf setting."""
    out = []
    inst = cls()
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = prefix + f.name
        if dataclasses.is_dataclass(tp):
            out.extend(all_keys(tp, key + "."))
        else:
            out.append((key, tp, getattr(inst, f.name), f.metadata.get("help", "")))
    return out


def _type_name(tp, key: str = "") -> str:
    if tp is Any:
        return _TYPE_NOTES.get(key, "any")
    origin = typing.get_origin(tp)
    if origin is list:
        return f"list[{typing.get_args(tp)[0].__name__}]"
    if origin is dict:
        return "dict"
    if origin is typing.Union:  # Optional[X]
        return " or ".join("null" if a is type(None) else a.__name__ for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


_TYPE_NOTES = {f.name: f.metadata["type"] for f in dataclasses.fields(Config) if "type" in f.metadata}


def _lookup(key: str) -> tuple[str, Any] | None:
    """What a dotted key names: ('section', cls), ('leaf', type), ('dict', type) for a dict-typed key,
    ('in_dict', type) for a key inside one (task.params.x, task.params_by_task.t.x); None if unknown."""
    cls = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = _hints(cls)
        if part not in hints:
            return None
        tp, last = hints[part], i == len(parts) - 1
        if dataclasses.is_dataclass(tp):
            if last:
                return "section", tp
            cls = tp
            continue
        if typing.get_origin(tp) is dict:
            return ("dict", tp) if last else ("in_dict", tp)
        return ("leaf", tp) if last else None
    return None


def _unknown(key: str, where: str) -> MetatunerError:
    for old, why in REMOVED.items():
        if key == old or key.startswith(old + "."):
            return MetatunerError(f"{where}: config key '{key}' was removed: {why}")
    keys = [k for k, *_ in all_keys()]
    close = difflib.get_close_matches(key, keys, n=4, cutoff=0.5)
    hint = f"; close valid keys: {', '.join(close)}" if close else "; see `metatuner --help` for all keys"
    return MetatunerError(f"{where}: unknown config key '{key}'{hint}")


def _parse_value(text: str) -> Any:
    """A command-line value parsed as YAML the way OmegaConf parses dotlists ('1e-3' -> 0.001)."""
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]))["v"]
    except Exception:  # noqa: BLE001 - anything OmegaConf cannot parse stays a string
        return text


def _bad_type(key: str, tp, value: Any, where: str) -> MetatunerError:
    return MetatunerError(f"{where}: key '{key}' expects {_type_name(tp, key)}, got {value!r}")


def _prepare_leaf(key: str, tp, value: Any, where: str) -> Any:
    """The few conversions beyond OmegaConf's: None -> '' for strings, 'a,b' -> [a, b] for lists,
    integral floats for ints; bools only from true/false/yes/no/on/off/1/0."""
    origin = typing.get_origin(tp) or tp
    if origin is str and value is None:
        return ""
    if origin is list and isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if origin is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if origin is bool and not isinstance(value, bool):
        words = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
        if str(value).strip().lower() not in words or isinstance(value, float):
            raise _bad_type(key, tp, value, where)
        return words[str(value).strip().lower()]
    if origin in (int, float) and isinstance(value, bool):
        raise _bad_type(key, tp, value, where)
    return value


def _apply(conf: DictConfig, key: str, value: Any, where: str, raw: bool = False) -> None:
    """Set one dotted key on an OmegaConf structured Config, failing in one line naming the key."""
    kind, tp, value = _resolve(key, value, where, raw)
    if kind == "section":
        for k, v in value.items():
            _apply(conf, f"{key}.{k}", v, where)
    else:
        _update(conf, key, key, kind, tp, value, where)


def _resolve(key: str, value: Any, where: str, raw: bool) -> tuple[str, Any, Any]:
    """(kind, type, value parsed from the command line when raw) of a dotted key; unknown keys fail."""
    found = _lookup(key)
    if found is None:
        raise _unknown(key, where)
    kind, tp = found
    if raw and not (kind == "leaf" and tp is str):
        value = _parse_value(value)
    if kind == "section" and not isinstance(value, dict):
        raise MetatunerError(f"{where}: key '{key}' is a section; set its keys ({key}.<name>=...), got {value!r}")
    return kind, tp, value


def _update(conf: DictConfig, path: str, key: str, kind: str, tp, value: Any, where: str) -> None:
    """OmegaConf.update of `path` in conf (the setting `key`): a dict assigned as a whole replaces the
    old one, a key inside a dict merges into it."""
    if kind == "leaf":
        value = _prepare_leaf(key, tp, value, where)
    if kind == "dict" and not isinstance(value, dict):
        raise _bad_type(key, tp, value, where)
    try:
        OmegaConf.update(conf, path, value, merge=kind == "in_dict")
    except OmegaConfBaseException as e:
        if isinstance(e, ConfigKeyError):
            raise _unknown(key, where) from None
        raise _bad_type(key, tp, value, where) from None


def _to_object(conf: DictConfig, where: str):
    try:
        return OmegaConf.to_object(conf)
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        raise MetatunerError(f"{where}: key '{getattr(e, 'full_key', '')}': {msg}") from None


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """YAML mapping -> (dotted key, value), stopping at sections' leaves and at dict-typed keys."""
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        found = _lookup(key)
        if isinstance(v, dict) and (found is None or found[0] == "section"):
            out.extend(_flatten(v, key + "."))
        else:
            out.append((key, v))
    return out


def _read_yaml(p: Path) -> dict:
    if not p.is_file():
        raise MetatunerError(f"config file not found: {p}")
    try:
        data = OmegaConf.to_container(OmegaConf.load(p), resolve=False)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        problem = str(getattr(e, "problem", None) or e).splitlines()[0]
        raise MetatunerError(f"{p}{line}: invalid YAML ({problem})") from None
    except UnicodeDecodeError as e:
        raise MetatunerError(f"{p}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from None
    if not isinstance(data, dict):
        raise MetatunerError(f"{p}: expected a mapping of config keys at the top level")
    return data


# ----------------------------------------------------------------------------- public API


def set_key(cfg: Config, key: str, value: Any, where: str = "override", raw: bool = False) -> None:
    """Set a dotted key on a Config in place, type-checked by OmegaConf on that one setting (compare
    sets many keys on many configs). `raw=True`: value is a command-line string, parsed as YAML unless
    the key is a string."""
    kind, tp, value = _resolve(key, value, where, raw)
    if kind == "section":
        for k, v in value.items():
            set_key(cfg, f"{key}.{k}", v, where)
        return
    owner = key if kind != "in_dict" else next(p for p in _prefixes(key) if _lookup(p)[0] == "dict")
    *parents, name = owner.split(".")
    obj = cfg
    for part in parents:
        obj = getattr(obj, part)
    conf = OmegaConf.structured(_one_field(type(obj), name)(getattr(obj, name)))
    _update(conf, "v" + key[len(owner):], key, kind, tp, value, where)
    setattr(obj, name, _to_object(conf, where).v)


def _prefixes(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@functools.cache
def _one_field(cls, name: str):
    """A dataclass with one field `v` of the type of `cls.name`."""
    return dataclasses.make_dataclass(f"_{name}", [("v", _hints(cls)[name])])


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                base: Config | None = None) -> Config:
    """Defaults (or `base`) <- YAML file <- `key=value` overrides, merged by OmegaConf against the
    dataclasses, then every setting validated (metatuner.validate.validate)."""
    from metatuner.validate import validate

    if not path and not overrides and base is None:
        cfg = Config()  # typed by construction: skip the OmegaConf round trip (compare starts many runs here)
        validate(cfg)
        return cfg
    conf = OmegaConf.structured(base if base is not None else Config())
    where = "override"
    if path:
        p = Path(path)
        where = str(p)
        for key, value in _flatten(_read_yaml(p)):
            _apply(conf, key, value, where=str(p))
    for item in overrides or []:
        if "=" not in item:
            raise MetatunerError(f"override '{item}': expected key=value")
        key, value = item.split("=", 1)
        _apply(conf, key.strip(), value, where="override", raw=True)
        where = "override"
    cfg = _to_object(conf, where)
    validate(cfg)
    return cfg


# Settings added with a default that changes what an older run did: a run's saved config.yaml written
# before the key existed ran with the value here (for the methods named; None = every method), so
# comparing or reloading it must use that value. Other methods never read the key: its default stands.
# A callable value computes it from the saved dict, for a key whose old behaviour equals the new one
# except in some runs (then those runs alone differ, and `compare` still skips the others).
def _fill_short_before(data: dict) -> bool:
    """task.fill_short of a run saved before the key: false where it changes the run's splits (its first
    draw was short and the bigger draw cuts other splits), else true (the default; the same splits)."""
    from metatuner.schema import TaskConfig
    from metatuner.tasks import load_task
    from metatuner.tasks.loading import first_draw_short

    try:
        names = {f.name for f in dataclasses.fields(TaskConfig)}
        task = {"split_order": "generation", **data["task"]}  # saved before split_order too: generation
        tc = TaskConfig(**{k: v for k, v in task.items() if k in names})
        seed = tc.split_seed if tc.split_seed is not None and tc.split_seed >= 0 else int(data.get("seed", 0))
        if not first_draw_short(tc, seed):
            return True
        old, new = (load_task(dataclasses.replace(tc, fill_short=v), seed) for v in (False, True))
        return all([e.query for e in getattr(old, k)] == [e.query for e in getattr(new, k)]
                   for k in ("train", "validation", "test"))
    except Exception:  # a task that cannot be loaded now: keep what such runs did
        return False


SAVED_BEFORE = {("task", "split_order"): ("generation", None),
                ("task", "fill_short"): (_fill_short_before, None),
                ("select", "stop_gate"): (False, ("inference_select",)),
                # runs saved before the generation section generated through transformers, with these defaults
                **{("generation", k): (v, None) for k, v in dataclasses.asdict(GenerationConfig()).items()}}


def _saved_before(data: dict) -> list[tuple[str, str, object]]:
    """(section, key, value) of the SAVED_BEFORE keys a saved config dict lacks and its method read."""
    return [(s, k, v(data) if callable(v) else v) for (s, k), (v, methods) in SAVED_BEFORE.items()
            if isinstance(data.get(s, {}), dict) and k not in data.get(s, {})
            and (methods is None or data.get("method") in methods)]


def saved_settings(data: dict) -> dict:
    """A saved config.yaml's dict, with the keys of SAVED_BEFORE it lacks set to what that run did."""
    for section, key, value in _saved_before(data):
        data.setdefault(section, {})[key] = value
    return data


def load_saved_config(path: str | os.PathLike) -> Config:
    """A run's saved config.yaml as a Config (see SAVED_BEFORE)."""
    data = _read_yaml(Path(path))
    return load_config(path, [f"{s}.{k}={v}" for s, k, v in _saved_before(data)])


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    from metatuner.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def help_text() -> str:
    lines = []
    section = None
    for key, tp, default, help in all_keys():
        sec = key.split(".")[0] if "." in key else ""
        if sec != section:
            section = sec
            lines.append(f"\n  [{sec or 'run'}]")
        lines.append(f"  {key} ({_type_name(tp, key)}, default {default!r})\n      {help}")
    return "\n".join(lines)
