"""Tasks: splits of (query, reference answer), the initial prompt p~, rendering, extraction, scoring.

A `Task` holds three lists of `Example`s and the task's rules. The four benchmarks of the paper
(GSM8K, MATH, HotpotQA distractor, CosmosQA), any reasoning-gym dataset, and a generic
JSONL/CSV/Parquet file with user-named columns all produce the same `Task`:

    task = load_task(cfg.task, seed=0)          # rules + splits (reads the data)
    rules = task_rules(cfg.task)                 # rules only, empty splits (reads no data)

Modules: core (Example, Task), answers (extraction, scoring, answer keys, answer_end regexes),
rules (per-task rules without data), readers (files, with one-line errors), sources (shared data
folder, hub, task.path, records -> Examples), splits (deterministic carving, auto validation size),
loading (load_task, train_tasks mixtures).
"""

from metatuner.tasks.answers import (
    LETTERS,
    extract_gsm8k,
    extract_letter,
    extract_math,
    extract_rg,
    extract_short,
    last_boxed,
    last_number,
    math_equal,
    normalize_answer,
    parse_number,
    score_letter,
    score_math,
    score_numeric,
    score_qa,
    token_f1,
    yes_no,
)
from metatuner.tasks.core import Example, Task
from metatuner.tasks.loading import load_task, mix_train_tasks
from metatuner.tasks.readers import read_table
from metatuner.tasks.rules import BENCHMARKS, RG_DEFAULT_PARAMS, task_rules
from metatuner.tasks.sources import data_root
from metatuner.tasks.splits import auto_val_size

__all__ = [
    "BENCHMARKS", "LETTERS", "RG_DEFAULT_PARAMS", "Example", "Task", "auto_val_size", "data_root", "extract_gsm8k",
    "extract_letter", "extract_math", "extract_rg", "extract_short", "last_boxed", "last_number", "load_task",
    "math_equal", "mix_train_tasks", "normalize_answer", "parse_number", "read_table", "score_letter", "score_math",
    "score_numeric", "score_qa", "task_rules", "token_f1", "yes_no",
]
