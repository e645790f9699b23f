"""The MetaTuner recipe, top to bottom: models -> (SAPO) -> actor warm-up -> system -> generator
warm-up -> joint phase -> final/ -> test evaluation."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

from metatuner.checkpoints import (find_resume_checkpoint, read_config_dict, resume_mode, same_settings,
                                   save_checkpoint_config)
from metatuner.config import Config, save_config
from metatuner.errors import MetatunerError
from metatuner.io import atomic_path, write_json, write_jsonl
from metatuner.run import set_seed
from metatuner.sapo import maybe_select
from metatuner.tasks import Task
from metatuner.training import TrainLog, list_checkpoints

from .gumbel import check_gumbel_vocab
from .loading import load_actor, load_generator
from .loop import JointLoop, Runner
from .system import MetaTunerSystem
from .warmup import warmup_actor, warmup_generator

METHODS = ("metatuner_j", "metatuner_i", "metatuner_gumbel")


def refuse_sharded_launch(cfg: Config) -> None:
    """MetaTuner's joint phase runs on DDP or sharded with FSDP2 (`metatuner.sharding`), not on DeepSpeed;
    what the sharded phase does not support is refused too. Before any training, so no warm-up is wasted."""
    from metatuner.sharding import check_settings

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise MetatunerError(
            f"method={cfg.method}: the joint phase runs on DDP or FSDP, not DeepSpeed (ACCELERATE_USE_DEEPSPEED=true): "
            "launch it with configs/accelerate/multi_gpu.yaml (one full copy per GPU) or "
            "configs/accelerate/fsdp.yaml (G sharded); DeepSpeed trains the baselines (sft, dpo, bettertogether)")
    check_settings(cfg)


def prepare(cfg: Config, task: Task) -> tuple[MetaTunerSystem, JointLoop, dict]:
    """Everything before the joint phase: models, actor warm-up, the system, generator warm-up
    (or the state of the checkpoint to resume)."""
    from accelerate import PartialState

    if cfg.method not in METHODS:
        raise MetatunerError(f"method: expected one of {METHODS}, got {cfg.method!r}")
    refuse_sharded_launch(cfg)
    if cfg.warmup.max_steps > cfg.train.max_steps:
        raise MetatunerError(f"warmup.max_steps={cfg.warmup.max_steps} exceeds train.max_steps={cfg.train.max_steps} "
                             "(train.max_steps counts the actor warm-up plus the joint steps)")
    state = PartialState(cpu=not __import__("torch").cuda.is_available())
    out = Path(cfg.output_dir)
    actor, tok = load_actor(cfg)
    gen, gtok = load_generator(cfg)
    if cfg.method == "metatuner_gumbel":
        check_gumbel_vocab(tok, gtok, actor, gen)
    resume_ck = find_resume_checkpoint(cfg)
    if resume_ck is None and state.is_main_process:
        # a fresh run: checkpoints of an earlier run here would be mixed with this run's
        for old in list_checkpoints(out):
            print(f"removing {old} of an earlier run (fresh start)")
            shutil.rmtree(old)
    state.wait_for_everyone()
    sel = maybe_select(cfg, actor, tok, task, gen, gtok)  # SAPO: choose p~ by pre-update loss
    if sel is not None:
        cfg.task.prompt = task.prompt  # recorded, so resume and `infer` use the same p~
        if state.is_main_process:
            save_config(cfg, out / "config.yaml")
            write_json(out / "sapo.json", sel)
    actor, adapter = warmup_actor(cfg, actor, tok, task, out, state, lambda: load_actor(cfg)[0])
    pool = prompt_pool(cfg, task, gen, gtok, out, state, resume_ck is not None)
    # The same random state from here on whether the warm-up and the pool were computed or read from the
    # cache (computing consumes random numbers): F's first weights, G's samples, the joint phase.
    set_seed(cfg.seed)
    system = MetaTunerSystem(cfg, actor, tok, gen, gtok, task)
    system.actor_adapter = adapter
    system.pool = pool
    runner = Runner(system)
    log = TrainLog(out, cfg.train.report_to, enabled=state.is_main_process, append=resume_ck is not None)
    stats = {"warmup_actor_steps": cfg.warmup.max_steps}
    gen_warm = out / "warmup" / "generator"
    if resume_ck is None:
        stats.update(warmup_generator(cfg, system, runner, log))
        if runner.sharded:  # gathered by every process
            system.save(gen_warm, write=state.is_main_process)
        elif state.is_main_process:
            system.save(gen_warm)
    state.wait_for_everyone()
    loop = JointLoop(cfg, system, runner, log)
    if resume_ck is not None:
        loop.resume(resume_ck)
        step = loop.state["step"]
        # drop what the interrupted run logged after its checkpoint; those steps run again
        log.keep(lambda r: r.get("stage") not in ("joint", "rollout") or r["step"] < step
                 or (r["step"] == step and r["stage"] == "joint"))
    return system, loop, stats


def prompt_pool(cfg: Config, task: Task, gen, gtok, out: Path, state, resuming: bool) -> list[str]:
    """The candidate pool (generator.prompt_space=pool|mixed), written to output_dir/pool.json (a resumed
    run reads it back). Every process builds it (OPRO's scoring splits its queries over the processes and
    gathers the answers, and a vLLM engine is built by all of them together), and the main process's pool
    is the one all of them keep."""
    from accelerate.utils import broadcast_object_list

    from metatuner.pool import build_pool

    if cfg.generator.prompt_space == "free":
        return [task.prompt]
    path = out / "pool.json"
    reuse = [resuming and path.is_file()]  # the main process's view: the others may not see its files
    if state.num_processes > 1:
        broadcast_object_list(reuse)
    pool = [None]
    if reuse[0]:
        if state.is_main_process:
            pool = [json.loads(path.read_text())["pool"]]
    else:
        built = build_pool(cfg, task, gen, gtok)
        if state.is_main_process:
            pool = [built]
            write_json(path, {"pool": built})
    if state.num_processes > 1:
        broadcast_object_list(pool)
    if state.is_main_process:
        print(f"prompt pool ({len(pool[0])} candidates): " + " | ".join(p[:60] for p in pool[0]))
    return pool[0]


def write_final(cfg: Config, loop: JointLoop, stats: dict) -> Path:
    """final/: generator.safetensors (G's trained tensors, phi_p', F), hypernet.json, generator_adapter/
    (G's LoRA in PEFT format), actor_adapter/, d2.jsonl; config.yaml and train_stats.json, with which a
    run killed during its test evaluation is evaluated again without training (`finished_final`)."""
    system, acc, task = loop.system, loop.acc, loop.task
    from .inference import save_generator_adapter

    final, main = Path(cfg.output_dir) / "final", acc.is_main_process
    with atomic_path(final, directory=True) if main else contextlib.nullcontext(final) as tmp:
        if main or loop.sharded:  # with G sharded every process gathers its tensors; the main one writes
            system.save(tmp, write=main)
            if cfg.generator.lora_rank > 0:
                save_generator_adapter(system, tmp / "generator_adapter", write=main)
        if main:
            if system.actor_adapter is not None:
                shutil.copytree(system.actor_adapter, tmp / "actor_adapter")
            if cfg.generator.prompt_space != "free":
                write_json(tmp / "pool.json", {"pool": system.pool})
            d2 = loop.state["d2"]
            key = "best_prompt" if cfg.generator.pool_loss == "best" else "right_pool_indices"
            write_jsonl(tmp / "d2.jsonl", [{"index": int(k), "query": task.train[int(k)].query, key: v}
                                           for k, v in sorted(d2.items(), key=lambda kv: int(kv[0]))])
            save_checkpoint_config(cfg, tmp)
            write_json(tmp / "train_stats.json", stats)
    acc.wait_for_everyone()
    return final


def train(cfg: Config, task: Task) -> tuple[MetaTunerSystem, dict]:
    """Warm-up + joint training + final/; returns the trained system and training stats."""
    t_start = time.time()
    system, loop, stats = prepare(cfg, task)
    loop.run()
    loop.log.close()
    world = loop.acc.num_processes
    warm = Path(cfg.output_dir) / "warmup" / "stats.json"
    warm = json.loads(warm.read_text()) if warm.is_file() else {}
    d2 = loop.state["d2"]
    stats.update({"train_steps": cfg.train.max_steps, "joint_steps": loop.joint_steps,
                  "generator_warmup_steps": cfg.warmup.generator_steps,
                  "train_examples": cfg.train.max_steps * cfg.train.batch_size * world,
                  "train_tokens": warm.get("train_tokens", 0) + system.counts["train_tokens"] * world,
                  "generation_calls": system.counts["generation_calls"] * world,
                  "rollout_seconds": round(loop.rollout_seconds, 1), "train_seconds": round(time.time() - t_start, 1),
                  # G's sampled prompts (free/mixed spaces); generation_backend names the test evaluation's
                  "prompt_sampling_backend": getattr(system, "prompt_sampling_backend", "none"),
                  "d2_rewritten": sum(v is not None and (v != system.p_tilde if isinstance(v, str) else 0 not in v)
                                      for v in d2.values()) / max(1, len(d2)),
                  "d2_targets": sum(v is not None for v in d2.values()) / max(1, len(d2))})
    write_final(cfg, loop, stats)
    return system, stats


def finished_final(cfg: Config, task: Task | None = None) -> dict | None:
    """The training stats of a complete final/ written with these settings, when resume_from_checkpoint is
    true or auto (what `compare` passes): training finished and the run stopped later, during its test
    evaluation, so it is evaluated again from final/ instead of trained again. None: train."""
    final = Path(cfg.output_dir) / "final"
    if resume_mode(cfg.resume_from_checkpoint) == "false" or not (final / "train_stats.json").is_file():
        return None
    saved = read_config_dict(final / "config.yaml")
    picked = sapo_pick(cfg, saved, task.prompt if task is not None else cfg.task.prompt)
    if picked is not None:  # final/ records SAPO's p~; the run was asked for cfg's p~, which SAPO started from
        saved = {**saved, "task": {**saved["task"], "prompt": cfg.task.prompt}}
    if not same_settings(saved, cfg):
        print(f"resume_from_checkpoint: {final} was written with other settings; training afresh", flush=True)
        return None
    if picked is not None:
        cfg.task.prompt = picked  # the same settings pick the same p~: evaluate with it, as the run did
    return json.loads((final / "train_stats.json").read_text())


def sapo_pick(cfg: Config, saved: dict | None, start: str) -> str | None:
    """With prompt_selection=sapo: the p~ SAPO chose (output_dir/sapo.json) when it started from `start`
    (the task's p~ as this run resolves it: SAPO's first candidate) and final/ was written with it; else None."""
    path = Path(cfg.output_dir) / "sapo.json"
    if cfg.prompt_selection != "sapo" or not saved or not path.is_file():
        return None
    try:
        sel = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    cands = sel.get("candidates") or [None]
    ok = cands[0] == start and (saved.get("task") or {}).get("prompt") == sel.get("prompt")
    return sel["prompt"] if ok else None


def run(cfg: Config) -> dict:
    from metatuner.run import start_run

    from .inference import evaluate_system

    from .inference import load_system

    task = start_run(cfg)
    stats = finished_final(cfg, task)
    if stats is not None:
        print(f"{cfg.output_dir}/final is complete, with these settings: evaluating it without training", flush=True)
        system = load_system(cfg.output_dir)
        task.prompt = cfg.task.prompt  # SAPO's pick, when it chose p~ (finished_final)
        system.task = task  # with its splits (load_system rebuilds the task's rules only)
    else:
        system, stats = train(cfg, task)
        if getattr(system, "sharded", False):  # G was sharded for training: evaluate a plain copy of final/
            import gc

            import torch

            del system
            gc.collect()  # FSDP's hooks hold the sharded G in reference cycles
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            system = load_system(cfg.output_dir)
            system.task = task
    return evaluate_system(cfg, system, {**stats, "p_tilde": task.prompt})
