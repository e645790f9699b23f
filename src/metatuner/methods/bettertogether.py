"""BetterTogether baseline (Soylu et al., 2024; DSPy): alternate prompt optimization and fine-tuning.

The strategy string (default "p -> w -> p") is a sequence of steps:
- p: prompt optimization. Bootstrap demonstrations from the actor's own correct traces on training
  queries; propose new instructions with the generator (an OPRO-style meta-prompt); score each
  instruction on the validation split, then random demo sets (1..max_demos) under the best
  instruction; keep the best program (instruction + demos) by validation accuracy.
- w: LoRA SFT (TRL) of the actor on its own correct traces under the current prompt; the adapter
  is merged so a later step starts from the fine-tuned actor.
After every step the program is scored on validation; the best-scoring program is returned and
evaluated on the test split.

    metatuner train method=bettertogether bettertogether.strategy="p -> w -> p"
"""

from __future__ import annotations

import random
import time

import torch

from metatuner.config import Config
from metatuner.errors import MetatunerError
from metatuner.io import write_jsonl
from metatuner.methods.opro import meta_prompt, parse_instruction
from metatuner.prompts import accuracy_of, bootstrap_traces, optimizer_llm, sample_texts, with_demos


def parse_strategy(s: str) -> list[str]:
    steps = [x.strip() for x in s.split("->")]
    if not steps or any(x not in ("p", "w") for x in steps):
        raise MetatunerError(f"bettertogether.strategy: expected steps 'p' and 'w' joined by ' -> ', got {s!r}")
    return steps


def prompt_step(cfg: Config, actor, tok, gen, gtok, task, instruction: str, rng: random.Random, val) -> tuple[str, str, float, int]:
    """-> (instruction, full prompt, validation accuracy, generation calls)."""
    bt = cfg.bettertogether
    bs = cfg.eval.batch_size
    queries = task.train[: bt.queries]
    traces = bootstrap_traces(actor, tok, task, queries, instruction, bs)
    calls = len(queries)
    scored = [(instruction, accuracy_of(actor, tok, task, val, instruction, bs))]
    if bt.instructions > 0:
        problems = rng.sample(task.train, min(3, len(task.train)))
        outs = sample_texts(gen, gtok, [[{"role": "user", "content": meta_prompt(scored, problems, 20)}]],
                            bt.instructions, cfg.opro.max_new_tokens, temperature=cfg.opro.temperature)[0]
        calls += len(outs)
        for ins in dict.fromkeys(parse_instruction(o) for o in outs):
            if ins and ins != instruction and len(ins) <= cfg.opro.max_chars:
                scored.append((ins, accuracy_of(actor, tok, task, val, ins, bs)))
    best_ins, best_acc = max(scored, key=lambda x: x[1])
    best_prompt = best_ins
    if traces:
        for _ in range(bt.demo_sets):
            k = rng.randint(1, min(bt.max_demos, len(traces)))
            demos = [(ex.query, gen_text) for ex, gen_text in rng.sample(traces, k)]
            prompt = with_demos(best_ins, demos)
            acc = accuracy_of(actor, tok, task, val, prompt, bs)
            if acc > best_acc:
                best_prompt, best_acc = prompt, acc
    calls += len(val) * (len(scored) + (bt.demo_sets if traces else 0))
    return best_ins, best_prompt, best_acc, calls


def weight_step(cfg: Config, actor, tok, task, prompt: str, out_dir: str, step_i: int):
    """SFT on the actor's own correct traces; returns (merged actor, examples trained on)."""
    from metatuner.methods.sft import train_sft
    from metatuner.tasks import Example

    traces = bootstrap_traces(actor, tok, task, task.train[: cfg.bettertogether.queries], prompt, cfg.eval.batch_size)
    if not traces:
        return actor, 0, len(task.train[: cfg.bettertogether.queries])
    data = [Example(query=ex.query, answer=ex.answer, target=g) for ex, g in traces]
    peft_model = train_sft(cfg, actor, tok, task, data, prompt, f"{out_dir}/w{step_i}", cfg.train.max_steps, cfg.train.lr)
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged, len(data), len(task.train[: cfg.bettertogether.queries])


def run(cfg: Config) -> dict:
    from metatuner.models import load_from_config
    from metatuner.run import final_eval, is_main_process, start_run

    t0 = time.time()
    task = start_run(cfg)
    steps = parse_strategy(cfg.bettertogether.strategy)
    actor, tok = load_from_config(cfg.model)
    gen, gtok = optimizer_llm(cfg, actor, tok)
    same = gen is actor
    val = task.validation[: cfg.bettertogether.val_examples]
    if not val:
        raise MetatunerError(f"task {task.name!r}: bettertogether needs a validation split (task.val_size > 0)")
    rng = random.Random(cfg.seed)
    instruction, prompt = task.prompt, task.prompt
    with torch.no_grad():
        best = (accuracy_of(actor, tok, task, val, prompt, cfg.eval.batch_size), "start", prompt)
    history = [{"step": "start", "prompt": prompt, "val_accuracy": best[0]}]
    calls, w_steps, w_examples = 0, 0, 0
    best_actor_state = None
    for i, s in enumerate(steps):
        if s == "p":
            with torch.no_grad():
                instruction, prompt, acc, c = prompt_step(cfg, actor, tok, actor if same else gen, tok if same else gtok,
                                                          task, instruction, rng, val)
            calls += c
        else:
            actor, n_data, c = weight_step(cfg, actor, tok, task, prompt, cfg.output_dir, i)
            calls += c
            w_steps += cfg.train.max_steps if n_data else 0
            w_examples += n_data
            with torch.no_grad():
                acc = accuracy_of(actor, tok, task, val, prompt, cfg.eval.batch_size)
        history.append({"step": f"{i}:{s}", "prompt": prompt, "val_accuracy": acc})
        if acc > best[0]:
            best = (acc, f"{i}:{s}", prompt)
            best_actor_state = {k: v.detach().clone() for k, v in actor.state_dict().items()} if "w" in steps else None
    if best_actor_state is not None:
        actor.load_state_dict(best_actor_state)
    elif any(h["step"].endswith(":w") for h in history[1:]) and best[1] == "start":
        actor, tok = load_from_config(cfg.model)  # the unoptimized program won: the original actor
    if is_main_process():
        write_jsonl(f"{cfg.output_dir}/bettertogether_history.jsonl", history)
    with torch.no_grad():
        return final_eval(cfg, actor, tok, task, best[2], extra={
            "prompt": best[2], "best_step": best[1], "val_accuracy": best[0], "strategy": cfg.bettertogether.strategy,
            "train_steps": w_steps, "train_examples": w_steps * cfg.train.batch_size, "generation_calls": calls,
            "train_seconds": round(time.time() - t0, 1)})
