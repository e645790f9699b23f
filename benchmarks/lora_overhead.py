"""Cost of batched per-query LoRA vs static LoRA, a frozen base, and a per-row loop of merged LoRA.

One training step (forward + backward of the LM loss) on a batch of random tokens, for:
  base       frozen base model, backward to the input embeddings (the floor for any adapter)
  static     PEFT LoRA, one adapter for the batch (the SFT/DPO baselines)
  per_query  metatuner.lora.PerQueryLoRA, one LoRA per row (factors: leaf tensors with grad)
  loop       per row: merge W + s*B_i A_i functionally (torch.func.functional_call), fwd/bwd that row

Methods are interleaved (order rotated every repetition) after warm-up; medians are reported.
The last printed line is JSON.

    python benchmarks/lora_overhead.py                                   # embedded SmolLM2-135M
    python benchmarks/lora_overhead.py --shape qwen2.5-3b --layers 2 --batch 4   # real widths, random weights
    python benchmarks/lora_overhead.py --random-config path/to/config.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from contextlib import nullcontext

import torch

from metatuner.config import LoRAConfig
from metatuner.lora import PerQueryLoRA, find_targets, static_lora

SHAPES = {
    "qwen2.5-3b": dict(model_type="qwen2", hidden_size=2048, num_hidden_layers=36, intermediate_size=11008,
                       num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                       max_position_embeddings=32768, tie_word_embeddings=True),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, intermediate_size=18944,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       max_position_embeddings=32768, tie_word_embeddings=False),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192, tie_word_embeddings=True),
}


def build_model(args) -> torch.nn.Module:
    """The embedded/named model, or random weights at a given shape (no hub access needed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if args.shape or args.random_config:
        if args.shape:
            spec = dict(SHAPES[args.shape])
            config = AutoConfig.for_model(spec.pop("model_type"), **spec)
        elif args.random_config.endswith(".json"):
            spec = json.load(open(args.random_config))
            config = AutoConfig.for_model(spec.pop("model_type"), **spec)
        else:
            config = AutoConfig.from_pretrained(args.random_config)
        if args.layers:
            config.num_hidden_layers = args.layers
        if args.vocab:
            config.vocab_size = args.vocab
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        from metatuner.models import load_model

        model, _ = load_model(args.model, dtype=args.dtype, device=args.device)
    model.to(args.device)
    model.eval()
    model.requires_grad_(False)
    return model


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="weights dtype")
    p.add_argument("--autocast", default="bfloat16", choices=["bfloat16", "none"], help="compute under autocast")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rank", type=int, default=LoRAConfig().rank)
    p.add_argument("--model", default="smollm2-135m-instruct", help="model name for metatuner.models.load_model")
    p.add_argument("--shape", choices=sorted(SHAPES), help="random weights at a built-in real shape")
    p.add_argument("--random-config", help="random weights from a HF id (local cache) or a config .json")
    p.add_argument("--layers", type=int, default=0, help="override the number of layers (random weights only)")
    p.add_argument("--vocab", type=int, default=0, help="override the vocabulary size (random weights only)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--methods", default="base,static,per_query,loop")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model(args)
    cfg = LoRAConfig(rank=args.rank)
    targets = find_targets(model, cfg.target_modules, cfg.layers)
    scale = cfg.alpha / cfg.rank
    methods = args.methods.split(",")
    static_model = static_lora(copy.deepcopy(model), cfg) if "static" in methods else None
    lora = PerQueryLoRA(model, targets, cfg.rank, cfg.alpha)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g).to(args.device)
    factors = {
        t.key: (
            (torch.randn(args.batch, cfg.rank, t.in_features, generator=g) * t.in_features ** -0.5).to(args.device).requires_grad_(),
            (torch.randn(args.batch, t.out_features, cfg.rank, generator=g) * 0.01).to(args.device).requires_grad_(),
        )
        for t in targets
    }
    weights = {t.path: dict(model.named_modules())[t.path].weight for t in targets}
    device_type = torch.device(args.device).type
    autocast = (lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if args.autocast == "bfloat16" else nullcontext

    def step_base():
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        with autocast():
            loss = model(inputs_embeds=embeds, labels=ids).loss
        loss.backward()

    def step_static():
        with autocast():
            loss = static_model(input_ids=ids, labels=ids).loss
        loss.backward()
        static_model.zero_grad(set_to_none=True)

    def step_per_query():
        with lora.use_factors(factors), autocast():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for a, b in factors.values():
            a.grad = b.grad = None

    def step_loop():
        for i in range(args.batch):
            merged = {}
            for t in targets:
                A, B = factors[t.key]
                merged[f"{t.path}.weight"] = weights[t.path] + scale * (B[i] @ A[i])
            with autocast():
                loss = torch.func.functional_call(model, merged, args=(), kwargs=dict(
                    input_ids=ids[i:i + 1], labels=ids[i:i + 1])).loss / args.batch
            loss.backward()
        for a, b in factors.values():
            a.grad = b.grad = None

    steps = {"base": step_base, "static": step_static, "per_query": step_per_query, "loop": step_loop}
    times: dict[str, list[float]] = {m: [] for m in methods}
    for rep in range(args.warmup + args.reps):
        order = methods[rep % len(methods):] + methods[: rep % len(methods)]
        for m in order:
            t0 = time.perf_counter()
            steps[m]()
            if device_type == "cuda":
                torch.cuda.synchronize()
            elapsed = (time.perf_counter() - t0) * 1000
            if rep >= args.warmup:
                times[m].append(elapsed)
        if rep < args.warmup:
            print(f"warm-up {rep + 1} done", file=sys.stderr)
        else:
            print(f"rep {rep - args.warmup + 1}: " + ", ".join(f"{m} {times[m][-1]:.0f} ms" for m in methods),
                  file=sys.stderr)

    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"{len(targets)} targets, rank {cfg.rank}, batch {args.batch} x {args.seq} tokens, "
          f"autocast {args.autocast}, {torch.get_num_threads()} threads")
    for m in methods:
        print(f"  {m:10s} median {med[m]:9.1f} ms   min {min(times[m]):9.1f} ms   runs {' '.join(f'{x:.0f}' for x in times[m])}")
    result = {
        "base_ms": round(med.get("base", float("nan")), 1),
        "static_ms": round(med.get("static", float("nan")), 1),
        "per_query_ms": round(med.get("per_query", float("nan")), 1),
        "loop_ms": round(med.get("loop", float("nan")), 1),
        "ratio_per_query_vs_static": round(med["per_query"] / med["static"], 3) if {"per_query", "static"} <= med.keys() else None,
        "speedup_vs_loop": round(med["loop"] / med["per_query"], 3) if {"per_query", "loop"} <= med.keys() else None,
    }
    # The machine may be shared: min is the least noisy estimate of each method's own cost.
    best = {m: min(v) for m, v in times.items()}
    if {"per_query", "static", "loop"} <= best.keys():
        result["min_ratio_per_query_vs_static"] = round(best["per_query"] / best["static"], 3)
        result["min_speedup_vs_loop"] = round(best["loop"] / best["per_query"], 3)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
