"""Batched per-query LoRA against row-by-row merged weights; static PEFT LoRA; PEFT export."""

import contextlib
import copy
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from metatuner.config import LoRAConfig
from metatuner.errors import MetatunerError
from metatuner.lora import PerQueryLoRA, TargetSpec, export_peft_adapter, find_targets, static_lora
from metatuner.testing import tiny_llama

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 4, 8.0
ATOL = 1e-5


def random_factors(targets, batch, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    return {
        t.key: (torch.randn(batch, RANK, t.in_features, generator=g) * std,
                torch.randn(batch, t.out_features, RANK, generator=g) * std)
        for t in targets
    }


def merged_model(base, targets, factors, row):
    """Reference: a copy of the base model with W + s * B_row @ A_row merged into every target."""
    ref = copy.deepcopy(base)
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for t in targets:
            A, B = factors[t.key]
            modules[t.path].weight += (ALPHA / RANK) * B[row] @ A[row]
    return ref


@pytest.fixture
def setup():
    base = tiny_llama(seed=0)
    base.requires_grad_(False)
    actor = copy.deepcopy(base)
    targets = find_targets(actor, ALL)
    lora = PerQueryLoRA(actor, targets, RANK, ALPHA)
    ids = torch.randint(4, 100, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # left padding in row 0
    return base, actor, targets, lora, ids, mask


def test_find_targets_layers_and_sizes():
    model = tiny_llama()
    targets = find_targets(model, ["q_proj", "down_proj"], "1:3")
    assert [t.key for t in targets] == ["1.q_proj", "1.down_proj", "2.q_proj", "2.down_proj"]
    assert targets[0] == TargetSpec(1, "q_proj", 32, 32, "model.layers.1.self_attn.q_proj")
    assert (targets[1].in_features, targets[1].out_features) == (64, 32)
    assert len(find_targets(model, ALL)) == 4 * 7
    assert [t.layer for t in find_targets(model, ["k_proj"], "-1:")] == [3]


@pytest.mark.parametrize("modules,layers,setting", [
    (["q_proj", "qkv"], "", "lora.target_modules"),
    ([], "", "lora.target_modules"),
    (["q_proj"], "10:20", "lora.layers"),
    (["q_proj"], "a:b", "lora.layers"),
    (["q_proj"], "3", "lora.layers"),
])
def test_find_targets_errors_name_the_setting(modules, layers, setting):
    with pytest.raises(MetatunerError, match=setting) as e:
        find_targets(tiny_llama(), modules, layers)
    if "qkv" in modules:
        assert "available: " in str(e.value) and "down_proj" in str(e.value)


def test_bad_rank_and_bad_factor_shapes(setup):
    base, actor, targets, lora, ids, mask = setup
    with pytest.raises(MetatunerError, match="lora.rank"):
        PerQueryLoRA(actor, targets, 0, ALPHA)
    f = random_factors(targets, 3)
    f[targets[0].key] = (f[targets[0].key][0][:, :2], f[targets[0].key][1])
    with pytest.raises(MetatunerError, match=targets[0].key):
        lora.set_factors(f)
    with pytest.raises(MetatunerError, match="missing"):
        lora.set_factors({})


def test_forward_matches_row_by_row_merged_weights(setup):
    base, actor, targets, lora, ids, mask = setup
    factors = random_factors(targets, 3)
    with lora.use_factors(factors):
        out = actor(ids, attention_mask=mask).logits
    base_out = base(ids, attention_mask=mask).logits
    for row in range(3):
        ref = merged_model(base, targets, factors, row)(ids[row:row + 1], attention_mask=mask[row:row + 1]).logits
        torch.testing.assert_close(out[row:row + 1], ref, atol=ATOL, rtol=0)
        assert (out[row] - base_out[row]).abs().max() > 1e-2  # the LoRA really changes the output


def test_no_factors_is_exactly_the_base_model(setup):
    base, actor, targets, lora, ids, mask = setup
    expected = base(ids, attention_mask=mask).logits
    assert torch.equal(actor(ids, attention_mask=mask).logits, expected)
    lora.set_factors(random_factors(targets, 3))
    lora.clear_factors()
    assert torch.equal(actor(ids, attention_mask=mask).logits, expected)
    with lora.use_factors(random_factors(targets, 3)):
        pass
    assert torch.equal(actor(ids, attention_mask=mask).logits, expected)
    lora.remove()
    assert torch.equal(actor(ids, attention_mask=mask).logits, expected)


def test_rows_with_the_same_input_get_different_outputs(setup):
    base, actor, targets, lora, ids, mask = setup
    same = ids[1:2].repeat(3, 1)
    with lora.use_factors(random_factors(targets, 3)):
        out = actor(same).logits
    assert (out[0] - out[1]).abs().max() > 1e-2 and (out[1] - out[2]).abs().max() > 1e-2


def test_greedy_generate_matches_merged_models(setup):
    base, actor, targets, lora, ids, mask = setup
    factors = random_factors(targets, 3)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with lora.use_factors(factors):
        out = actor.generate(input_ids=ids, attention_mask=mask, **kw)
    for row in range(3):
        ref = merged_model(base, targets, factors, row).generate(
            input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1], **kw)
        assert torch.equal(out[row:row + 1], ref)


def test_sampling_with_several_sequences_per_query_repeats_each_querys_factors(setup):
    """num_return_sequences=2: rows 2i and 2i+1 use query i's LoRA at every step. Checked on the
    raw logits of each generation step against the merged model teacher-forced on the sample."""
    base, actor, targets, lora, ids, mask = setup
    factors = random_factors(targets, 3)
    torch.manual_seed(0)
    with lora.use_factors(factors):
        gen = actor.generate(input_ids=ids, attention_mask=mask, do_sample=True, num_return_sequences=2,
                             max_new_tokens=5, pad_token_id=0, eos_token_id=None, top_k=0,
                             output_logits=True, return_dict_in_generate=True)
    step_logits = torch.stack(gen.logits, dim=1)  # [6, new, V]
    T, new = ids.shape[1], step_logits.shape[1]
    assert gen.sequences.shape[0] == 6
    for j in range(6):
        row = j // 2
        seq = gen.sequences[j:j + 1]
        full_mask = torch.cat([mask[row:row + 1], torch.ones(1, new, dtype=mask.dtype)], dim=1)
        ref = merged_model(base, targets, factors, row)(seq, attention_mask=full_mask).logits
        torch.testing.assert_close(step_logits[j], ref[0, T - 1:T - 1 + new], atol=1e-4, rtol=0)


def test_shared_prompt_sampling_keeps_each_querys_factors(setup):
    """generate_texts with the prompt run once and its cache copied to the n samples gives, under
    per-query LoRA, the same samples and scores as num_return_sequences (every copy run with its factors)."""
    from metatuner.evaluate import generate_texts
    from metatuner.testing import char_tokenizer

    base, actor, targets, lora, ids, mask = setup
    tok = char_tokenizer()
    texts = ["abc", "hello there", "xyz uvw rst"]
    factors = random_factors(targets, 3)
    out = {}
    for share in (False, True):
        torch.manual_seed(0)
        with lora.use_factors(factors):
            out[share] = generate_texts(actor, tok, texts, 6, do_sample=True, num_return_sequences=2,
                                        return_logprobs=True, share_prompt=share)
    assert out[True][0] == out[False][0]
    for a, b in zip(out[True][2], out[False][2]):
        assert a == pytest.approx(b, abs=1e-5)
    torch.manual_seed(0)
    plain = generate_texts(actor, tok, texts, 6, do_sample=True, num_return_sequences=2)[0]
    assert plain != out[True][0]  # the factors changed the samples
    # rounds over some rows (early stopping): a cache of all three prompts, built once under all factors,
    # serves rows [2, 0] under their own factors as running those prompts again would
    from metatuner.evaluate import PromptCache

    with lora.use_factors(factors):
        cached = PromptCache(actor, tok, texts)
    sub = {k: (a[[2, 0]], b[[2, 0]]) for k, (a, b) in factors.items()}
    got = {}
    for reuse in (False, True):
        torch.manual_seed(1)
        with lora.use_factors(sub):
            got[reuse] = generate_texts(actor, tok, [texts[2], texts[0]], 6, do_sample=True, num_return_sequences=3,
                                        return_logprobs=True, share_prompt=False,
                                        prompt_cache=(cached, [2, 0]) if reuse else None)
    assert got[True][0] == got[False][0] and got[True][1] == got[False][1]
    for a, b in zip(got[True][2], got[False][2]):
        assert a == pytest.approx(b, abs=1e-5)


def test_finished_rows_leave_the_batch_with_their_factors(setup):
    """Greedy decoding whose finished rows leave the batch (drop_finished, with keep_rows narrowing the factors
    to the rows that stay) gives each row what the whole batch kept to the end gives, and what the row alone
    under its own merged weights gives; when decoding ends every row's factors are back."""
    from metatuner.generation import greedy_texts
    from metatuner.testing import char_tokenizer

    base, actor, targets, lora, ids, mask = setup
    tok = char_tokenizer()
    texts = ["abc", "hello there", "xyz uvw rst", "q", "twelve 12"]
    factors = random_factors(targets, len(texts))
    # a row ends at the first character most rows produce after a few steps: rows finish at different steps
    with lora.use_factors(factors):
        free, _ = greedy_texts(actor, tok, texts, 12, share_prefix=False, drop_finished=False)
    chars = [c for g in free for c in g[0][2:]]
    end = re.escape(max(set(chars), key=chars.count))
    seen = []
    hook = actor.model.layers[0].register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    with lora.use_factors(factors):
        whole, whole_n = greedy_texts(actor, tok, texts, 12, answer_end=end, share_prefix=False, drop_finished=False)
        whole_rows, seen[:] = list(seen), []
        left, left_n = greedy_texts(actor, tok, texts, 12, answer_end=end, share_prefix=False, drop_finished=True,
                                    keep_rows=lora.keep_rows)
        assert all(lora._factors[k][0].shape[0] == len(texts) for k in lora._factors)  # whole again
    hook.remove()
    assert left == whole and left_n == whole_n
    assert len({n[0] for n in whole_n}) > 1  # rows finished at different steps
    assert min(seen) < len(texts) == max(whole_rows)  # and left the batch
    for r in (0, 3):
        alone, _ = greedy_texts(merged_model(base, targets, factors, r), tok, [texts[r]], 12, answer_end=end)
        assert alone[0] == left[r]


def test_one_prompt_pass_gives_the_greedy_answer_and_the_reference_nll(setup):
    """greedy_with_nll (a D2 rollout's scoring: the prompts run once, their cache serving both) gives the
    answers greedy_texts gives and the NLL a teacher-forced pass over prompt + reference gives, for the plain
    model and under per-query factors (finished rows leaving with theirs), with completions of different
    lengths; the cache cut back to the prompts leaves the answers untouched."""
    from metatuner.generation import greedy_texts, greedy_with_nll
    from metatuner.testing import char_tokenizer
    from metatuner.training import forward_nll, lm_batch

    base, actor, targets, lora, ids, mask = setup
    tok = char_tokenizer()
    prefixes = ["abc", "hello there", "xyz uvw rst", "q", "twelve 12"]
    comps = ["7", "no, 42", "", "x y z w", "12!"]
    factors = random_factors(targets, len(prefixes))
    for per_row in (False, True):
        with lora.use_factors(factors) if per_row else contextlib.nullcontext():
            keep = lora.keep_rows if per_row else None
            want, want_n = greedy_texts(actor, tok, prefixes, 10, answer_end="e", share_prefix=False,
                                        drop_finished=not per_row)
            want_nll = forward_nll(actor, lm_batch(tok, prefixes, comps, 512))[0]
            got, got_n, got_nll = greedy_with_nll(actor, tok, prefixes, comps, 10, "e", True, keep)
        assert got == want and got_n == want_n
        torch.testing.assert_close(got_nll, want_nll, atol=1e-5, rtol=1e-5)
        assert got_nll[2] == 0.0 and (got_nll[[0, 1, 3, 4]] > 0).all()  # an empty completion scores 0


def test_gradients_reach_non_leaf_factors_and_not_base_weights(setup):
    base, actor, targets, lora, ids, mask = setup
    leaf = {k: (a.requires_grad_(), b.requires_grad_()) for k, (a, b) in random_factors(targets, 3).items()}
    scale = torch.tensor(2.0, requires_grad=True)
    factors = {k: (a * scale, b) for k, (a, b) in leaf.items()}  # non-leaf A
    with lora.use_factors(factors):
        loss = actor(ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    assert scale.grad is not None and scale.grad.abs() > 0
    for a, b in leaf.values():
        assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    assert all(p.grad is None for p in actor.parameters())


def test_bf16_autocast_close_to_fp32_and_differentiable(setup):
    base, actor, targets, lora, ids, mask = setup
    factors = {k: (a.requires_grad_(), b) for k, (a, b) in random_factors(targets, 3).items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base16 = actor(ids, attention_mask=mask).logits.float()
    with lora.use_factors(factors):
        effect32 = actor(ids, attention_mask=mask).logits - base(ids, attention_mask=mask).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = actor(ids, attention_mask=mask, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    effect16 = out.logits.float() - base16
    # bf16 rounding only: no worse than the same LoRA merged into the weights, run under the same autocast
    # (on this tiny model bf16 alone moves the effect by about 10%, for both)
    merged_err = []
    for row in range(ids.shape[0]):
        ref, r = merged_model(base, targets, factors, row), slice(row, row + 1)
        with torch.no_grad():
            ref32 = ref(ids[r], attention_mask=mask[r]).logits - base(ids[r], attention_mask=mask[r]).logits
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ref16 = ref(ids[r], attention_mask=mask[r]).logits.float() - base(ids[r], attention_mask=mask[r]).logits.float()
        merged_err.append((ref16 - ref32).norm() ** 2)
    merged_rel = (sum(merged_err) ** 0.5 / effect32.norm()).item()
    assert 0 < (effect16 - effect32).norm() / effect32.norm() < 1.25 * merged_rel
    out.loss.backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a, _ in factors.values())


def test_static_lora_targets_the_same_modules():
    model = tiny_llama()
    expected = {t.path for t in find_targets(model, ["q_proj", "up_proj"], "1:3")}
    peft_model = static_lora(model, LoRAConfig(rank=RANK, alpha=ALPHA, target_modules=["q_proj", "up_proj"], layers="1:3"))
    got = {n.removeprefix("base_model.model.").removesuffix(".lora_A")
           for n, _ in peft_model.named_modules() if n.endswith(".lora_A")}
    assert got == expected
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(MetatunerError, match="lora.target_modules"):
        static_lora(tiny_llama(), LoRAConfig(target_modules=["wq"]))


def test_peft_export_round_trip(setup, tmp_path):
    from peft import PeftModel

    base, actor, targets, lora, ids, mask = setup
    factors = random_factors(targets, 3)
    with lora.use_factors(factors):
        expected = actor(ids, attention_mask=mask).logits
    row = 2
    one = {k: (a[row], b[row]) for k, (a, b) in factors.items()}
    out = export_peft_adapter(targets, one, RANK, ALPHA, tmp_path / "adapter", "tiny")
    out = export_peft_adapter(targets, one, RANK, ALPHA, tmp_path / "adapter", "tiny")  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp folders left
    weights = load_file(str(out / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert weights[key].shape == (RANK, 32)
    assert weights[key.replace("lora_A", "lora_B")].shape == (32, RANK)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == RANK
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(out))
    got = peft_model(ids[row:row + 1], attention_mask=mask[row:row + 1]).logits
    torch.testing.assert_close(got, expected[row:row + 1], atol=ATOL, rtol=0)
