"""MetaTuner-Gumbel: the prompt as straight-through Gumbel-softmax tokens from the live G, fed to the
actor as soft embeddings, so the task loss reaches phi_p (instead of the supervised regularization)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from metatuner.errors import MetatunerError
from metatuner.tasks import Example
from metatuner.training import autocast, completion_text, sequence_nll, use_bf16


def check_gumbel_vocab(actor_tok, gen_tok, actor, gen) -> None:
    if actor_tok.get_vocab() != gen_tok.get_vocab() or actor.get_input_embeddings().weight.shape[0] != gen.get_output_embeddings().weight.shape[0]:
        raise MetatunerError("method=metatuner_gumbel needs the generator and actor to share one vocabulary "
                             f"(generator.name={gen.name_or_path!r}, model.name={actor.name_or_path!r} differ); "
                             "use metatuner_j or the same tokenizer for both")


def gumbel_task_loss(system, examples: list[Example]) -> torch.Tensor:
    """Task loss with a relaxed prompt from the live G: at most generator.max_prompt_tokens hard
    straight-through Gumbel-softmax tokens per query, decoded with a KV cache and real-token position
    ids (as generation does), stopping at G's end-of-sequence token like test-time prompts; the
    kept tokens reach the actor as soft embeddings, so the task loss reaches phi_p and phi_s."""
    from metatuner.generator import position_ids

    cfg = system.cfg
    dev = system.device
    gen = system.gen.model
    emb_gen = gen.get_input_embeddings().weight
    emb_actor = system.actor.get_input_embeddings().weight  # [V, d]
    eos = system.gen_tok.eos_token_id
    with autocast(use_bf16(cfg.train, dev), dev):
        enc = system.gen_encode(examples)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        B = ids.shape[0]
        out = gen(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), output_hidden_states=True,
                  use_cache=True)
        hidden_k, past = out.hidden_states[system.gen.k], out.past_key_values
        logits = out.logits[:, -1]
        pos = position_ids(mask)[:, -1:]
        soft, alive = [], torch.ones(B, dtype=torch.bool, device=dev)
        keep = []  # [L] x [B] bool: the token is part of the prompt (before the first EOS)
        for t in range(cfg.generator.max_prompt_tokens):
            y = F.gumbel_softmax(logits.float(), tau=cfg.train.gumbel_tau, hard=True)  # [B, V]
            if eos is not None:
                alive = alive & (y[:, eos] < 0.5)
            soft.append(y)
            keep.append(alive.clone())
            if not alive.any() or t == cfg.generator.max_prompt_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=dev)], 1)
            pos = pos + 1
            step_emb = (y.to(emb_gen.dtype) @ emb_gen).unsqueeze(1)
            out = gen(inputs_embeds=step_emb, attention_mask=mask, position_ids=pos, past_key_values=past,
                      use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
        y = torch.stack(soft, 1)  # [B, L, V]
        kept = torch.stack(keep, 1)  # [B, L]
        f = system.factors(examples, hidden_k, enc["attention_mask"]) if system.use_f else None
        # actor input: [chat text before the prompt] [soft prompt] [rest of the chat + target]
        marker = "\u0000PROMPT\u0000"
        rows = []
        for ex in examples:
            pre, comp = completion_text(system.tok, system.task.render(marker, ex.query), ex.target)
            a, b = pre.split(marker)
            rows.append((system.tok(a, add_special_tokens=False)["input_ids"],
                         system.tok(b, add_special_tokens=False)["input_ids"],
                         system.tok(comp, add_special_tokens=False)["input_ids"]))
        lens = kept.sum(1).tolist()
        T = max(len(a) + n + len(b) + len(c) for (a, b, c), n in zip(rows, lens))
        E = emb_actor.shape[1]
        inp = torch.zeros(B, T, E, device=dev, dtype=emb_actor.dtype)
        am = torch.zeros(B, T, dtype=torch.long, device=dev)
        labels = torch.full((B, T), -100, dtype=torch.long, device=dev)
        for i, (a, b, c) in enumerate(rows):
            a_t, b_t, c_t = (torch.tensor(v, device=dev, dtype=torch.long) for v in (a, b, c))
            prompt = y[i, kept[i]].to(emb_actor.dtype) @ emb_actor
            seq = torch.cat([emb_actor[a_t], prompt, emb_actor[b_t], emb_actor[c_t]], 0)
            inp[i, : seq.shape[0]] = seq
            am[i, : seq.shape[0]] = 1
            labels[i, seq.shape[0] - len(c) : seq.shape[0]] = c_t
        with system.lora.use_factors(f) if f is not None else contextlib.nullcontext():
            out = system.actor(inputs_embeds=inp, attention_mask=am)
        return sequence_nll(out.logits, labels).mean()
