"""results.json of a comparison: each method's accuracy, costs and diagnostics read from its run folders,
paired comparisons, the verdict's numbers and the provenance of the runs.

A run folder is `output_dir/<method name>/seed_<s>/` holding what `metatuner train` writes
(metrics.json, predictions.jsonl, config.yaml) and compare.json (compare's status and wall time of the
child process). Keys missing in older runs read as absent, never as an error.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from importlib import metadata
from pathlib import Path

import yaml

from metatuner.io import read_jsonl
from metatuner.stats import holm, paired_comparison, t_interval, wilson

PROMPT_ONLY = ("zero_shot", "opro", "bpo")
FINE_TUNING = ("sft", "dpo")
PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "metatuner")
DIAGNOSTICS = ("floor_accuracy", "floor_answer", "floor_letter_accuracy", "floor_letter", "no_answer_rate",
               "distinct_answers", "distinct_references", "top_answer", "top_answer_share", "top_reference_share",
               "letter_distribution", "label_distribution")


def is_cooptimization(method: str) -> bool:
    """MetaTuner's variants (the methods whose name starts with metatuner)."""
    return method.startswith("metatuner")


def load_run(run_dir: Path) -> dict | None:
    """One finished run folder -> {metrics, predictions, outcomes {index: 0/1}, wall, config}; None if unfinished."""
    if not (run_dir / "metrics.json").is_file() or not (run_dir / "predictions.jsonl").is_file():
        return None
    metrics = json.loads((run_dir / "metrics.json").read_text())
    preds = read_jsonl(run_dir / "predictions.jsonl")
    status = _read_json(run_dir / "compare.json")
    config = None
    if (run_dir / "config.yaml").is_file():
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return {"metrics": metrics, "predictions": preds, "config": config,
            "outcomes": {int(p.get("index", i)): int(bool(p["correct"])) for i, p in enumerate(preds)},
            "wall": status.get("wall_seconds", metrics.get("wall_seconds")),
            "peak_rss_mb": status.get("peak_rss_mb")}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _mean(runs: list[dict], key: str):
    vals = [r["metrics"][key] for r in runs if isinstance(r["metrics"].get(key), (int, float))]
    return statistics.mean(vals) if vals else None


def method_row(m: dict, runs: dict, failed: list[tuple[int, dict]], multi_seed: bool, p_tilde: str,
               pools: dict[int, list[str]] | None = None) -> dict:
    """One method's entry of results.json from its finished runs {seed: run} and failures [(seed, status)];
    `pools`: the comparison's prompt pool per seed (a pool can differ by seed: OPRO's member is run per seed)."""
    row = {"name": m["name"], "method": m["method"], "seeds_complete": sorted(runs)}
    if failed:
        s, st = failed[0]
        row.update(status="failed", error=(f"seed {s}: " if multi_seed else "") + st.get("error", "failed"))
    elif not runs:
        row["status"] = "not run"
    else:
        row["status"] = "complete"
    if not runs:
        return row
    seeds = sorted(runs)
    rs = [runs[s] for s in seeds]
    accs = [r["metrics"]["accuracy"] for r in rs]
    k = sum(sum(r["outcomes"].values()) for r in rs)
    n = sum(len(r["outcomes"]) for r in rs)
    first = rs[0]["metrics"]
    row.update(accuracy=statistics.mean(accs), accuracy_ci95_examples=list(wilson(k, n)),
               n_test=first.get("n", len(rs[0]["outcomes"])), accuracy_per_seed=accs)
    if len(rs) > 1:
        lo, hi = t_interval(accs)  # over seeds; an accuracy interval is clipped to [0, 1]
        row["accuracy_ci95_seeds"] = [max(0.0, lo), min(1.0, hi)]
    for key in ("em", "f1", "score", "train_steps", "train_examples", "generation_calls", "peak_memory_mb"):
        if _mean(rs, key) is not None:
            row[key] = _mean(rs, key)
    row["train_tokens"] = _mean(rs, "train_tokens") or 0
    row["tokens_generated_eval"] = _mean(rs, "tokens_generated") or 0
    row["tokens_generated_train"] = _mean(rs, "train_tokens_generated")  # None: the method does not count them
    row["tokens_generated"] = row["tokens_generated_eval"] + (row["tokens_generated_train"] or 0)
    walls = [r["wall"] for r in rs if r["wall"] is not None]
    row["wall_seconds"] = statistics.mean(walls) if walls else None
    rss = [r["peak_rss_mb"] for r in rs if r.get("peak_rss_mb") is not None]
    if rss:
        row["peak_rss_mb"] = max(rss)  # the child process's peak resident memory, measured by compare
    row["inference"] = f"{first.get('strategy', 'greedy')}@{first.get('samples_per_query', 1)}"
    if first.get("strategy") == "early_majority" and "mean_samples" in first:
        row["inference"] += f" ({first['mean_samples']:.1f}/q)"
    row.update(diagnostics(rs))
    p0 = first.get("p_tilde", p_tilde)
    preds = rs[0]["predictions"]
    row["prompts"] = [{"query": p["query"], "prompt": p["prompt"]} for p in preds[:3]]
    every = [p for r in rs for p in r["predictions"]]
    row["prompt_differs_from_p_tilde"] = sum(p["prompt"] != p0 for p in every) / max(1, len(every))
    own = rs[0]["metrics"].get("pool") or []
    run_pools = [r["metrics"].get("pool") or (pools or {}).get(s) or [] for s, r in zip(seeds, rs)]
    row.update(prompt_choices(rs, p0, run_pools), pool_size=len(own))
    row["notes"] = notes(first)
    return row


def prompt_choices(rs: list[dict], p_tilde: str, pools: list[list[str]], top: int = 5, examples: int = 2) -> dict:
    """Which prompts the test queries got, pooled over seeds: the `top` most frequent choices with their
    shares, and a few (query, prompt) examples, preferring queries whose prompt differs from p~. A prompt of
    run i's pool, `pools[i]` (the run's own pool from its metrics, else the comparison's pool of its seed:
    methods such as SAPO use the pool without saving it), counts as that pool index, so a candidate whose
    text differs by seed (OPRO's member) is one choice; `texts` says how many texts it had."""
    counts: dict[tuple, int] = {}
    texts: dict[tuple, list[str]] = {}
    for r, pool in zip(rs, pools):
        for p in r["predictions"]:
            key = ("pool", pool.index(p["prompt"])) if p["prompt"] in pool else ("text", p["prompt"])
            counts[key] = counts.get(key, 0) + 1
            if p["prompt"] not in texts.setdefault(key, []):
                texts[key].append(p["prompt"])
    n = max(1, sum(counts.values()))
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    chosen = [{"prompt": texts[k][0], "share": c / n, "pool_index": k[1] if k[0] == "pool" else None,
               "is_p_tilde": texts[k] == [p_tilde], "texts": len(texts[k])} for k, c in ranked[:top]]
    differ = [p for p in rs[0]["predictions"] if p["prompt"] != p_tilde]
    ex = (differ or rs[0]["predictions"])[:examples]
    return {"prompt_choices": chosen, "distinct_prompts": len(counts),
            "prompt_examples": [{"query": p["query"], "prompt": p["prompt"], "correct": bool(p["correct"])} for p in ex]}


def notes(m: dict) -> str:
    """What a method's metrics say beyond accuracy and cost (first seed): the SAPO prompt, forgetting,
    the inference_select choice against greedy, early stopping and the sample budget."""
    out = []
    if m.get("sapo_losses"):
        out.append(f"SAPO prompt: {str(m.get('prompt', ''))[:60]!r}")
    if "mean_forgetting" in m:
        acc = m.get("accuracy_matrix") or []
        out.append("after each stage: " + "; ".join("/".join(f"{100 * a:.0f}" for a in row) for row in acc))
        out.append(f"mean forgetting {100 * m['mean_forgetting']:.1f} pts")
    if "chosen_arm" in m:
        out.append(f"chosen {m['chosen_arm']}; greedy same prompt {100 * m['greedy_same_prompt_accuracy']:.1f} "
                   f"(McNemar p={m['vs_greedy_p_value']:.3g})")
        out.append(f"early stop {100 * m['early_stop_accuracy']:.1f} at {m['early_stop_mean_samples']:.2f} samples "
                   f"vs fixed majority {100 * m['fixed_majority_accuracy']:.1f}")
        out.append(f"budget: {m['budget_used']} {100 * m['budget_accuracy']:.1f} at {m.get('budget_samples')} samples")
    return "; ".join(out).replace("|", "/").replace("\n", " ")


def diagnostics(rs: list[dict]) -> dict:
    """Floor and collapse diagnostics of a method (common decision 4): numbers averaged over seeds, the
    rest from the first seed; `collapsed` if any seed collapsed; `floor` = the higher trivial rule
    (most frequent answer, or letter) with its Wilson interval on the test examples; `at_floor` when the
    method's accuracy is not above that interval."""
    out = {}
    for key in DIAGNOSTICS:
        vals = [r["metrics"][key] for r in rs if key in r["metrics"]]
        if not vals:
            continue
        out[key] = statistics.mean(vals) if all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                for v in vals) else vals[0]
    flags = [r["metrics"]["collapsed"] for r in rs if "collapsed" in r["metrics"]]
    if flags:
        out["collapsed"] = any(flags)
    floors = [v for v in (out.get("floor_accuracy"), out.get("floor_letter_accuracy")) if v is not None]
    if floors:
        n = len(rs[0]["outcomes"])
        out["floor"] = max(floors)
        out["floor_ci95"] = list(wilson(round(out["floor"] * n), n))
        acc = statistics.mean(r["metrics"]["accuracy"] for r in rs)
        out["at_floor"] = acc <= out["floor_ci95"][1]
    return out


def best(rows: list[dict], pick) -> dict | None:
    """The complete method with the highest accuracy among those `pick(row)` selects (first on ties)."""
    cands = [r for r in rows if r["status"] == "complete" and pick(r)]
    return max(cands, key=lambda r: r["accuracy"]) if cands else None


def compare_against(rows: list[dict], ref: dict | None, outcomes: dict) -> dict:
    """Every other complete method vs `ref`: paired comparisons with Holm-adjusted p across them."""
    if ref is None:
        return {}
    out = {}
    for r in rows:
        if r["status"] == "complete" and r["name"] != ref["name"]:
            c = paired_comparison(outcomes[r["name"]], outcomes[ref["name"]])
            if c is not None:
                out[r["name"]] = c
    for name, p in zip(out, holm([c["p"] for c in out.values()])):
        out[name]["p_holm"] = p
    return out


def ratio(a, b):
    return a / b if a is not None and b else None


def verdict(rows: list[dict], outcomes: dict) -> list[dict]:
    """The three questions a user asks, answered by the best MetaTuner method against the best method of
    each group; p-values Holm-adjusted across the questions answered."""
    co = best(rows, lambda r: is_cooptimization(r["method"]))
    groups = [("co-optimization vs prompt optimization alone", lambda r: r["method"] in PROMPT_ONLY,
               "no prompt-optimization method (zero_shot, opro, bpo)"),
              ("co-optimization vs fine-tuning alone", lambda r: r["method"] in FINE_TUNING,
               "no fine-tuning method (sft, dpo)"),
              ("co-optimization vs the best baseline", lambda r: not is_cooptimization(r["method"]),
               "no baseline")]
    lines = []
    for question, pick, missing in groups:
        other = best(rows, pick)
        line = {"question": question}
        if co is None or other is None:
            line["missing"] = "no complete MetaTuner method" if co is None else missing
        else:
            c = paired_comparison(outcomes[co["name"]], outcomes[other["name"]])
            if c is None:
                line["missing"] = f"{co['name']} and {other['name']} share no test example"
            else:
                line.update(a=co["name"], b=other["name"], **c,
                            cost_ratio_train_tokens=ratio(co.get("train_tokens"), other.get("train_tokens")),
                            cost_ratio_wall=ratio(co.get("wall_seconds"), other.get("wall_seconds")),
                            at_floor=[n for n, r in ((co["name"], co), (other["name"], other)) if r.get("at_floor")])
        lines.append(line)
    answered = [ln for ln in lines if "p" in ln]
    for ln, p in zip(answered, holm([ln["p"] for ln in answered])):
        ln["p_holm"] = p
    return lines


def summarize(spec: dict, statuses: dict) -> dict:
    """results.json content: per method accuracy, costs and diagnostics; paired comparisons; verdict;
    provenance. statuses: {(name, seed): {"status": "complete"|"failed", "error": ...}} of this compare."""
    out = {"title": spec.get("title", ""), "config": spec["path"], "seeds": spec["seeds"]}
    loaded = {}
    for m in spec["methods"]:
        for seed in spec["seeds"]:
            if statuses.get((m["name"], seed), {}).get("status") == "failed":
                continue
            run = load_run(Path(spec["output_dir"]) / m["name"] / f"seed_{seed}")
            if run is not None:
                loaded.setdefault(m["name"], {})[seed] = run
    # p~ of the task: every method but zero_shot records it; zero_shot's prompt is p~ by definition
    all_runs = [(m["method"], r) for m in spec["methods"] for r in loaded.get(m["name"], {}).values()]
    p_tilde = next((r["metrics"]["p_tilde"] for _, r in all_runs if "p_tilde" in r["metrics"]), None)
    if p_tilde is None:
        p_tilde = next((r["predictions"][0]["prompt"] for meth, r in all_runs
                        if r["predictions"] and meth == "zero_shot"), "")
    any_pool = next((r["metrics"]["pool"] for _, r in all_runs if r["metrics"].get("pool")), [])
    pools = {seed: next((runs[seed]["metrics"]["pool"] for runs in loaded.values()  # a seed with no saved pool:
                         if seed in runs and runs[seed]["metrics"].get("pool")), any_pool)  # another seed's
             for seed in spec["seeds"]}
    rows = []
    for m in spec["methods"]:
        failed = [(s, statuses[(m["name"], s)]) for s in spec["seeds"]
                  if statuses.get((m["name"], s), {}).get("status") == "failed"]
        rows.append(method_row(m, loaded.get(m["name"], {}), failed, len(spec["seeds"]) > 1, p_tilde, pools))
    outcomes = {name: {s: r["outcomes"] for s, r in runs.items()} for name, runs in loaded.items()}
    # only fully complete methods enter comparisons (a failed seed would make the pairing uneven)
    base = best(rows, lambda r: not is_cooptimization(r["method"]))
    sft = best(rows, lambda r: r["method"] == "sft")
    out["best_baseline"] = base["name"] if base else None
    out["sft"] = sft["name"] if sft else None
    out["vs_best_baseline"] = compare_against(rows, base, outcomes)
    out["vs_sft"] = compare_against(rows, sft, outcomes)
    out["verdict"] = verdict(rows, outcomes)
    out["methods"] = rows
    out["provenance"] = provenance(spec, loaded)
    return out


def provenance(spec: dict, loaded: dict) -> dict:
    """Versions, git commit, machine, seeds and every run's resolved config (its config.yaml)."""
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    versions["python"] = platform.python_version()
    return {"versions": versions, "git": git_state(Path(__file__).resolve().parents[2]), "machine": machine(),
            "seeds": spec["seeds"], "compare_config": spec["path"],
            "run_configs": {f"{name}/seed_{s}": r["config"] for name, runs in loaded.items()
                            for s, r in sorted(runs.items())}}


def git_state(root: Path) -> dict:
    """The commit of the source tree and whether tracked files differ from it; nulls outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {"cpu": cpu, "cpu_cores": os.cpu_count(), "platform": platform.platform(), "gpus": []}
    try:
        import torch

        if torch.cuda.is_available():
            out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return out
