"""Split generator: depth k, one-pass forward, gradient routing, frozen copy, sharing ablation, checkpoints."""

import copy

import pytest
import torch

from metatuner.errors import MetatunerError
from metatuner.generator import SplitGenerator, load_metatuner, save_metatuner, split_depth
from metatuner.hypernet import ParameterDecoder, pool
from metatuner.lora import PerQueryLoRA, find_targets
from metatuner.state_file import load_state, save_state
from metatuner.testing import tiny_llama

GREEDY = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)


def batch(seed=0, n=3, t=8):
    ids = torch.randint(4, 100, (n, t), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0
    return ids, mask


def tied_llama(seed=3):
    model = tiny_llama(seed=seed)
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


def test_split_depth():
    assert split_depth(30, 0.25) == 8  # 7.5 rounds up
    assert split_depth(28, 0.25) == 7 and split_depth(36, 0.75) == 27
    for k_layers, ratio in [(4, 0.1), (4, 1.0), (4, 0.0), (1, 0.5)]:
        with pytest.raises(MetatunerError, match="generator.share_ratio"):
            split_depth(k_layers, ratio)
    with pytest.raises(MetatunerError, match="generator.share_ratio"):
        SplitGenerator(tiny_llama(), share_ratio=0.95)


def test_forward_is_one_pass_giving_lm_loss_and_layer_k_states():
    model = tiny_llama(seed=1)
    gen = SplitGenerator(model, share_ratio=0.5)
    ids, mask = batch()
    loss, logits, h_k = gen(ids, mask, labels=ids)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    full = model(ids, attention_mask=mask, labels=ids, position_ids=pos, output_hidden_states=True)
    torch.testing.assert_close(loss, full.loss)
    torch.testing.assert_close(h_k, full.hidden_states[2])
    torch.testing.assert_close(gen.encode(ids, mask), h_k, atol=1e-6, rtol=0)
    assert gen.k == 2 and h_k.shape == (3, 8, 32)


def test_encoding_of_a_row_does_not_depend_on_left_padding():
    gen = SplitGenerator(tiny_llama(seed=1), share_ratio=0.5)
    ids, mask = batch()  # row 0 has 2 pad tokens on the left
    alone = gen.encode(ids[0:1, 2:], mask[0:1, 2:])
    torch.testing.assert_close(gen.encode(ids, mask)[0:1, 2:], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(pool(gen.encode(ids, mask), mask)[0:1], pool(alone, mask[0:1, 2:]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("make", [tiny_llama, tied_llama])
def test_parameter_groups_partition_the_model(make):
    gen = SplitGenerator(make(), share_ratio=0.5)
    enc, dec = {id(p) for p in gen.encoder_parameters()}, {id(p) for p in gen.decoder_parameters()}
    assert not enc & dec
    assert enc | dec == {id(p) for p in gen.model.parameters()}
    assert all(not p.requires_grad for p in gen.frozen.parameters())
    assert {id(p) for p in gen.parameters()} >= enc | dec


def test_task_loss_reaches_phi_q_and_phi_s_never_phi_p_or_frozen_copy():
    gen = SplitGenerator(tiny_llama(seed=1), share_ratio=0.5)
    actor = tiny_llama(seed=2)
    actor.requires_grad_(False)
    targets = find_targets(actor, ["q_proj", "v_proj", "down_proj"])
    lora = PerQueryLoRA(actor, targets, rank=4, alpha=8)
    dec = ParameterDecoder(32, targets, rank=4, alpha=8, hidden=16, embed_dim=8)
    with torch.no_grad():  # as after a few steps: B != 0, so gradients also reach A and h
        for head in dec.side_b.heads.values():
            head.weight.normal_(std=0.05)
    ids, mask = batch()
    h = pool(gen.encode(ids, mask), mask)
    with lora.use_factors(dec(h)):
        loss = actor(ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dec.parameters())
    assert all(p.grad is not None for p in gen.encoder_parameters())
    assert sum(p.grad.abs().sum() for p in gen.encoder_parameters()) > 0
    assert all(p.grad is None for p in gen.decoder_parameters())
    assert all(p.grad is None for p in gen.frozen.parameters())
    assert all(p.grad is None for p in actor.parameters())


def test_regulariser_trains_phi_s_and_phi_p():
    gen = SplitGenerator(tiny_llama(seed=1), share_ratio=0.5)
    ids, mask = batch()
    gen(ids, mask, labels=ids)[0].backward()
    assert all(p.grad is not None for p in gen.encoder_parameters() + gen.decoder_parameters())
    assert all(p.grad is None for p in gen.frozen.parameters())


def test_sample_prompts_uses_frozen_copy_until_sync():
    gen = SplitGenerator(tiny_llama(seed=1), share_ratio=0.5)
    ids, mask = batch()
    before = gen.sample_prompts(ids, mask, **GREEDY)
    assert torch.equal(before, gen.generate_live(ids, mask, **GREEDY))
    with torch.no_grad():  # a training step on phi_p
        for p in gen.decoder_parameters():
            p.add_(torch.randn_like(p))
    live = gen.generate_live(ids, mask, **GREEDY)
    assert not torch.equal(live, before)
    assert torch.equal(gen.sample_prompts(ids, mask, **GREEDY), before)
    gen.sync_frozen()
    frozen, live_state = gen.frozen_state(), gen.live_decoder_state()
    assert frozen.keys() == live_state.keys() and "lm_head.weight" in frozen
    assert all(torch.equal(frozen[k], live_state[k]) and frozen[k].data_ptr() != live_state[k].data_ptr() for k in frozen)
    assert all(not p.requires_grad for p in gen.frozen.parameters())
    assert torch.equal(gen.sample_prompts(ids, mask, **GREEDY), live)


def lora_gen(seed=1, rank=4):
    from metatuner.methods.metatuner.system import add_generator_lora

    model = tiny_llama(seed=seed)
    add_generator_lora(model, rank, ["q_proj", "v_proj"])
    with torch.no_grad():  # as after training: B != 0
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    return SplitGenerator(model, share_ratio=0.5)


def test_lora_generator_keeps_only_adapter_tensors_in_frozen_copy_and_checkpoint(tmp_path):
    gen = lora_gen()
    frozen = gen.frozen_state()
    assert frozen and all("lora_" in k for k in frozen), "phi_p' holds G's LoRA factors of layers [k, K) only"
    assert all(int(k.split(".")[2]) >= gen.k for k in frozen)
    n_frozen = sum(t.numel() for t in frozen.values())
    n_base = sum(p.numel() for n, p in gen.model.named_parameters() if "lora_" not in n)
    assert n_frozen < n_base / 10
    ids, mask = batch()
    before = gen.sample_prompts(ids, mask, **GREEDY)
    with torch.no_grad():  # a training step on phi_p's adapter
        for k, p in gen.live_decoder_state().items():
            p.add_(torch.randn_like(p))
    assert torch.equal(gen.sample_prompts(ids, mask, **GREEDY), before), "sampling must use phi_p'"
    assert not torch.equal(gen.generate_live(ids, mask, **GREEDY), before)
    gen.save(tmp_path / "g.safetensors")
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "g.safetensors").keys()
    assert keys and all("lora_" in k for k in keys), [k for k in keys if "lora_" not in k][:3]
    other = lora_gen(seed=1)  # same base weights, other adapter values
    with torch.no_grad():
        for p in other.live_decoder_state().values():
            p.zero_()
    other.load(tmp_path / "g.safetensors")
    assert torch.equal(other.sample_prompts(ids, mask, **GREEDY), before)
    assert torch.equal(other.generate_live(ids, mask, **GREEDY), gen.generate_live(ids, mask, **GREEDY))


def test_sample_prompts_reads_the_live_encoder():
    gen = SplitGenerator(tiny_llama(seed=1), share_ratio=0.5)
    ids, mask = batch()
    before = gen.sample_prompts(ids, mask, **GREEDY)
    with torch.no_grad():
        for p in gen.encoder_parameters():
            p.add_(torch.randn_like(p))
    assert not torch.equal(gen.sample_prompts(ids, mask, **GREEDY), before)


def test_no_sharing_gives_f_its_own_encoder():
    shared = SplitGenerator(tiny_llama(seed=1), share_ratio=0.5)
    ids, mask = batch()
    assert torch.equal(shared.param_encode(ids, mask), shared.encode(ids, mask))
    assert shared.param_encoder_parameters() == []

    gen = SplitGenerator(tiny_llama(seed=1), share_ratio=0.5, share_encoder=False)
    torch.testing.assert_close(gen.param_encode(ids, mask), gen.encode(ids, mask))  # same start
    gen.param_encode(ids, mask).sum().backward()
    assert all(p.grad is not None for p in gen.param_encoder_parameters())
    assert all(p.grad is None for p in gen.encoder_parameters())
    with torch.no_grad():
        for p in gen.encoder_parameters():
            p.add_(1.0)
    assert not torch.allclose(gen.param_encode(ids, mask), gen.encode(ids, mask))


@pytest.mark.parametrize("make,share", [(tiny_llama, True), (tied_llama, False)])
def test_save_load_round_trip(tmp_path, make, share):
    def build(seed):
        gen = SplitGenerator(make(seed=seed), share_ratio=0.5, share_encoder=share)
        targets = find_targets(tiny_llama(), ["q_proj", "up_proj"])
        return gen, ParameterDecoder(32, targets, rank=2, alpha=4, hidden=8, embed_dim=4)

    gen, dec = build(1)
    with torch.no_grad():
        for p in list(gen.decoder_parameters()) + list(dec.parameters()):
            p.add_(torch.randn_like(p))
    save_metatuner(tmp_path, gen, dec)
    gen2, dec2 = build(5)
    load_metatuner(tmp_path, gen2, dec2)
    for a, b in [(gen, gen2), (dec, dec2)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    if make is tied_llama:
        assert gen2.model.lm_head.weight is gen2.model.model.embed_tokens.weight  # tying survives
    ids, mask = batch()
    assert torch.equal(gen.sample_prompts(ids, mask, **GREEDY), gen2.sample_prompts(ids, mask, **GREEDY))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generator.safetensors", "hypernet.json"]


def test_load_rejects_other_split(tmp_path):
    gen = SplitGenerator(tiny_llama(), share_ratio=0.5)
    gen.save(tmp_path / "g.safetensors")
    with pytest.raises(MetatunerError, match="share_ratio"):
        SplitGenerator(tiny_llama(), share_ratio=0.25).load(tmp_path / "g.safetensors")
    with pytest.raises(MetatunerError, match="not found"):
        gen.load(tmp_path / "missing.safetensors")


def test_save_state_is_strict(tmp_path):
    model = tiny_llama()
    save_state({"m": model}, tmp_path / "s.safetensors")
    other = tiny_llama(num_layers=3)
    with pytest.raises(MetatunerError, match="'m'"):
        load_state({"m": other}, tmp_path / "s.safetensors")
    copy_ = copy.deepcopy(model)
    with torch.no_grad():
        copy_.lm_head.weight.zero_()
    load_state({"m": copy_}, tmp_path / "s.safetensors")
    assert torch.equal(copy_.lm_head.weight, model.lm_head.weight)
