"""What MetaTuner's prompt branch did in finished pool-mode runs: D2's composition at every rollout, the
joint phase's losses, and which pool candidates the test queries got.

    .venv/bin/python scripts/pool_run_summary.py runs/pool/metatuner_j_pool/seed_0 runs/pool_sweep/w40_a1_s5_f1e-4/seed_0
    .venv/bin/python scripts/pool_run_summary.py --plot losses.png RUN ...   # also the joint phase's loss curves

Each argument is a MetaTuner run folder (train_log.jsonl, pool.json, and predictions.jsonl when its test
evaluation finished; without it the test section is left out). Per run:
- rollouts: step, share of D2 queries with a correct best prompt, share whose best prompt is not p~, and
  how many D2 queries each pool candidate won (candidate 0 = p~; with generator.pool_loss=listwise: on how
  many D2 queries with a target each candidate answered right);
- G's warm-up: the regulariser at its first and last step;
- joint phase: mean task loss and regulariser over its first and last five logged steps;
- test: how many test queries got each pool candidate (argmax of the prompt decoder), and their accuracy.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def mean(xs: list[float]) -> float:
    return sum(xs) / max(1, len(xs))


def summary(run: Path) -> str:
    need = [run / f for f in ("train_log.jsonl", "pool.json")]
    missing = [str(p) for p in need if not p.is_file()]
    if missing:
        sys.exit(f"{run}: missing {', '.join(missing)} (a MetaTuner run with generator.prompt_space=pool?)")
    log = jsonl(need[0])
    pool = json.loads(need[1].read_text())["pool"]
    preds = jsonl(run / "predictions.jsonl") if (run / "predictions.jsonl").is_file() else None
    lines = [f"## {run}", "", "pool: " + " | ".join(f"#{i} {p[:50]!r}" for i, p in enumerate(pool)), ""]
    cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    listwise = (cfg.get("generator") or {}).get("pool_loss") == "listwise"
    per = "D2 right per candidate (listwise)" if listwise else "D2 wins per candidate"
    lines += [f"| rollout at step | D2 correct % | D2 with a target % | D2 best != p~ % | {per} |",
              "|---|---|---|---|---|"]
    for r in (x for x in log if x.get("stage") == "rollout"):
        lines.append(f"| {r['step']} | {100 * r.get('d2_correct', 0):.1f} | {100 * r.get('d2_targets', 1):.1f} | "
                     f"{100 * r.get('d2_rewritten', 0):.1f} | {r.get('d2_pool_counts', '-')} |")
    warm = [x["reg"] for x in log if x.get("stage") == "warmup_generator" and "reg" in x]
    if warm:
        lines += ["", f"G's warm-up ({len(warm)} steps): regulariser {warm[0]:.3f} -> {warm[-1]:.3f} (first / last step)"]
    joint = [x for x in log if x.get("stage") == "joint" and "task_loss" in x]
    if joint:
        first, last = joint[:5], joint[-5:]
        lines += ["", f"joint phase ({len(joint)} logged steps): task loss {mean([x['task_loss'] for x in first]):.3f} -> "
                  f"{mean([x['task_loss'] for x in last]):.3f}, regulariser {mean([x['reg'] for x in first]):.3f} -> "
                  f"{mean([x['reg'] for x in last]):.3f} (mean of the first / last five)"]
    if preds is None:
        return "\n".join(lines + ["", "(no predictions.jsonl: the test evaluation did not finish; "
                                   "scripts/pool_oracle.py scores the decoder's choice from final/)"])
    lines += ["", "| test prompt | queries | accuracy % |", "|---|---|---|"]
    by: dict[str, list[bool]] = {}
    for p in preds:
        by.setdefault(p["prompt"], []).append(bool(p["correct"]))
    for prompt, ok in sorted(by.items(), key=lambda kv: -len(kv[1])):
        name = f"#{pool.index(prompt)}" if prompt in pool else repr(prompt[:50])
        lines.append(f"| {name} | {len(ok)} | {100 * mean(ok):.1f} |")
    return "\n".join(lines)


def plot(runs: list[Path], path: Path) -> None:
    """Task loss and regulariser per logged joint step, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for i, run in enumerate(runs):
        log = jsonl(run / "train_log.jsonl")
        joint = [x for x in log if x.get("stage") == "joint" and "task_loss" in x]
        for ax, key in zip(axes, ("task_loss", "reg")):
            ax.plot([x["step"] for x in joint], [x[key] for x in joint], color=f"C{i}", label="/".join(run.parts[-3:]))
            for x in log:  # a new D2 window (rollout) starts after this step: the regulariser's targets change
                if x.get("stage") == "rollout" and x["step"] > 0:
                    ax.axvline(x["step"] + 0.5, color=f"C{i}", alpha=0.3, linestyle=":", linewidth=1)
    for ax, title in zip(axes, ("task loss (actor, sampled pool prompt)",
                                "regulariser (NLL of D2's best prompt; dotted: new D2)")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("joint step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    tmp.replace(path)


if __name__ == "__main__":
    argv = sys.argv[1:]
    out = None
    if argv[:1] == ["--plot"]:
        if len(argv) < 2:
            sys.exit("--plot needs a file name: --plot losses.png RUN ...")
        out, argv = Path(argv[1]), argv[2:]
    if not argv:
        sys.exit(__doc__)
    print("\n\n".join(summary(Path(a)) for a in argv))
    if out:
        plot([Path(a) for a in argv], out)
        print(f"\nwrote {out}")
