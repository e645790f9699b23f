"""Deterministic split carving, the automatic validation size, and clear errors for splits too small.

With a training file: validation is a seeded sample of it (or the validation file), train the rest,
test a prefix of the evaluation file. Without one: test, validation and train are carved, disjoint,
from one seeded shuffle of the evaluation file. task.val_size = -1 (the default) means
min(100, 20% of the rows available for train + validation), so a 20-row training file keeps 16 rows to
train on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from metatuner.errors import MetatunerError
from metatuner.tasks.core import Example
from metatuner.tasks.sources import Pools

AUTO_VAL_CAP = 100
AUTO_VAL_SHARE = 0.2


def auto_val_size(available: int) -> int:
    """The validation size task.val_size=-1 stands for: min(100, 20% of the rows available)."""
    return min(AUTO_VAL_CAP, int(round(AUTO_VAL_SHARE * max(0, available))))


def check_sizes(tc) -> None:
    for key in ("train_size", "test_size"):
        v = getattr(tc, key)
        if v < 0:
            raise MetatunerError(f"task.{key}: expected an integer >= 0, got {v}")
    if tc.val_size < -1:
        raise MetatunerError(f"task.val_size: expected an integer >= 0, or -1 (auto), got {tc.val_size}")


def val_size(tc, available: int) -> int:
    """task.val_size, or the automatic size when it is -1."""
    return auto_val_size(available) if tc.val_size < 0 else tc.val_size


@dataclass
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    origin: dict = field(default_factory=dict)  # split -> one line on where it came from


def carve(items: list, seed: int, test_size: int, val_size: int, train_size: int):
    """Deterministic disjoint (train, val, test) from one seeded shuffle: test first, then
    validation, then train."""
    rng = random.Random(seed)
    idx = list(range(len(items)))
    rng.shuffle(idx)
    test = [items[i] for i in idx[:test_size]]
    val = [items[i] for i in idx[test_size : test_size + val_size]]
    train = [items[i] for i in idx[test_size + val_size : test_size + val_size + train_size]]
    return train, val, test


def split_train_val(train: list, seed: int, val_size: int, train_size: int):
    """(train, validation) from a training pool: validation is a seeded sample, train the rest."""
    rng = random.Random(seed)
    idx = list(range(len(train)))
    rng.shuffle(idx)
    val = [train[i] for i in idx[:val_size]]
    tr = [train[i] for i in idx[val_size : val_size + train_size]]
    return tr, val


def _too_small(where: str, n: int, what: str, vs: int, tc) -> None:
    """The validation split would leave no training rows although task.train_size asks for some."""
    if tc.train_size > 0 and n > 0 and vs >= n:
        raise MetatunerError(
            f"{where}: {what} has {n} rows and task.val_size={vs} takes all of them, leaving none for "
            f"training (task.train_size={tc.train_size}); lower task.val_size, or leave it at -1 "
            f"(auto: min(100, 20% of the rows))")


def make_splits(pools: Pools, tc, seed: int) -> Splits:
    """Train, validation and test from the pools, by the rules in this module's docstring."""
    where = pools.where
    if pools.train is not None:
        n = len(pools.train)
        if pools.validation is not None:
            train, val = pools.train[: tc.train_size], pools.validation[: AUTO_VAL_CAP if tc.val_size < 0 else tc.val_size]
            origin_val = f"{where['validation']}: {len(val)} of {len(pools.validation)} rows"
        else:
            vs = val_size(tc, n)
            _too_small(where["train"], n, "the training file", vs, tc)
            train, val = split_train_val(pools.train, seed, vs, tc.train_size)
            origin_val = f"{where['train']}: {len(val)} of {n} rows (task.val_size={tc.val_size})"
        test = pools.test[: tc.test_size]
        origin = {"train": f"{where['train']}: {len(train)} of {n} rows (task.train_size={tc.train_size}, "
                           f"task.val_size={tc.val_size})",
                  "validation": origin_val,
                  "test": f"{where['test']}: the first {len(test)} of {len(pools.test)} rows (task.test_size={tc.test_size})"}
    else:
        n = len(pools.test)
        rest = max(0, n - tc.test_size)
        vs = val_size(tc, rest)
        _too_small(where["test"], rest, f"the file ({n} rows) after the test split (task.test_size={tc.test_size})",
                   vs, tc)
        train, val, test = carve(pools.test, seed, tc.test_size, vs, tc.train_size)
        note = (f"{where['test']} (no training file: test, validation and train are carved from its {n} rows; "
                f"task.test_size={tc.test_size}, task.val_size={tc.val_size}, task.train_size={tc.train_size})")
        origin = {"train": f"{len(train)} training rows from {note}", "validation": f"{len(val)} validation rows from {note}",
                  "test": f"{len(test)} test rows from {note}"}
    return Splits(train, val, test, origin)
