"""MetaTuner's joint phase sharded with PyTorch FSDP2 (`fully_shard`), when launched with an FSDP config
(`accelerate launch --config_file configs/accelerate/fsdp.yaml`, which sets ACCELERATE_USE_FSDP=true)
on more than one process.

What is sharded: the generator G (each decoder layer one unit, the embeddings, final norm and head in
the root unit), its base weights and what trains in it (LoRA factors, or all of G with
generator.lora_rank=0), their gradients and optimizer state; phi_p' follows phi_p's sharding. What is
not: the actor (frozen; it answers a different number of candidates on each process, which sharded
layers cannot, since every forward pass of a sharded module is a collective) and F (small; its
gradients are averaged across the processes by `average_gradients`). The rules that keep the
collectives in step: every process calls G the same number of times (equal query shares, equal pool
widths; `generate(synced_gpus=True)` runs until every process is done), and F's input states for the
actor's candidate scoring are computed once per rollout (`SplitGenerator.encode` with equal chunks).

Accelerate applies FSDP only on GPUs; the sharding here is applied by us, so it also runs on CPUs
(gloo) under `torchrun` with ACCELERATE_USE_FSDP=true, which is how the tests check it.
Checkpoints hold full tensors (gathered), so a sharded run's files are those of a DDP run; the
optimizer state is saved whole (`torch.distributed.checkpoint.state_dict`) for exact resume.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from metatuner.errors import MetatunerError


def sharded_launch() -> bool:
    """Whether the joint phase shards G: an FSDP launch with more than one process."""
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    return fsdp and int(os.environ.get("WORLD_SIZE", "1")) > 1


def check_settings(cfg) -> None:
    """One-line errors, before any training, for what the sharded joint phase does not do."""
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if fsdp and world == 1:  # on GPUs accelerate would wrap the joint phase's module in FSDP itself
        raise MetatunerError(f"method={cfg.method} under FSDP (ACCELERATE_USE_FSDP=true) with one process: nothing to "
                             "shard; launch it without the FSDP config (python -m metatuner.cli train ...), or with "
                             "two or more processes")
    if not fsdp:
        return
    bad = []
    if cfg.method == "metatuner_gumbel":
        bad.append("method=metatuner_gumbel (its prompts stop at a different token on each process)")
    if not cfg.generator.share_encoder:
        bad.append("generator.share_encoder=false (F's own encoder copy is not sharded)")
    if cfg.generation.backend == "vllm":
        bad.append("generation.backend=vllm (the engine would need G's full weights on every step)")
    if os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() == "true":
        bad.append("fsdp_cpu_ram_efficient_loading: true (only the first process would hold G's weights)")
    if cfg.warmup.generator_steps > 0 and cfg.train.prompt_rewrite and cfg.warmup.queries % world:
        bad.append(f"warmup.queries={cfg.warmup.queries} not a multiple of the {world} processes "
                   "(each must roll out as many queries)")
    if bad:
        raise MetatunerError(f"method={cfg.method} under FSDP (ACCELERATE_USE_FSDP=true, {world} processes): "
                             f"not supported with {'; '.join(bad)}; change it, or launch on DDP "
                             "(configs/accelerate/multi_gpu.yaml)")


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def shard_generator(gen) -> None:
    """`fully_shard` G's decoder layers and then G itself over all processes (this machine's device
    type), and re-make phi_p' with phi_p's sharding (same values)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    from metatuner.lora import decoder_layers

    model = gen.model
    kind = model.device.type
    mesh = init_device_mesh(kind, (torch.distributed.get_world_size(),))
    for layer in decoder_layers(model)[1]:
        fully_shard(layer, mesh=mesh)
    # The root (embeddings, norm, head) reshards after every forward too (FSDP2 keeps a root gathered by
    # default, for the backward that usually follows): G also runs without gradients (sampling, scoring),
    # and its parameters must be the sharded ones whenever they are read (optimizer, phi_p' swaps, saves).
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    plain = [n for n, p in model.named_parameters() if not is_dtensor(p)]
    if plain:
        raise MetatunerError(f"generator: sharding left {len(plain)} parameters whole (e.g. {plain[0]})")
    live = gen.live_decoder_state()
    with torch.no_grad():
        for n, buf in gen.frozen_state().items():
            p = live[n]
            d = distribute_tensor(buf.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            setattr(gen.frozen, n.replace(".", "__"), d)


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from every process when sharded: a collective), detached."""
    t = t.detach()
    return t.full_tensor() if is_dtensor(t) else t


def copy_full_into(t: torch.Tensor, value: torch.Tensor) -> None:
    """t <- value, where t may be sharded and value is the whole tensor (each process keeps its part)."""
    if is_dtensor(t):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(t.device, t.dtype), t.device_mesh, t.placements, src_data_rank=None)
    t.copy_(value)


def average_gradients(params: list[nn.Parameter]) -> None:
    """Mean of the plain (unsharded) parameters' gradients over the processes, as DDP would leave them
    (sharded ones are reduced by FSDP itself). A parameter no process's loss reached keeps no gradient
    (so Adam leaves it alone, as under DDP). Every process calls it, with the same parameters."""
    import torch.distributed as dist

    plain = [p for p in params if not is_dtensor(p)]
    if not plain:
        return
    dev = plain[0].device
    reached = torch.tensor([float(p.grad is not None) for p in plain], device=dev)
    dist.all_reduce(reached, op=dist.ReduceOp.MAX)
    world = dist.get_world_size()
    for p, r in zip(plain, reached.tolist()):
        if not r:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ over a mix of sharded and plain parameters: the 2-norm of all gradients
    together (the sharded ones' over all their shards: local sums of squares, one all-reduce), each scaled
    by max_norm / norm when above. Every process calls it."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g.to_local() for g in grads if is_dtensor(g)]
    dev = sharded[0].device if sharded else (grads[0].device if grads else torch.device("cpu"))
    sq = torch.zeros((), dtype=torch.float32, device=dev)
    for g in sharded:
        sq = sq + g.float().pow(2).sum()
    if dist.is_initialized():
        dist.all_reduce(sq)
    for g in grads:
        if not is_dtensor(g):  # whole on every process (F): counted once
            sq = sq + g.float().pow(2).sum().to(dev)
    total = sq.sqrt().cpu()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    with torch.no_grad():
        for g in grads:
            g.mul_(coef.to(g.device))
    return total


def optimizer_state(module: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimizer's whole state by parameter name (a collective), on the CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(module: nn.Module, opt: torch.optim.Optimizer, path) -> None:
    """Load an `optimizer_state` file saved by the main process: the main process reads it and sends each
    process its part (the others never hold the whole state). Every process calls it."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = torch.load(path, map_location="cpu", weights_only=True) if dist.get_rank() == 0 else {}
    opt.zero_grad(set_to_none=True)  # the optimizer's state is made first (a step at lr 0), which needs no gradients
    set_optimizer_state_dict(module, opt, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
