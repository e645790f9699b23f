"""Models trained under FSDP2 (accelerate's configs/accelerate/fsdp.yaml) come back as plain PeftModels.

FSDP itself needs GPUs through accelerate; here torch's `fully_shard` runs on CPU in a one-process gloo
group, which shards the parameters into DTensors exactly as a GPU launch does. A sharded model trains, but
after a backward pass its `generate` meets sharded root parameters, and safetensors cannot save DTensors;
`lora_sft.unsharded` must give back the same weights as a plain model that does both.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from metatuner.lora_sft import is_sharded, unsharded
from metatuner.testing import tiny_llama


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def peft_tiny(merged_delta: bool = False):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(vocab_size=104)
    if merged_delta:  # an adapter merged earlier (BetterTogether's w steps): the base weights moved
        with torch.no_grad():
            base.model.layers[0].mlp.up_proj.weight.add_(0.5)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a trained adapter: B no longer zero
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5, generator=torch.Generator().manual_seed(len(n)))
    return model


def test_plain_models_pass_through():
    model = peft_tiny()
    assert not is_sharded(model) and unsharded(model) is model


@pytest.mark.parametrize("merged_delta", [False, True])
def test_sharded_model_comes_back_plain_with_the_same_weights_and_answers(one_process_group, tmp_path, merged_delta):
    from safetensors.torch import load_file
    from torch.distributed.fsdp import fully_shard

    ref = peft_tiny(merged_delta)
    sharded = copy.deepcopy(ref)
    for layer in sharded.get_base_model().model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    assert is_sharded(sharded)
    ids = torch.randint(4, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_loss = ref(input_ids=ids, labels=ids).loss
        assert torch.allclose(sharded(input_ids=ids, labels=ids).loss, ref_loss)  # it trains as the plain one

    plain = unsharded(sharded)
    assert not is_sharded(plain)
    got, want = plain.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    with torch.no_grad():
        assert torch.equal(plain.generate(input_ids=ids, max_new_tokens=4, do_sample=False),
                           ref.generate(input_ids=ids, max_new_tokens=4, do_sample=False))
    plain.save_pretrained(tmp_path / "adapter")  # safetensors: plain tensors only
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)
