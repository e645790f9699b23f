"""Sampling throughput (test examples per second at n samples each): every prompt run n times vs once.

Same model (default: the embedded SmolLM2-135M-Instruct), task, prompt, test examples, temperature and
seed; `generate_texts(..., num_return_sequences=n)` with share_prompt off (Hugging Face's
num_return_sequences: each prompt's n copies are each run through the model) and on (each prompt run
once, its cache copied to its n samples). Both draw the same random numbers in the same order, so the
samples should be the same up to float rounding; the script counts those that differ.

--strategy early_majority times `evaluate(strategy="early_majority")` instead: rounds of samples per batch
until each query's vote settles, with the batch's prompts run once and their cache reused in every
round (on) or every round running its prompts again (off).

The examples are cut into chunks; each chunk is sampled by both, in the order off-on, on-off, ... (ABBA),
so changing load from other processes falls on both alike. On a shared machine use --threads 1.

    .venv/bin/python benchmarks/sample_throughput.py [--n 64] [--samples 8] [--batch 16] [--task basic_arithmetic]
    .venv/bin/python benchmarks/sample_throughput.py --strategy early_majority

The last line printed is JSON: off_ex_per_s, on_ex_per_s, speedup, same_samples (position by position),
off_samples, on_samples, ...
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def _no_reuse(generate_texts):
    """generate_texts that runs every call's prompts again (early stopping's rounds before PromptCache)."""
    def run(*a, prompt_cache=None, **kw):
        return generate_texts(*a, **kw, share_prompt=False)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--task", default="basic_arithmetic")
    ap.add_argument("--n", type=int, default=64, help="test examples")
    ap.add_argument("--samples", type=int, default=8, help="samples per example (num_return_sequences)")
    ap.add_argument("--batch", type=int, default=16, help="examples per generate call (draw_samples' batch)")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--chunk", type=int, default=32, help="examples per off/on alternation")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strategy", default="plain", choices=["plain", "early_majority"],
                    help="plain: generate_texts with n samples; early_majority: evaluate's rounds")
    ap.add_argument("--stop-threshold", type=float, default=0.75, help="early_majority: the Beta rule's threshold")
    ap.add_argument("--device", default="auto")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides (e.g. task.max_new_tokens=48)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import metatuner.evaluate as ev
    from metatuner.config import load_config
    from metatuner.evaluate import evaluate
    from metatuner.generation import chat_text, generate_texts
    from metatuner.models import load_from_config
    from metatuner.tasks import load_task

    cfg = load_config(None, [f"model.name={args.model}", f"task.name={args.task}", f"model.device={args.device}",
                             f"task.test_size={args.n}", *args.overrides])
    task = load_task(cfg.task, 0)
    model, tok = load_from_config(cfg.model)
    model.eval()
    examples = task.test[: args.n]
    texts = [chat_text(tok, task.render(task.prompt, ex.query)) for ex in examples]
    secs = {False: 0.0, True: 0.0}
    outs: dict[bool, list] = {False: [], True: []}
    for c, start in enumerate(range(0, len(texts), args.chunk)):
        part = texts[start : start + args.chunk]
        for share in ((False, True) if c % 2 == 0 else (True, False)):
            t = time.perf_counter()
            if args.strategy == "early_majority":
                ev.generate_texts = generate_texts if share else _no_reuse(generate_texts)
                torch.manual_seed(args.seed + start)
                recs, _ = evaluate(model, tok, task, examples[start : start + args.chunk], batch_size=args.batch,
                                   strategy="early_majority", n=args.samples, temperature=args.temperature,
                                   stop_threshold=args.stop_threshold, stop_min=2, progress=False, diagnose=False)
                outs[share] += [s for r in recs for s in r["generations"]]
            else:
                for b in range(0, len(part), args.batch):
                    torch.manual_seed(args.seed + start + b)  # the same random numbers for both
                    gens, _, lps = generate_texts(model, tok, part[b : b + args.batch], task.max_new_tokens,
                                                  do_sample=True, temperature=args.temperature,
                                                  num_return_sequences=args.samples, return_logprobs=True,
                                                  answer_end=getattr(task, "answer_end", ""), share_prompt=share)
                    outs[share] += [s for row in gens for s in row]
            secs[share] += time.perf_counter() - t
        print(f"{start + len(part)}/{len(texts)}: off {secs[False]:.1f} s, on {secs[True]:.1f} s", flush=True)
    same = sum(a == b for a, b in zip(outs[False], outs[True]))
    n = len(texts)
    print(f"{'':8}{'ex/s':>8}{'seconds':>9}")
    for share, name in ((False, "off"), (True, "on")):
        print(f"{name:8}{n / secs[share]:8.2f}{secs[share]:9.1f}")
    print(json.dumps({"model": args.model, "task": args.task, "strategy": args.strategy, "n": n,
                      "samples": args.samples, "batch": args.batch,
                      "threads": torch.get_num_threads(), "max_new_tokens": task.max_new_tokens,
                      "off_ex_per_s": round(n / secs[False], 3), "on_ex_per_s": round(n / secs[True], 3),
                      "speedup": round(secs[False] / secs[True], 2), "same_samples": same,
                      "off_samples": len(outs[False]), "on_samples": len(outs[True])}))


if __name__ == "__main__":
    main()
