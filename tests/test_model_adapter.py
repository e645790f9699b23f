"""model.adapter: a saved PEFT adapter merged on top of model.name by load_from_config (and MetaTuner's
actor loader), with a one-line error for a folder that is not an adapter."""

from __future__ import annotations

import pytest
import torch

from metatuner.config import load_config
from metatuner.errors import MetatunerError
from metatuner.models import load_from_config, load_model


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_path, tmp_path_factory):
    """A tiny LoRA adapter with non-zero B (a fresh LoRA is the identity), saved in PEFT format."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_model(str(tiny_model_path), dtype="float32", device="cpu")
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    peft_model.save_pretrained(str(out))
    return out


def test_loading_the_adapter_gives_the_peft_models_logits(tiny_model_path, adapter_dir):
    from peft import PeftModel

    base, tok = load_model(str(tiny_model_path), dtype="float32", device="cpu")
    ids = tok(["<|im_start|>user\n12 + 35?<|im_end|>"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        ref = PeftModel.from_pretrained(base, str(adapter_dir)).eval()(input_ids=ids).logits
    cfg = load_config(None, [f"model.name={tiny_model_path}", f"model.adapter={adapter_dir}", "model.dtype=float32",
                             "model.device=cpu"])
    merged, _ = load_from_config(cfg.model)
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert not torch.allclose(plain, ref, atol=1e-3)  # the adapter really changes the model
    assert torch.allclose(got, ref, atol=1e-5)
    assert type(merged).__name__ == "LlamaForCausalLM" and not merged.training  # merged, not a PeftModel

    from metatuner.methods.metatuner.loading import load_actor

    actor, _ = load_actor(cfg)
    with torch.no_grad():
        assert torch.allclose(actor(input_ids=ids).logits, ref, atol=1e-5)


def test_empty_adapter_is_the_base_model(tiny_model_path):
    cfg = load_config(None, [f"model.name={tiny_model_path}", "model.device=cpu"])
    assert cfg.model.adapter == ""
    model, _ = load_from_config(cfg.model)
    base, _ = load_model(str(tiny_model_path), device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))


def test_a_folder_without_adapter_config_is_one_line(tiny_model_path, tmp_path):
    from metatuner.validate import validate_models

    cfg = load_config(None, [f"model.name={tiny_model_path}", f"model.adapter={tmp_path}", "model.device=cpu"])
    for call in (lambda: validate_models(cfg), lambda: load_from_config(cfg.model)):
        with pytest.raises(MetatunerError, match=r"^model\.adapter = .*adapter_config\.json$") as e:
            call()
        assert "\n" not in str(e.value)


def test_a_missing_gguf_file_is_one_line(tmp_path):
    from metatuner.models import model_config, model_fingerprint, resolve_path

    missing = str(tmp_path / "nope.gguf")
    for call in (lambda: resolve_path(missing), lambda: model_config(missing), lambda: load_model(missing)):
        with pytest.raises(MetatunerError, match=r"model\.name=.*nope\.gguf.*no such GGUF file"):
            call()
    assert model_fingerprint(missing) == {"name": missing}
    assert not (tmp_path / "cache").exists()


def test_a_gguf_file_under_home_is_the_same_file_with_or_without_tilde(tmp_path, monkeypatch):
    from metatuner.models import model_fingerprint

    monkeypatch.setenv("HOME", str(tmp_path))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(60))
    fp = model_fingerprint("~/m.gguf")
    assert fp == model_fingerprint(str(f)) and fp["files"][0][:2] == ("m.gguf", 64)
    f.write_bytes(b"GGUF" + bytes(61))  # a changed file is a different model
    assert model_fingerprint("~/m.gguf") != fp
