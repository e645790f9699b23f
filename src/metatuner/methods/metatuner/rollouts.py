"""Prompts from the generator and D2: sample candidates from phi_p' (or the live phi_p), score them
with the actor, keep each query's best (correct first, then lower NLL of the reference; p~ always
competes)."""

from __future__ import annotations

import torch

from metatuner.rewrite import clean_prompt
from metatuner.tasks import Example


@torch.no_grad()
def sample_prompts(system, examples: list[Example], n: int, live: bool = False, greedy: bool = False) -> list[list[str]]:
    """n prompts per query from phi_p' (or the live phi_p): [len(examples)][n]."""
    cfg = system.cfg
    out = []
    bs = cfg.rollout.batch_size
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
    return out


def test_prompts(system, examples: list[Example]) -> list[str]:
    """Rewritten prompt per query at test time (greedy, live G); p~ in the w/o P ablation."""
    if not system.use_p:
        return [system.p_tilde] * len(examples)
    return [c[0] for c in sample_prompts(system, examples, 1, live=True, greedy=True)]


@torch.no_grad()
def score_candidates(system, examples: list[Example], candidates: list[list[str]]) -> list[tuple[str, bool, float]]:
    """Best candidate per query by (correct first, then lower NLL of the reference) under the actor
    with that query's generated LoRA. p~ is always a candidate. Returns (prompt, correct, nll)."""
    from metatuner.prompts import rank_prompts

    cfg = system.cfg
    cands = [list(dict.fromkeys([system.p_tilde] + list(c))) for c in candidates]
    if cfg.rollout.criterion == "answer":
        system.counts["generation_calls"] += sum(len(c) for c in cands)
    return rank_prompts(system.actor, system.tok, system.task, examples, cands, cfg.rollout.criterion,
                        cfg.rollout.batch_size, cfg.train.max_length, cfg.train.bf16, system.with_factors)


def d2_rollout(system, examples: list[Example], live: bool = False) -> tuple[list[str], list[str], dict]:
    """Sample rollout.n prompts per query, score them; -> (best prompts, task prompts, stats)."""
    n = system.cfg.rollout.n
    if n > 0 and system.use_p:
        cands = sample_prompts(system, examples, n, live=live)
        best = score_candidates(system, examples, cands)
    else:  # nothing to choose from (w/o P: the actor never sees a rewrite): D2 holds p~
        cands = [[] for _ in examples]
        best = [(system.p_tilde, False, 0.0)] * len(examples)
    task_prompts = [c[0] if (c and system.use_p) else system.p_tilde for c in cands]
    stats = {"d2_correct": sum(b[1] for b in best) / max(1, len(best)),
             "d2_rewritten": sum(b[0] != system.p_tilde for b in best) / max(1, len(best))}
    return [b[0] for b in best], task_prompts, stats
