"""Prompts from the generator and D2: candidates from phi_p' (or the live phi_p), scored by the actor;
each query keeps its best (correct first, then lower NLL of the reference; p~ always competes).

generator.prompt_space: `free` samples rollout.n prompts per query from the decoder; `pool` restricts
the decoder to the candidate pool (pool.py): every candidate is scored by its length-normalised
log-likelihood given (p~, x) in one teacher-forced pass, the task-loss prompt is sampled from phi_p'
over the pool at generator.pool_temperature, the test prompt is the live decoder's argmax; `mixed`
puts rollout.n free samples beside the pool.

rollout.targets=decisive keeps a D2 target only for queries whose candidates disagree on correctness; the
others get None (the regulariser skips them, `MetaTunerSystem.joint_losses`). generator.pool_loss=listwise
(pool mode) keeps, for those queries, every candidate's outcome instead of the single best, and the
regulariser is `pool_choice_loss`: -log of the decoder's pool probability on the candidates that answered right."""

from __future__ import annotations

import contextlib
import os

import torch
from tqdm.auto import tqdm

from metatuner.generator import generator_lora_disabled
from metatuner.pool import candidate_logprobs
from metatuner.rewrite import clean_prompt, rewrite_messages
from metatuner.tasks import Example
from metatuner.training import use_bf16


@torch.no_grad()
def sample_prompts(system, examples: list[Example], n: int, live: bool = False, greedy: bool = False) -> list[list[str]]:
    """n prompts per query from phi_p' (or the live phi_p): [len(examples)][n]. generation.backend=vllm:
    through G's vLLM engine (`sample_prompts_vllm`)."""
    cfg = system.cfg
    system.prompt_sampling_backend = cfg.generation.backend  # for the run's metrics (none: G never sampled)
    if cfg.generation.backend == "vllm":
        return sample_prompts_vllm(system, examples, n, live, greedy)
    out = []
    bs = cfg.rollout.batch_size
    bar = tqdm(total=len(examples), desc="rewriting prompts" if live else "sampling prompts (phi_p')", leave=False,
               dynamic_ncols=True, disable=int(os.environ.get("RANK", "0")) != 0 or len(examples) <= bs)
    for s in range(0, len(examples), bs):
        chunk = examples[s : s + bs]
        enc = system.gen_encode(chunk)
        kw = dict(max_new_tokens=cfg.generator.max_prompt_tokens, num_return_sequences=n,
                  pad_token_id=system.gen_tok.pad_token_id, eos_token_id=system.gen_tok.eos_token_id,
                  synced_gpus=getattr(system, "sharded", False))  # sharded G: step until every process is done
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


def sample_prompts_vllm(system, examples: list[Example], n: int, live: bool = False, greedy: bool = False) -> list[list[str]]:
    """`sample_prompts` through a vLLM engine over G's checkpoint (made once per run): G's current weights go
    in first (the live meta encoder with phi_p', or with the live phi_p), then every query in one request,
    each seeded by the run's seed and a count that grows over the run (no two calls repeat their draws;
    with several processes, each process's keys are its own)."""
    from metatuner.models import resolve_path
    from metatuner.vllm_backend import generator_engine

    cfg = system.cfg
    if getattr(system, "gen_engine", None) is None:
        system.gen_engine = generator_engine(resolve_path(cfg.generator.name or cfg.model.name), system.gen.model,
                                             system.gen_tok, cfg.generation, seed=cfg.seed)
    with contextlib.nullcontext() if live else system.gen.frozen_decoder():
        system.gen_engine.push(system.gen.model)
    first = system.counts["generation_calls"]
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    gens, _, _ = system.gen_engine.generate(system.gen_prefixes(examples), cfg.generator.max_prompt_tokens,
                                            do_sample=not greedy, temperature=cfg.rollout.temperature,
                                            top_p=cfg.rollout.top_p, num_return_sequences=n,
                                            keys=[(first + i) * world + rank for i in range(len(examples))])
    system.counts["generation_calls"] += len(examples) * n
    return [[clean_prompt(t, system.p_tilde) for t in (g * n if greedy else g)] for g in gens]


def pool_scores(system, examples: list[Example], candidates: list[list[str]], frozen: bool, grad: bool = False) -> torch.Tensor:
    """[queries, candidates] scores of the decoder (phi_p' when frozen, else the live phi_p): the length-
    normalised log-likelihood of each candidate given (p~, x); with generator.pool_score=gain minus the same
    under G without its LoRA (the untrained generator), so every candidate starts at 0 and only what training
    taught moves the choice (the raw likelihood favours copying p~ from the input). grad=True: the live
    decoder's scores keep their graph (the listwise loss)."""
    cfg = system.cfg
    msgs = [rewrite_messages(system.p_tilde, ex.query) for ex in examples]
    args = (cfg.rollout.batch_size, cfg.train.max_length, use_bf16(cfg.train, system.device))
    # sharded G: as many passes on every process (length groups differ where the candidates do: mixed mode)
    group = not getattr(system, "sharded", False)
    with system.gen.frozen_decoder() if frozen else contextlib.nullcontext():
        scores = candidate_logprobs(system.gen.model, system.gen_tok, msgs, candidates, *args, grad=grad, group=group)
    if cfg.generator.pool_score == "gain":
        with generator_lora_disabled(system.gen.model):
            base = candidate_logprobs(system.gen.model, system.gen_tok, msgs, candidates, *args, group=group)
        scores = scores - base.to(scores.device)
    return scores


def pool_choice_loss(system, examples: list[Example], targets: list[list[int] | None]) -> torch.Tensor:
    """generator.pool_loss=listwise: mean over the queries with a target of -log of the live decoder's pool
    probability (softmax of `pool_scores` at generator.pool_temperature) on the candidates that answered the
    query right; 0 when no query has one. The distribution trained is the one the test argmax reads, and the
    candidates that answered wrong are pushed down."""
    rows = [(ex, t) for ex, t in zip(examples, targets) if t]
    pool = list(system.pool)
    if getattr(system, "sharded", False):  # every process runs G alike and its loss reaches G (FSDP's collectives)
        every = pool_scores(system, examples, [pool] * len(examples), frozen=False, grad=True)
        if not rows:
            return every.sum() * 0.0
        scores = every[[i for i, t in enumerate(targets) if t]]
    elif not rows:
        return torch.zeros((), device=system.device)
    else:
        scores = pool_scores(system, [ex for ex, _ in rows], [pool] * len(rows), frozen=False, grad=True)
    logp = torch.log_softmax(scores / system.cfg.generator.pool_temperature, dim=-1)
    right = torch.zeros_like(logp, dtype=torch.bool)
    for r, (_, t) in enumerate(rows):
        right[r, t] = True
    return -torch.logsumexp(logp.masked_fill(~right, float("-inf")), dim=-1).mean()


def choose(system, examples: list[Example], candidates: list[list[str]], frozen: bool, sample: bool,
           counts: list[int] | None = None) -> list[str]:
    """One candidate per query from the decoder's distribution restricted to that query's candidates:
    phi_p' (frozen) or the live phi_p, scored by `pool_scores`; sampled at generator.pool_temperature, or
    the argmax (the first candidate, p~, on ties). `counts`: how many of a query's candidates are its own
    (the rest pad the rows to one width for the batched pass and are never chosen)."""
    cfg = system.cfg
    scores = pool_scores(system, examples, candidates, frozen)
    if counts is not None:
        width = scores.shape[1]
        pad = torch.arange(width).unsqueeze(0) >= torch.tensor(counts).unsqueeze(1)
        scores = scores.masked_fill(pad.to(scores.device), float("-inf"))
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
def candidate_outcomes(system, examples: list[Example], candidates: list[list[str]]) -> list[list[tuple]]:
    """Per query, (prompt, correct, nll) of p~ and each distinct candidate under the actor with that
    query's generated LoRA: whether it makes the actor's answer right, and the NLL of the reference."""
    from metatuner.prompts import prompt_outcomes

    cfg = system.cfg
    cands = [list(dict.fromkeys([system.p_tilde] + list(c))) for c in candidates]
    if cfg.rollout.criterion == "answer":
        system.counts["generation_calls"] += sum(len(c) for c in cands)
    return prompt_outcomes(system.actor, system.tok, system.task, examples, cands, cfg.rollout.criterion,
                           cfg.rollout.batch_size, cfg.train.max_length, use_bf16(cfg.train, system.device), system.with_factors,
                           desc="D2: scoring prompts")


def best_candidates(system, outcomes: list[list[tuple]]) -> list[tuple]:
    """(prompt, correct, nll, decisive) per query: the best by (correct first, then lower NLL of the
    reference); decisive = the candidates disagree on correctness (always True with rollout.targets=all)."""
    from metatuner.prompts import best_outcome

    ranked = [best_outcome(o, decisive=True) for o in outcomes]
    return [r if system.cfg.rollout.targets == "decisive" else (*r[:3], True) for r in ranked]


def score_candidates(system, examples: list[Example], candidates: list[list[str]]) -> list[tuple]:
    """Best candidate per query under the actor with that query's generated LoRA (p~ always competes):
    (prompt, correct, nll, decisive), see `best_candidates`."""
    return best_candidates(system, candidate_outcomes(system, examples, candidates))


def d2_rollout(system, examples: list[Example], live: bool = False) -> tuple[list, list[str], dict]:
    """Candidates per query (rollout.n samples and/or the pool), scored by the actor;
    -> (D2 targets: the best prompt per query, None where the query has no target under
    rollout.targets=decisive; with generator.pool_loss=listwise the pool indices of the candidates that
    answered right, None unless some answered right and some wrong; task prompts; stats)."""
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
        if getattr(system, "sharded", False):  # sharded G: the same number of rows (passes) on every process
            import torch.distributed as dist

            w = torch.tensor([width], device=system.device)
            dist.all_reduce(w, op=dist.ReduceOp.MAX)
            width = int(w)
        padded = [c + [c[0]] * (width - len(c)) for c in cands]  # the same count per query for one batched pass
        task_prompts = choose(system, examples, padded, frozen=not live, sample=True, counts=[len(c) for c in cands])
    # F's input states once per query (not once per scoring batch): cheaper, and with G sharded the scoring
    # (a different number of batches on each process) must not run G
    with system.pooled_states(examples) if system.use_f else contextlib.nullcontext():
        outs = candidate_outcomes(system, examples, cands) if any(cands) else None
    best = (best_candidates(system, outs) if outs is not None
            else [(system.p_tilde, False, 0.0, cfg.rollout.targets == "all")] * len(examples))
    stats = {"d2_correct": sum(b[1] for b in best) / max(1, len(best)),
             "d2_rewritten": sum(b[0] != system.p_tilde for b in best if b[3]) / max(1, len(best)),
             "d2_targets": sum(b[3] for b in best) / max(1, len(best))}
    if cfg.generator.pool_loss == "listwise":
        index = {p: j for j, p in enumerate(system.pool)}
        right = [sorted(index[p] for p, ok, _ in o if ok) for o in outs]
        targets = [r if 0 < len(r) < len(system.pool) else None for r in right]
        stats.update(d2_targets=sum(t is not None for t in targets) / max(1, len(targets)),
                     d2_pool_counts=[sum(j in t for t in targets if t) for j in range(len(system.pool))])
        return targets, task_prompts, stats
    if space != "free":
        stats["d2_pool_counts"] = [sum(b[0] == c for b in best if b[3]) for c in system.pool]
    return [b[0] if b[3] else None for b in best], task_prompts, stats
