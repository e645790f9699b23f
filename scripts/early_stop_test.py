"""Add the early-stopping test comparison at more (prompt, temperature) groups to a finished
`method=inference_select` run, as select.early_test=cheapest|all would have done in the run itself.

    .venv/bin/python scripts/early_stop_test.py runs/gate_ba/inference_select/seed_0 cheapest
    .venv/bin/python scripts/early_stop_test.py runs/gate_ba/inference_select/seed_0 all

Reads the run's config.yaml, select.json (prompts, the stopping rule fitted per group on validation) and
samples.jsonl (validation samples per group, test samples already drawn); draws the largest N test samples
per query for each group that has none yet (with the run's model, task, top_p and verifier; seeded with the
run's seed, so not the same draws the run itself would have made), appends them to samples.jsonl and
writes early_stop_groups.json (same schema as the method's; never replaced by one with fewer groups).
Groups are picked on validation only (cheapest: the rule that spends the fewest validation samples; a
select.rule=halving run gets its rules fitted here as the run would have). The new samples are checked to be
of the run's own test queries (predictions.jsonl). Run again, it reuses the samples on disk.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_early_groups(run_dir: str | Path, which: str) -> dict:
    import torch

    from metatuner.config import load_saved_config
    from metatuner.errors import MetatunerError
    from metatuner.inference import draw_samples, resolve_verifier
    from metatuner.io import read_jsonl, write_json, write_jsonl
    from metatuner.methods.inference_select import compare_early_groups, early_groups, stop_rules
    from metatuner.models import load_from_config
    from metatuner.run import eval_examples, set_seed
    from metatuner.tasks import load_task

    d = Path(run_dir)
    for name in ("config.yaml", "select.json", "samples.jsonl"):
        if not (d / name).is_file():
            raise MetatunerError(f"{d / name}: not found (expected a finished method=inference_select run)")
    if which not in ("chosen", "cheapest", "all"):
        raise MetatunerError(f"groups {which!r}: expected chosen, cheapest or all")
    cfg = load_saved_config(d / "config.yaml")
    if cfg.method != "inference_select":
        raise MetatunerError(f"{d / 'config.yaml'}: method {cfg.method!r}, expected inference_select")
    cfg.select.early_test = which
    sel = json.loads((d / "select.json").read_text())
    rows = read_jsonl(d / "samples.jsonl")
    by: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        smp = {k: r[k] for k in ("answers", "correct", "scores")}
        by.setdefault((r["split"], r["prompt"], r["temperature"]), {})[r["query"]] = smp
    samples = {(s, ("sampled", p, t)): [q[i] for i in sorted(q)] for (s, p, t), q in by.items()}
    val = {g: v for (s, g), v in samples.items() if s == "validation"}
    have = {g: v for (s, g), v in samples.items() if s == "test"}
    rules = {("sampled", g["prompt"], g["temperature"]): g for g in sel["stop_rule"]["per_group"]}
    nmax = sel["early_stop_vs_fixed"]["cap"]
    # select.rule=halving fitted no rule during the choice: fit those of the groups it sampled, as the run would
    rules.update(stop_rules(cfg, {g: v for g, v in val.items() if g not in rules}, nmax))
    chosen = ("sampled", sel["chosen"]["prompt"], sel["test_sample_temperature"])
    groups = early_groups(rules, val, which, chosen, nmax)
    state: dict = {}

    def draw_test(g: tuple) -> list[dict]:
        if not state:  # load the model and the task only when a group needs new samples
            set_seed(cfg.seed)
            state["task"] = task = load_task(cfg.task, cfg.seed)
            state["test"] = test = eval_examples(cfg, task)
            ran = [r["query"] for r in read_jsonl(d / "predictions.jsonl")]
            if [ex.query for ex in test] != ran:  # new samples must be of the run's own test queries
                raise MetatunerError(f"{d / 'predictions.jsonl'}: its {len(ran)} test queries differ from the "
                                     f"{len(test)} the task gives now (task data or code changed since the run)")
            state["model"] = load_from_config(cfg.model)
            state["verifier"] = resolve_verifier(cfg.inference.verifier, task)
        actor, tok = state["model"]
        with torch.no_grad():
            return draw_samples(actor, tok, state["task"], state["test"], sel["prompts"][g[1]], nmax, g[2],
                                cfg.inference.top_p, cfg.eval.batch_size, state["verifier"])

    report, new_rows = compare_early_groups(cfg, groups, rules, have, draw_test, nmax)
    report["added_by"] = "scripts/early_stop_test.py"
    if (d / "early_stop_groups.json").is_file():  # never shrink a report already written
        old = json.loads((d / "early_stop_groups.json").read_text())
        key = lambda e: (e["prompt"], e["temperature"])  # noqa: E731
        if {key(e) for e in old["groups"]} - {key(e) for e in report["groups"]}:
            raise MetatunerError(f"{d / 'early_stop_groups.json'}: already compares more groups "
                                 f"(early_test={old['which']}) than {which!r}; left as it is")
    if new_rows:
        write_jsonl(d / "samples.jsonl", rows + new_rows)
    write_json(d / "early_stop_groups.json", report)
    return report


def main(args: list[str]) -> None:
    from metatuner.errors import MetatunerError

    try:
        rep = add_early_groups(args[0], args[1] if len(args) > 1 else "cheapest")
    except MetatunerError as e:
        sys.exit(f"error: {e}")
    print("| prompt | T | roles | rule (threshold, min, gate) | fixed majority@cap % | early stop % | mean samples (share) |")
    print("|---|---|---|---|---|---|---|")
    for e in rep["groups"]:
        gate = "no gate" if e["stop_score"] is None else f"gate {e['stop_score']:.3f}"
        print(f"| P{e['prompt']} | {e['temperature']} | {', '.join(e['roles']) or '-'} | {e['threshold']}, "
              f"{e['min_samples']}, {gate} | {100 * e['fixed_majority_accuracy']:.1f} | {100 * e['early_accuracy']:.1f} | "
              f"{e['early_mean_samples']:.2f} of {e['cap']} ({100 * e['sample_ratio']:.0f}%) |")


if __name__ == "__main__":
    if not sys.argv[1:]:
        sys.exit(__doc__)
    main(sys.argv[1:])
