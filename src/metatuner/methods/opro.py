"""OPRO baseline (Yang et al., 2023): an LLM optimizer proposes instructions from a meta-prompt.

Each step the meta-prompt lists the best previous instructions with their scores in ascending
order, a few training problems with their answers, and asks for a new, different, better
instruction in <INS></INS>. Several candidates are sampled at temperature 1; each is scored by
the actor's greedy accuracy on a training subset; the best by training accuracy is kept and
evaluated on the test split. The generator is the optimizer LLM; the actor is never trained.

    metatuner train method=opro opro.steps=3 opro.candidates=4 opro.subset=32
"""

from __future__ import annotations

import random
import re
import time

import torch
from tqdm.auto import tqdm

from metatuner.config import Config
from metatuner.io import write_jsonl
from metatuner.prompts import accuracy_of, optimizer_llm, sample_texts
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


def optimize(cfg: Config, actor, tok, gen, gtok, task, log_path=None) -> tuple[str, float, list[dict], int]:
    """Run OPRO; returns (best instruction, its training accuracy, history rows, optimizer LLM samples)."""
    oc = cfg.opro
    rng = random.Random(cfg.seed)
    subset = task.train[: oc.subset]
    history: list[tuple[str, float]] = []
    rows = []
    score = accuracy_of(actor, tok, task, subset, task.prompt, cfg.eval.batch_size)
    history.append((task.prompt, score))
    rows.append({"step": 0, "instruction": task.prompt, "train_accuracy": score})
    calls = 0
    for step in tqdm(range(1, oc.steps + 1), desc="opro", leave=False):
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
            acc = accuracy_of(actor, tok, task, subset, ins, cfg.eval.batch_size)
            history.append((ins, acc))
            rows.append({"step": step, "instruction": ins, "train_accuracy": acc})
    best_ins, best_acc = max(history, key=lambda h: h[1])  # first of the best on ties (p~ wins ties)
    if log_path is not None:
        write_jsonl(log_path, rows)
    return best_ins, best_acc, rows, calls


def run(cfg: Config) -> dict:
    from metatuner.models import load_from_config
    from metatuner.run import final_eval, is_main_process, start_run

    t0 = time.time()
    task = start_run(cfg)
    actor, tok = load_from_config(cfg.model)
    gen, gtok = optimizer_llm(cfg, actor, tok)
    path = f"{cfg.output_dir}/opro_history.jsonl" if is_main_process() else None
    with torch.no_grad():
        best, acc, rows, calls = optimize(cfg, actor, tok, gen, gtok, task, path)
        scored = len(rows) * min(cfg.opro.subset, len(task.train))
        return final_eval(cfg, actor, tok, task, best, extra={
            "prompt": best, "train_accuracy": acc, "instructions_scored": len(rows), "generation_calls": calls + scored,
            "train_steps": 0, "train_examples": 0, "train_seconds": round(time.time() - t0, 1)})
