"""MetaTuner's joint step with G sharded (FSDP2, `metatuner.sharding`) beside the same step with G whole on every
process (DDP, what `configs/accelerate/multi_gpu.yaml` runs), in one launch, random weights:

    torchrun --standalone --nproc_per_node 2 benchmarks/sharded_step.py                 # CPU, embedded model's shapes
    torchrun --nproc_per_node 8 benchmarks/sharded_step.py --shapes paper --device cuda  # GPUs: Qwen2.5-7B G, 3B M

Per process, for each layout: the bytes of G's parameters it holds (whole, or its shards), and of the
gradients and AdamW's state of what trains in G and of F (F stays whole in both layouts) after a step
(`*_mb`); the step's median time over --reps repetitions, one layout after the other (`*_step_ms`); on CUDA,
the step's peak allocated memory (`*_peak_mb`, counter reset before each layout's first step).
The two layouts train the same system from the same weights and batch; `loss_rel_diff` is the relative
difference of their first-step losses. Rank 0 prints one JSON line last. The step is the joint phase's (the
J loss over one batch, backward, gradient averaging, clipping, AdamW); D2's rollouts are not in it.
With generator.lora_rank=0 (`--full-g`) all of G trains: gradients and AdamW's state then scale with G.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).parent))

from paper_scale import random_model, shape_args, shape_batch, shapes  # noqa: E402


def mb(x: float) -> float:
    return round(x / 2**20, 2)


def local_bytes(tensors) -> int:
    """Bytes this process holds of these tensors (a sharded one: its shard)."""
    from metatuner.sharding import is_dtensor

    total = 0
    for t in tensors:
        t = t.to_local() if is_dtensor(t) else t
        total += t.numel() * t.element_size()
    return total


def run(argv: list[str] | None = None) -> dict:
    ap = shape_args(__doc__, 4, "queries per process")
    ap.add_argument("--full-g", action="store_true", help="generator.lora_rank=0: all of G trains")
    args = ap.parse_args(argv)

    from metatuner.methods.metatuner import MetaTunerSystem
    from metatuner.models import resolve_device
    from metatuner.sharding import average_gradients, clip_grad_norm, shard_generator

    if "WORLD_SIZE" not in os.environ:
        raise SystemExit("launch with torchrun --nproc_per_node N (N >= 2) benchmarks/sharded_step.py ...")
    dev = resolve_device(args.device)
    cuda = dev.type == "cuda"
    if cuda:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.bfloat16 if cuda else torch.float32
    g_spec, m_spec, overrides = shapes(args.shapes)
    if args.full_g:
        overrides = [o for o in overrides if not o.startswith("generator.lora")] + ["generator.lora_rank=0"]
    cfg, task, tok, exs = shape_batch(args, cuda, overrides, tag=f"{rank} ")
    prompts = [task.prompt] * len(exs)

    def build(sharded: bool):
        from torch.nn.parallel import DistributedDataParallel

        from metatuner.methods.metatuner.loop import _Trained

        gen, actor = random_model(g_spec, dtype, dev, tok), random_model(m_spec, dtype, dev, tok)
        torch.manual_seed(1)  # F's first weights: the same in both layouts
        system = MetaTunerSystem(cfg, actor, tok, gen, tok, task)
        system.gen.model.train()
        module = _Trained(system)
        if sharded:
            shard_generator(system.gen)
            system.sharded = True
        else:
            module = DistributedDataParallel(module, find_unused_parameters=True, broadcast_buffers=False,
                                             device_ids=[dev.index] if cuda else None)
        groups = system.trainable_groups()
        opt = torch.optim.AdamW(groups)
        params = [p for g in groups for p in g["params"]]
        return system, module, opt, params

    def step(system, module, opt, params, sharded: bool) -> float:
        opt.zero_grad(set_to_none=True)
        task_loss, reg = module(lambda: system.joint_losses(exs, prompts, prompts))
        loss = task_loss + cfg.train.alpha * reg
        loss.backward()
        if sharded:
            average_gradients(params)
            clip_grad_norm(params, 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.item()

    def timed(fn) -> float:
        if cuda:
            torch.cuda.synchronize(dev)
        dist.barrier()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(dev)
        return (time.perf_counter() - t) * 1000

    out: dict = {"shapes": args.shapes, "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
                 "processes": world, "dtype": str(dtype), "batch_per_process": args.batch,
                 "generator_lora_rank": cfg.generator.lora_rank, "versions": {"torch": torch.__version__}}
    losses = {}
    for name, sharded in (("ddp", False), ("sharded", True)):
        system, module, opt, params = build(sharded)
        if cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        losses[name] = step(system, module, opt, params, sharded)  # first step: warm-up, AdamW's state made
        if cuda:
            out[f"{name}_peak_mb"] = mb(torch.cuda.max_memory_allocated(dev))
        out[f"{name}_generator_params_mb"] = mb(local_bytes(system.gen.model.parameters()))
        in_g = {id(p) for p in system.generator_parameters()}
        for part, keep in (("generator", lambda p: id(p) in in_g), ("f", lambda p: id(p) not in in_g)):
            out[f"{name}_{part}_grads_mb"] = mb(local_bytes(p.grad for p in params if keep(p) and p.grad is not None))
            out[f"{name}_{part}_adam_mb"] = mb(local_bytes(t for p, st in opt.state.items() if keep(p)
                                                           for t in st.values() if torch.is_tensor(t) and t.dim() > 0))
        out[f"{name}_step_ms"] = round(statistics.median(
            timed(lambda: step(system, module, opt, params, sharded)) for _ in range(args.reps)), 1)
        del system, module, opt, params
        if cuda:
            torch.cuda.empty_cache()
    out["loss_rel_diff"] = abs(losses["sharded"] - losses["ddp"]) / abs(losses["ddp"])
    out["generator_params_ratio"] = round(out["sharded_generator_params_mb"] / out["ddp_generator_params_mb"], 3)
    out["step_ratio_sharded_vs_ddp"] = round(out["sharded_step_ms"] / out["ddp_step_ms"], 3)
    if cuda:
        out["peak_ratio_sharded_vs_ddp"] = round(out["sharded_peak_mb"] / out["ddp_peak_mb"], 3)
    if rank == 0:
        print(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()
    return out


if __name__ == "__main__":
    run()
