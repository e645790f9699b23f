"""The two warm-ups before the joint phase.

Actor: LoRA SFT with p~ through TRL (distributed like the rest), merged into the actor. The adapter
is cached under $METATUNER_CACHE/warmup/<key>/ where the key hashes every setting the warm-up
depends on (model and its files, task, prompt, seeds, LoRA, warm-up budget and optimiser, process
count, library versions), so MetaTuner variants that share a warm-up train it once.

Generator: rollouts of the untrained generator build an initial D2, then SFT of G on it, so its
rewrites are well-formed prompts; ends with phi_p' <- phi_p.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from metatuner.config import Config
from metatuner.errors import MetatunerError
from metatuner.io import atomic_path, write_json
from metatuner.models import model_fingerprint, resolve_device
from metatuner.tasks import Task
from metatuner.training import check_finite, use_bf16

from .rollouts import d2_rollout


def warmup_key(cfg: Config, task: Task, world: int) -> str:
    """Hash of everything the actor warm-up's result depends on."""
    import peft
    import transformers
    import trl

    t = cfg.train
    parts = {
        "model": model_fingerprint(cfg.model.name), "dtype": cfg.model.dtype,
        **({"adapter": model_fingerprint(cfg.model.adapter)} if cfg.model.adapter else {}),
        "task": {k: v for k, v in vars(cfg.task).items()}, "prompt": task.prompt, "seed": cfg.seed,
        "lora": vars(cfg.lora), "steps": cfg.warmup.max_steps, "lr": cfg.warmup.lr,
        "train": [t.batch_size, t.grad_accum, t.max_length, use_bf16(t, resolve_device(cfg.model.device)), t.gradient_checkpointing, t.weight_decay,
                  t.max_grad_norm, t.scheduler, t.lr_warmup_ratio],
        "world": world, "data_order": "training.step_indices", "versions": [torch.__version__, transformers.__version__, peft.__version__, trl.__version__],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def warmup_actor(cfg: Config, actor, tok, task: Task, out: Path, state, load_actor):
    """Returns (the actor with the warm-up adapter merged, adapter dir or None). `state` is accelerate's
    PartialState; `load_actor()` gives a fresh actor."""
    from peft import PeftModel

    from metatuner.models import cache_dir

    if cfg.warmup.max_steps <= 0:
        return actor, None
    key = warmup_key(cfg, task, state.num_processes)
    cached = cache_dir() / "warmup" / key / "adapter"
    own = out / "warmup" / "adapter"
    if cfg.warmup.cache and (cached / "adapter_config.json").is_file():
        adapter = cached
        if state.is_main_process:
            print(f"actor warm-up: reusing {cached.parent} (same settings)")
    else:
        from metatuner.lora_sft import train_sft

        sub = copy.deepcopy(cfg)
        sub.train.save_steps = 0
        peft_model = train_sft(sub, actor, tok, task, task.train, task.prompt, out / "warmup", cfg.warmup.max_steps,
                               cfg.warmup.lr)
        if state.is_main_process:
            write_json(out / "warmup" / "stats.json", peft_model.train_metrics)
            if cfg.warmup.cache:
                with atomic_path(cached.parent, directory=True) as tmp:
                    shutil.copytree(own, tmp / "adapter")
                    shutil.copy(out / "warmup" / "stats.json", tmp / "stats.json")
        state.wait_for_everyone()  # the main process has written the adapter
        # The trainer left its marks on `actor` (PEFT layers injected in place, input-grad hooks,
        # config.use_cache=False): start again from a fresh copy and merge the saved adapter, so every
        # process and every reuse merges the same weights.
        del peft_model, actor
        actor = load_actor()
        adapter = own
    stats_src = adapter.parent / "stats.json"
    if stats_src.is_file() and state.is_main_process and adapter != own:
        (out / "warmup").mkdir(parents=True, exist_ok=True)
        shutil.copy(stats_src, out / "warmup" / "stats.json")
    return PeftModel.from_pretrained(actor, str(adapter)).merge_and_unload(), adapter


def warmup_generator(cfg: Config, system, trainer, log) -> dict:
    """SFT of G on an initial D2 from rollouts of the untrained generator (each process rolls out
    its share of warmup.queries); gradients average across processes through `trainer.backward`."""
    task, state = system.task, trainer.acc
    stats = {}
    if cfg.warmup.generator_steps > 0 and system.use_p:
        rng = random.Random(cfg.seed + 1)
        queries = rng.sample(task.train, min(cfg.warmup.queries, len(task.train)))
        if getattr(system, "sharded", False):  # every process rolls out as many queries (G's passes are collectives)
            queries = queries[: len(queries) - len(queries) % state.num_processes]
        mine = queries[state.process_index :: state.num_processes]
        if not mine:
            raise MetatunerError(f"warmup.queries={cfg.warmup.queries} gives process {state.process_index} of "
                                 f"{state.num_processes} no query; raise warmup.queries")
        t0 = time.time()
        system.gen.model.eval()
        best, _, st = d2_rollout(system, mine, live=True)
        stats.update({"warmup_rollout_seconds": round(time.time() - t0, 1), **{f"warmup_{k}": v for k, v in st.items()}})
        params = system.generator_parameters()
        opt = torch.optim.AdamW(params, lr=cfg.warmup.generator_lr, weight_decay=0.0)
        bs = cfg.train.batch_size
        system.gen.model.train()
        targets = [i for i, b in enumerate(best) if b is not None]  # rollout.targets=decisive: only those
        if state.num_processes > 1:  # the same steps on every process (gradients are averaged): none unless all have a target
            from accelerate.utils import gather_object

            if not all(gather_object([bool(targets)])):
                targets = []
        steps = cfg.warmup.generator_steps if targets else 0
        if not targets:
            stats["warmup_generator_skipped"] = "no warm-up query has a D2 target (rollout.targets=decisive; on some process, with several)"
        bar = tqdm(range(steps), desc="warm-up G", disable=not state.is_main_process)
        for step in bar:
            idx = [targets[(step * bs + j) % len(targets)] for j in range(bs)]
            exs = [mine[i] for i in idx]

            def reg_loss():
                _, reg = system.joint_losses(exs, [system.p_tilde] * bs, [best[i] for i in idx],
                                             need_task=False, need_reg=True)
                return reg

            opt.zero_grad(set_to_none=True)
            reg = trainer.forward(reg_loss)
            check_finite(reg, step + 1, None, what="generator warm-up loss", everywhere=True)
            trainer.acc.backward(reg)
            if cfg.train.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            opt.step()
            bar.set_postfix(reg=f"{reg.item():.3f}")
            log.log(step, stage="warmup_generator", reg=reg.item())
        system.gen.model.eval()
        del opt
    system.gen.sync_frozen()
    return stats
