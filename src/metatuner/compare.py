"""`metatuner compare`: several methods on the same task, splits, seeds and harness; one report.

A compare config names the shared settings, the methods (each with its own overrides) and seeds:

    output_dir: runs/quickstart
    seeds: [0]
    base:                       # any run-config keys, shared by every method
      task.name: chain_sum
      eval.limit: 100
    methods:
      - {name: zero_shot, method: zero_shot}
      - {name: sft, method: sft, overrides: {train.max_steps: 40}}

Each method runs in its own process (`metatuner train`), writing `output_dir/<name>/seed_<s>/`;
a method that fails is reported as failed with its error and the others still run; re-running
with the same output_dir skips runs that completed. MetaTuner methods with the same warm-up
settings reuse one actor warm-up. Outputs: results.json, results.md, results.png, gallery.md.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from metatuner.config import load_config, save_config, set_key, to_dict
from metatuner.errors import MetatunerError
from metatuner.io import atomic_write_text, read_jsonl, write_json

COMPARE_KEYS = {"output_dir", "seeds", "base", "methods", "title"}
METATUNER_FAMILY = ("metatuner_j", "metatuner_i", "metatuner_gumbel")


def load_compare(path: str, overrides: list[str]) -> dict:
    p = Path(path)
    if not p.is_file():
        raise MetatunerError(f"compare config not found: {p}")
    try:
        spec = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise MetatunerError(f"{p}: invalid YAML ({e})") from None
    unknown = set(spec) - COMPARE_KEYS
    if unknown:
        raise MetatunerError(f"{p}: unknown compare key(s) {sorted(unknown)}; expected {sorted(COMPARE_KEYS)}")
    if not spec.get("methods"):
        raise MetatunerError(f"{p}: 'methods' must list at least one method")
    spec.setdefault("seeds", [0])
    spec.setdefault("base", {})
    spec.setdefault("output_dir", "runs/compare")
    spec["cli_overrides"] = []
    for item in overrides:
        if "=" not in item:
            raise MetatunerError(f"override '{item}': expected key=value")
        k, v = item.split("=", 1)
        if k == "output_dir":
            spec["output_dir"] = v
        elif k == "seeds":
            spec["seeds"] = [int(x) for x in v.strip("[]").split(",") if x.strip()]
        else:
            spec["cli_overrides"].append(item)
    names = [m.get("name") for m in spec["methods"]]
    for i, m in enumerate(spec["methods"]):
        if not isinstance(m, dict) or "method" not in m:
            raise MetatunerError(f"{p}: methods[{i}] needs a 'method' (and optionally 'name' and 'overrides')")
        m.setdefault("name", m["method"])
    names = [m["name"] for m in spec["methods"]]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise MetatunerError(f"{p}: method names must be unique; repeated: {sorted(dup)}")
    spec["path"] = str(p)
    return spec


def method_config(spec: dict, m: dict, seed: int, run_dir: Path):
    """The run config of one method and seed: defaults <- base <- method overrides <- CLI overrides."""
    cfg = load_config(None, [])
    where = spec["path"]
    for k, v in _flat(spec["base"]).items():
        set_key(cfg, k, v, where=f"{where} base")
    set_key(cfg, "method", m["method"], where=where)
    for k, v in _flat(m.get("overrides") or {}).items():
        set_key(cfg, k, v, where=f"{where} methods[{m['name']}]")
    cfg = load_config(None, spec["cli_overrides"], base=cfg)
    cfg.seed = seed
    cfg.output_dir = str(run_dir)
    cfg.resume_from_checkpoint = True
    return cfg


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not key.endswith("params"):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _warmup_key(cfg) -> str:
    d = to_dict(cfg)
    return json.dumps({k: d[k] for k in ("model", "task", "lora", "warmup", "seed")} | {"bs": cfg.train.batch_size,
                      "lr": cfg.train.lr, "bf16": cfg.train.bf16, "max_length": cfg.train.max_length}, sort_keys=True)


def run_one(cfg, run_dir: Path) -> dict:
    """Run `metatuner train` in a child process; -> status dict."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "requested.yaml")
    t0 = time.time()
    with open(run_dir / "stdout.log", "w") as out, open(run_dir / "stderr.log", "w") as err:
        proc = subprocess.run([sys.executable, "-m", "metatuner.cli", "train", "--config", str(run_dir / "requested.yaml")],
                              stdout=out, stderr=err, env={**os.environ, "TQDM_DISABLE": "1"})
    wall = time.time() - t0
    if proc.returncode != 0 or not (run_dir / "metrics.json").is_file():
        lines = [ln for ln in (run_dir / "stderr.log").read_text().splitlines() if ln.strip()]
        errs = [ln for ln in lines if ln.startswith("error:") or "Error" in ln]
        return {"status": "failed", "error": (errs or lines or [f"exit code {proc.returncode}"])[-1][:500],
                "wall_seconds": round(wall, 1)}
    (run_dir / "COMPLETE").write_text(json.dumps({"wall_seconds": round(wall, 1)}))
    return {"status": "complete", "wall_seconds": round(wall, 1)}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a proportion k/n."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def t_interval(xs: list[float]) -> tuple[float, float]:
    """95% t interval of the mean over seeds."""
    if len(xs) < 2:
        return (xs[0], xs[0]) if xs else (0.0, 0.0)
    tcrit = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}.get(len(xs), 2.0)
    m, s = statistics.mean(xs), statistics.stdev(xs)
    h = tcrit * s / math.sqrt(len(xs))
    return (m - h, m + h)


def summarize(spec: dict, statuses: dict) -> dict:
    """results.json content: per method, metrics with intervals and costs."""
    out = {"title": spec.get("title", ""), "config": spec["path"], "seeds": spec["seeds"], "methods": []}
    for m in spec["methods"]:
        name = m["name"]
        runs = []
        for seed in spec["seeds"]:
            d = Path(spec["output_dir"]) / name / f"seed_{seed}"
            st = statuses.get((name, seed), {})
            if (d / "COMPLETE").is_file() and (d / "metrics.json").is_file():
                met = json.loads((d / "metrics.json").read_text())
                preds = read_jsonl(d / "predictions.jsonl")
                wall = json.loads((d / "COMPLETE").read_text()).get("wall_seconds")
                runs.append((seed, met, preds, wall))
            elif st.get("status") == "failed":
                out["methods"].append({"name": name, "method": m["method"], "status": "failed", "error": st["error"]})
                break
        else:
            if not runs:
                out["methods"].append({"name": name, "method": m["method"], "status": "not run"})
                continue
            accs = [r[1]["accuracy"] for r in runs]
            k = sum(bool(p["correct"]) for r in runs for p in r[2])
            n = sum(len(r[2]) for r in runs)
            row = {"name": name, "method": m["method"], "status": "complete", "accuracy": statistics.mean(accs),
                   "accuracy_ci95_examples": list(wilson(k, n)), "n_test": runs[0][1]["n"],
                   "accuracy_per_seed": accs}
            if len(runs) > 1:
                row["accuracy_ci95_seeds"] = list(t_interval(accs))
            for key in ("em", "f1", "score"):
                if key in runs[0][1]:
                    row[key] = statistics.mean(r[1][key] for r in runs)
            for key in ("train_steps", "train_examples", "train_tokens", "generation_calls"):
                vals = [r[1].get(key) for r in runs if r[1].get(key) is not None]
                row[key] = statistics.mean(vals) if vals else 0
            row["tokens_generated_eval"] = statistics.mean(r[1]["tokens_generated"] for r in runs)
            row["wall_seconds"] = statistics.mean(r[3] or 0 for r in runs)
            p0 = runs[0][1].get("p_tilde", "")
            row["prompts"] = [{"query": p["query"], "prompt": p["prompt"]} for p in runs[0][2][:3]]
            row["prompt_differs_from_p_tilde"] = sum(p["prompt"] != p0 for p in runs[0][2]) / max(1, len(runs[0][2]))
            out["methods"].append(row)
    return out


def table(results: dict) -> str:
    cols = ["method", "accuracy % (95% CI)", "EM/F1", "train steps", "train examples", "train tokens", "gen calls",
            "eval tokens", "wall s", "status"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in results["methods"]:
        if r["status"] != "complete":
            err = r.get("error", "").replace("|", "/")
            lines.append(f"| {r['name']} | - | - | - | - | - | - | - | - | {r['status']}: {err} |")
            continue
        lo, hi = r["accuracy_ci95_examples"]
        acc = f"{100 * r['accuracy']:.1f} ({100 * lo:.1f}-{100 * hi:.1f})"
        if "accuracy_ci95_seeds" in r:
            slo, shi = r["accuracy_ci95_seeds"]
            acc += f"; seeds {100 * slo:.1f}-{100 * shi:.1f}"
        emf1 = f"{100 * r['em']:.1f}/{100 * r['f1']:.1f}" if "f1" in r else "-"
        lines.append(f"| {r['name']} | {acc} | {emf1} | {r['train_steps']:.0f} | {r['train_examples']:.0f} | "
                     f"{r['train_tokens']:.0f} | {r['generation_calls']:.0f} | {r['tokens_generated_eval']:.0f} | "
                     f"{r['wall_seconds']:.0f} | complete |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["methods"] if r["status"] == "complete"]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(rows) + 1), 3.5))
    accs = [100 * r["accuracy"] for r in rows]
    lo = [100 * (r["accuracy"] - r["accuracy_ci95_examples"][0]) for r in rows]
    hi = [100 * (r["accuracy_ci95_examples"][1] - r["accuracy"]) for r in rows]
    ax.bar(range(len(rows)), accs, yerr=[lo, hi], capsize=4, color="#4C72B0")
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(results.get("title") or "metatuner compare")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def gallery(results: dict) -> str:
    lines = ["# Prompts used per query (first test queries)", ""]
    for r in results["methods"]:
        if r["status"] != "complete":
            continue
        lines.append(f"## {r['name']}")
        for p in r["prompts"]:
            q = p["query"].replace("\n", " ")
            lines.append(f"- query: {q[:160]}{'...' if len(q) > 160 else ''}\n  prompt: {p['prompt'][:300]!r}")
        lines.append("")
    return "\n".join(lines)


def run_compare(path: str, overrides: list[str]) -> dict:
    spec = load_compare(path, overrides)
    out = Path(spec["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    statuses = {}
    warm = {}  # warm-up key -> adapter dir of the first MetaTuner run that made it
    for seed in spec["seeds"]:
        for m in spec["methods"]:
            run_dir = out / m["name"] / f"seed_{seed}"
            cfg = method_config(spec, m, seed, run_dir)
            if (run_dir / "COMPLETE").is_file():
                statuses[(m["name"], seed)] = {"status": "complete"}
                print(f"[compare] {m['name']} seed {seed}: already complete, skipped")
                continue
            if cfg.method in METATUNER_FAMILY and cfg.warmup.max_steps > 0:
                key = _warmup_key(cfg)
                src = warm.get(key)
                dst = run_dir / "warmup" / "adapter"
                if src and not dst.exists():
                    shutil.copytree(src, dst)
                    print(f"[compare] {m['name']} seed {seed}: reusing the actor warm-up of {src.parent.parent.name}")
            print(f"[compare] {m['name']} seed {seed}: running (method={cfg.method}) -> {run_dir}", flush=True)
            st = run_one(cfg, run_dir)
            statuses[(m["name"], seed)] = st
            print(f"[compare] {m['name']} seed {seed}: {st['status']} in {st['wall_seconds']:.0f}s"
                  + (f" ({st['error']})" if st["status"] == "failed" else ""), flush=True)
            if cfg.method in METATUNER_FAMILY and (run_dir / "warmup" / "adapter" / "adapter_config.json").is_file():
                warm.setdefault(_warmup_key(cfg), run_dir / "warmup" / "adapter")
    results = summarize(spec, statuses)
    write_json(out / "results.json", results)
    md = table(results)
    atomic_write_text(out / "results.md", (f"# {results['title']}\n\n" if results["title"] else "") + md + "\n")
    atomic_write_text(out / "gallery.md", gallery(results))
    plot(results, out / "results.png")
    print(md)
    print(f"wrote {out}/results.json, results.md, results.png, gallery.md")
    return results
