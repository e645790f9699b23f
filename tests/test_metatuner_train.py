"""The MetaTuner training recipe end to end on a tiny random Llama (a few steps each).

Every variant runs and writes its outputs; each trains what it should and nothing else; D2 never
holds a prompt worse than p~; an interrupted run resumes to the same parameters; NaN stops with a
clear message; `metatuner infer` answers; two CPU processes match one process with twice the batch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from metatuner.config import load_config
from metatuner.errors import MetatunerError
from metatuner.generator import SplitGenerator
from metatuner.lora import decoder_layers
from metatuner.methods import metatuner as M
from metatuner.run import start_run
from metatuner.training import actor_batch, forward_nll, newest_checkpoint

SMALL = ["task.name=chain_sum", "task.train_size=16", "task.test_size=4", "eval.limit=2", "eval.batch_size=2",
         "train.batch_size=2", "train.max_steps=5", "warmup.max_steps=1", "warmup.generator_steps=1",
         "warmup.queries=4", "rollout.n=2", "rollout.batch_size=8", "train.sync_steps=2",
         "generator.max_prompt_tokens=6", "task.max_new_tokens=4", "rollout.criterion=nll", "lora.rank=2",
         "hypernet.hidden=16", "hypernet.embed_dim=8", "generator.lora_rank=4", "train.generator_lr=1e-3"]

VARIANTS = {
    "metatuner_j": ["method=metatuner_j"],
    "metatuner_i": ["method=metatuner_i"],
    "metatuner_gumbel": ["method=metatuner_gumbel"],
    "wo_F": ["method=metatuner_j", "train.param_decoder=false"],
    "wo_P": ["method=metatuner_j", "train.prompt_rewrite=false"],
    "wo_S": ["method=metatuner_j", "generator.share_encoder=false"],
    "share_0.75": ["method=metatuner_j", "generator.share_ratio=0.75"],
    "full_G": ["method=metatuner_j", "generator.lora_rank=0", "train.generator_lr=1e-4"],
}

FINAL_FILES = ["generator.safetensors", "hypernet.json", "actor_adapter/adapter_config.json", "d2.jsonl"]
RUN_FILES = ["config.yaml", "metrics.json", "predictions.jsonl", "train_log.jsonl"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """One tiny random Llama + char tokenizer directory for the whole module."""
    from metatuner.testing import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("mt_tiny") / "model")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    """The actor warm-up cache of these tests lives in a temporary folder, shared by the module."""
    monkeypatch.setenv("METATUNER_CACHE", str(tmp_path_factory.getbasetemp() / "mt_cache"))


@pytest.fixture(scope="module")
def finished_runs() -> dict:
    """Output dirs of the variant runs, by variant name (the infer test reuses metatuner_j's)."""
    return {}


def make_cfg(model_dir: Path, out: Path, *overrides: str):
    return load_config(None, [f"model.name={model_dir}", f"output_dir={out}", *SMALL, *overrides])


# ----------------------------------------------------------------------------- state snapshots


def snap(module_or_params) -> dict[str, torch.Tensor]:
    items = module_or_params.state_dict().items() if isinstance(module_or_params, nn.Module) else module_or_params
    return {k: v.detach().clone() for k, v in items}


def live_phi_p(gen: SplitGenerator) -> dict[str, torch.Tensor]:
    """The trainable tensors of phi_p of the live G, by the names phi_p' uses."""
    return {k: v.detach().clone() for k, v in gen.live_decoder_state().items()}


def frozen_snap(gen: SplitGenerator) -> dict[str, torch.Tensor]:
    """phi_p' (only what trains in phi_p: G's LoRA factors of layers [k, K))."""
    return {k: v.detach().clone() for k, v in gen.frozen_state().items()}


def gen_trainable(system) -> dict[str, torch.Tensor]:
    return snap([(n, p) for n, p in system.gen.model.named_parameters() if p.requires_grad])


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def changed_keys(a: dict, b: dict) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


# ----------------------------------------------------------------------------- 1 + 2: variants


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_runs_and_trains_only_its_parameters(variant, model_dir, tmp_path, monkeypatch, finished_runs):
    out = tmp_path / variant
    cfg = make_cfg(model_dir, out, *VARIANTS[variant])
    seen: dict = {"syncs": []}

    real_run, real_sync = M.JointLoop.run, SplitGenerator.sync_frozen

    def run(loop):
        s = loop.system
        seen["before"] = {"actor": snap(s.actor), "decoder": snap(s.decoder), "gen": gen_trainable(s),
                          "frozen": frozen_snap(s.gen),
                          "param_encoder": snap(s.gen.param_encoder) if s.gen.param_encoder is not None else {}}
        seen["system"] = s
        seen["joint"] = True
        history = real_run(loop)
        seen["history"] = history
        seen["after"] = {"actor": snap(s.actor), "decoder": snap(s.decoder), "gen": gen_trainable(s),
                         "frozen": frozen_snap(s.gen), "live_phi_p": live_phi_p(s.gen),
                         "param_encoder": snap(s.gen.param_encoder) if s.gen.param_encoder is not None else {}}
        return history

    def sync(gen):
        before = frozen_snap(gen)
        real_sync(gen)
        if seen.get("joint"):  # the warm-up ends with a sync too
            seen["syncs"].append((before, frozen_snap(gen), live_phi_p(gen)))

    monkeypatch.setattr(M.JointLoop, "run", run)
    monkeypatch.setattr(SplitGenerator, "sync_frozen", sync)
    metrics = M.run(cfg)

    # 1. outputs and finite losses
    for f in RUN_FILES:
        assert (out / f).is_file(), f
    for f in FINAL_FILES:
        assert (out / "final" / f).is_file(), f
    assert metrics["method"] == cfg.method and metrics["n"] == 2
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2
    rows = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]
    joint = [r for r in rows if r["stage"] == "joint"]
    assert [r["step"] for r in joint] == [1, 2, 3, 4]
    assert all(math.isfinite(r[k]) for r in joint for k in ("loss", "task_loss", "reg", "grad_norm"))
    assert len(seen["history"]) == 4
    d2 = [json.loads(ln) for ln in (out / "final" / "d2.jsonl").read_text().splitlines()]
    assert len(d2) == len({r["index"] for r in d2}) > 0

    # 2. what changed in the joint phase
    b, a = seen["before"], seen["after"]
    assert same(b["actor"], a["actor"]), "the warmed-up actor must not change in the joint phase"
    assert not any(p.requires_grad for p in seen["system"].actor.parameters())
    decoder_changed = not same(b["decoder"], a["decoder"])
    assert decoder_changed == (variant != "wo_F"), "phi_q trains iff the parameter decoder is used"
    assert changed_keys(b["gen"], a["gen"]), "G's LoRA parameters (phi_s, phi_p) must train"
    if variant == "full_G":  # generator.lora_rank=0: all of G trains, phi_p' copies its upper layers
        assert not any("lora_" in k for k in b["gen"]) and any("lm_head" in k or "norm" in k for k in b["frozen"])
    else:
        assert all("lora_" in k for k in b["gen"]), "with generator.lora_rank > 0 only LoRA factors of G train"
    if variant == "wo_S":
        assert changed_keys(b["param_encoder"], a["param_encoder"]), "F's own encoder copy must train (w/o S)"
    # phi_p' changes only at a sync, and a sync copies phi_p exactly: syncs at steps 0 and 2
    syncs = seen["syncs"]
    assert len(syncs) == 2
    assert same(syncs[0][0], b["frozen"])
    for (_, after_i, live_i), (before_next, _, _) in zip(syncs, syncs[1:]):
        assert same(after_i, live_i)
        assert same(before_next, after_i), "phi_p' changed between syncs"
    assert same(syncs[-1][1], syncs[-1][2]) and same(a["frozen"], syncs[-1][1])
    if variant == "wo_P":  # no prompt branch: phi_p never trains, phi_s trains only through F
        assert same(a["frozen"], a["live_phi_p"]) and same(b["frozen"], a["live_phi_p"])
        k = seen["system"].gen.k
        assert all(int(key.split(".")[2]) < k for key in changed_keys(b["gen"], a["gen"]))
        preds = [json.loads(ln) for ln in (out / "predictions.jsonl").read_text().splitlines()]
        assert {r["prompt"] for r in preds} == {seen["system"].p_tilde}, "w/o P: the actor sees p~ at test"
        assert all(r["reg"] == 0 for r in joint)
    else:
        assert not same(a["frozen"], a["live_phi_p"]), "phi_p trains after the last sync, phi_p' must not follow"
    if variant in ("metatuner_j", "wo_S", "share_0.75"):
        assert all(r["loss"] == pytest.approx(r["task_loss"] + cfg.train.alpha * r["reg"], rel=1e-5) for r in joint)
    finished_runs[variant] = out


def test_frozen_copy_keeps_its_warmup_value_without_sync(model_dir, tmp_path):
    cfg = make_cfg(model_dir, tmp_path / "nosync", "method=metatuner_j", "train.sync_steps=10", "train.max_steps=3",
                   "warmup.max_steps=0")
    task = start_run(cfg)
    system, loop, _ = M.prepare(cfg, task)
    frozen0, live0 = frozen_snap(system.gen), live_phi_p(system.gen)
    assert same(frozen0, live0), "the warm-up ends with phi_p' <- phi_p"
    loop.run()
    assert same(frozen_snap(system.gen), frozen0)
    assert not same(live_phi_p(system.gen), live0)


def test_grad_accum_matches_one_batch(model_dir, tmp_path):
    results = []
    for accum in (1, 2):
        cfg = make_cfg(model_dir, tmp_path / f"acc{accum}", "method=metatuner_j", "warmup.max_steps=0",
                       "train.bf16=false", "train.max_steps=2", "train.batch_size=4", f"train.grad_accum={accum}")
        system, loop, _ = M.prepare(cfg, start_run(cfg))
        history = loop.run()
        results.append((snap(system.decoder), gen_trainable(system), history))
    (d1, g1, h1), (d2, g2, h2) = results
    for a, b in ((d1, d2), (g1, g2)):
        # Adam divides by sqrt(v): near-zero gradients summed in another order move a weight by up to ~1e-4
        bad = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.allclose(a[k], b[k], atol=3e-4, rtol=1e-4)}
        assert not bad, sorted(bad.items(), key=lambda kv: -kv[1])[:5]
    assert [h["loss"] for h in h1] == pytest.approx([h["loss"] for h in h2], abs=1e-4)
    with pytest.raises(MetatunerError, match="train.grad_accum = 3: expected a divisor of train.batch_size"):
        cfg = make_cfg(model_dir, tmp_path / "acc3", "warmup.max_steps=0", "warmup.generator_steps=0",
                       "method=metatuner_j", "train.batch_size=4", "train.grad_accum=3")
        M.prepare(cfg, start_run(cfg))


def test_fresh_run_removes_checkpoints_of_an_earlier_run(model_dir, tmp_path):
    from metatuner.training import write_checkpoint

    out = tmp_path / "again"
    write_checkpoint(out, 7, lambda tmp: None)
    fresh = ["method=metatuner_j", "warmup.max_steps=0", "warmup.generator_steps=0"]
    cfg = make_cfg(model_dir, out, *fresh, "resume_from_checkpoint=true")
    with pytest.raises(MetatunerError, match="step_7 lacks trainer_state.json"):  # resuming does use it
        M.prepare(cfg, start_run(cfg))
    cfg = make_cfg(model_dir, out, *fresh)
    M.prepare(cfg, start_run(cfg))
    assert newest_checkpoint(out) is None


# ----------------------------------------------------------------------------- 3: D2 criterion


@pytest.fixture(scope="module")
def scoring_system(model_dir, tmp_path_factory):
    """A built system without warm-up, with F perturbed so the generated LoRA is not zero."""
    out = tmp_path_factory.mktemp("score")
    cfg = make_cfg(model_dir, out, "method=metatuner_j", "warmup.max_steps=0", "warmup.generator_steps=0",
                   "train.bf16=false", "rollout.n=4")
    task = start_run(cfg)
    system, _, _ = M.prepare(cfg, task)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in system.decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return system


def nll_of(system, ex, prompt: str) -> float:
    with torch.no_grad():
        f = system.factors([ex])
        with system.lora.use_factors(f):
            batch = actor_batch(system.tok, system.task, [prompt], [ex], 512, system.actor.device)
            return forward_nll(system.actor, batch)[0].item()


def test_d2_best_is_never_worse_than_p_tilde(scoring_system):
    system = scoring_system
    exs = system.task.train[:4]
    torch.manual_seed(1)
    cands = M.sample_prompts(system, exs, 4)
    alone = M.score_candidates(system, exs, [[] for _ in exs])  # p~ only
    best = M.score_candidates(system, exs, cands)
    for (p0, c0, n0, d0), (p, c, n, d), cs in zip(alone, best, cands):
        assert d0 and d  # rollout.targets=all: every query has a target
        assert p0 == system.p_tilde
        assert p in cs or p == system.p_tilde
        assert (not c, n) <= (not c0, n0 + 1e-5)
    prompts, task_prompts, stats = M.d2_rollout(system, exs)
    assert len(prompts) == len(task_prompts) == 4 and 0 <= stats["d2_rewritten"] <= 1


def test_d2_picks_the_strictly_lower_nll_candidate(scoring_system):
    system = scoring_system
    pool = ["Be brief.", "Add the numbers.", "x", "Think step by step, then answer.", "Reply with one number.",
            "Sum it.", "What is the total?", "Compute carefully and give the result."]
    for ex in system.task.train:  # a query for which the (random) actor ranks candidates on both sides of p~
        base = nll_of(system, ex, system.p_tilde)
        nlls = {c: nll_of(system, ex, c) for c in pool}
        lower = sorted((n, c) for c, n in nlls.items() if n < base - 1e-4)
        higher = sorted((n, c) for c, n in nlls.items() if n > base + 1e-4)
        if lower and higher:
            break
    assert lower and higher, "the pool should hold candidates on both sides of p~"
    best_c = lower[0][1]
    got, correct, nll, _ = M.score_candidates(system, [ex], [[higher[-1][1], best_c] + [c for _, c in lower[1:]]])[0]
    assert got == best_c and not correct and nll == pytest.approx(nlls[best_c], abs=1e-5)
    # nothing better than p~: p~ stays
    got, _, nll, _ = M.score_candidates(system, [ex], [[c for _, c in higher]])[0]
    assert got == system.p_tilde and nll == pytest.approx(base, abs=1e-5)


def test_d2_ranks_correct_answers_before_nll(scoring_system, monkeypatch):
    system = scoring_system
    ex = system.task.train[1]
    magic = ["MAGIC now.", "MAGIC: do the sum, then check it twice."]
    worst_magic = max(magic, key=lambda c: nll_of(system, ex, c))
    plain = min(["Be brief.", "Add the numbers.", "Sum it."], key=lambda c: nll_of(system, ex, c))
    assert nll_of(system, ex, worst_magic) > nll_of(system, ex, plain)

    def fake_generate(model, tok, texts, max_new_tokens, **kw):  # "correct" iff the prompt holds MAGIC
        gens = [["RIGHT" if "MAGIC" in t else "WRONG"] for t in texts]
        return gens, [[1]] * len(texts)

    import metatuner.prompts

    real = metatuner.prompts.greedy_with_nll

    def fake_with_nll(model, tok, prefixes, comps, n, *a, **k):  # the real NLL, the fake answers
        _, ntok, nll = real(model, tok, prefixes, comps, n, *a, **k)
        return fake_generate(model, tok, prefixes, n)[0], ntok, nll

    monkeypatch.setattr(metatuner.prompts, "greedy_texts", fake_generate)  # D2 scoring goes through prompt_outcomes
    monkeypatch.setattr(metatuner.prompts, "greedy_with_nll", fake_with_nll)
    monkeypatch.setattr(system.cfg.rollout, "criterion", "answer")
    monkeypatch.setattr(system.task, "extract", lambda g: g)
    monkeypatch.setattr(system.task, "score_fn", lambda pred, e: {"correct": pred == "RIGHT"})
    got, correct, _, _ = M.score_candidates(system, [ex], [[plain, worst_magic]])[0]
    assert got == worst_magic and correct
    # rollout.targets=decisive: a target only where the candidates disagree on correctness
    monkeypatch.setattr(system.cfg.rollout, "targets", "decisive")
    exs = system.task.train[:3]
    got = M.score_candidates(system, exs, [[plain, worst_magic], [plain], ["MAGIC now."]])
    assert [g[3] for g in got] == [True, False, True]  # p~ is wrong everywhere: the third one is split too
    import metatuner.methods.metatuner.rollouts as R

    monkeypatch.setattr(R, "sample_prompts", lambda system, exs, n, live=False: [[plain, worst_magic], [plain], ["Sum it."]])
    best, task_prompts, stats = M.d2_rollout(system, exs)
    assert best == [worst_magic, None, None] and len(task_prompts) == 3
    assert stats["d2_targets"] == pytest.approx(1 / 3) and stats["d2_correct"] == pytest.approx(1 / 3)


def test_queries_without_a_target_leave_the_regulariser(scoring_system):
    """rollout.targets=decisive: a None best prompt drops its row from the regulariser's mean."""
    system = scoring_system
    exs = system.task.train[:2]
    with torch.no_grad():
        _, both = system.joint_losses(exs, [system.p_tilde] * 2, ["Add the numbers.", None], need_task=False)
        _, alone = system.joint_losses(exs[:1], [system.p_tilde], ["Add the numbers."], need_task=False)
        _, other = system.joint_losses(exs, [system.p_tilde] * 2, ["Add the numbers.", "Sum it."], need_task=False)
    assert both.item() == pytest.approx(alone.item(), rel=1e-5) and other.item() != pytest.approx(alone.item(), rel=1e-5)
    system.gen.model.zero_grad(set_to_none=True)
    _, none = system.joint_losses(exs, [system.p_tilde] * 2, [None, None], need_task=False)
    assert none.item() == 0.0
    none.backward()
    assert all(p.grad is None or not p.grad.abs().any() for p in system.generator_parameters())


# ----------------------------------------------------------------------------- 4: resume


class Killed(Exception):
    pass


def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(model_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    # sync_steps=3: the checkpoint at step 2 falls inside a D2 window, so the window must be restored too
    args = ["method=metatuner_j", "train.save_steps=2", "train.sync_steps=3"]
    full, part = tmp_path / "full", tmp_path / "part"
    cfg = make_cfg(model_dir, full, *args)
    M.train(cfg, start_run(cfg))

    real_save = M.JointLoop.save_checkpoint

    def save_then_die(loop):
        path = real_save(loop)
        (path.parent / ".step_3.half").mkdir()  # what a kill during the next save would leave
        raise Killed(loop.state["step"])

    monkeypatch.setattr(M.JointLoop, "save_checkpoint", save_then_die)
    cfg = make_cfg(model_dir, part, *args)
    with pytest.raises(Killed):
        M.train(cfg, start_run(cfg))
    monkeypatch.undo()
    assert not (part / "final").exists() and newest_checkpoint(part) == part / "step_2"

    cfg = make_cfg(model_dir, part, *args, "resume_from_checkpoint=true")
    M.train(cfg, start_run(cfg))
    a, b = load_file(full / "final" / "generator.safetensors"), load_file(part / "final" / "generator.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    assert (full / "final" / "d2.jsonl").read_text() == (part / "final" / "d2.jsonl").read_text()
    rows = [json.loads(ln) for ln in (part / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["stage"] == "joint"] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if r["stage"] == "rollout"] == [0, 3]


def test_a_run_killed_during_its_test_evaluation_is_evaluated_again_without_training(model_dir, tmp_path,
                                                                                    monkeypatch):
    """final/ complete (training done) but no metrics.json: `compare` relaunches with
    resume_from_checkpoint=auto, which must evaluate final/ (same answers, same training stats) instead of
    training again; other settings, or resume off, train."""
    out = tmp_path / "killed_in_eval"
    first = M.run(make_cfg(model_dir, out, "method=metatuner_j"))
    preds = (out / "predictions.jsonl").read_text()
    (out / "metrics.json").unlink()
    (out / "predictions.jsonl").unlink()

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(M.recipe, "train", no_training)
    second = M.run(make_cfg(model_dir, out, "method=metatuner_j", "resume_from_checkpoint=auto"))
    assert (out / "predictions.jsonl").read_text() == preds
    for k in ("accuracy", "train_steps", "train_examples", "train_tokens", "generation_calls", "d2_targets"):
        assert second[k] == first[k], k
    for overrides in (["resume_from_checkpoint=auto", "train.generator_lr=2e-3"], ["resume_from_checkpoint=false"]):
        with pytest.raises(AssertionError, match="trained again"):
            M.run(make_cfg(model_dir, out, "method=metatuner_j", *overrides))


def test_a_sapo_run_killed_during_its_test_evaluation_is_evaluated_with_sapos_prompt(model_dir, tmp_path,
                                                                                     monkeypatch):
    """With prompt_selection=sapo final/config.yaml records SAPO's p~, not the one asked for: the run is still
    recognised as finished and evaluated with SAPO's p~ (as the run itself was), without training."""
    from metatuner import sapo

    monkeypatch.setattr(sapo, "prompt_losses", lambda model, tok, task, exs, cands, *a, **k:
                        [float(len(cands) - i) for i in range(len(cands))])  # the last candidate wins
    out = tmp_path / "sapo_killed"
    args = ("method=metatuner_j", "prompt_selection=sapo", "sapo.candidates=0", "sapo.prompts=[Add them all.]")
    first = M.run(make_cfg(model_dir, out, *args))
    assert first["p_tilde"] == "Add them all."
    preds = (out / "predictions.jsonl").read_text()
    (out / "metrics.json").unlink()
    (out / "predictions.jsonl").unlink()

    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(M.recipe, "train", no_training)
    second = M.run(make_cfg(model_dir, out, *args, "resume_from_checkpoint=auto"))
    assert (out / "predictions.jsonl").read_text() == preds and second["p_tilde"] == "Add them all."
    assert second["accuracy"] == first["accuracy"]
    with pytest.raises(AssertionError, match="trained again"):  # another p~ asked for: SAPO started elsewhere
        M.run(make_cfg(model_dir, out, *args, "resume_from_checkpoint=auto", "task.prompt=Sum the list."))


# ----------------------------------------------------------------------------- 5: NaN


def test_nan_loss_stops_naming_step_and_checkpoint(model_dir, tmp_path, monkeypatch):
    real = M.JointLoop.losses

    def losses(loop, step, *micro):
        loss, task, reg = real(loop, step, *micro)
        return (loss * float("nan"), task, reg) if step == 2 else (loss, task, reg)

    monkeypatch.setattr(M.JointLoop, "losses", losses)
    out = tmp_path / "nan"
    cfg = make_cfg(model_dir, out, "method=metatuner_j", "train.save_steps=2", "warmup.max_steps=0")
    with pytest.raises(MetatunerError, match=r"loss became nan at step 3: .*last good checkpoint is .*step_2"):
        M.train(cfg, start_run(cfg))
    assert newest_checkpoint(out) == out / "step_2" and not (out / "final").exists()


def test_diverging_learning_rate_stops_with_a_clear_error(model_dir, tmp_path):
    cfg = make_cfg(model_dir, tmp_path / "lr", "method=metatuner_j", "warmup.max_steps=0", "hypernet.lr=1e30",
                   "train.generator_lr=1e30")
    with pytest.raises(MetatunerError, match=r"became (nan|inf|-inf) at step [2-4]: stopping; no checkpoint"):
        M.train(cfg, start_run(cfg))


# ----------------------------------------------------------------------------- 6: infer


def test_infer_prints_prompt_and_answer(model_dir, tmp_path, capsys, finished_runs):
    from metatuner.cli import main

    run_dir = finished_runs.get("metatuner_j")
    if run_dir is None:
        run_dir = tmp_path / "run"
        M.run(make_cfg(model_dir, run_dir, "method=metatuner_j"))
    capsys.readouterr()
    assert main(["infer", f"run_dir={run_dir}", "query=What is 2 + 3?"]) == 0
    text = capsys.readouterr().out
    assert text.count("query:  What is 2 + 3?") == 1 and "prompt: " in text and "answer: " in text

    qf = tmp_path / "queries.txt"
    qf.write_text("What is 1 + 1?\n\nWhat is 4 + 5?\n")
    assert main(["infer", f"run_dir={run_dir}", f"query_file={qf}"]) == 0
    text = capsys.readouterr().out
    assert text.count("query: ") == 2 and text.count("answer: ") == 2 and "What is 4 + 5?" in text

    exp = tmp_path / "exported"
    assert main(["export", f"run_dir={run_dir}", "query=What is 2 + 3?", f"export_dir={exp}"]) == 0
    assert "prompt for this query: " in capsys.readouterr().out
    assert (exp / "adapter_config.json").is_file() and (exp / "adapter_model.safetensors").is_file()
    assert main(["export", f"run_dir={run_dir}", "query=x"]) == 2
    assert "export needs" in capsys.readouterr().err

    assert main(["infer", f"run_dir={tmp_path / 'nothing'}", "query=x"]) == 2
    assert "not a folder" in capsys.readouterr().err  # infer.run_config: run_dir must be a run folder


# ----------------------------------------------------------------------------- 7: two processes


def _cli_train(model_dir: Path, out: Path, nproc: int, batch_size: int, extra=(), env=None) -> subprocess.CompletedProcess:
    venv_bin = Path(sys.executable).parent
    args = [f"model.name={model_dir}", f"output_dir={out}", *SMALL, "method=metatuner_i",
            "train.prompt_rewrite=false", "rollout.n=0", "train.bf16=false", f"train.batch_size={batch_size}",
            "train.save_steps=2", *extra]
    if nproc == 1:
        cmd = [sys.executable, "-m", "metatuner.cli", "train", *args]
    else:
        cmd = [str(venv_bin / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "-m", "metatuner.cli",
               "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_two_processes_match_one_process_with_twice_the_batch(model_dir, tmp_path):
    """MetaTuner-I: its phases leave some parameters without a gradient, which must stay untouched
    on every process (a zero gradient would still move them through Adam's momentum). The actor
    warm-up (TRL) runs distributed too."""
    from safetensors.torch import load_file

    one, two = tmp_path / "one", tmp_path / "two"
    r1 = _cli_train(model_dir, one, 1, 4)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = _cli_train(model_dir, two, 2, 2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert r2.stdout.count("wrote ") == 1  # only rank 0 reports

    a, b = load_file(one / "final" / "generator.safetensors"), load_file(two / "final" / "generator.safetensors")
    assert a.keys() == b.keys()
    hyper = [k for k in a if k.startswith("hypernet.")]
    assert hyper
    start = load_file(two / "warmup" / "generator" / "generator.safetensors")
    assert any(not torch.equal(start[k], b[k]) for k in hyper), "the decoder did not train"
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-3), k

    # only rank 0 wrote: one log row per step, every process's D2 in final/, per-process checkpoint state
    rows = [json.loads(ln) for ln in (two / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["stage"] == "joint"] == [1, 2, 3, 4]
    d2_one = (one / "final" / "d2.jsonl").read_text()
    assert (two / "final" / "d2.jsonl").read_text() == d2_one and len(d2_one.splitlines()) > 8
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in (two / "step_2").iterdir()}
    assert not list(two.glob(".*rank*")), "temporary per-process files left behind"
    assert len((two / "predictions.jsonl").read_text().splitlines()) == 2
    adapter = "final/actor_adapter/adapter_model.safetensors"
    wa, wb = load_file(one / adapter), load_file(two / adapter)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa), "distributed actor warm-up differs"


def test_two_processes_build_a_pool_with_opro_members_together(model_dir, tmp_path):
    """A pool with OPRO's instructions: OPRO scores them with an evaluation split over the processes, so
    every process builds the pool (a main-process-only build waited forever for the others); the pool is the
    one a single process builds."""
    extra = ["method=metatuner_j", "generator.prompt_space=pool", "prompts.opro=1", "opro.steps=1",
             "opro.candidates=2", "opro.subset=4", "train.max_steps=3", "generator.max_prompt_tokens=8"]
    pools = []
    for nproc, bs in ((1, 4), (2, 2)):
        out = tmp_path / f"p{nproc}"
        r = _cli_train(model_dir, out, nproc, bs, extra, env={"METATUNER_CACHE": str(tmp_path / f"cache{nproc}")})
        assert r.returncode == 0, r.stderr[-3000:]
        pools.append(json.loads((out / "pool.json").read_text())["pool"])
        assert list((tmp_path / f"cache{nproc}" / "pools").glob("*.json")), "OPRO did not run"
    assert pools[0] == pools[1] and len(pools[0]) >= 1


def test_a_sharded_joint_phase_trains_as_ddp_and_resumes_exactly(model_dir, tmp_path):
    """An FSDP launch (ACCELERATE_USE_FSDP=true, as `accelerate launch --config_file configs/accelerate/fsdp.yaml`
    sets it; here on CPU under torchrun) shards G with FSDP2 (`metatuner.sharding`) and trains as DDP does: the
    same D2, the same trained tensors up to float rounding, the same test answers; its checkpoints hold whole
    tensors and the optimizer's whole state, and a run resumed from one ends where the uninterrupted run
    ended. A DDP launch refuses to resume a sharded checkpoint."""
    from safetensors.torch import load_file

    extra = ["method=metatuner_j", "train.prompt_rewrite=true", "rollout.n=2"]
    fsdp = {"ACCELERATE_USE_FSDP": "true"}
    ddp_out, fsdp_out, resumed = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "resumed"
    for out, env in ((ddp_out, {}), (fsdp_out, fsdp)):  # each its own cache: both train the actor's warm-up
        r = _cli_train(model_dir, out, 2, 2, extra, env={**env, "METATUNER_CACHE": str(tmp_path / f"cache_{out.name}")})
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(ddp_out / "final" / "generator.safetensors"), load_file(fsdp_out / "final" / "generator.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("frozen.") for k in a)
    assert all(a[k].shape == b[k].shape and torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    start = load_file(fsdp_out / "warmup" / "generator" / "generator.safetensors")
    assert any(not torch.equal(start[k], b[k]) for k in b if "lora_B" in k), "G did not train"
    assert (ddp_out / "final" / "d2.jsonl").read_text() == (fsdp_out / "final" / "d2.jsonl").read_text()
    assert (ddp_out / "predictions.jsonl").read_text() == (fsdp_out / "predictions.jsonl").read_text()
    ck = fsdp_out / "step_2"
    assert json.loads((ck / "trainer_state.json").read_text())["sharded"] is True
    assert (ck / "optimizer_full.pt").is_file() and (ck / "generator_adapter" / "adapter_model.safetensors").is_file()
    opt = torch.load(ck / "optimizer_full.pt", weights_only=True)
    assert len(opt["state"]) == sum(len(g["params"]) for g in opt["param_groups"]) > 0

    resumed.mkdir()
    shutil.copytree(ck, resumed / "step_2")
    r = _cli_train(model_dir, resumed, 2, 2, [*extra, "resume_from_checkpoint=true"], env=fsdp)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout + r.stderr
    c = load_file(resumed / "final" / "generator.safetensors")
    assert all(torch.equal(b[k], c[k]) for k in b), "the resumed sharded run ended elsewhere"

    other = tmp_path / "ddp_resume"
    other.mkdir()
    shutil.copytree(ck, other / "step_2")
    r = _cli_train(model_dir, other, 2, 2, [*extra, "resume_from_checkpoint=true"])
    assert r.returncode != 0 and "sharded (FSDP)" in r.stderr


# ----------------------------------------------------------------------------- 8: Gumbel vocabulary


def test_a_warm_up_read_from_the_cache_trains_the_same_system(model_dir, tmp_path, monkeypatch):
    """The actor's warm-up trains once and is then read from the cache; training consumes random numbers that
    reading does not, so the random state is set again after it: F's first weights, G's samples and the joint
    phase are the same whether the warm-up was trained or read."""
    from safetensors.torch import load_file

    monkeypatch.setenv("METATUNER_CACHE", str(tmp_path / "cache"))
    outs = []
    for name in ("trained", "cached"):
        cfg = make_cfg(model_dir, tmp_path / name, "method=metatuner_j", "train.bf16=false", "warmup.max_steps=2")
        M.train(cfg, start_run(cfg))
        outs.append(load_file(tmp_path / name / "final" / "generator.safetensors"))
    assert list((tmp_path / "cache" / "warmup").iterdir()), "the warm-up was not cached"
    a, b = outs
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "trained" / "final" / "d2.jsonl").read_text() == (tmp_path / "cached" / "final" / "d2.jsonl").read_text()


def test_deepspeed_launch_is_refused_before_any_training(model_dir, tmp_path, monkeypatch):
    """`accelerate launch` with a DeepSpeed config sets this; the joint phase runs on DDP or FSDP only."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    out = tmp_path / "sharded"
    cfg = make_cfg(model_dir, out, "method=metatuner_j")
    with pytest.raises(MetatunerError, match="the joint phase runs on DDP or FSDP, not DeepSpeed.*fsdp.yaml"):
        M.train(cfg, start_run(cfg))
    assert not (out / "warmup").exists(), "must refuse before the warm-up"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")  # what a DDP launch leaves: no refusal
    M.recipe.refuse_sharded_launch(cfg)


def test_fsdp_launch_refuses_what_the_sharded_joint_phase_does_not_do(model_dir, tmp_path, monkeypatch):
    """Under FSDP with several processes: one line naming every unsupported setting, before any training;
    the supported settings pass. One process under FSDP is refused (nothing to shard, and on GPUs accelerate
    would wrap the joint phase's module in FSDP itself); without FSDP nothing is refused."""
    from metatuner.sharding import check_settings, sharded_launch

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert sharded_launch()
    check_settings(make_cfg(model_dir, tmp_path / "ok", "method=metatuner_j", "generator.prompt_space=mixed"))
    bad = make_cfg(model_dir, tmp_path / "bad", "method=metatuner_gumbel", "generator.share_encoder=false",
                   "warmup.queries=5")
    with pytest.raises(MetatunerError) as err:
        check_settings(bad)
    msg = str(err.value)
    assert "\n" not in msg and "2 processes" in msg and "multi_gpu.yaml" in msg
    assert all(s in msg for s in ("metatuner_gumbel", "share_encoder=false", "warmup.queries=5"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not sharded_launch()
    with pytest.raises(MetatunerError, match="with one process: nothing to shard; launch it without the FSDP config"):
        check_settings(make_cfg(model_dir, tmp_path / "ok", "method=metatuner_j"))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    check_settings(bad)


def test_gumbel_refuses_generator_with_another_vocabulary(model_dir, tmp_path):
    from metatuner.testing import char_tokenizer, tiny_llama

    other = tmp_path / "other_vocab"
    tok = char_tokenizer()
    tok.add_tokens(["<extra>"])
    model = tiny_llama(vocab_size=len(tok))
    model.save_pretrained(other)
    tok.save_pretrained(other)
    out = tmp_path / "gumbel"
    cfg = make_cfg(model_dir, out, "method=metatuner_gumbel", f"generator.name={other}")
    with pytest.raises(MetatunerError, match="metatuner_gumbel needs the generator and actor to share one vocabulary"):
        M.train(cfg, start_run(cfg))
    assert not (out / "warmup").exists(), "must refuse before any training"


# ----------------------------------------------------------------------------- 9: what checkpoints hold


def test_checkpoints_and_final_hold_no_base_weights_and_export_a_query_adapter(model_dir, tmp_path):
    """step_N/ and final/ hold G's LoRA, phi_p', F and the resume state, never a base weight; G's adapter
    loads with PEFT; one query's generated LoRA exports as a PEFT adapter that reproduces the actor."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from metatuner.models import load_model

    out = tmp_path / "ck"
    cfg = make_cfg(model_dir, out, "method=metatuner_j", "train.save_steps=2", "train.bf16=false")
    system, _ = M.train(cfg, start_run(cfg))
    base_numel = sum(p.numel() for p in load_model(str(model_dir), "float32", "cpu")[0].parameters())
    for folder in (out / "step_2", out / "final"):
        t = load_file(folder / "generator.safetensors")
        assert all(k.split(".")[0] in ("generator", "frozen", "hypernet") for k in t), folder
        assert all("lora_" in k for k in t if not k.startswith("hypernet.")), folder
        assert sum(v.numel() for k, v in t.items() if not k.startswith("hypernet.")) < base_numel / 4
    assert {"optimizer.bin", "trainer_state.json", "COMPLETE", "generator_adapter"} <= {p.name for p in (out / "step_2").iterdir()}

    # G's adapter in PEFT format reproduces the live G
    gen_base, _ = load_model(str(model_dir), "float32", "cpu")
    peft_gen = PeftModel.from_pretrained(gen_base, str(out / "final" / "generator_adapter")).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(peft_gen(ids).logits, system.gen.model(ids).logits, atol=1e-5, rtol=1e-4)

    # one query's LoRA as a static PEFT adapter of the warmed-up actor
    ex = system.task.test[0]
    with torch.no_grad():
        for p in system.decoder.parameters():  # F as after more training: a visible LoRA
            p.add_(0.05 * torch.randn_like(p))
    path = M.export_query_adapter(system, ex.query, tmp_path / "q_adapter")
    batch = actor_batch(system.tok, system.task, [system.p_tilde], [ex], 512, "cpu")
    with torch.no_grad():
        with system.with_factors([ex]):
            want = system.actor(input_ids=batch["input_ids"]).logits
        plain = system.actor(input_ids=batch["input_ids"]).logits
        got = PeftModel.from_pretrained(system.actor, str(path))(input_ids=batch["input_ids"]).logits
    assert not torch.allclose(want, plain, atol=1e-4)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)


# ----------------------------------------------------------------------------- 10: variants do what their names say


def _step_changes(system, loop) -> dict[str, bool]:
    """Which parts move in one optimizer step: F, phi_s (G's trained tensors in layers < k), phi_p."""
    k = system.gen.k

    def parts():
        g = gen_trainable(system)
        return {"F": snap(system.decoder), "phi_s": {n: v for n, v in g.items() if ".layers." in n and int(n.split(".")[2]) < k},
                "phi_p": {n: v for n, v in g.items() if ".layers." in n and int(n.split(".")[2]) >= k}}

    before = parts()
    loop.step()
    after = parts()
    return {name: not same(before[name], after[name]) for name in before}


def test_metatuner_i_moves_the_right_parameters_on_each_kind_of_step(model_dir, tmp_path):
    cfg = make_cfg(model_dir, tmp_path / "i", "method=metatuner_i", "warmup.max_steps=0", "train.bf16=false",
                   "train.alternate_steps=1", "rollout.n=1")
    system, loop, _ = M.prepare(cfg, start_run(cfg))
    with torch.no_grad():  # as after some training: generated LoRA != 0, so the task loss reaches F's A side and phi_s
        for p in system.decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    system.gen.model.train()
    assert _step_changes(system, loop) == {"F": True, "phi_s": True, "phi_p": False}, "task step"
    assert _step_changes(system, loop) == {"F": False, "phi_s": True, "phi_p": True}, "regularization step"

    cfg = make_cfg(model_dir, tmp_path / "i_wo_f", "method=metatuner_i", "warmup.max_steps=0", "train.bf16=false",
                   "train.param_decoder=false", "rollout.n=1")
    system, loop, _ = M.prepare(cfg, start_run(cfg))
    system.gen.model.train()
    for _ in range(2):  # w/o F: every step is a regularization step that moves G
        ch = _step_changes(system, loop)
        assert ch["phi_s"] and ch["phi_p"] and not ch["F"]


def test_gumbel_task_loss_reaches_phi_p_and_stops_at_eos(model_dir, tmp_path, monkeypatch):
    cfg = make_cfg(model_dir, tmp_path / "g", "method=metatuner_gumbel", "warmup.max_steps=0", "train.bf16=false")
    system, loop, _ = M.prepare(cfg, start_run(cfg))
    exs = system.task.train[:2]
    loss = M.gumbel_task_loss(system, exs)
    loss.backward()
    grads = [p.grad for p in system.gen.decoder_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0

    # the relaxed prompt ends at G's EOS, as test-time prompts do: a generator that always says EOS gives
    # the same loss whatever generator.max_prompt_tokens is; one that never does, a longer prompt each time
    import torch.nn.functional as F_

    def constant(token):
        return lambda logits, tau, hard: F_.one_hot(torch.full(logits.shape[:1], token), logits.shape[-1]).float()

    def loss_with(token, max_tokens):
        monkeypatch.setattr(F_, "gumbel_softmax", constant(token))
        system.cfg.generator.max_prompt_tokens = max_tokens
        with torch.no_grad():
            return M.gumbel_task_loss(system, exs).item()

    eos, other = system.gen_tok.eos_token_id, 10
    assert loss_with(eos, 1) == pytest.approx(loss_with(eos, 6), abs=1e-6)
    assert loss_with(other, 1) != pytest.approx(loss_with(other, 6), abs=1e-4)


def test_h_i_at_training_equals_h_i_at_test(scoring_system):
    """F reads the same pooled state for a query inside the right-padded joint pass and the left-padded test pass."""
    from metatuner.generator import position_ids
    from metatuner.hypernet import pool
    from metatuner.rewrite import rewrite_messages
    from metatuner.training import completion_text, lm_batch

    system = scoring_system
    exs = system.task.train[:3]
    with torch.no_grad():
        enc = system.gen_encode(exs)
        h_test = pool(system.gen.param_encode(enc["input_ids"], enc["attention_mask"]), enc["attention_mask"])
        comps = [completion_text(system.gen_tok, rewrite_messages(system.p_tilde, ex.query), p)[1]
                 for ex, p in zip(exs, ["a", "a much longer prompt than that", "b"])]
        gb = lm_batch(system.gen_tok, system.gen_prefixes(exs), comps, 512, "cpu")
        out = system.gen.model(input_ids=gb["input_ids"], attention_mask=gb["attention_mask"],
                               position_ids=position_ids(gb["attention_mask"]), output_hidden_states=True)
        h_train = pool(out.hidden_states[system.gen.k], gb["prefix_mask"])
    torch.testing.assert_close(h_train, h_test, atol=1e-5, rtol=1e-4)


def test_d2_scoring_encodes_each_query_once_and_gives_the_factors_of_a_fresh_encoding(scoring_system, monkeypatch):
    """Inside `pooled_states` (D2's candidate scoring) F reads states computed once per chunk of queries: G's
    meta encoder runs once per rollout.batch_size queries, not once per scoring batch, and each query's
    factors equal those of encoding it alone; outside the block F encodes again."""
    system = scoring_system
    exs = system.task.train[:5]
    calls = []
    encode = system.gen.param_encode
    monkeypatch.setattr(system.gen, "param_encode", lambda *a: calls.append(a[0].shape[0]) or encode(*a))
    with torch.no_grad(), system.pooled_states(exs):
        assert calls == [5]  # rollout.batch_size=8 > 5 queries: one chunk
        cached = [system.factors([ex, exs[0]]) for ex in exs]  # any subset, any order, as the scoring asks
        assert calls == [5]
    assert system.pooled is None
    with torch.no_grad():
        for ex, f in zip(exs, cached):
            alone = system.factors([ex])
            for key, (a, b) in alone.items():
                torch.testing.assert_close(f[key][0][:1], a, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(f[key][1][:1], b, atol=1e-5, rtol=1e-4)
    assert len(calls) == 1 + len(exs)


def test_answer_criterion_inside_the_real_loop(model_dir, tmp_path, monkeypatch):
    """rollout.criterion=answer: D2 candidates are scored by generating answers inside the joint loop."""
    import metatuner.prompts

    calls = []
    real = metatuner.prompts.prompt_outcomes

    def spy(*a, **k):
        calls.append(a[5])
        return real(*a, **k)

    monkeypatch.setattr(metatuner.prompts, "prompt_outcomes", spy)
    cfg = make_cfg(model_dir, tmp_path / "ans", "method=metatuner_j", "warmup.max_steps=0",
                   "warmup.generator_steps=0", "rollout.criterion=answer")
    system, loop, _ = M.prepare(cfg, start_run(cfg))
    loop.run()
    assert calls and set(calls) == {"answer"}
    assert system.counts["generation_calls"] > 0


def test_decisive_targets_inside_the_real_loop(model_dir, tmp_path):
    """rollout.targets=decisive in the joint loop: the random actor answers nothing right, so no query is
    decisive, D2 holds no target and the regulariser is 0 on every joint step; the run still trains F."""
    cfg = make_cfg(model_dir, tmp_path / "dec", "method=metatuner_j", "warmup.max_steps=0", "warmup.generator_steps=2",
                   "rollout.criterion=answer", "rollout.targets=decisive", "generator.prompt_space=pool",
                   "prompts.candidates=[Add.,Sum them.]", "generator.pool_score=likelihood")
    system, loop, stats = M.prepare(cfg, start_run(cfg))
    assert "no warm-up query has a D2 target" in stats["warmup_generator_skipped"]  # G's warm-up had nothing to learn
    before = [p.detach().clone() for p in system.decoder.parameters()]
    loop.run()
    assert loop.state["d2"] and all(v is None for v in loop.state["d2"].values())
    rows = [json.loads(x) for x in (tmp_path / "dec" / "train_log.jsonl").read_text().splitlines()]
    joint = [r for r in rows if "reg" in r and r.get("stage") != "rollout"]
    assert joint and all(r["reg"] == 0.0 for r in joint)
    assert [r["d2_targets"] for r in rows if r.get("stage") == "rollout"] == [0.0] * sum(r.get("stage") == "rollout" for r in rows)
    assert any(not torch.equal(a, b) for a, b in zip(before, system.decoder.parameters()))


def test_warm_up_and_joint_phase_train_on_the_examples_of_sft_step_by_step(model_dir, tmp_path, monkeypatch):
    """W warm-up + J joint steps of MetaTuner consume exactly the examples of W + J SFT steps, in the same
    steps (training.step_indices): the joint phase continues where the warm-up stopped instead of drawing
    from its own permutation (which made it repeat warm-up examples and see fewer distinct ones than SFT)."""
    from transformers import Trainer

    from metatuner.lora_sft import train_sft
    from metatuner.models import load_model

    cfg = make_cfg(model_dir, tmp_path / "mt", "method=metatuner_j", "warmup.max_steps=3", "train.max_steps=7",
                   "warmup.cache=false", "task.train_size=12")
    task = start_run(cfg)
    queries = sorted({ex.query for ex in task.train}, key=len, reverse=True)

    def query_in(text: str) -> str:
        return next(q for q in queries if q in text)  # the longest query the text holds

    trainer_steps: list[list[str]] = []
    real_step = Trainer.training_step

    def record_step(self, model, inputs, *args, **kwargs):
        tok = self.processing_class
        trainer_steps.append(sorted(query_in(tok.decode(row, skip_special_tokens=True)) for row in inputs["input_ids"]))
        return real_step(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", record_step)
    model, tok = load_model(str(model_dir))
    train_sft(cfg, model, tok, task, task.train, task.prompt, tmp_path / "sft", cfg.train.max_steps, 1e-3)
    sft_steps, trainer_steps[:] = list(trainer_steps), []
    # a later stage of one run (SAPO's re-selection stages, sapo.staged_sft) continues the same stream
    model, tok = load_model(str(model_dir))
    train_sft(cfg, model, tok, task, task.train, task.prompt, tmp_path / "stage", 2, 1e-3, first_step=4)
    assert trainer_steps == sft_steps[4:6]
    trainer_steps[:] = []

    joint_steps: list[list[str]] = []
    real_losses = M.MetaTunerSystem.joint_losses

    def record_losses(self, examples, *args, need_task=True, **kwargs):
        if need_task:  # the joint phase's task term (the generator warm-up runs the regulariser only)
            joint_steps.append(sorted(ex.query for ex in examples))
        return real_losses(self, examples, *args, need_task=need_task, **kwargs)

    monkeypatch.setattr(M.MetaTunerSystem, "joint_losses", record_losses)
    system, loop, _ = M.prepare(cfg, task)
    loop.run()
    assert len(sft_steps) == 7 and len(trainer_steps) == 3 and len(joint_steps) == 4
    assert trainer_steps + joint_steps == sft_steps
    # 7 steps of 2 over 12 examples: the first epoch's 12 distinct examples, then a new permutation
    assert len({q for s in sft_steps[:6] for q in s}) == len({ex.query for ex in task.train})
