"""Prompt-side building blocks shared by the prompt baselines (OPRO, BPO, BetterTogether, SAPO, MetaTuner's D2).

- `accuracy_of(...)`: the actor's accuracy with one prompt on a set of examples (the OPRO scorer).
- `optimizer_llm(...)`: the generator as a frozen prompt-writing LLM (sampling lives in metatuner.sampling).
- `prompt_outcomes(...)` / `rank_prompts(...)`: per query, every candidate prompt's outcome under the actor
  (right or wrong, NLL of the reference), and the best by the D2 criterion (correct first, then lower NLL).
- `bootstrap_traces(...)`: the actor's own generations that the task scores correct.
"""

from __future__ import annotations

import contextlib
import os

import torch
from tqdm.auto import tqdm

from metatuner.evaluate import evaluate
from metatuner.generation import chat_text, greedy_texts
from metatuner.tasks import Example, Task
from metatuner.training import actor_batch, autocast, forward_nll


def accuracy_of(model, tok, task: Task, examples: list[Example], prompt: str, batch_size: int = 16) -> float:
    """Greedy accuracy of the actor with `prompt` on `examples`."""
    _, m = evaluate(model, tok, task, examples, prompt, batch_size=batch_size, progress=False)
    return m["accuracy"]


@torch.no_grad()
def prompt_outcomes(model, tok, task: Task, examples: list[Example], candidates: list[list[str]], criterion: str = "answer",
                    batch_size: int = 16, max_length: int = 512, bf16: bool = True,
                    factors_ctx=None, desc: str | None = None) -> list[list[tuple[str, bool, float]]]:
    """Per query, (prompt, correct, nll) for each of its distinct candidates in order: whether the actor's
    greedy answer with that prompt is right (always False with criterion=nll) and the NLL of the reference.
    `factors_ctx(examples)` may return a context that changes the actor per row; `desc` labels a
    progress bar over the (query, candidate) rows (main process only)."""
    if criterion not in ("answer", "nll"):
        from metatuner.errors import MetatunerError

        raise MetatunerError(f"rollout.criterion: expected answer or nll, got {criterion!r}")
    flat_ex, flat_p, owner = [], [], []
    for i, (ex, cands) in enumerate(zip(examples, candidates)):
        uniq = list(dict.fromkeys(cands))
        flat_ex += [ex] * len(uniq)
        flat_p += uniq
        owner += [i] * len(uniq)
    correct, nll = [], []
    bar = tqdm(total=len(flat_ex), desc=desc, leave=False, dynamic_ncols=True,
               disable=desc is None or int(os.environ.get("RANK", "0")) != 0)
    for s in range(0, len(flat_ex), batch_size):
        exs, ps = flat_ex[s : s + batch_size], flat_p[s : s + batch_size]
        ctx = factors_ctx(exs) if factors_ctx else contextlib.nullcontext()
        with ctx:
            with autocast(bf16, model.device):
                batch = actor_batch(tok, task, ps, exs, max_length, model.device)
                nll += forward_nll(model, batch)[0].float().tolist()
            if criterion == "answer":
                texts = [chat_text(tok, task.render(p, ex.query)) for p, ex in zip(ps, exs)]
                per_row = factors_ctx is not None  # weights may differ per row: keep the batch whole
                gens, _ = greedy_texts(model, tok, texts, task.max_new_tokens, answer_end=getattr(task, "answer_end", ""),
                                       share_prefix=not per_row, drop_finished=not per_row)
                correct += [bool(task.score(task.extract_for(g[0], ex), ex)["correct"]) for g, ex in zip(gens, exs)]
            else:
                correct += [False] * len(exs)
        bar.update(len(exs))
    bar.close()
    out: list[list[tuple[str, bool, float]]] = [[] for _ in examples]
    for j, i in enumerate(owner):
        out[i].append((flat_p[j], correct[j], nll[j]))
    return out


def best_outcome(outcomes: list[tuple[str, bool, float]], decisive: bool = False) -> tuple:
    """The best of one query's (prompt, correct, nll): correct first, then lower NLL (the first on ties).
    With `decisive`, a fourth field: whether the candidates disagree on correctness."""
    best = min(outcomes, key=lambda o: (not o[1], o[2]))
    if decisive:
        return (*best, len({o[1] for o in outcomes}) == 2)
    return best


def rank_prompts(model, tok, task: Task, examples: list[Example], candidates: list[list[str]], criterion: str = "answer",
                 batch_size: int = 16, max_length: int = 512, bf16: bool = True,
                 factors_ctx=None, desc: str | None = None, decisive: bool = False) -> list[tuple]:
    """Best candidate per query: (prompt, correct, nll), ranked by (correct first, then lower NLL of the
    reference); see `prompt_outcomes`. With `decisive`, each tuple gains a fourth field: whether the
    query's candidates disagree on correctness (some right, some wrong)."""
    outs = prompt_outcomes(model, tok, task, examples, candidates, criterion, batch_size, max_length, bf16,
                           factors_ctx, desc)
    return [best_outcome(o, decisive) for o in outs]


@torch.no_grad()
def bootstrap_traces(model, tok, task: Task, examples: list[Example], prompt: str, batch_size: int = 16) -> list[tuple[Example, str]]:
    """(example, generation) pairs where the actor's own greedy answer with `prompt` is correct."""
    records, _ = evaluate(model, tok, task, examples, prompt, batch_size=batch_size, progress=False)
    return [(ex, r["generation"]) for ex, r in zip(examples, records) if r["correct"]]


def with_demos(instruction: str, demos: list[tuple[str, str]]) -> str:
    """An instruction followed by few-shot demonstrations (query, answer) in the prompt text."""
    if not demos:
        return instruction
    shots = "\n\n".join(f"Example question: {q}\nExample answer: {a}" for q, a in demos)
    return f"{instruction}\n\n{shots}"


def optimizer_llm(cfg, actor, tok):
    """The generator as a frozen prompt-writing LLM; the actor itself when they are the same checkpoint."""
    name = cfg.generator.name or cfg.model.name
    if name == cfg.model.name:
        return actor, tok
    from metatuner.models import load_model

    return load_model(name, cfg.generator.dtype, cfg.model.device, cfg.generator.trust_remote_code)
