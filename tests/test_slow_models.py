"""The real embedded model (SmolLM2-135M-Instruct from GGUF): `metatuner eval` defaults, GSM8K, conversion.

Run with `pytest -m slow` (or `-m ci_slow`); about 1-2 minutes on a laptop CPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from metatuner.cli import main
from metatuner.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.ci_slow]


def check_run(out, n, task):
    cfg = load_config(out / "config.yaml")
    assert cfg.model.name == "smollm2-135m-instruct"
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == n
    for p in preds:
        assert {"query", "prompt", "generation", "extracted", "reference", "correct"} <= set(p)
        assert isinstance(p["generation"], str)
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == task and m["n"] == n and m["model"] == "smollm2-135m-instruct"
    assert 0.0 <= m["accuracy"] <= 1.0
    assert m["accuracy"] == pytest.approx(sum(bool(p["correct"]) for p in preds) / n)
    assert m["tokens_generated"] > 0 and m["wall_seconds"] > 0
    return preds, m


def test_eval_defaults_on_default_task(tmp_path, capsys):
    out = tmp_path / "default"
    assert main(["eval", "eval.limit=8", f"output_dir={out}"]) == 0
    preds, m = check_run(out, 8, "chain_sum")
    assert all("arithmetic problem" in p["query"] for p in preds)
    # the instruct model answers in words: at least some generations are non-empty and extractable
    assert any(p["generation"].strip() for p in preds)


def test_eval_gsm8k(tmp_path):
    from pathlib import Path

    from metatuner.tasks import data_root

    out = tmp_path / "gsm8k"
    args = ["eval", "task.name=gsm8k", "eval.limit=4", f"output_dir={out}"]
    if data_root() is None:  # no ../shared/data here: the first 4 GSM8K test problems shipped with the tests
        args.append(f"task.path={Path(__file__).parent / 'assets' / 'gsm8k_test_first4.jsonl'}")
    assert main(args) == 0
    preds, _ = check_run(out, 4, "gsm8k")
    # the first 4 GSM8K test problems (shared data, the hub's, or the shipped asset, which is carved in shuffled order)
    assert {p["reference"] for p in preds} == {"18", "3", "70000", "540"}
    assert all(p["prompt"].endswith("'#### <number>'.") for p in preds)


def test_conversion_reload_and_save_pretrained(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from metatuner.evaluate import chat_text, generate_texts
    from metatuner.models import embedded_model_dir, load_model

    monkeypatch.setenv("METATUNER_CACHE", str(tmp_path / "cache"))
    conv = embedded_model_dir()  # converts the embedded GGUF afresh into the temporary cache
    assert conv == tmp_path / "cache" / "models" / "smollm2-135m-instruct"
    assert (conv / "config.json").is_file() and (conv / "model.safetensors").is_file()
    assert not [p for p in conv.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    cfg = json.loads((conv / "config.json").read_text())
    assert "quantization_config" not in cfg
    mtime = os.path.getmtime(conv / "model.safetensors")
    assert embedded_model_dir() == conv and os.path.getmtime(conv / "model.safetensors") == mtime  # converted once

    model, tok = load_model(device="cpu")
    assert model.dtype == torch.float32 and not model.training
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None

    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    tok.save_pretrained(saved)
    again, tok2 = load_model(str(saved), device="cpu")
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    plain = AutoModelForCausalLM.from_pretrained(conv, dtype=torch.float32)
    assert torch.equal(plain.model.embed_tokens.weight, model.model.embed_tokens.weight)

    text = [chat_text(tok, [{"role": "user", "content": "What is 2 + 3?"}])]
    assert generate_texts(model, tok, text, 12)[0] == generate_texts(again, tok2, text, 12)[0]


def test_a_local_gguf_file_converts_once_to_the_embedded_weights(tmp_path, monkeypatch):
    """model.name=/path/to/file.gguf: the same dequantization as the embedded model, cached by path, size and
    mtime (a touched file is converted afresh), and loadable by load_model."""
    import importlib.util
    import shutil

    from metatuner.models import EMBEDDED, embedded_model_dir, load_model, model_config, model_fingerprint, resolve_path

    package, filename = EMBEDDED["smollm2-135m-instruct"]
    src = Path(list(importlib.util.find_spec(package).submodule_search_locations)[0]) / filename
    gguf = tmp_path / "copy" / "my-model.gguf"
    gguf.parent.mkdir()
    shutil.copyfile(src, gguf)
    monkeypatch.setenv("METATUNER_CACHE", str(tmp_path / "cache"))

    assert model_config(str(gguf)).num_hidden_layers == 30  # read from the file's metadata, nothing converted yet
    assert not (tmp_path / "cache").exists()
    conv = Path(resolve_path(str(gguf)))
    assert conv.parent == tmp_path / "cache" / "models" and conv.name.startswith("gguf-my-model-")
    assert not [p for p in conv.parent.iterdir() if p.name.startswith(".")]
    mtime = os.path.getmtime(conv / "model.safetensors")
    assert Path(resolve_path(str(gguf))) == conv and os.path.getmtime(conv / "model.safetensors") == mtime
    fp = model_fingerprint(str(gguf))
    assert fp["name"] == str(gguf.resolve()) and fp["files"][0][:2] == ("my-model.gguf", gguf.stat().st_size)

    model, tok = load_model(str(gguf), device="cpu")
    ref, _ = load_model(str(embedded_model_dir()), device="cpu")
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert tok.chat_template and tok.padding_side == "left"

    os.utime(gguf, ns=(gguf.stat().st_atime_ns, gguf.stat().st_mtime_ns + 10**9))  # a changed file: a new key
    assert Path(resolve_path(str(gguf))) != conv
