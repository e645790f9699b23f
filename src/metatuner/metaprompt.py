"""OPRO's meta-prompt and instruction search (Yang et al., 2023), shared by the OPRO baseline,
BetterTogether's prompt steps and inference_select's candidate prompts.

- `meta_prompt(...)`: previous instructions with their scores (ascending, 0-100), a few training
  problems with their answers, and the request for a new, better instruction in <INS></INS>.
- `parse_instruction(...)`: the instruction inside <INS></INS> (else the first non-empty line).
- `optimize(...)`: the OPRO loop: each step samples candidates from the optimizer LLM, scores each
  by the actor's greedy accuracy on a training subset, and keeps the best by training accuracy.
"""

from __future__ import annotations

import random
import re

from tqdm.auto import tqdm

from metatuner.config import Config
from metatuner.io import write_jsonl
from metatuner.prompts import accuracy_of
from metatuner.run import is_main_process
from metatuner.sampling import sample_texts
from metatuner.tasks import Example


def meta_prompt(history: list[tuple[str, float]], problems: list[Example], top_k: int) -> str:
    """The OPRO meta-prompt: previous instructions (ascending score, 0-100), problems, the request."""
    best = sorted(history, key=lambda h: h[1])[-top_k:]
    parts = ["Your task is to generate the instruction <INS>. Below are some previous instructions with their "
             "scores. The score ranges from 0 to 100.\n"]
    for ins, score in best:
        parts.append(f"text:\n{ins}\nscore:\n{round(100 * score)}\n")
    parts.append("Below are some problems.\n")
    for ex in problems:
        parts.append(f"input:\nQ: <INS>\n{ex.query}\nA:\nGround truth answer:\n{ex.answer}\n")
    parts.append("Generate an instruction that is different from all the instructions <INS> above, and has a higher "
                 "score than all the instructions <INS> above. The instruction should begin with <INS> and end with "
                 "</INS>. The instruction should be concise, effective, and generally applicable to all problems above.")
    return "\n".join(parts)


def parse_instruction(text: str) -> str:
    """The text inside <INS></INS>, else the first non-empty line."""
    m = re.search(r"<INS>(.*?)(?:</INS>|$)", text, flags=re.DOTALL)
    if m and m.group(1).strip():
        return m.group(1).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else ""


def optimize(cfg: Config, actor, tok, gen, gtok, task, log_path=None, seeds: list[str] | None = None,
             engine=None) -> tuple[str, float, list[dict], int]:
    """Run OPRO; returns (best instruction, its training accuracy, history rows, optimizer LLM samples).
    `seeds`: the instructions scored first (default [p~]; with a candidate pool, the pool, p~ first).
    `engine`: a vLLM engine over the actor's weights that scores the instructions (generation.backend=vllm)."""
    oc = cfg.opro
    rng = random.Random(cfg.seed)
    subset = task.train[: oc.subset]
    history: list[tuple[str, float]] = []
    rows = []
    seeds = seeds or [task.prompt]
    for ins in seeds:  # the candidate pool seeds the search (same prompts as MetaTuner's pool modes)
        score = accuracy_of(actor, tok, task, subset, ins, cfg.eval.batch_size, engine=engine)
        history.append((ins, score))
        rows.append({"step": 0, "instruction": ins, "train_accuracy": score})
    calls = 0
    bar = tqdm(range(1, oc.steps + 1), desc="opro", leave=False, dynamic_ncols=True, disable=not is_main_process())
    for step in bar:
        problems = rng.sample(task.train, min(oc.exemplars, len(task.train)))
        mp = meta_prompt(history, problems, oc.top_k)
        gens = sample_texts(gen, gtok, [[{"role": "user", "content": mp}]], oc.candidates, oc.max_new_tokens,
                            temperature=oc.temperature)[0]
        calls += len(gens)
        seen = {h[0] for h in history}
        for g in gens:
            ins = parse_instruction(g)
            if not ins or ins in seen or len(ins) > oc.max_chars or "INS" in ins:
                continue
            seen.add(ins)
            acc = accuracy_of(actor, tok, task, subset, ins, cfg.eval.batch_size, engine=engine)
            history.append((ins, acc))
            rows.append({"step": step, "instruction": ins, "train_accuracy": acc})
        bar.set_postfix(best=f"{max(h[1] for h in history):.3f}", scored=len(rows), refresh=False)
    best_ins, best_acc = max(history, key=lambda h: h[1])  # first of the best on ties (p~ wins ties)
    if log_path is not None:
        write_jsonl(log_path, rows)
    return best_ins, best_acc, rows, calls
