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


# ----------------------------------------------------------------------------- MetaTuner's generator G sharded


def lora_split_gen():
    from metatuner.generator import SplitGenerator
    from metatuner.methods.metatuner.system import add_generator_lora

    model = tiny_llama(seed=1)
    add_generator_lora(model, 4, ["q_proj", "v_proj"])
    with torch.no_grad():  # a trained adapter: B no longer zero
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.3, generator=torch.Generator().manual_seed(len(n)))
    return SplitGenerator(model, share_ratio=0.5)


def step_phi_p(gen) -> None:
    """What a training step does to the live prompt decoder: phi_p moves, phi_p' does not."""
    from metatuner.sharding import is_dtensor

    with torch.no_grad():
        for n, p in gen.live_decoder_state().items():
            delta = torch.full(tuple(p.shape), 0.05) * (1 + len(n) % 3)
            if is_dtensor(p):
                from torch.distributed.tensor import distribute_tensor

                delta = distribute_tensor(delta, p.device_mesh, p.placements, src_data_rank=None)
            p.add_(delta)


def test_a_sharded_generator_samples_encodes_saves_and_loads_as_the_plain_one(one_process_group, tmp_path):
    """`sharding.shard_generator`: G's layers and G become FSDP2 units and phi_p' takes phi_p's sharding; phi_p'
    sampling (values swapped by copy, not storage), the meta encoder alone (root gathered for the call),
    phi_p' <- phi_p and the checkpoint (gathered whole tensors) give what the plain generator gives."""
    from safetensors.torch import load_file

    from metatuner.errors import MetatunerError
    from metatuner.sharding import is_dtensor, shard_generator, whole

    plain = lora_split_gen()
    sharded = copy.deepcopy(plain)
    shard_generator(sharded)
    assert all(is_dtensor(p) for p in sharded.model.parameters())
    frozen, want = sharded.frozen_state(), plain.frozen_state()
    assert frozen and all(is_dtensor(t) and torch.equal(whole(t), want[n]) for n, t in frozen.items())

    ids = torch.randint(4, 100, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    before = plain.sample_prompts(ids, mask, **greedy)
    for g in (plain, sharded):
        step_phi_p(g)
    live = plain.generate_live(ids, mask, **greedy)
    assert not torch.equal(live, before), "the step did not change G's answers"
    assert torch.equal(sharded.sample_prompts(ids, mask, **greedy), before)  # phi_p' still the old decoder
    assert torch.equal(sharded.generate_live(ids, mask, **greedy), live)  # and phi_p back in place after it
    # no pass leaves a unit gathered (FSDP2 keeps a root gathered after forward by default): what the optimizer,
    # phi_p' swaps and saves read must be the sharded parameters
    assert all(is_dtensor(p) for p in sharded.model.parameters())
    with torch.no_grad():
        assert torch.allclose(sharded.encode(ids, mask), plain.encode(ids, mask), atol=1e-6)
    with pytest.raises(MetatunerError, match="without gradients when G is sharded"):
        sharded.encode(ids, mask)
    for g in (plain, sharded):
        g.sync_frozen()
    assert torch.equal(sharded.sample_prompts(ids, mask, **greedy), live)

    plain.save(tmp_path / "plain.safetensors")
    sharded.save(tmp_path / "sharded.safetensors")
    sharded.save(tmp_path / "not_written.safetensors", write=False)  # another process's part of a sharded save
    assert not (tmp_path / "not_written.safetensors").exists()
    a, b = load_file(tmp_path / "plain.safetensors"), load_file(tmp_path / "sharded.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    fresh = lora_split_gen()
    shard_generator(fresh)
    fresh.load(tmp_path / "plain.safetensors")
    got = {k: whole(v) for k, v in fresh.trained_state().items()}
    assert all(torch.equal(got[k], v) for k, v in plain.trained_state().items())


def test_gradients_of_sharded_and_plain_parameters_are_clipped_together_as_torch_does(one_process_group):
    """`sharding.clip_grad_norm` (G's sharded gradients and F's plain ones: one norm over all) equals torch's
    clip_grad_norm_ on plain copies; `average_gradients` leaves a parameter no loss reached without a
    gradient (Adam then leaves it alone, as under DDP)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch import nn

    from metatuner.sharding import average_gradients, clip_grad_norm, is_dtensor

    mesh = init_device_mesh("cpu", (1,))
    g = torch.Generator().manual_seed(0)
    values = [torch.randn(4, 3, generator=g), torch.randn(5, generator=g)]
    grads = [torch.randn(4, 3, generator=g) * 3, torch.randn(5, generator=g) * 3]
    ref = [nn.Parameter(v.clone()) for v in values]
    for p, gr in zip(ref, grads):
        p.grad = gr.clone()
    mixed = [nn.Parameter(distribute_tensor(values[0], mesh, [Shard(0)])), nn.Parameter(values[1].clone())]
    mixed[0].grad = distribute_tensor(grads[0], mesh, [Shard(0)])
    mixed[1].grad = grads[1].clone()
    unreached = nn.Parameter(torch.zeros(2))
    average_gradients(mixed + [unreached])
    assert unreached.grad is None and torch.equal(mixed[1].grad, grads[1])  # one process: the mean is itself
    want = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    got = clip_grad_norm(mixed, 1.0)
    assert torch.allclose(got, want)
    assert is_dtensor(mixed[0].grad)
    assert torch.allclose(mixed[0].grad.full_tensor(), ref[0].grad, atol=1e-6)
    assert torch.allclose(mixed[1].grad, ref[1].grad, atol=1e-6)
    assert abs(clip_grad_norm(mixed, float("inf")).item() - 1.0) < 1e-4  # already clipped: norm 1, untouched
