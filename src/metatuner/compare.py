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
METHOD_KEYS = {"name", "method", "overrides"}
METATUNER_FAMILY = ("metatuner_j", "metatuner_i", "metatuner_gumbel")


def load_compare(path: str, overrides: list[str]) -> dict:
    p = Path(path)
    if not p.is_file():
        raise MetatunerError(f"compare config not found: {p}")
    try:
        spec = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise MetatunerError(f"{p}: invalid YAML ({e})") from None
    if not isinstance(spec, dict):
        raise MetatunerError(f"{p}: expected a mapping with keys {sorted(COMPARE_KEYS)}")
    unknown = set(spec) - COMPARE_KEYS
    if unknown:
        raise MetatunerError(f"{p}: unknown compare key(s) {sorted(unknown)}; expected {sorted(COMPARE_KEYS)}")
    if not spec.get("methods") or not isinstance(spec["methods"], list):
        raise MetatunerError(f"{p}: 'methods' must list at least one method")
    if spec.get("base") is not None and not isinstance(spec["base"], dict):
        raise MetatunerError(f"{p}: 'base' must be a mapping of run-config keys")
    if spec.get("seeds") is None:
        spec["seeds"] = [0]
    elif isinstance(spec["seeds"], int) and not isinstance(spec["seeds"], bool):
        spec["seeds"] = [spec["seeds"]]
    spec["base"] = spec.get("base") or {}
    spec["output_dir"] = str(spec.get("output_dir") or "runs/compare")
    spec["cli_overrides"] = []
    for item in overrides:
        if "=" not in item:
            raise MetatunerError(f"override '{item}': expected key=value")
        k, v = item.split("=", 1)
        if k == "output_dir":
            spec["output_dir"] = v
        elif k == "seeds":
            try:
                spec["seeds"] = [int(x) for x in v.strip("[]").split(",") if x.strip()]
            except ValueError:
                raise MetatunerError(f"override 'seeds': expected a list of integers like [0,1], got {v!r}") from None
        elif k in ("title", "base", "methods"):
            raise MetatunerError(f"override '{k}': set it in the compare config; use run-config keys here")
        else:
            spec["cli_overrides"].append(item)
    seeds = spec["seeds"]
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)):
        raise MetatunerError(f"{p}: 'seeds' must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise MetatunerError(f"{p}: 'seeds' repeats a seed: {seeds}")
    for i, m in enumerate(spec["methods"]):
        if not isinstance(m, dict) or "method" not in m:
            raise MetatunerError(f"{p}: methods[{i}] needs a 'method' (and optionally 'name' and 'overrides')")
        extra = set(m) - METHOD_KEYS
        if extra:
            raise MetatunerError(f"{p}: methods[{i}]: unknown key(s) {sorted(extra)}; expected {sorted(METHOD_KEYS)}")
        if m.get("overrides") is not None and not isinstance(m["overrides"], dict):
            raise MetatunerError(f"{p}: methods[{i}].overrides must be a mapping of run-config keys")
        m.setdefault("name", m["method"])
        m["name"] = str(m["name"])
        if not m["name"] or "/" in m["name"] or m["name"] in (".", ".."):
            raise MetatunerError(f"{p}: methods[{i}].name {m['name']!r} cannot be a folder name")
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
    if cfg.task.split_seed < 0:
        cfg.task.split_seed = spec["seeds"][0]  # every seed sees the same splits
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
        # our one-line errors first, then the last exception line of a traceback, then the last line
        errs = ([ln for ln in lines if ln.startswith("error:")]
                or [ln for ln in lines if not ln.startswith((" ", "\t")) and ("Error" in ln or "Exception" in ln)]
                or lines or [f"exit code {proc.returncode}"])
        return {"status": "failed", "error": errs[-1].strip()[:500],
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


# two-sided 95% critical values of Student's t by degrees of freedom (1..30); beyond: the normal 1.96
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_interval(xs: list[float]) -> tuple[float, float]:
    """95% t interval of the mean over seeds (n-1 degrees of freedom)."""
    if len(xs) < 2:
        return (xs[0], xs[0]) if xs else (0.0, 0.0)
    df = len(xs) - 1
    tcrit = _T95[df - 1] if df <= len(_T95) else 1.96
    m, s = statistics.mean(xs), statistics.stdev(xs)
    h = tcrit * s / math.sqrt(len(xs))
    return (m - h, m + h)


def summarize(spec: dict, statuses: dict) -> dict:
    """results.json content: per method, metrics with intervals and costs."""
    out = {"title": spec.get("title", ""), "config": spec["path"], "seeds": spec["seeds"], "methods": []}
    loaded = {}
    for m in spec["methods"]:
        for seed in spec["seeds"]:
            d = Path(spec["output_dir"]) / m["name"] / f"seed_{seed}"
            if (d / "COMPLETE").is_file() and (d / "metrics.json").is_file() and (d / "predictions.jsonl").is_file():
                met = json.loads((d / "metrics.json").read_text())
                preds = read_jsonl(d / "predictions.jsonl")
                wall = json.loads((d / "COMPLETE").read_text() or "{}").get("wall_seconds")
                loaded[(m["name"], seed)] = (seed, met, preds, wall)
    # p~ of the task: every method but zero_shot records it; zero_shot's prompt is p~ by definition
    p_tilde = next((r[1]["p_tilde"] for r in loaded.values() if "p_tilde" in r[1]), None)
    if p_tilde is None:
        p_tilde = next((r[2][0]["prompt"] for (name, _), r in loaded.items() if r[2]
                        and r[1].get("method") == "zero_shot"), "")
    for m in spec["methods"]:
        name = m["name"]
        runs = [loaded[(name, s)] for s in spec["seeds"] if (name, s) in loaded]
        failed = [(s, statuses[(name, s)]) for s in spec["seeds"]
                  if statuses.get((name, s), {}).get("status") == "failed"]
        if failed:
            s, st = failed[0]
            out["methods"].append({"name": name, "method": m["method"], "status": "failed",
                                   "error": (f"seed {s}: " if len(spec["seeds"]) > 1 else "") + st["error"],
                                   "seeds_complete": [r[0] for r in runs]})
            continue
        if not runs:
            out["methods"].append({"name": name, "method": m["method"], "status": "not run"})
            continue
        accs = [r[1]["accuracy"] for r in runs]
        k = sum(bool(p["correct"]) for r in runs for p in r[2])
        n = sum(len(r[2]) for r in runs)
        row = {"name": name, "method": m["method"], "status": "complete", "accuracy": statistics.mean(accs),
               "accuracy_ci95_examples": list(wilson(k, n)), "n_test": runs[0][1]["n"],
               "seeds_complete": [r[0] for r in runs], "accuracy_per_seed": accs}
        if len(runs) > 1:
            lo, hi = t_interval(accs)  # over seeds; an accuracy interval is clipped to [0, 1]
            row["accuracy_ci95_seeds"] = [max(0.0, lo), min(1.0, hi)]
        for key in ("em", "f1", "score"):
            if key in runs[0][1]:
                row[key] = statistics.mean(r[1][key] for r in runs)
        for key in ("train_steps", "train_examples", "train_tokens", "generation_calls"):
            vals = [r[1].get(key) for r in runs if r[1].get(key) is not None]
            row[key] = statistics.mean(vals) if vals else 0
        row["tokens_generated_eval"] = statistics.mean(r[1].get("tokens_generated", 0) for r in runs)
        row["inference"] = f"{runs[0][1].get('strategy', 'greedy')}@{runs[0][1].get('samples_per_query', 1)}"
        row["notes"] = notes(runs[0][1])
        row["wall_seconds"] = statistics.mean(r[3] or 0 for r in runs)
        p0 = runs[0][1].get("p_tilde", p_tilde)
        row["prompts"] = [{"query": p["query"], "prompt": p["prompt"]} for p in runs[0][2][:3]]
        row["prompt_differs_from_p_tilde"] = sum(p["prompt"] != p0 for p in runs[0][2]) / max(1, len(runs[0][2]))
        out["methods"].append(row)
    return out


def notes(m: dict) -> str:
    """What a method's metrics say beyond accuracy and cost (seed 0): the SAPO prompt, forgetting,
    the (prompt, N) choice and adaptive vs uniform budget."""
    out = []
    if m.get("sapo_losses"):
        out.append(f"SAPO prompt: {str(m.get('prompt', ''))[:60]!r}")
    if "mean_forgetting" in m:
        acc = m.get("accuracy_matrix") or []
        out.append("after each stage: " + "; ".join("/".join(f"{100 * a:.0f}" for a in row) for row in acc))
        out.append(f"mean forgetting {100 * m['mean_forgetting']:.1f} pts")
    if "adaptive_accuracy" in m:
        out.append(f"chosen N={m.get('chosen_n')}; best prompt changes with N: {m.get('best_prompt_changes_with_n')}")
        out.append(f"adaptive {100 * m['adaptive_accuracy']:.1f} vs uniform {100 * m['uniform_accuracy']:.1f} "
                   f"at {m.get('budget_samples')} samples")
    return "; ".join(out).replace("|", "/").replace("\n", " ")


def table(results: dict) -> str:
    cols = ["method", "accuracy % (95% CI)", "EM/F1", "train steps", "train examples", "train tokens", "gen calls",
            "eval tokens", "wall s", "inference", "notes", "status"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in results["methods"]:
        if r["status"] != "complete":
            err = r.get("error", "").replace("|", "/")
            lines.append(f"| {r['name']} | - | - | - | - | - | - | - | - | - | - | {r['status']}: {err} |")
            continue
        lo, hi = r["accuracy_ci95_examples"]
        acc = f"{100 * r['accuracy']:.1f} ({100 * lo:.1f}-{100 * hi:.1f})"
        if "accuracy_ci95_seeds" in r:
            slo, shi = r["accuracy_ci95_seeds"]
            acc += f"; seeds {100 * slo:.1f}-{100 * shi:.1f}"
        emf1 = f"{100 * r['em']:.1f}/{100 * r['f1']:.1f}" if "f1" in r else "-"
        lines.append(f"| {r['name']} | {acc} | {emf1} | {r['train_steps']:.0f} | {r['train_examples']:.0f} | "
                     f"{r['train_tokens']:.0f} | {r['generation_calls']:.0f} | {r['tokens_generated_eval']:.0f} | "
                     f"{r['wall_seconds']:.0f} | {r.get('inference', 'greedy@1')} | {r.get('notes') or '-'} | complete |")
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


def _same_config(cfg, run_dir: Path) -> bool:
    """Whether the completed run in run_dir was requested with the same settings as cfg (keys added to the
    config schema since then count as their defaults)."""
    try:
        old = load_config(run_dir / "requested.yaml", [])
    except MetatunerError:
        return False
    return to_dict(old) == to_dict(cfg)


def run_compare(path: str, overrides: list[str]) -> dict:
    spec = load_compare(path, overrides)
    out = Path(spec["output_dir"])
    # resolve and validate every run's config before running anything: a typo fails in seconds, not hours
    plan = [(seed, m, method_config(spec, m, seed, out / m["name"] / f"seed_{seed}"))
            for seed in spec["seeds"] for m in spec["methods"]]
    out.mkdir(parents=True, exist_ok=True)
    statuses = {}
    warm = {}  # warm-up key -> adapter dir of the first MetaTuner run that made it
    for seed, m, cfg in plan:
        run_dir = out / m["name"] / f"seed_{seed}"
        tag = f"[compare] {m['name']} seed {seed}"
        made = run_dir / "warmup" / "adapter"
        if (run_dir / "COMPLETE").is_file():
            if _same_config(cfg, run_dir):
                statuses[(m["name"], seed)] = {"status": "complete"}
                print(f"{tag}: already complete, skipped", flush=True)
                if cfg.method in METATUNER_FAMILY and (made / "adapter_config.json").is_file():
                    warm.setdefault(_warmup_key(cfg), made)
                continue
            print(f"{tag}: settings changed since the completed run; running again", flush=True)
            (run_dir / "COMPLETE").unlink()
        if cfg.method in METATUNER_FAMILY and cfg.warmup.max_steps > 0:
            src = warm.get(_warmup_key(cfg))
            if src and not made.exists():
                shutil.copytree(src, made)
                print(f"{tag}: reusing the actor warm-up of {src.parent.parent.relative_to(out)}", flush=True)
        print(f"{tag}: running (method={cfg.method}) -> {run_dir}", flush=True)
        st = run_one(cfg, run_dir)
        statuses[(m["name"], seed)] = st
        print(f"{tag}: {st['status']} in {st['wall_seconds']:.0f}s"
              + (f" ({st['error']})" if st["status"] == "failed" else ""), flush=True)
        if cfg.method in METATUNER_FAMILY and (made / "adapter_config.json").is_file():
            warm.setdefault(_warmup_key(cfg), made)
    results = summarize(spec, statuses)
    write_json(out / "results.json", results)
    md = table(results)
    atomic_write_text(out / "results.md", (f"# {results['title']}\n\n" if results["title"] else "") + md + "\n")
    atomic_write_text(out / "gallery.md", gallery(results))
    plot(results, out / "results.png")
    print(md)
    print(f"wrote {out}/results.json, results.md, results.png, gallery.md")
    return results
