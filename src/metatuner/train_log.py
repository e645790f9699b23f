"""Training log and progress for the TRL-based trainers (SFT, DPO, BPO's rewriter, BetterTogether, continual).

`TrainLogCallback` replaces the Trainer's own progress/printer callbacks: instead of printing raw
log dicts to stdout it shows one tqdm bar per phase (rate and ETA, loss as postfix) and appends
one JSON line per log to the run folder's `train_log.jsonl`:

    {"step": 3, "phase": "sft", "loss": 2.31, "lr": 0.0002, "epoch": 0.75, "elapsed": 4.2, ...}

`step` counts optimizer steps within the phase; a resumed phase first drops the lines it logged
after the checkpoint it resumes from. Only the main process writes or draws.
"""

from __future__ import annotations

import time
from pathlib import Path

from tqdm.auto import tqdm
from transformers import TrainerCallback

from metatuner.run import is_main_process
from metatuner.training import TrainLog


def open_train_log(run_dir: str | Path, append: bool = True) -> TrainLog:
    """The run folder's train_log.jsonl (main process only; others get a disabled log)."""
    return TrainLog(run_dir, report_to="jsonl", enabled=is_main_process(), append=append)


class TrainLogCallback(TrainerCallback):
    """One train_log.jsonl line per Trainer log and a tqdm bar with rate/ETA (see module doc)."""

    def __init__(self, log: TrainLog, phase: str):
        self.log, self.phase = log, phase
        self.bar, self.t0, self.seen = None, 0.0, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0 = time.time()
        self.seen = state.global_step
        if state.global_step > 0:  # resumed: forget what this phase logged after the checkpoint
            g = state.global_step
            self.log.keep(lambda r: r.get("phase") != self.phase or r.get("step", 0) <= g)
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.phase, dynamic_ncols=True,
                            leave=False)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.seen)
        self.seen = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs or not state.is_world_process_zero:  # the end-of-training summary is in metrics.json
            return
        row = {"phase": self.phase, "loss": float(logs["loss"]), "lr": float(logs.get("learning_rate", 0.0)),
               "epoch": float(logs.get("epoch", state.epoch or 0.0)), "elapsed": round(time.time() - self.t0, 3)}
        row.update({k: float(v) for k, v in logs.items()
                    if k not in ("loss", "learning_rate", "epoch") and isinstance(v, (int, float))})
        self.log.log(state.global_step, **row)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4g}")  # redraw now: the step bar moved before this log

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def attach(trainer, log: TrainLog, phase: str):
    """Swap the Trainer's stdout progress/printer callbacks for a TrainLogCallback; returns the trainer."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(TrainLogCallback(log, phase))
    return trainer
