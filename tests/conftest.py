"""Shared fixtures: a tiny random model on disk, hand-made tasks, the shared benchmark folder.

Tests never reach the network: the hub is switched off before anything imports transformers.
Tests marked `slow` use the real embedded model. A plain `pytest` (`make test-all`) runs every test;
`make test` deselects them with `-m "not slow or ci_slow"` (pytest's own marker selection: the few
`ci_slow` ones still run).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _torch_threads():
    """Run torch on one thread in tests. On a small shared CPU, torch's default (one thread per core)
    oversubscribes as soon as anything else runs: generation measured 10-20x slower than on one thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """A complete tiny random Llama + char tokenizer directory, written once per session."""
    from metatuner.testing import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_path):
    """(model, tokenizer) loaded from tiny_model_path with load_model, on CPU. Do not modify."""
    from metatuner.models import load_model

    return load_model(str(tiny_model_path), dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared benchmark folder (original schemas); tests using it skip when it is absent."""
    from metatuner.tasks import data_root

    root = data_root()
    if root is None or not all((root / d).is_dir() for d in ("gsm8k", "math", "hotpotqa", "cosmosqa")):
        pytest.skip("shared benchmark data folder not present")
    return root


@pytest.fixture
def make_task():
    """Build a Task from (query, answer) pairs with a given extractor and scorer."""
    from metatuner.tasks import Example, Task

    def first_char(text):
        return text[:1] or None

    def exact(pred, ex):
        return {"correct": pred is not None and pred == ex.answer}

    def build(pairs, extract=first_char, score=exact, prompt="", max_new_tokens=6, name="toy"):
        exs = [Example(query=q, answer=a, target=f"Answer: {a}") for q, a in pairs]
        return Task(name=name, prompt=prompt, train=[], validation=[], test=exs, max_new_tokens=max_new_tokens,
                    extract=extract, score_fn=score)

    return build
