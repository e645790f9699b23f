"""BetterTogether baseline (Soylu et al., 2024; DSPy): alternate prompt optimization and fine-tuning.

The strategy string (default "p -> w -> p") is a sequence of steps:
- p: prompt optimization. Bootstrap demonstrations from the actor's own correct traces on training
  queries; propose new instructions with the generator (an OPRO-style meta-prompt); score each
  instruction on the validation split, then random demo sets (1..max_demos) under the best
  instruction; keep the best program (instruction + demos) by validation accuracy.
- w: LoRA SFT (TRL) of the actor on its own correct traces under the current prompt; the adapter
  is merged so a later step starts from the fine-tuned actor. `train.max_steps` is the total over
  all w steps, split evenly (earlier steps take the remainder); train_log.jsonl logs each (phase wI).
After every step the program is scored on validation; the best-scoring program is returned and
evaluated on the test split.

    metatuner train method=bettertogether bettertogether.strategy="p -> w -> p"
"""

from __future__ import annotations

import random
import time

import torch
from tqdm.auto import tqdm

from metatuner.config import Config
from metatuner.errors import MetatunerError
from metatuner.io import write_jsonl
from metatuner.lora_sft import examples_per_step, split_steps, train_sft
from metatuner.metaprompt import meta_prompt, parse_instruction
from metatuner.prompts import accuracy_of, bootstrap_traces, optimizer_llm, with_demos
from metatuner.sampling import sample_texts
from metatuner.train_log import open_train_log


def parse_strategy(s) -> list[str]:
    """'p -> w -> p' -> ['p', 'w', 'p'] (spaces optional); anything else is a one-line MetatunerError."""
    steps = [x.strip() for x in str(s).split("->")] if isinstance(s, str) else []
    if not steps or any(x not in ("p", "w") for x in steps):
        raise MetatunerError(f"bettertogether.strategy: expected steps 'p' and 'w' joined by ' -> ' "
                             f"(e.g. 'p -> w -> p'), got {s!r}")
    return steps


def prompt_step(cfg: Config, actor, tok, gen, gtok, task, instruction: str, rng: random.Random, val,
                train=None, pool: list[str] = ()) -> tuple[str, str, float, int]:
    """-> (instruction, full prompt, validation accuracy, generation calls). `train`: this step's
    (shuffled) training list, default task.train; `pool`: candidate prompts scored beside the proposals."""
    bt = cfg.bettertogether
    bs = cfg.eval.batch_size
    train = task.train if train is None else train
    queries = train[: bt.queries]
    traces = bootstrap_traces(actor, tok, task, queries, instruction, bs)
    calls = len(queries)
    scored = [(instruction, accuracy_of(actor, tok, task, val, instruction, bs))]
    for cand in pool:  # the candidate pool (prompts.*), as MetaTuner's pool modes get it
        if cand != instruction:
            scored.append((cand, accuracy_of(actor, tok, task, val, cand, bs)))
    if bt.instructions > 0:
        problems = rng.sample(train, min(cfg.opro.exemplars, len(train)))
        outs = sample_texts(gen, gtok, [[{"role": "user", "content": meta_prompt(scored, problems, cfg.opro.top_k)}]],
                            bt.instructions, cfg.opro.max_new_tokens, temperature=cfg.opro.temperature)[0]
        calls += len(outs)
        for ins in dict.fromkeys(parse_instruction(o) for o in outs):
            if ins and ins != instruction and len(ins) <= cfg.opro.max_chars and "INS" not in ins:
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


def weight_step(cfg: Config, actor, tok, task, prompt: str, out_dir: str, step_i: int, train=None, steps: int = -1,
                log=None):
    """`steps` (-1: train.max_steps) of SFT on the actor's own correct traces; returns (merged actor,
    examples trained on, generation calls, tokens trained on, optimizer steps taken)."""
    from metatuner.tasks import Example

    steps = cfg.train.max_steps if steps < 0 else steps
    queries = (task.train if train is None else train)[: cfg.bettertogether.queries]
    traces = bootstrap_traces(actor, tok, task, queries, prompt, cfg.eval.batch_size)
    if not traces or steps <= 0:
        return actor, 0, len(queries), 0, 0
    data = [Example(query=ex.query, answer=ex.answer, target=g) for ex, g in traces]
    peft_model = train_sft(cfg, actor, tok, task, data, prompt, f"{out_dir}/w{step_i}", steps, cfg.train.lr, log=log,
                           phase=f"w{step_i}")
    tokens = peft_model.train_metrics.get("train_tokens", 0)
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged, len(data), len(queries), tokens, peft_model.train_metrics["train_steps"]


def run(cfg: Config) -> dict:
    from metatuner.models import load_from_config
    from metatuner.run import final_eval, is_main_process, start_run

    t0 = time.time()
    task = start_run(cfg)
    steps = parse_strategy(cfg.bettertogether.strategy)
    val = task.validation[: cfg.bettertogether.val_examples]
    if not val:
        raise MetatunerError(f"task {task.name!r}: bettertogether needs a validation split (task.val_size > 0)")
    actor, tok = load_from_config(cfg.model)
    gen, gtok = optimizer_llm(cfg, actor, tok)
    same = gen is actor
    rng = random.Random(cfg.seed)
    from metatuner.pool import build_pool, pool_requested

    pool = build_pool(cfg, task, actor if same else gen, tok if same else gtok) if pool_requested(cfg) else []
    w_budget = iter(split_steps(cfg.train.max_steps, steps.count("w")))
    log = open_train_log(cfg.output_dir, append=False)
    instruction, prompt = task.prompt, task.prompt
    with torch.no_grad():
        acc0 = accuracy_of(actor, tok, task, val, prompt, cfg.eval.batch_size)
    best = {"acc": acc0, "step": "start", "prompt": prompt, "instruction": instruction}
    history = [{"step": "start", "prompt": prompt, "val_accuracy": acc0}]
    calls, w_steps, w_examples, w_tokens = len(val), 0, 0, 0
    # which actor weights the best program uses: "original" (as loaded), "current" (the live actor: no weight
    # step changed it since), or a CPU copy of its state (a later weight step changed it)
    best_weights = "original"
    trained = False  # has any weight step changed the live actor
    bar = tqdm(steps, desc="bettertogether", leave=False, dynamic_ncols=True, disable=not is_main_process())
    for i, s in enumerate(bar):
        # DSPy shuffles the trainset between steps (shuffle_trainset_between_steps=True)
        train = rng.sample(task.train, len(task.train))
        if s == "p":
            with torch.no_grad():
                instruction, prompt, acc, c = prompt_step(cfg, actor, tok, actor if same else gen, tok if same else gtok,
                                                          task, instruction, rng, val, train, pool)
            calls += c
        else:
            # the best program so far runs on the live actor's weights: keep a CPU copy before changing them
            snapshot = ({k: v.detach().to("cpu", copy=True) for k, v in actor.state_dict().items()}
                        if best_weights == "current" else None)
            actor, n_data, c, n_tokens, n_steps = weight_step(cfg, actor, tok, task, prompt, cfg.output_dir, i, train,
                                                              next(w_budget), log)
            calls += c
            w_tokens += n_tokens
            if n_data:
                trained = True
                w_steps += n_steps
                w_examples += n_data
                if snapshot is not None:
                    best_weights = snapshot
            del snapshot
            with torch.no_grad():
                acc = accuracy_of(actor, tok, task, val, prompt, cfg.eval.batch_size)
            calls += len(val)
        history.append({"step": f"{i}:{s}", "instruction": instruction, "prompt": prompt, "val_accuracy": acc})
        bar.set_postfix(step=f"{i}:{s}", val=f"{acc:.3f}", best=f"{max(acc, best['acc']):.3f}", refresh=False)
        if acc > best["acc"]:  # strict: on ties the earlier (cheaper) program stays
            best = {"acc": acc, "step": f"{i}:{s}", "prompt": prompt, "instruction": instruction}
            best_weights = "current" if trained else "original"
    if isinstance(best_weights, dict):
        actor.load_state_dict(best_weights)
    elif best_weights == "original" and trained:
        actor, tok = load_from_config(cfg.model)  # the best program uses the unoptimized weights
    if is_main_process():
        write_jsonl(f"{cfg.output_dir}/bettertogether_history.jsonl", history)
    with torch.no_grad():
        return final_eval(cfg, actor, tok, task, best["prompt"], extra={
            "prompt": best["prompt"], "best_step": best["step"], "val_accuracy": best["acc"],
            "bettertogether_strategy": cfg.bettertogether.strategy, "w_traces": w_examples,
            "train_steps": w_steps, "train_examples": w_steps * examples_per_step(cfg), "train_tokens": w_tokens,
            "generation_calls": calls,
            "train_seconds": round(time.time() - t0, 1)})
