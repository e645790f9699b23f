"""Sampling completions from a model in batches, with a progress bar (rate and ETA) on the main process.

- `sample_texts(...)`: n completions per chat input (the optimizer LLM of OPRO/BetterTogether, BPO's
  rewriter, SAPO's paraphraser).
- `sample_answers(...)`: k sampled answers of the actor per example under one prompt (DPO's pairs).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from metatuner.generation import chat_text, generate_texts
from metatuner.run import is_main_process


def _bar(total: int, desc: str | None):
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=desc is None or not is_main_process())


@torch.no_grad()
def sample_texts(model, tok, messages: list[list[dict]], n: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, batch_size: int = 8, greedy: bool = False, desc: str | None = None) -> list[list[str]]:
    """n sampled completions per chat (greedy: one, deterministic). `desc`: label of a progress bar."""
    out = []
    with _bar(len(messages), desc) as bar:
        for s in range(0, len(messages), batch_size):
            texts = [chat_text(tok, m) for m in messages[s : s + batch_size]]
            gens, _, _ = generate_texts(model, tok, texts, max_new_tokens, do_sample=not greedy, temperature=temperature,
                                        top_p=top_p, num_return_sequences=1 if greedy else n)
            out += gens
            bar.update(len(texts))
    return out


@torch.no_grad()
def sample_answers(model, tok, task, examples, prompt: str, k: int, temperature: float, batch_size: int,
                   desc: str | None = "sampling answers") -> list[list[str]]:
    """k sampled answers per example from the actor with `prompt` (the task's chat rendering)."""
    out = []
    with _bar(len(examples), desc) as bar:
        for s in range(0, len(examples), batch_size):
            texts = [chat_text(tok, task.render(prompt, ex.query)) for ex in examples[s : s + batch_size]]
            gens, _, _ = generate_texts(model, tok, texts, task.max_new_tokens, do_sample=True, temperature=temperature,
                                        num_return_sequences=k)
            out += gens
            bar.update(len(texts))
    return out
