"""Parameter decoder F: pooling, factor shapes, zero-init B (actor unchanged), settings errors."""

import copy

import pytest
import torch

from metatuner.errors import MetatunerError
from metatuner.hypernet import ParameterDecoder, pool
from metatuner.lora import PerQueryLoRA, find_targets
from metatuner.testing import tiny_llama

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_pool_mean_and_last_with_left_and_right_padding():
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    torch.testing.assert_close(pool(h, right, "mean")[0], h[0, :2].mean(0))
    torch.testing.assert_close(pool(h, left, "mean")[0], h[0, 2:].mean(0))
    torch.testing.assert_close(pool(h, right, "mean")[1], h[1].mean(0))
    assert torch.equal(pool(h, right, "last"), torch.stack([h[0, 1], h[1, 3]]))
    assert torch.equal(pool(h, left, "last"), torch.stack([h[0, 3], h[1, 3]]))
    with pytest.raises(MetatunerError, match="hypernet.pooling"):
        pool(h, left, "max")


@pytest.mark.parametrize("heads", ["shared", "per_target"])
def test_factor_shapes_zero_b_and_query_dependence(heads):
    actor = tiny_llama()
    targets = find_targets(actor, ALL, "1:3")
    dec = ParameterDecoder(48, targets, rank=4, alpha=8, hidden=16, heads=heads, embed_dim=8)  # G wider than M
    h = torch.randn(3, 48)
    factors = dec(h)
    assert list(factors) == [t.key for t in targets]
    for t in targets:
        A, B = factors[t.key]
        assert A.shape == (3, 4, t.in_features) and B.shape == (3, t.out_features, 4)
        assert torch.count_nonzero(B) == 0  # dW = 0 at step 0
        assert (A[0] - A[1]).abs().max() > 1e-4  # A depends on the query
        assert 0.02 < A.std() < 1.0  # small, LoRA-like scale
    rebuilt = ParameterDecoder.from_config_dict(dec.config_dict())
    assert rebuilt.targets == dec.targets and sum(p.numel() for p in rebuilt.parameters()) == sum(
        p.numel() for p in dec.parameters())


def test_zero_initialised_decoder_leaves_actor_logits_identical():
    base = tiny_llama()
    actor = copy.deepcopy(base)
    targets = find_targets(actor, ALL)
    lora = PerQueryLoRA(actor, targets, 4, 8)
    dec = ParameterDecoder(32, targets, rank=4, alpha=8)
    ids = torch.randint(4, 100, (2, 7))
    with lora.use_factors(dec(torch.randn(2, 32))):
        out = actor(ids).logits
    assert torch.equal(out, base(ids).logits)


def test_shared_trunk_gives_each_target_its_own_factors():
    targets = find_targets(tiny_llama(), ["q_proj"])
    dec = ParameterDecoder(32, targets, rank=2, alpha=4)
    with torch.no_grad():
        for head in dec.side_b.heads.values():
            head.weight.normal_()
    f = dec(torch.randn(1, 32))
    assert (f["0.q_proj"][1] - f["1.q_proj"][1]).abs().max() > 1e-3  # layer embeddings separate them


@pytest.mark.parametrize("kwargs,setting", [
    (dict(rank=0), "lora.rank"),
    (dict(hidden=0), "hypernet.hidden"),
    (dict(heads="tree"), "hypernet.heads"),
    (dict(embed_dim=0), "hypernet.embed_dim"),
])
def test_bad_settings_name_the_setting(kwargs, setting):
    targets = find_targets(tiny_llama(), ["q_proj"])
    args = dict(rank=4, alpha=8.0, hidden=16, heads="shared", embed_dim=8) | kwargs
    with pytest.raises(MetatunerError, match=setting):
        ParameterDecoder(32, targets, **args)
    with pytest.raises(MetatunerError, match="shape"):
        ParameterDecoder(32, targets, rank=4, alpha=8)(torch.randn(2, 31))
