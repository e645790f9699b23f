"""The candidate prompt pool and MetaTuner's pool / mixed prompt spaces on a tiny random Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from metatuner.config import load_config
from metatuner.errors import MetatunerError
from metatuner.methods import metatuner as M
from metatuner.pool import build_pool, candidate_logprobs, demo_prompt
from metatuner.run import start_run
from metatuner.testing import char_tokenizer, tiny_llama

SMALL = ["task.name=chain_sum", "task.train_size=16", "task.test_size=4", "eval.limit=3", "eval.batch_size=2",
         "train.batch_size=2", "train.max_steps=3", "warmup.max_steps=0", "warmup.generator_steps=1",
         "warmup.queries=4", "rollout.n=2", "rollout.batch_size=8", "train.sync_steps=2",
         "generator.max_prompt_tokens=6", "task.max_new_tokens=4", "rollout.criterion=nll", "lora.rank=2",
         "hypernet.hidden=16", "hypernet.embed_dim=8", "generator.lora_rank=4"]
CANDS = ["Add the numbers.", "Compute the sum and reply 'Answer: N'."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from metatuner.testing import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("pool_tiny") / "model")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("METATUNER_CACHE", str(tmp_path_factory.getbasetemp() / "pool_cache"))


def make_cfg(model_dir, out, *overrides):
    return load_config(None, [f"model.name={model_dir}", f"output_dir={out}", *SMALL,
                              f"prompts.candidates=[{','.join(json.dumps(c) for c in CANDS)}]", *overrides])


def test_candidate_logprobs_equal_a_row_by_row_reference():
    tok = char_tokenizer()
    model = tiny_llama(seed=1).eval()
    # prefixes of different lengths (different left padding in one batch)
    msgs = [[{"role": "user", "content": "what is 1+2"}], [{"role": "user", "content": "and then 30 + 4, what?"}]]
    cands = [["abc", "a longer one", "x"], ["abc", "q", "zz top"]]
    got = candidate_logprobs(model, tok, msgs, cands, batch_size=4, bf16=False)
    from metatuner.evaluate import chat_text
    from metatuner.training import completion_text

    for i in range(2):
        for c in range(3):
            pre = tok(chat_text(tok, msgs[i]), add_special_tokens=False)["input_ids"]
            com = tok(completion_text(tok, msgs[i], cands[i][c])[1], add_special_tokens=False)["input_ids"]
            ids = torch.tensor([pre + com])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            want = torch.stack([logp[len(pre) - 1 + j, t] for j, t in enumerate(com)]).mean()
            assert got[i, c].item() == pytest.approx(want.item(), abs=1e-4)
    # the graph-keeping path (a row per candidate) gives the same scores; without a graph each query's prefix
    # runs once: the first pass holds one row per query, the next one row per candidate
    with torch.enable_grad():
        rows = candidate_logprobs(model, tok, msgs, cands, batch_size=4, bf16=False, grad=True)
    torch.testing.assert_close(rows.detach(), got, atol=1e-5, rtol=1e-5)
    seen = []
    hook = model.model.layers[0].register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape[:2])))
    both = candidate_logprobs(model, tok, msgs, cands, batch_size=6, bf16=False)
    torch.testing.assert_close(both, got, atol=1e-5, rtol=1e-5)  # both queries' rows mixed in the groups
    # the candidates then run in groups of similar length on copies of their prefixes' cache: the long
    # 'a longer one' row alone, the five short ones padded to the longest of them, not to it
    from metatuner.generation import length_groups, prefix_nll

    lens = [len(tok(completion_text(tok, msgs[i], c)[1], add_special_tokens=False)["input_ids"])
            for i in range(2) for c in cands[i]]
    assert [len(g) for g in length_groups(lens)] == [5, 1]
    assert [b for b, _ in seen] == [2, 5, 1]
    assert seen[1][1] == sorted(lens)[-2] - 1 and seen[2][1] == max(lens) - 1
    seen.clear()
    pre = [chat_text(tok, m) for m in msgs]
    comps = [[completion_text(tok, msgs[i], c)[1] for c in cands[i]] for i in range(2)]
    with torch.no_grad():
        whole = prefix_nll(model, tok, pre, comps, group=False)
    hook.remove()
    assert seen == [(2, seen[0][1]), (6, max(lens) - 1)]  # before: every row padded to the longest
    torch.testing.assert_close(-whole, got, atol=1e-5, rtol=1e-5)
    with torch.enable_grad():  # no graph kept whatever the caller's mode (the cache copies need none)
        grouped = prefix_nll(model, tok, pre, comps)
    assert not grouped.requires_grad
    torch.testing.assert_close(-grouped, got, atol=1e-5, rtol=1e-5)
    assert prefix_nll(model, tok, pre, [[], []]).shape == (2, 0)
    # an over-long query is cut from the left once, to fit with its longest candidate (as lm_batch cuts that row)
    from metatuner.training import forward_nll, lm_batch

    short = candidate_logprobs(model, tok, msgs[:1], [["abc", "a longer one", "x"]], bf16=False, max_length=20)
    pre = chat_text(tok, msgs[0])
    want = -forward_nll(model, lm_batch(tok, [pre], [completion_text(tok, msgs[0], "a longer one")[1]], 20))[0]
    assert short[0, 1].item() == pytest.approx(want.item(), abs=1e-4)


def test_length_groups():
    from metatuner.generation import length_groups

    assert length_groups([23, 16, 22, 18, 128, 31]) == [[1, 3, 2, 0], [5], [4]]  # a real pool's token lengths
    assert length_groups([5, 5, 5]) == [[0, 1, 2]]
    assert length_groups([]) == []
    assert sorted(k for g in length_groups([9, 1, 40, 3, 100, 2]) for k in g) == list(range(6))


def test_pool_is_p_tilde_first_deduplicated_and_capped(model_dir, tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("From the file.\n\nAdd the numbers.\n")
    cfg = make_cfg(model_dir, tmp_path / "o", f"prompts.candidates_file={f}", "prompts.demos=2")
    task = start_run(cfg)
    pool = build_pool(cfg, task)
    assert pool == [task.prompt, *CANDS, "From the file.", demo_prompt(task, 2)]
    assert task.train[0].query in pool[-1]
    cfg.prompts.pool_size = 2
    assert build_pool(cfg, task) == [task.prompt, CANDS[0]]
    cfg.prompts.candidates_file = str(tmp_path / "missing.txt")
    with pytest.raises(MetatunerError, match="prompts.candidates_file: .*missing.txt not found"):
        build_pool(cfg, task)


def test_opro_members_join_the_pool_once_and_are_read_back(model_dir, tmp_path, monkeypatch):
    """prompts.opro adds OPRO's best NEW instructions (seeded with the rest of the pool) after the other
    candidates; the result is cached, so a second method (another process) gets the same pool without
    running OPRO again; a different seed is a different key."""
    import metatuner.metaprompt as MP

    cfg = make_cfg(model_dir, tmp_path / "o", "prompts.opro=2", "opro.steps=1", "opro.candidates=3", "opro.subset=2",
                   "opro.max_new_tokens=8")
    task = start_run(cfg)
    calls = []
    real = MP.optimize

    def spy(*a, **k):
        calls.append(k.get("seeds"))
        return real(*a, **k)

    monkeypatch.setattr(MP, "optimize", spy)
    # the tiny random model writes gibberish: make its proposals deterministic and distinct
    monkeypatch.setattr(MP, "parse_instruction", lambda text: f"Proposal {sum(map(ord, text)) % 997}.")
    pool = build_pool(cfg, task)
    assert calls == [[task.prompt, *CANDS]]  # OPRO seeded with the rest of the pool, p~ first
    assert pool[:3] == [task.prompt, *CANDS] and len(pool) == 5
    assert all(p.startswith("Proposal ") for p in pool[3:])
    import os

    cached = [json.loads(f.read_text()) for f in (Path(os.environ["METATUNER_CACHE"]) / "pools").glob("*.json")]
    assert any(c["members"] == pool[3:] for c in cached)
    assert build_pool(cfg, task) == pool and len(calls) == 1  # read back, OPRO not run again
    for f in (Path(os.environ["METATUNER_CACHE"]) / "pools").glob("*.json"):
        f.unlink()
    torch.manual_seed(12345)  # another caller's RNG state: OPRO seeds its own, so the members are the same
    assert build_pool(cfg, task) == pool and len(calls) == 2
    cfg.seed = 1
    build_pool(cfg, task)
    assert len(calls) == 3
    cfg.prompts.pool_size = 3  # a full pool leaves no room: OPRO is not run
    assert build_pool(cfg, task) == [task.prompt, *CANDS] and len(calls) == 3


def test_choose_takes_the_argmax_at_test_and_samples_in_training(model_dir, tmp_path, monkeypatch):
    cfg = make_cfg(model_dir, tmp_path / "c", "method=metatuner_j", "generator.prompt_space=pool",
                   "generator.pool_temperature=0.01", "generator.pool_score=likelihood")
    system, loop, _ = M.prepare(cfg, start_run(cfg))
    import metatuner.methods.metatuner.rollouts as R

    scores = torch.tensor([[0.0, -1.0, 2.0], [3.0, -1.0, 0.0]])
    monkeypatch.setattr(R, "candidate_logprobs", lambda *a, **k: scores)
    exs = system.task.train[:2]
    cands = [list(system.pool)] * 2
    assert R.choose(system, exs, cands, frozen=False, sample=False) == [cands[0][2], cands[1][0]]
    assert R.choose(system, exs, cands, frozen=True, sample=True) == [cands[0][2], cands[1][0]]  # T = 0.01
    # rows padded to one width (mixed space: a query with fewer distinct candidates repeats its first): the
    # padding is never chosen, however it scores; at T = 1 the padding would otherwise carry nearly all the mass
    cfg.generator.pool_temperature = 1.0
    pad = torch.tensor([[0.0, -1.0, 9.0], [0.0, 9.0, 9.0]])
    monkeypatch.setattr(R, "candidate_logprobs", lambda *a, **k: pad)
    padded = [cands[0][:2] + cands[0][:1], cands[1][:1] * 3]
    torch.manual_seed(0)
    picks = [R.choose(system, exs, padded, frozen=True, sample=True, counts=[2, 1]) for _ in range(100)]
    assert all(p[1] == cands[1][0] and p[0] in cands[0][:2] for p in picks)
    # softmax over the two real candidates: the second has probability 1 / (1 + e) = 0.27 (with the padding
    # scored in, 5e-5)
    assert 12 <= sum(p[0] == cands[0][1] for p in picks) <= 45
    assert R.choose(system, exs, padded, frozen=False, sample=False, counts=[2, 1]) == [cands[0][0], cands[1][0]]
    # a sharded G (FSDP: every pass a collective) scores without length groups, so every process makes the
    # same number of passes; unsharded, the candidates run in length groups
    seen = []
    monkeypatch.setattr(R, "candidate_logprobs", lambda *a, **k: seen.append(k["group"]) or scores)
    R.choose(system, exs, cands, frozen=False, sample=False)
    system.sharded = True
    R.choose(system, exs, cands, frozen=False, sample=False)
    system.sharded = False
    assert seen == [True, False]  # pool_score=likelihood here: one pass each way


def test_gain_scores_start_at_zero_and_move_with_the_regularizer(model_dir, tmp_path):
    """generator.pool_score=gain: scores are the decoder's log-likelihood minus the untrained G's (LoRA
    bypassed, equal to the base model's), so they start at 0 for every candidate; a few regularizer steps
    on one candidate make it the argmax, where the raw likelihood keeps choosing p~ (copied from the input)."""
    from metatuner.methods.metatuner.rollouts import choose, pool_scores
    from metatuner.models import load_model
    from metatuner.rewrite import rewrite_messages

    cfg = make_cfg(model_dir, tmp_path / "g", "method=metatuner_j", "generator.prompt_space=pool",
                   "train.bf16=false", "warmup.generator_steps=0")  # untrained G; exact zeros (under bf16 autocast the two passes round differently, ~1e-3)
    system, loop, _ = M.prepare(cfg, start_run(cfg))
    exs = system.task.train[:4]
    cands = [list(system.pool)] * len(exs)
    assert torch.allclose(pool_scores(system, exs, cands, frozen=False), torch.zeros(4, 3), atol=1e-5)
    base, btok = load_model(str(model_dir), "float32", "cpu")
    cfg.generator.pool_score = "likelihood"
    raw = pool_scores(system, exs, cands, frozen=False)
    ref = candidate_logprobs(base, btok, [rewrite_messages(system.p_tilde, ex.query) for ex in exs], cands,
                             bf16=cfg.train.bf16)
    assert torch.allclose(raw, ref, atol=1e-4)  # untrained LoRA: the base model's scores
    target = system.pool[2]
    opt = torch.optim.Adam(system.generator_parameters(), lr=5e-3)
    for _ in range(15):
        _, reg = system.joint_losses(exs, [system.p_tilde] * 4, [target] * 4, need_task=False)
        opt.zero_grad()
        reg.backward()
        opt.step()
    cfg.generator.pool_score = "gain"
    gain = pool_scores(system, exs, cands, frozen=False)
    assert (gain[:, 2] > gain[:, 0]).all() and (gain[:, 2] > gain[:, 1]).all()
    assert choose(system, exs, cands, frozen=False, sample=False) == [target] * 4
    # phi_p' (training's sampler) moves only at a sync
    assert not torch.allclose(pool_scores(system, exs, cands, frozen=True), gain, atol=1e-3)
    system.gen.sync_frozen()
    assert torch.allclose(pool_scores(system, exs, cands, frozen=True), gain, atol=1e-5)


def test_gain_needs_generator_lora(model_dir, tmp_path):
    with pytest.raises(MetatunerError, match="generator.pool_score = .gain.: expected likelihood with generator.lora_rank=0"):
        start_run(make_cfg(model_dir, tmp_path / "r0", "method=metatuner_j", "generator.prompt_space=pool",
                           "generator.lora_rank=0"))


@pytest.mark.parametrize("space", ["pool", "mixed"])
def test_pool_spaces_train_end_to_end(model_dir, tmp_path, space):
    out = tmp_path / space
    cfg = make_cfg(model_dir, out, "method=metatuner_j", f"generator.prompt_space={space}")
    metrics = M.run(cfg)
    pool = json.loads((out / "final" / "pool.json").read_text())["pool"]
    assert pool == json.loads((out / "pool.json").read_text())["pool"] and len(pool) == 3
    preds = [json.loads(ln) for ln in (out / "predictions.jsonl").read_text().splitlines()]
    d2 = [json.loads(ln)["best_prompt"] for ln in (out / "final" / "d2.jsonl").read_text().splitlines()]
    if space == "pool":
        assert all(r["prompt"] in pool for r in preds), "pool mode: every test prompt is a pool candidate"
        assert all(p in pool for p in d2)
        rows = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]
        assert any("d2_pool_counts" in r for r in rows if r["stage"] == "rollout")
    assert metrics["pool"] == pool and sum(metrics["prompt_counts"].values()) == len(preds)
    # a finished pool run answers new queries with a pool prompt
    system = M.load_system(out)
    assert system.pool == pool
    ans = M.answer(system, ["What is 2 + 3?"])
    if space == "pool":
        assert ans[0]["prompt"] in pool


# ----------------------------------------------------------------------------- the baselines get the same pool


def test_baselines_that_choose_a_prompt_get_the_same_pool(model_dir, tmp_path, monkeypatch):
    """zero-shot answers with the pool prompt best on validation; SAPO, OPRO and BetterTogether's p step
    score every pool candidate."""
    import random

    import metatuner.prompts
    from metatuner import metaprompt, sapo
    from metatuner.methods import bettertogether, zero_shot
    from metatuner.models import load_model

    favourite = CANDS[1]
    fake = lambda model, tok, task, examples, prompt, batch_size=16, engine=None: 0.9 if prompt == favourite else 0.1  # noqa: E731
    monkeypatch.setattr(metatuner.prompts, "accuracy_of", fake)
    cfg = make_cfg(model_dir, tmp_path / "zs", "method=zero_shot", "prompts.val_examples=2")
    metrics = zero_shot.run(cfg)
    assert metrics["prompt"] == favourite and metrics["pool"][0] == metrics["p_tilde"]
    preds = [json.loads(ln) for ln in (tmp_path / "zs" / "predictions.jsonl").read_text().splitlines()]
    assert {r["prompt"] for r in preds} == {favourite}

    cfg = make_cfg(model_dir, tmp_path / "x", "method=sft", "prompt_selection=sapo", "sapo.candidates=0", "sapo.subset=2")
    task = start_run(cfg)
    model, tok = load_model(str(model_dir), "float32", "cpu")
    sel = sapo.select_prompt(cfg, model, tok, task)
    assert set(CANDS) <= set(sel["candidates"]) and sel["candidates"][0] == task.prompt

    monkeypatch.setattr(metaprompt, "accuracy_of", fake)
    cfg.opro.steps = 0
    best, acc, rows, _ = metaprompt.optimize(cfg, model, tok, model, tok, task, seeds=build_pool(cfg, task))
    assert [r["instruction"] for r in rows] == [task.prompt, *CANDS] and best == favourite
    from metatuner.methods import opro

    seen = []
    monkeypatch.setattr(opro, "optimize", lambda *a, seeds=None, **k: (seen.append(seeds), (task.prompt, 0.0, [], 0))[1])
    opro.run(make_cfg(model_dir, tmp_path / "opro", "method=opro"))
    assert seen == [[task.prompt, *CANDS]]  # the OPRO method starts from the pool

    monkeypatch.setattr(bettertogether, "accuracy_of", fake)
    monkeypatch.setattr(bettertogether, "bootstrap_traces", lambda *a, **k: [])
    cfg.bettertogether.instructions = 0
    ins, prompt, acc, _ = bettertogether.prompt_step(cfg, model, tok, model, tok, task, task.prompt,
                                                     random.Random(0), task.validation[:2], pool=[task.prompt, *CANDS])
    assert ins == favourite and acc == 0.9


def test_sft_with_sapo_records_the_tasks_own_p_tilde(model_dir, tmp_path):
    """SAPO replaces the training/test prompt; metrics keep the task's p~ so the report's 'differ from p~' is
    measured against the task's prompt, not against SAPO's pick."""
    from metatuner.methods import sft

    out = tmp_path / "sft_sapo"
    cfg = make_cfg(model_dir, out, "method=sft", "prompt_selection=sapo", "sapo.candidates=0", "sapo.subset=2")
    original = start_run(make_cfg(model_dir, tmp_path / "probe", "method=sft")).prompt
    m = sft.run(cfg)
    assert m["p_tilde"] == original and m["prompt"] in [original, *CANDS]
    preds = [json.loads(ln) for ln in (out / "predictions.jsonl").read_text().splitlines()]
    assert {p["prompt"] for p in preds} == {m["prompt"]}


# ----------------------------------------------------------------------------- generator.pool_loss=listwise


def test_listwise_loss_is_minus_log_pool_mass_on_right_candidates_and_trains_the_choice(model_dir, tmp_path):
    """The listwise regulariser equals -log sum_{right} softmax(scores / T), averaged over the queries with a
    target (None skipped); it reaches the live decoder only (phi_p' moves at a sync), and a few steps make a
    right candidate the argmax and push the wrong ones below it."""
    from metatuner.methods.metatuner.rollouts import choose, pool_choice_loss, pool_scores

    cfg = make_cfg(model_dir, tmp_path / "lw", "method=metatuner_j", "generator.prompt_space=pool",
                   "generator.pool_loss=listwise", "rollout.criterion=answer", "train.bf16=false",
                   "generator.pool_temperature=0.5", "generator.pool_score=likelihood", "warmup.generator_steps=0")
    system, loop, _ = M.prepare(cfg, start_run(cfg))
    exs = system.task.train[:4]
    cands = [list(system.pool)] * len(exs)
    targets = [[1, 2], None, [2], [0, 2]]
    with torch.no_grad():
        s = pool_scores(system, exs, cands, frozen=False) / 0.5
        p = torch.softmax(s, -1)
        want = -(torch.log(p[0, 1] + p[0, 2]) + torch.log(p[2, 2]) + torch.log(p[3, 0] + p[3, 2])) / 3
    got = pool_choice_loss(system, exs, targets)
    assert got.item() == pytest.approx(want.item(), rel=1e-4)
    _, reg = system.joint_losses(exs, [system.p_tilde] * 4, targets, need_task=False)
    assert reg.item() == pytest.approx(want.item(), rel=1e-4)
    assert pool_choice_loss(system, exs, [None] * 4).item() == 0.0
    # gradients: the live decoder's LoRA, never phi_p' (a buffer) nor F
    system.gen.model.zero_grad()
    reg.backward()
    grads = [q.grad for q in system.gen.decoder_parameters() if q.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(q.grad is None for q in system.decoder.parameters())
    frozen_before = {k: v.clone() for k, v in system.gen.frozen_state().items()}
    opt = torch.optim.Adam(system.generator_parameters(), lr=5e-3)
    right = [[2], [2], [2], [2]]
    for _ in range(15):
        _, reg = system.joint_losses(exs, [system.p_tilde] * 4, right, need_task=False)
        opt.zero_grad()
        reg.backward()
        opt.step()
    after = pool_scores(system, exs, cands, frozen=False)
    assert (after[:, 2] > after[:, 0]).all() and (after[:, 2] > after[:, 1]).all()
    assert choose(system, exs, cands, frozen=False, sample=False) == [system.pool[2]] * 4
    assert all(torch.equal(v, frozen_before[k]) for k, v in system.gen.frozen_state().items())


def test_the_listwise_decoder_learns_a_different_candidate_per_query(model_dir, tmp_path):
    """The choice is per query, not one prompt for all: with targets that differ by query (two queries want
    candidate 1, two want candidate 2), listwise steps make each query's own target its argmax (the gain score
    starts uniform, so the query is all that separates them). Before that they all share one argmax."""
    from metatuner.methods.metatuner.rollouts import choose

    cfg = make_cfg(model_dir, tmp_path / "pq", "method=metatuner_j", "generator.prompt_space=pool",
                   "generator.pool_loss=listwise", "rollout.criterion=answer", "train.bf16=false",
                   "generator.pool_temperature=0.5", "warmup.generator_steps=0")
    system, loop, _ = M.prepare(cfg, start_run(cfg))
    exs = system.task.train[:4]
    pool = list(system.pool)
    want = [1, 1, 2, 2]
    opt = torch.optim.Adam(system.generator_parameters(), lr=3e-2)
    for step in range(60):
        _, reg = system.joint_losses(exs, [system.p_tilde] * 4, [[i] for i in want], need_task=False)
        opt.zero_grad()
        reg.backward()
        opt.step()
        if step == 0:
            assert len(set(choose(system, exs, [pool] * 4, frozen=False, sample=False))) == 1
    assert choose(system, exs, [pool] * 4, frozen=False, sample=False) == [pool[i] for i in want]


def test_listwise_d2_holds_the_right_pool_indices_of_decisive_queries(model_dir, tmp_path, monkeypatch):
    import metatuner.prompts as P
    from metatuner.methods.metatuner.rollouts import d2_rollout

    cfg = make_cfg(model_dir, tmp_path / "d2", "method=metatuner_j", "generator.prompt_space=pool",
                   "generator.pool_loss=listwise", "rollout.criterion=answer")
    system, loop, _ = M.prepare(cfg, start_run(cfg))
    pool = list(system.pool)
    right = [[False, True, True], [False, False, False], [True, True, True], [True, False, False]]

    def fake(model, tok, task, examples, candidates, *a, **k):
        assert all(c == pool for c in candidates)  # every query is scored on the whole pool
        return [[(p, ok, 1.0) for p, ok in zip(c, r)] for c, r in zip(candidates, right)]

    monkeypatch.setattr(P, "prompt_outcomes", fake)
    targets, task_prompts, stats = d2_rollout(system, system.task.train[:4])
    assert targets == [[1, 2], None, None, [0]]
    assert all(p in pool for p in task_prompts)
    assert stats["d2_targets"] == 0.5 and stats["d2_pool_counts"] == [1, 1, 1]


def test_listwise_needs_the_pool_and_answers(model_dir, tmp_path):
    for extra in (["generator.prompt_space=mixed", "rollout.criterion=answer"],
                  ["generator.prompt_space=pool", "rollout.criterion=nll"]):
        with pytest.raises(MetatunerError, match="generator.pool_loss = 'listwise': expected best unless"):
            start_run(make_cfg(model_dir, tmp_path / "bad", "method=metatuner_j", "generator.pool_loss=listwise", *extra))


def test_listwise_trains_end_to_end(model_dir, tmp_path, monkeypatch):
    """The real loop (G's warm-up, D2 windows, joint steps, test) with listwise targets: the random actor
    answers nothing right, so its outcomes are replaced by 'only candidate 2 is right'; every D2 target is
    then [2], the regulariser is positive on every joint step, and the live decoder's scores move toward
    candidate 2 (gain scores start at 0 for every candidate)."""
    import metatuner.prompts as P

    def fake(model, tok, task, examples, candidates, *a, **k):
        return [[(p, j == 2, 1.0) for j, p in enumerate(c)] for c in candidates]

    monkeypatch.setattr(P, "prompt_outcomes", fake)
    out = tmp_path / "lw_run"
    cfg = make_cfg(model_dir, out, "method=metatuner_j", "generator.prompt_space=pool", "generator.pool_loss=listwise",
                   "rollout.criterion=answer", "train.max_steps=4", "train.bf16=false")
    M.run(cfg)
    pool = json.loads((out / "final" / "pool.json").read_text())["pool"]
    d2 = [json.loads(ln) for ln in (out / "final" / "d2.jsonl").read_text().splitlines()]
    assert d2 and all(r["right_pool_indices"] == [2] for r in d2)
    rows = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]
    joint = [r for r in rows if r["stage"] == "joint"]
    assert len(joint) == 4 and all(r["reg"] > 0 for r in joint)
    assert any(r["stage"] == "warmup_generator" for r in rows)
    preds = [json.loads(ln) for ln in (out / "predictions.jsonl").read_text().splitlines()]
    assert all(r["prompt"] in pool for r in preds)
    from metatuner.methods.metatuner.rollouts import pool_scores

    from metatuner.tasks import Example

    system = M.load_system(out)
    exs = [Example(query=r["query"], answer="", target="") for r in preds]
    scores = pool_scores(system, exs, [pool] * len(exs), frozen=False)
    assert (scores[:, 2] > scores[:, 0]).all() and (scores[:, 2] > scores[:, 1]).all()
