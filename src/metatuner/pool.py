"""The candidate prompt pool, and a generator's distribution restricted to it.

The pool: p~ first, then the user's candidates (prompts.candidates, prompts.candidates_file), the
generator's paraphrases of p~ (prompts.paraphrases), and p~ with a few training demonstrations
(prompts.demos), and OPRO's best new instructions (prompts.opro, cached so every method gets the same);
duplicates dropped, at most prompts.pool_size. MetaTuner's prompt decoder in
generator.prompt_space=pool|mixed chooses among them per query; the baselines that can choose among
prompts get the same pool, so a win is not just "more prompts".

`candidate_logprobs` scores every (query, candidate) pair in batched teacher-forced passes of the
generator (no generation; each query's prefix once, its candidates in groups of similar length): the mean
log-probability of the candidate's tokens (length-normalised) given the
generator's input for the query.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from metatuner.config import Config
from metatuner.errors import MetatunerError
from metatuner.tasks import Task
from metatuner.training import autocast, completion_text, forward_nll, lm_batch


PARAPHRASE = (
    "Paraphrase the task instruction below in a different style, structure or tone. Keep its meaning and keep "
    "any answer-format strings verbatim. Output only the new instruction between <START> and </START>.\n\n"
    "Instruction: {prompt}"
)


def parse_paraphrase(text: str) -> str:
    m = re.search(r"<START>(.*?)(?:</START>|$)", text, flags=re.DOTALL)
    body = m.group(1) if m else text
    return body.strip().strip('"').strip()


def paraphrases(gen, gtok, prompt: str, m: int, temperature: float, max_new_tokens: int) -> list[str]:
    """M paraphrases of `prompt` from the generator (empty or duplicate ones dropped)."""
    from metatuner.sampling import sample_texts

    if m <= 0:
        return []
    outs = sample_texts(gen, gtok, [[{"role": "user", "content": PARAPHRASE.format(prompt=prompt)}]], m,
                        max_new_tokens, temperature=temperature)[0]
    return [p for p in dict.fromkeys(parse_paraphrase(o) for o in outs) if len(p) >= 3 and p != prompt]


def read_candidates_file(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise MetatunerError(f"prompts.candidates_file: {p} not found")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise MetatunerError(f"prompts.candidates_file: {p} is not UTF-8 text (byte {e.start})") from None
    return [ln.strip() for ln in lines if ln.strip()]


def demo_prompt(task: Task, k: int) -> str:
    """p~ followed by the first k training examples as worked demonstrations."""
    lines = [task.prompt, "", "Examples:"]
    for ex in task.train[:k]:
        lines += [f"Question: {ex.query}", f"Answer: {ex.answer}", ""]
    return "\n".join(lines).rstrip()


def pool_requested(cfg: Config) -> bool:
    """Whether the settings ask for candidates beyond p~ (then every method that can choose a prompt uses them)."""
    pc = cfg.prompts
    return bool(pc.candidates or pc.candidates_file or pc.paraphrases > 0 or pc.demos > 0 or pc.opro > 0)


def pool_for_baseline(cfg: Config, task: Task) -> list[str]:
    """The pool for a method that has no generator loaded: loads the generator only for paraphrases."""
    if not pool_requested(cfg):
        return [task.prompt]
    gen = gtok = None
    if cfg.prompts.paraphrases > 0:
        from metatuner.models import load_model

        gen, gtok = load_model(cfg.generator.name or cfg.model.name, cfg.generator.dtype, cfg.model.device,
                               cfg.generator.trust_remote_code)
    return build_pool(cfg, task, gen, gtok)


def best_on_validation(actor, tok, task: Task, pool: list[str], n: int, batch_size: int = 16) -> tuple[str, list[float]]:
    """The pool candidate with the highest greedy accuracy on the first n validation examples (p~ wins ties)."""
    from metatuner.prompts import accuracy_of

    val = task.validation[:n]
    if not val:
        raise MetatunerError(f"task {task.name!r}: choosing a pool prompt on validation needs a validation split "
                             "(task.val_size > 0)")
    accs = [accuracy_of(actor, tok, task, val, p, batch_size) for p in pool]
    best = max(range(len(pool)), key=lambda i: (accs[i], -i))
    return pool[best], accs


def build_pool(cfg: Config, task: Task, gen=None, gtok=None, actor=None, tok=None) -> list[str]:
    """p~, the user's candidates, paraphrases, demonstrations, OPRO's best new instructions: deduplicated,
    at most prompts.pool_size. OPRO (prompts.opro > 0) scores with `actor` (loaded from model.name when not
    given) and proposes with `gen` (the generator, loaded when not given)."""
    pc = cfg.prompts
    pool = [task.prompt, *[str(c).strip() for c in pc.candidates if str(c).strip()]]
    if pc.candidates_file:
        pool += read_candidates_file(pc.candidates_file)
    if pc.paraphrases > 0:
        if gen is None:
            raise MetatunerError("prompts.paraphrases needs a generator to write them")
        pool += paraphrases(gen, gtok, task.prompt, pc.paraphrases, cfg.sapo.temperature, cfg.sapo.max_new_tokens)
    if pc.demos > 0:
        pool.append(demo_prompt(task, pc.demos))
    pool = list(dict.fromkeys(pool))[: pc.pool_size]
    if pc.opro > 0 and len(pool) < pc.pool_size:
        pool = pool + opro_members(cfg, task, list(pool), gen, gtok, actor, tok)
    return list(dict.fromkeys(pool))[: pc.pool_size]


def opro_key(cfg: Config, task: Task, seeds: list[str]) -> str:
    """Hash of what OPRO's pool members depend on: models, task settings, seed, opro.*, the seed prompts."""
    import hashlib
    import json

    from metatuner.models import model_fingerprint

    parts = {"model": model_fingerprint(cfg.model.name), "dtype": cfg.model.dtype,
             "generator": model_fingerprint(cfg.generator.name or cfg.model.name), "task": vars(cfg.task),
             "seed": cfg.seed, "opro": vars(cfg.opro), "k": cfg.prompts.opro, "seeds": seeds,
             "torch": torch.__version__}
    if cfg.model.adapter:  # OPRO scores with the adapter merged (no key without one: older pools keep theirs)
        parts["adapter"] = model_fingerprint(cfg.model.adapter)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def opro_members(cfg: Config, task: Task, seeds: list[str], gen=None, gtok=None, actor=None, tok=None) -> list[str]:
    """The prompts.opro best instructions OPRO found that are not among `seeds` (by training accuracy, ties to
    the earliest). Run once per settings and read back from $METATUNER_CACHE/pools/<key>.json afterwards, so
    every method of a comparison (each in its own process) gets the same members."""
    import json

    from metatuner.io import write_json
    from metatuner.metaprompt import optimize
    from metatuner.models import cache_dir, load_from_config, load_model

    path = cache_dir() / "pools" / f"{opro_key(cfg, task, seeds)}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())["members"]
        except (OSError, ValueError, KeyError):
            pass  # damaged: compute again and overwrite
    engine = None
    if actor is None:
        actor, tok = load_from_config(cfg.model)
        if cfg.generation.backend == "vllm":  # the loaded weights: the model's own directory unless an adapter is merged
            from metatuner.models import resolve_path
            from metatuner.vllm_backend import engine_for

            engine = engine_for(actor, tok, cfg.generation, seed=cfg.seed,
                                weights_dir=None if cfg.model.adapter else resolve_path(cfg.model.name))
    if gen is None:
        gen, gtok = (actor, tok) if not cfg.generator.name else load_model(
            cfg.generator.name, cfg.generator.dtype, cfg.model.device, cfg.generator.trust_remote_code)
    with torch.no_grad(), torch.random.fork_rng():  # the same members whichever method computes them first
        torch.manual_seed(cfg.seed)
        _, _, rows, _ = optimize(cfg, actor, tok, gen, gtok, task, seeds=seeds, engine=engine)
    new = [r for r in rows if r["instruction"] not in seeds]
    ranked = sorted(range(len(new)), key=lambda i: (-new[i]["train_accuracy"], i))
    members = [new[i]["instruction"] for i in ranked[: cfg.prompts.opro]]
    write_json(path, {"members": members, "rows": rows})
    return members


def candidate_logprobs(model, tok, messages: list[list[dict]], candidates: list[list[str]], batch_size: int = 16,
                       max_length: int = 512, bf16: bool = True, grad: bool = False, group: bool = True) -> torch.Tensor:
    """[queries, C] mean token log-probability of each query's C candidates as the model's reply to that
    query's chat `messages`, teacher-forced in batches of `batch_size` rows (no generation). grad=True keeps
    the graph (for a loss on the scores; the result stays on the model's device), else no_grad, on the CPU,
    with each query's prefix run once for all its candidates (generation.prefix_nll), the candidates in groups
    of similar length unless group=False (a fixed number of passes per batch: what a sharded G needs, whose
    every pass is a collective that all processes must join)."""
    from metatuner.generation import chat_text

    C = len(candidates[0]) if candidates else 0
    if any(len(c) != C for c in candidates):
        raise MetatunerError("candidate_logprobs: every query needs the same number of candidates")
    prefixes = [chat_text(tok, m) for m in messages]
    dev = model.device
    comps = [[completion_text(tok, messages[i], candidates[i][c])[1] for c in range(C)] for i in range(len(messages))]
    if C and not (grad and torch.is_grad_enabled()):
        # no graph to keep: each query's (p~, x) prefix runs once for its C candidates (about half the work
        # of a row per candidate; over-long rows are cut once per query, see prefix_nll)
        from metatuner.generation import prefix_nll

        step = max(1, batch_size // C)
        with torch.no_grad(), autocast(bf16, dev):
            nll = [prefix_nll(model, tok, prefixes[s : s + step], comps[s : s + step], max_length, group=group)
                   for s in range(0, len(prefixes), step)]
        return -torch.cat(nll) if nll else torch.empty(0, C)
    rows = [(i, c) for i in range(len(messages)) for c in range(C)]
    parts = []
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        for s in range(0, len(rows), batch_size):
            chunk = rows[s : s + batch_size]
            pre = [prefixes[i] for i, _ in chunk]
            com = [comps[i][c] for i, c in chunk]
            with autocast(bf16, dev):
                batch = lm_batch(tok, pre, com, max_length, dev)
                nll = forward_nll(model, batch)[0].float()
            parts.append(-nll if grad else -nll.cpu())
    out = torch.cat(parts) if parts else torch.empty(0, device=dev if grad else "cpu")
    return out.view(len(messages), C)
