"""Prompts from the generator and D2: candidates from phi_p' (or the live phi_p), scored by the actor;
each query keeps its best (correct first, then lower NLL of the reference; p~ always competes).

generator.prompt_space: `free` samples rollout.n prompts per query from the decoder; `pool` restricts
the decoder to the candidate pool (pool.py): every candidate is scored by its length-normalised
log-likelihood given (p~, x) in one teacher-forced pass, the task-loss prompt is sampled from phi_p'
over the pool at generator.pool_temperature, the test prompt is the live decoder's argmax; `mixed`
puts rollout.n free samples beside the pool.

rollout.targets=decisive keeps a D2 target only for queries whose candidates disagree on correctness; the
others get None (the regulariser skips them, `MetaTunerSystem.joint_losses`)."""

from __future__ import annotations

import contextlib
import os

import torch
from tqdm.auto import tqdm

from metatuner.pool import candidate_logprobs
from metatuner.rewrite import clean_prompt, rewrite_messages
from metatuner.tasks import Example

from .system import generator_lora_disabled


@torch.no_grad()
def sample_prompts(system, examples: list[Example], n: int, live: bool = False, greedy: bool = False) -> list[list[str]]:
    """n prompts per query from phi_p' (or the live phi_p): [len(examples)][n]."""
    cfg = system.cfg
    out = []
    bs = cfg.rollout.batch_size
    bar = tqdm(total=len(examples), desc="rewriting prompts" if live else "sampling prompts (phi_p')", leave=False,
               dynamic_ncols=True, disable=int(os.environ.get("RANK", "0")) != 0 or len(examples) <= bs)
    for s in range(0, len(examples), bs):
        chunk = examples[s : s + bs]
        enc = system.gen_encode(chunk)
        kw = dict(max_new_tokens=cfg.generator.max_prompt_tokens, num_return_sequences=n,
                  pad_token_id=system.gen_tok.pad_token_id, eos_token_id=system.gen_tok.eos_token_id)
        if greedy:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p)
        fn = system.gen.generate_live if live else system.gen.sample_prompts
        seqs = fn(enc["input_ids"], enc["attention_mask"], **kw)[:, enc["input_ids"].shape[1]:]
        texts = [clean_prompt(t, system.p_tilde) for t in system.gen_tok.batch_decode(seqs, skip_special_tokens=True)]
        out += [texts[i * n : (i + 1) * n] for i in range(len(chunk))]
        system.counts["generation_calls"] += len(texts)
        bar.update(len(chunk))
    bar.close()
    return out


def pool_scores(system, examples: list[Example], candidates: list[list[str]], frozen: bool) -> torch.Tensor:
    """[queries, candidates] scores of the decoder (phi_p' when frozen, else the live phi_p): the length-
    normalised log-likelihood of each candidate given (p~, x); with generator.pool_score=gain minus the same
    under G without its LoRA (the untrained generator), so every candidate starts at 0 and only what training
    taught moves the choice (the raw likelihood favours copying p~ from the input)."""
    cfg = system.cfg
    msgs = [rewrite_messages(system.p_tilde, ex.query) for ex in examples]
    args = (cfg.rollout.batch_size, cfg.train.max_length, cfg.train.bf16)
    with system.gen.frozen_decoder() if frozen else contextlib.nullcontext():
        scores = candidate_logprobs(system.gen.model, system.gen_tok, msgs, candidates, *args)
    if cfg.generator.pool_score == "gain":
        with generator_lora_disabled(system.gen.model):
            scores = scores - candidate_logprobs(system.gen.model, system.gen_tok, msgs, candidates, *args)
    return scores


def choose(system, examples: list[Example], candidates: list[list[str]], frozen: bool, sample: bool) -> list[str]:
    """One candidate per query from the decoder's distribution restricted to that query's candidates:
    phi_p' (frozen) or the live phi_p, scored by `pool_scores`; sampled at generator.pool_temperature, or
    the argmax (the first candidate, p~, on ties)."""
    cfg = system.cfg
    scores = pool_scores(system, examples, candidates, frozen)
    if sample:
        probs = torch.softmax(scores / cfg.generator.pool_temperature, dim=-1)
        pick = torch.multinomial(probs, 1).squeeze(1)
    else:
        pick = scores.argmax(-1)
    return [c[int(j)] for c, j in zip(candidates, pick)]


def test_prompts(system, examples: list[Example]) -> list[str]:
    """The prompt each query gets at test time (live G): the greedy rewrite (free), the argmax over the
    pool (pool), or over the pool and the greedy rewrite (mixed); p~ in the w/o P ablation."""
    if not system.use_p:
        return [system.p_tilde] * len(examples)
    space = system.cfg.generator.prompt_space
    if space == "pool":
        return choose(system, examples, [list(system.pool)] * len(examples), frozen=False, sample=False)
    free = [c[0] for c in sample_prompts(system, examples, 1, live=True, greedy=True)]
    if space == "mixed":
        return choose(system, examples, [list(system.pool) + [f] for f in free], frozen=False, sample=False)
    return free


@torch.no_grad()
def score_candidates(system, examples: list[Example], candidates: list[list[str]]) -> list[tuple]:
    """Best candidate per query by (correct first, then lower NLL of the reference) under the actor
    with that query's generated LoRA. p~ is always a candidate. Returns (prompt, correct, nll, decisive):
    decisive = the candidates disagree on correctness (always True with rollout.targets=all)."""
    from metatuner.prompts import rank_prompts

    cfg = system.cfg
    cands = [list(dict.fromkeys([system.p_tilde] + list(c))) for c in candidates]
    if cfg.rollout.criterion == "answer":
        system.counts["generation_calls"] += sum(len(c) for c in cands)
    ranked = rank_prompts(system.actor, system.tok, system.task, examples, cands, cfg.rollout.criterion,
                          cfg.rollout.batch_size, cfg.train.max_length, cfg.train.bf16, system.with_factors,
                          desc="D2: scoring prompts", decisive=True)
    return [r if cfg.rollout.targets == "decisive" else (*r[:3], True) for r in ranked]


def d2_rollout(system, examples: list[Example], live: bool = False) -> tuple[list[str | None], list[str], dict]:
    """Candidates per query (rollout.n samples and/or the pool), scored by the actor;
    -> (best prompts, None where the query has no target under rollout.targets=decisive; task prompts; stats)."""
    cfg = system.cfg
    n, space = cfg.rollout.n, cfg.generator.prompt_space
    if not system.use_p:  # nothing to choose from (w/o P: the actor never sees a rewrite): D2 holds p~
        best = [(system.p_tilde, False, 0.0, True)] * len(examples)
        return [b[0] for b in best], [system.p_tilde] * len(examples), {"d2_correct": 0.0, "d2_rewritten": 0.0}
    free = sample_prompts(system, examples, n, live=live) if (space != "pool" and n > 0) else [[] for _ in examples]
    if space == "free":
        cands = free
        task_prompts = [c[0] if c else system.p_tilde for c in cands]
    else:
        cands = [list(system.pool) + [p for p in f if p not in system.pool] for f in free]
        width = max(len(c) for c in cands)
        padded = [c + [c[0]] * (width - len(c)) for c in cands]  # the same count per query for one batched pass
        task_prompts = choose(system, examples, padded, frozen=not live, sample=True)
    best = (score_candidates(system, examples, cands) if any(cands)
            else [(system.p_tilde, False, 0.0, cfg.rollout.targets == "all")] * len(examples))
    stats = {"d2_correct": sum(b[1] for b in best) / max(1, len(best)),
             "d2_rewritten": sum(b[0] != system.p_tilde for b in best if b[3]) / max(1, len(best)),
             "d2_targets": sum(b[3] for b in best) / max(1, len(best))}
    if space != "free":
        stats["d2_pool_counts"] = [sum(b[0] == c for b in best if b[3]) for c in system.pool]
    return [b[0] if b[3] else None for b in best], task_prompts, stats
