"""The joint phase, one optimizer step at a time, on accelerate: gradient sync (DDP when several
processes), accumulation, clipping, and checkpoints with exact resume (`save_state`/`load_state`).

Every D2 window starts with phi_p' <- phi_p; each process rolls out its share of the window's
queries, and the results are gathered, so the loop state (step, window, D2) is the same on every
process and one copy of it is saved. Checkpoints step_N/ hold what trains and the state to resume:
generator.safetensors (G's trained tensors, phi_p', F), the optimizer, the scheduler, the loop state
and each process's RNG state; never base weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from metatuner.checkpoints import save_checkpoint_config
from metatuner.config import Config
from metatuner.errors import MetatunerError
from metatuner.training import TrainLog, check_finite, list_checkpoints, make_scheduler, step_indices

from .gumbel import gumbel_task_loss
from .rollouts import d2_rollout


class _Trained(nn.Module):
    """What trains (G with phi_p', F's encoder copy, F), as one module accelerate can prepare: with
    several processes it becomes DDP, and `forward(fn)` runs a loss closure inside DDP's forward so
    the backward pass averages the gradients."""

    def __init__(self, system):
        super().__init__()
        self.gen = system.gen
        self.decoder = system.decoder

    def forward(self, fn):
        return fn()


class Runner:
    """accelerate around the trained module: `forward(fn)` and `acc` (the Accelerator). Under an FSDP launch
    (`sharding.sharded_launch`) G is sharded with FSDP2 instead of wrapping the module in DDP."""

    def __init__(self, system):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        from metatuner.sharding import shard_generator, sharded_launch

        ddp = DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False)
        self.acc = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp])
        self.system = system
        self.sharded = sharded_launch()
        system.sharded = self.sharded
        if self.sharded:
            shard_generator(system.gen)
            self.module = _Trained(system)
        else:
            self.module = self.acc.prepare(_Trained(system))
        # checkpoints hold only what trains: accelerate must neither save nor load the module's full weights
        self.acc.register_save_state_pre_hook(lambda models, weights, out: weights.clear())
        self.acc.register_load_state_pre_hook(lambda models, inp: models.clear())

    def forward(self, fn):
        return self.module(fn)


class JointLoop:
    """`run()` steps to the end; tests call `step()`. `state` = {"step", "window", "d2"}."""

    def __init__(self, cfg: Config, system, runner: Runner, log: TrainLog):
        self.cfg, self.system, self.task, self.log = cfg, system, system.task, log
        self.runner, self.acc = runner, runner.acc
        self.joint_steps = cfg.train.max_steps - cfg.warmup.max_steps
        groups = system.trainable_groups()
        self.params = [p for g in groups for p in g["params"]]
        opt = torch.optim.AdamW(groups, weight_decay=cfg.train.weight_decay)
        self.sharded = runner.sharded  # FSDP2: the optimizer state is saved by `sharding`, not accelerate
        self.opt = opt if self.sharded else self.acc.prepare_optimizer(opt)
        self.sched = make_scheduler(opt, cfg.train.scheduler, self.joint_steps, cfg.train.lr_warmup_ratio)
        self.grad_accum = max(1, cfg.train.grad_accum)
        if cfg.train.batch_size % self.grad_accum:
            raise MetatunerError(f"train.grad_accum={cfg.train.grad_accum} must divide train.batch_size="
                                 f"{cfg.train.batch_size} (the batch is split into that many micro-batches)")
        self.state = {"step": 0, "window": None, "d2": {}}
        self.acc.register_for_checkpointing(self.sched)
        self.acc.register_for_checkpointing(self)
        self.last_ckpt: str | None = None
        self.rollout_seconds = 0.0

    # accelerate saves and restores the loop state with the checkpoint
    def state_dict(self) -> dict:
        return {"state": json.dumps(self.state)}

    def load_state_dict(self, d: dict) -> None:
        self.state = json.loads(d["state"])

    @property
    def done(self) -> bool:
        return self.state["step"] >= self.joint_steps

    # -- data order: the stream SFT and the warm-up take (training.step_indices), from where the warm-up
    # stopped; process r takes slice r of each global batch

    def global_indices(self, step: int) -> list[int]:
        gbs = self.cfg.train.batch_size * self.acc.num_processes
        return step_indices(len(self.task.train), self.cfg.seed, max(0, self.cfg.warmup.max_steps) + step, gbs)

    def my_indices(self, step: int) -> list[int]:
        bs, r = self.cfg.train.batch_size, self.acc.process_index
        return self.global_indices(step)[r * bs : (r + 1) * bs]

    # -- one step

    def start_window(self) -> None:
        """phi_p' <- phi_p; then, for the next train.sync_steps steps' queries, sample prompts from
        phi_p' and keep the best of them (or p~) in D2 (each process its share, then gathered)."""
        from accelerate.utils import gather_object

        cfg, system, step = self.cfg, self.system, self.state["step"]
        system.gen.sync_frozen()
        end = min(self.joint_steps, step + max(1, cfg.train.sync_steps))
        idx = [i for s in range(step, end) for i in self.my_indices(s)]
        exs = [self.task.train[i] for i in idx]
        t0 = time.time()
        if cfg.method == "metatuner_gumbel":  # no D2: the prompt comes from the live G inside the loss
            best, tprompts, st = [system.p_tilde] * len(exs), [system.p_tilde] * len(exs), {}
        else:
            system.gen.model.eval()
            best, tprompts, st = d2_rollout(system, exs)
            system.gen.model.train()
        seconds = time.time() - t0
        self.rollout_seconds += seconds
        world, bs = self.acc.num_processes, cfg.train.batch_size
        if world > 1:
            parts = gather_object([(idx, best, tprompts)])  # one tuple per process, in process order
        else:
            parts = [(idx, best, tprompts)]
        g_idx, g_best, g_tp = [], [], []
        for s in range(end - step):  # global order: step by step, process by process
            for p_idx, p_best, p_tp in parts:
                g_idx += p_idx[s * bs : (s + 1) * bs]
                g_best += p_best[s * bs : (s + 1) * bs]
                g_tp += p_tp[s * bs : (s + 1) * bs]
        self.state["window"] = {"start": step, "end": end, "task_prompts": g_tp}
        for i, b in zip(g_idx, g_best):
            self.state["d2"][str(i)] = b
        self.log.log(step, stage="rollout", seconds=round(seconds, 2), **st)

    def phase(self, step: int) -> tuple[bool, bool]:
        """(task term, regularization term) at this step.

        w/o P: the actor sees p~ everywhere and there is no prompt to regularize: task term only (F and,
        through h_i, phi_s train). w/o F: the task loss reaches no trainable parameter (sampled prompts
        carry no gradient): regularization only. MetaTuner-I alternates the two every
        train.alternate_steps steps; J sums them."""
        cfg, system = self.cfg, self.system
        if not system.use_p:
            return True, False
        if not system.use_f:
            return False, True
        if cfg.method == "metatuner_i":
            need_task = (step // max(1, cfg.train.alternate_steps)) % 2 == 0
            return need_task, not need_task
        return True, True

    def losses(self, step: int, part: int = 0, parts: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss to minimise, task loss, regularization) of micro-batch `part` of `parts` of this
        process's batch at `step` (each a mean over its rows)."""
        cfg, system, w = self.cfg, self.system, self.state["window"]
        bs = cfg.train.batch_size
        m = bs // parts
        ids = self.my_indices(step)[part * m : (part + 1) * m]
        exs = [self.task.train[i] for i in ids]
        if cfg.method == "metatuner_gumbel" and system.use_p:
            task_loss = gumbel_task_loss(system, exs)
            return task_loss, task_loss, torch.zeros((), device=task_loss.device)
        off = ((step - w["start"]) * self.acc.num_processes + self.acc.process_index) * bs + part * m
        tprompts = w["task_prompts"][off : off + m]
        best = [self.state["d2"][str(i)] for i in ids]
        need_task, need_reg = self.phase(step)
        task_loss, reg = system.joint_losses(exs, tprompts, best, need_task=need_task, need_reg=need_reg)
        return task_loss * need_task + cfg.train.alpha * reg * need_reg, task_loss, reg

    def step(self) -> dict:
        """One optimizer step (a new D2 window first when one is due) over train.grad_accum micro-batches."""
        cfg, state, acc = self.cfg, self.state, self.acc
        step = state["step"]
        if state["window"] is None or step >= state["window"]["end"]:
            self.start_window()
        parts = self.grad_accum
        self.opt.zero_grad(set_to_none=True)
        totals = {"loss": 0.0, "task_loss": 0.0, "reg": 0.0}
        for part in range(parts):
            last = part == parts - 1
            sync = contextlib.nullcontext() if last or self.sharded else acc.no_sync(self.runner.module)
            with sync:
                loss, task_loss, reg = self.runner.forward(lambda: self.losses(step, part, parts))
                check_finite(loss, step + 1, self.last_ckpt, everywhere=True)
                acc.backward(loss / parts)
            for k, v in (("loss", loss), ("task_loss", task_loss), ("reg", reg)):
                totals[k] += v.item() / parts
        if self.sharded:  # FSDP reduced G's gradients; F's are averaged here, as DDP would
            from metatuner.sharding import average_gradients, clip_grad_norm

            average_gradients([p for p in self.params if p.requires_grad])
            grad_norm = clip_grad_norm(self.params, cfg.train.max_grad_norm or float("inf"))
        else:
            grad_norm = acc.clip_grad_norm_(self.params, cfg.train.max_grad_norm or float("inf"))
        check_finite(grad_norm, step + 1, self.last_ckpt, what="gradient norm")
        self.opt.step()
        self.sched.step()
        state["step"] = step + 1
        values = {**totals, "grad_norm": float(grad_norm), "lr": self.sched.get_last_lr()[-1]}
        if state["step"] % max(1, cfg.train.log_steps) == 0:
            self.log.log(state["step"], stage="joint", **values)
        if cfg.train.save_steps and state["step"] % cfg.train.save_steps == 0 and not self.done:
            self.last_ckpt = str(self.save_checkpoint())
        return values

    def run(self) -> list[dict]:
        """Step to the end of the joint phase; returns the logged values of every step."""
        self.system.gen.model.train()
        self.system.decoder.train()
        history = []
        bar = tqdm(total=self.joint_steps, initial=self.state["step"], desc=self.cfg.method,
                   disable=not self.acc.is_main_process)
        while not self.done:
            v = self.step()
            history.append(v)
            bar.update(1)
            bar.set_postfix(loss=f"{v['loss']:.3f}", task=f"{v['task_loss']:.3f}", reg=f"{v['reg']:.3f}")
        bar.close()
        self.system.gen.model.eval()
        self.system.decoder.eval()
        return history

    # -- checkpoints

    def save_checkpoint(self) -> Path:
        """step_N/, written into a temporary folder by every process and renamed by the main one when complete."""
        out, acc, step = Path(self.cfg.output_dir), self.acc, self.state["step"]
        tmp, final = out / f".step_{step}.tmp", out / f"step_{step}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))  # optimizer (DDP), scheduler, loop state, every process's RNG
        main = acc.is_main_process
        if self.sharded:  # the optimizer state gathered by every process, written by the main one
            from metatuner.sharding import optimizer_state

            state = optimizer_state(self.runner.module, self.opt)
            if main:
                torch.save(state, tmp / "optimizer_full.pt")
        if main or self.sharded:  # with G sharded every process gathers its tensors; the main one writes
            from .inference import save_generator_adapter

            self.system.save(tmp, write=main)
            if self.cfg.generator.lora_rank > 0:  # G's adapter in PEFT format too (what trains, a few MB)
                save_generator_adapter(self.system, tmp / "generator_adapter", write=main)
        if main:
            save_checkpoint_config(self.cfg, tmp)  # resume_from_checkpoint=auto compares these settings
            (tmp / "trainer_state.json").write_text(json.dumps(
                {"step": step, "method": self.cfg.method, "world_size": acc.num_processes,
                 "sharded": self.sharded}))
            (tmp / "COMPLETE").write_text(str(step))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            keep = self.cfg.train.save_total_limit
            if keep > 0:
                for old in list_checkpoints(out)[:-keep]:
                    shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def resume(self, ck: Path) -> None:
        """Continue exactly where checkpoint `ck` stopped (same process count)."""
        missing = [f for f in ("trainer_state.json", "generator.safetensors") if not (ck / f).is_file()]
        if missing:
            raise MetatunerError(f"resume_from_checkpoint: {ck} lacks {', '.join(missing)} (not written by a "
                                 "MetaTuner run?); remove it to resume from an older one, or start afresh")
        meta = json.loads((ck / "trainer_state.json").read_text())
        if (meta.get("method") != self.cfg.method or meta.get("world_size") != self.acc.num_processes
                or meta.get("sharded", False) != self.sharded):
            how = lambda m, n, sh: f"method={m} with {n} process(es){' sharded (FSDP)' if sh else ''}"  # noqa: E731
            raise MetatunerError(f"resume_from_checkpoint: {ck} was written by "
                                 f"{how(meta.get('method'), meta.get('world_size'), meta.get('sharded', False))}; this run is "
                                 f"{how(self.cfg.method, self.acc.num_processes, self.sharded)} (resume with the same "
                                 "settings and launch, or start a new output_dir)")
        self.system.load(ck)
        self.acc.load_state(str(ck))
        if self.sharded:
            from metatuner.sharding import load_optimizer_state

            if not (ck / "optimizer_full.pt").is_file():
                raise MetatunerError(f"resume_from_checkpoint: {ck} lacks optimizer_full.pt (the optimizer of a "
                                     "sharded run); remove it to resume from an older one, or start afresh")
            load_optimizer_state(self.runner.module, self.opt, ck / "optimizer_full.pt")
        self.last_ckpt = str(ck)
        if self.acc.is_main_process:
            print(f"resuming from {ck} at step {self.state['step']}")
