"""Evaluate a finished SFT run's adapter with the old and the new evaluation harness, side by side.

    .venv/bin/python scripts/harness_check.py runs/quickstart100/sft/seed_0

The old harness: Hugging Face generate, batches in data order, stop at EOS only
(evaluate(..., fast_greedy=False, sort_by_length=False, stop_at_answer=False)); the new one: the
defaults. Both with the adapter merged and unmerged (as the run evaluates it). Prints the accuracies and how many
extracted answers differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def main(run_dir: str) -> None:
    from peft import PeftModel

    from metatuner.config import load_config
    from metatuner.evaluate import evaluate
    from metatuner.models import load_model
    from metatuner.run import eval_examples
    from metatuner.tasks import load_task

    run = Path(run_dir)
    cfg = load_config(run / "config.yaml")
    task = load_task(cfg.task, cfg.seed)
    exs = eval_examples(cfg, task)
    for merged in (True, False):  # the run itself evaluates the unmerged PeftModel
        model, tok = load_model(cfg.model.name, cfg.model.dtype, "cpu")
        model = PeftModel.from_pretrained(model, str(run / "adapter"))
        model = (model.merge_and_unload() if merged else model).eval()
        out = {}
        with torch.no_grad():
            for name, kw in (("old", dict(fast_greedy=False, sort_by_length=False, stop_at_answer=False)), ("new", {})):
                recs, m = evaluate(model, tok, task, exs, task.prompt, batch_size=cfg.eval.batch_size, progress=False, **kw)
                out[name] = (recs, m)
                print(f"{'merged' if merged else 'unmerged'} adapter, {name} harness: accuracy "
                      f"{100 * m['accuracy']:.1f}% on {m['n']}, tokens {m['tokens_generated']}")
        diff = sum(a["extracted"] != b["extracted"] for a, b in zip(out["old"][0], out["new"][0]))
        print(f"  extracted answers that differ between the harnesses: {diff} of {len(exs)}")


if __name__ == "__main__":
    main(sys.argv[1])
