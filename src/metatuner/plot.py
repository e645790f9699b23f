"""results.png of a comparison: accuracy per method (failed methods marked, the trivial floor drawn) and
accuracy against training compute (training tokens) with the Pareto front marked."""

from __future__ import annotations

import math
import re
from pathlib import Path

from metatuner.io import atomic_path


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: none has at most the cost and more accuracy, or less
    cost and at least the accuracy. Sorted by cost."""
    front = []
    for i, (c, a) in enumerate(points):
        if not any((c2 <= c and a2 > a) or (c2 < c and a2 >= a) for c2, a2 in points):
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["methods"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(max(9.0, 1.1 * len(rows) + 5.5), 4.2),
                                  gridspec_kw={"width_ratios": [max(3, len(rows)), 4]})
    for i, r in enumerate(rows):
        if "accuracy" in r:
            acc = 100 * r["accuracy"]
            lo, hi = (100 * x for x in r["accuracy_ci95_examples"])
            color = "#C44E52" if r["status"] != "complete" else "#8C8C8C" if r.get("at_floor") else "#4C72B0"
            ax.bar(i, acc, yerr=[[acc - lo], [hi - acc]], capsize=4, color=color,
                   hatch="//" if r["status"] != "complete" else None)
            ax.text(i, hi + 1, f"{acc:.1f}", ha="center", va="bottom", fontsize=8)
        if r["status"] != "complete":
            err = re.sub(r"^(seed \d+: )?(error: )?", "", r.get("error") or "")
            err = err if len(err) <= 45 else err[:42] + "..."
            ax.text(i, 2, f"{r['status'].upper()}\n{err}", ha="center", va="bottom", rotation=90, fontsize=7,
                    color="#C44E52")
    floors = [r for r in rows if "floor" in r]
    if floors:
        f = floors[0]
        ax.axhspan(100 * f["floor_ci95"][0], 100 * f["floor_ci95"][1], color="#DD8452", alpha=0.15, lw=0)
        ax.axhline(100 * f["floor"], color="#DD8452", ls="--", lw=1, label="trivial floor (95% CI)")
        ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=30, ha="right")
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylim(0, 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy (95% CI); grey = at floor, red = failed", fontsize=9)

    done = [r for r in rows if r["status"] == "complete" and "accuracy" in r]
    pts = [(float(r.get("train_tokens") or 0), 100 * r["accuracy"]) for r in done]
    front = pareto_front(pts)
    for i, (r, (c, a)) in enumerate(zip(done, pts)):
        on = i in front
        ax2.scatter([c], [a], s=60 if on else 30, color="#55A868" if on else "#4C72B0", zorder=3,
                    edgecolor="black" if on else "none")
        ax2.annotate(r["name"], (c, a), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if front:
        fx, fy = zip(*[pts[i] for i in front])
        ax2.step(fx, fy, where="post", color="#55A868", lw=1.5, label="Pareto front")
        ax2.legend(loc="lower right", fontsize=8, frameon=False)
    smallest = min([c for c, _ in pts if c > 0], default=10.0)
    ax2.set_xscale("symlog", linthresh=10 ** max(0, math.floor(math.log10(smallest))))
    ax2.margins(x=0.15)
    if pts:
        lo, hi = min(a for _, a in pts), max(a for _, a in pts)
        pad = max(2.0, 0.15 * (hi - lo))
        ax2.set_ylim(max(-2.0, lo - pad), min(102.0, hi + pad))
    gone = [r["name"] for r in rows if r["status"] != "complete"]
    if gone:
        ax2.text(0.02, 0.02, "not shown (failed): " + ", ".join(gone), transform=ax2.transAxes, fontsize=7,
                 color="#C44E52", va="bottom")
    ax2.set_xlabel("training tokens (symlog; 0 = no training)")
    ax2.set_ylabel("test accuracy (%)")
    ax2.set_title("accuracy vs training compute", fontsize=9)
    ax2.grid(alpha=0.3)
    fig.suptitle(results.get("title") or "metatuner compare", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
