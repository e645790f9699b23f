"""Training-step time under bf16 autocast vs fp32 on this machine's CPU (why train.bf16 needs native bf16).

One LoRA training step as SFT takes it (PEFT LoRA on the attention and MLP projections, a batch of
token ids, forward, backward, AdamW step) on the embedded SmolLM2-135M-Instruct, timed with
`torch.autocast("cpu", dtype=torch.bfloat16)` on and off. The two alternate step by step (fp32,
bf16, bf16, fp32, ...: ABBA), so load from other processes falls on both alike. The first step of
each is a warm-up and not timed.

On a CPU without AVX512-BF16 or AMX torch emulates bf16 matrix products, and the step is many times
slower; that is why `train.bf16` applies only where the device has native bf16
(`metatuner.training.bf16_native`) unless `train.bf16_emulated=true`.

    .venv/bin/python benchmarks/bf16_cpu.py [--steps 2] [--batch 8] [--length 96] [--threads 0]

The last line printed is JSON: native_bf16, avx512_bf16, amx, fp32_s_per_step, bf16_s_per_step, slowdown.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=2, help="timed steps of each, after one warm-up step each")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=96, help="tokens per sequence")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from peft import LoraConfig, get_peft_model

    from metatuner.models import load_model
    from metatuner.training import bf16_native

    model, _ = load_model(args.model, dtype="float32", device="cpu")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.length), generator=gen)

    def step(bf16: bool) -> float:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    step(False), step(True)  # warm-up
    times = {False: [], True: []}
    order = [False, True, True, False] * ((args.steps + 1) // 2)
    for bf16 in order:
        if len(times[bf16]) < args.steps:
            times[bf16].append(step(bf16))
    fp32, bf16 = (sum(times[k]) / len(times[k]) for k in (False, True))
    out = {"native_bf16": bf16_native(torch.device("cpu")),
           "avx512_bf16": bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: None)()),
           "amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: None)()),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
           "fp32_s_per_step": round(fp32, 3), "bf16_s_per_step": round(bf16, 3), "slowdown": round(bf16 / fp32, 2),
           "steps_each": args.steps, "batch": args.batch, "length": args.length}
    print(f"fp32 {fp32:.2f} s/step, bf16 autocast {bf16:.2f} s/step: bf16 is {bf16 / fp32:.1f}x the fp32 time "
          f"(native bf16: {out['native_bf16']})")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
