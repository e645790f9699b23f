"""`load_task`: a task's rules (rules.py) plus its splits (sources.py, splits.py).

    task = load_task(cfg.task, seed=0)
    chat = task.render(task.prompt, task.test[0].query)        # chat messages for the actor
    answer = task.extract(generation)                          # the final answer, or None
    scores = task.score(answer, task.test[0])                  # {"correct": bool, ...}

Splits are deterministic given the seed; a benchmark without a training split carves one out of the
data it has, never overlapping the evaluation split.
"""

from __future__ import annotations

import copy
import random

from metatuner.errors import MetatunerError
from metatuner.tasks.core import Example, Task
from metatuner.tasks.readers import cap_queries, max_query_chars
from metatuner.tasks.rules import BENCHMARKS, FILE_TASKS, apply_overrides, base_rules, make_rg_dataset
from metatuner.tasks.sources import benchmark_pools, file_pools
from metatuner.tasks.splits import AUTO_VAL_CAP, Splits, check_sizes, make_splits, val_size


def load_task(tc, seed: int = 0) -> Task:
    """Build a Task from a TaskConfig (name, path, params, prompt, split sizes, max_new_tokens).
    The splits follow task.split_seed when it is set (>= 0), else the run's seed. With
    task.train_tasks, train and validation come from those tasks instead (see `mix_train_tasks`)."""
    check_sizes(tc)
    split_seed = getattr(tc, "split_seed", -1)
    seed = split_seed if split_seed is not None and split_seed >= 0 else seed
    if getattr(tc, "train_tasks", None):
        return mix_train_tasks(tc, seed)
    return load_one(tc, seed)


def rg_splits(tc, seed: int) -> tuple[Splits, object]:
    """A reasoning-gym task's splits, generated (unique questions; test, then validation, then
    train), and the dataset, whose `score_answer` scores them.

    task.split_order=shuffled (default) shuffles the unique questions with the split seed before
    cutting, so the three splits are alike. `generation` cuts them in generation order: dropping
    repeats in that order leaves the first split (test) more of the questions that repeat often
    (products with 1-2 digit factors: answers below 100 are 30% of test, 6% of validation;
    scripts/split_stats.py); it reproduces numbers measured before the fix."""
    vs = val_size(tc, tc.train_size + (tc.val_size if tc.val_size >= 0 else 0))
    total = tc.train_size + vs + tc.test_size
    order = getattr(tc, "split_order", "shuffled")
    if order not in ("shuffled", "generation"):
        raise MetatunerError(f"task.split_order={order!r}: expected shuffled or generation")
    # oversample so that dropping duplicate questions still fills every split
    size = int(total * 1.5) + 10
    ds, entries = distinct_questions(tc, size, seed, total if order == "generation" else None)
    if order == "shuffled":
        random.Random(seed).shuffle(entries)
        entries = entries[:total]
    if len(entries) < total and getattr(tc, "fill_short", True):
        ds, entries = fill_short_splits(tc, size, seed, total, order)
    exs = [Example(query=e["question"], answer=str(e["answer"]), target=f"Answer: {e['answer']}",
                   meta={"entry_index": i, "entry": e}) for i, e in enumerate(entries)]
    exs = cap_queries(exs, max_query_chars(tc.params), f"task {tc.name!r}")
    t, v = tc.test_size, tc.test_size + vs
    where = f"task {tc.name!r}: {len(entries)} unique generated questions ({order} order)"
    origin = {"test": f"{where}, the first {min(t, len(exs))} (task.test_size={tc.test_size})",
              "validation": f"{where}, the next {len(exs[t:v])} (task.val_size={tc.val_size})",
              "train": f"{where}, the last {len(exs[v:])} (task.train_size={tc.train_size})"}
    return Splits(exs[v:], exs[t:v], exs[:t], origin), ds


def distinct_questions(tc, size: int, seed: int, limit: int | None = None) -> tuple[object, list[dict]]:
    """(dataset, its entries with each question once, in generation order, at most `limit`)."""
    ds = make_rg_dataset(tc.name, tc.params, size, seed)
    seen, entries = set(), []
    for e in ds:
        if e["question"] in seen:
            continue
        seen.add(e["question"])
        entries.append(e)
        if limit is not None and len(entries) == limit:
            break
    return ds, entries


def first_draw_short(tc, seed: int) -> bool:
    """Whether a procedural task's first draw holds fewer distinct questions than its splits need (the
    only case task.fill_short changes anything); False for other tasks. `seed`: the split seed."""
    if getattr(tc, "train_tasks", None):  # the target task's splits, then each train task's as mixed
        target = copy.copy(tc)
        target.train_tasks = []
        return first_draw_short(target, seed) or any(
            first_draw_short(source_config(tc, n), seed) for n in tc.train_tasks if n != tc.name)
    if tc.name in BENCHMARKS or tc.name in FILE_TASKS:
        return False
    total = tc.train_size + val_size(tc, tc.train_size + (tc.val_size if tc.val_size >= 0 else 0)) + tc.test_size
    order = getattr(tc, "split_order", "shuffled")
    _, entries = distinct_questions(tc, int(total * 1.5) + 10, seed, total if order == "generation" else None)
    return len(entries) < total


def fill_short_splits(tc, size: int, seed: int, total: int, order: str) -> tuple[object, list[dict]]:
    """A task with few distinct questions (products with 1-2 digit factors: 934 among the first 1735)
    leaves the first draw short: draw more (doubling) and cut every split from the bigger draw, shuffled
    (or in generation order, where the bigger draw's list extends the first). No split is
    kept from the first draw alone: distinct questions of a bigger draw hold fewer of the often-repeated ones,
    so refilling only train would make it unlike test. Too few even then: a one-line error."""
    while True:
        size *= 2
        ds, more = distinct_questions(tc, size, seed, total if order == "generation" else None)
        if len(more) >= total or size >= 16 * total + 1000:
            break
    if len(more) < total:
        raise MetatunerError(
            f"task {tc.name!r}: only {len(more)} distinct questions among {size} generated, fewer than "
            f"task.test_size + validation + task.train_size = {total}; lower the sizes or widen task.params")
    if order == "shuffled":
        random.Random(seed).shuffle(more)
    return ds, more[:total]


def load_one(tc, seed: int) -> Task:
    """One task: its rules from the config, its splits from its data."""
    if tc.name in BENCHMARKS or tc.name in FILE_TASKS:
        pools = benchmark_pools(tc) if tc.name in BENCHMARKS else file_pools(tc)
        splits = make_splits(pools, tc, seed)
        answers = [e.answer for e in pools.test[:50]]
        task = base_rules(tc.name, dict(tc.params), answers=answers)
    else:
        splits, ds = rg_splits(tc, seed)
        task = base_rules(tc.name, dict(tc.params), answers=[e.answer for e in splits.test + splits.validation + splits.train][:50],
                          dataset=ds)
    task = apply_overrides(task, tc)
    task.train, task.validation, task.test, task.origin = splits.train, splits.validation, splits.test, splits.origin
    if not task.test:
        raise MetatunerError(f"task {tc.name!r}: the test split is empty (task.test_size={tc.test_size}); "
                             f"{splits.origin.get('test', '')}")
    return task


def source_config(tc, name: str):
    """The task config a train task of task.train_tasks is loaded with (its own params, a small test)."""
    sc = copy.deepcopy(tc)
    sc.name, sc.prompt, sc.path, sc.max_new_tokens = name, "", "", 0
    sc.params = dict((getattr(tc, "params_by_task", None) or {}).get(name) or {})
    sc.test_size = min(tc.test_size, 10)
    return sc


def mix_train_tasks(tc, seed: int) -> Task:
    """Train on task.train_tasks, evaluate on task.name (the paper's generalization experiment).

    Train and validation are the train tasks' splits shuffled together (train_size and val_size are
    split evenly across them; val_size=-1 counts as 100); test is task.name's. p~ is task.name's prompt
    (or task.prompt); a training example of another task carries that task's own instruction at the top
    of its query, so its answer format is stated, and is extracted and scored by its own task's rules.
    When task.name is itself in the list, its test split never overlaps the training data (same seed,
    same splits). The answer budget (max_new_tokens) is the largest of the tasks' unless
    task.max_new_tokens is set, so rollouts on a long-answer training task are not cut off."""
    names = [str(n) for n in tc.train_tasks]
    if len(set(names)) != len(names):
        raise MetatunerError(f"task.train_tasks repeats a task: {names}")
    target = load_one(tc, seed)
    sources, train, val = {}, [], []
    k = len(names)
    total_val = tc.val_size if tc.val_size >= 0 else AUTO_VAL_CAP
    for j, name in enumerate(names):
        if name == tc.name:
            src = target
        else:
            try:
                src = load_one(source_config(tc, name), seed)
            except MetatunerError as e:
                raise MetatunerError(f"task.train_tasks[{j}]={name!r}: {e}") from None
        sources[name] = src
        n_train = tc.train_size // k + (1 if j < tc.train_size % k else 0)
        n_val = total_val // k + (1 if j < total_val % k else 0)

        def tag(ex: Example, src=src, name=name) -> Example:
            q = ex.query if src.prompt == target.prompt else f"{src.prompt}\n\n{ex.query}"
            return Example(query=q, answer=ex.answer, target=ex.target, meta={**ex.meta, "task": name})

        train += [tag(ex) for ex in src.train[:n_train]]
        val += [tag(ex) for ex in src.validation[:n_val]]
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(val)
    max_new = max([target.max_new_tokens] + [s.max_new_tokens for s in sources.values()])
    origin = {"train": f"{len(train)} rows mixed from task.train_tasks={names} (task.train_size={tc.train_size})",
              "validation": f"{len(val)} rows mixed from task.train_tasks={names} (task.val_size={tc.val_size})",
              "test": target.origin.get("test", "")}
    return Task(name=tc.name, prompt=target.prompt, train=train, validation=val, test=target.test,
                max_new_tokens=tc.max_new_tokens or max_new, extract=target.extract, score_fn=target.score_fn,
                sources=sources, answer_end=target.answer_end, is_multiple_choice=target.is_multiple_choice,
                key_fn=target.key_fn, origin=origin)
