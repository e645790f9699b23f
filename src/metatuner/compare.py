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

Each method runs in its own process (`metatuner train ... resume_from_checkpoint=auto`), writing
`output_dir/<name>/seed_<s>/`, with its progress shown and kept in stdout.log/stderr.log there. A
method that fails is reported (and plotted) as failed with its error, the others still run, and
compare then exits non-zero. Re-running with the same output_dir skips a run whose metrics.json
exists and whose saved config.yaml equals the settings now resolved; any other run runs again
(resuming from a checkpoint with the same settings, if the method keeps one). compare knows no
method's internals. Outputs: results.json (with paired statistics, the verdict and provenance),
results.md, results.png, gallery.md; see metatuner.results, .report, .plot and .stats.
"""

from __future__ import annotations

import codecs
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from metatuner.config import load_config, load_saved_config, save_config, set_key, to_dict
from metatuner.errors import MetatunerError
from metatuner.io import atomic_write_text, write_json
from metatuner.plot import plot
from metatuner.report import gallery, markdown
from metatuner.results import summarize

COMPARE_KEYS = {"output_dir", "seeds", "base", "methods", "title"}
METHOD_KEYS = {"name", "method", "overrides"}
# settings that say where and how a run writes, not what it computes: ignored when comparing configs
RUN_PLUMBING = ("output_dir", "resume_from_checkpoint", "overwrite", "run_dir", "query", "query_file")


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
    set_key(cfg, "resume_from_checkpoint", "auto", where="compare")
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


def settings(cfg) -> dict:
    """What a run computes: its resolved config without RUN_PLUMBING."""
    return {k: v for k, v in to_dict(cfg).items() if k not in RUN_PLUMBING}


def is_done(cfg, run_dir: Path) -> bool:
    """Whether run_dir holds a finished run (metrics.json) whose saved config.yaml has cfg's settings
    (keys added to the config schema since then count as their defaults)."""
    if not (run_dir / "metrics.json").is_file() or not (run_dir / "config.yaml").is_file():
        return False
    try:
        old = load_saved_config(run_dir / "config.yaml")
    except MetatunerError:
        return False
    return settings(old) == settings(cfg)


def _pump(src, sinks) -> None:
    """Copy a child's output to sinks (log file, console) as it comes, carriage returns included, so
    progress bars show live."""
    decode = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while chunk := os.read(src.fileno(), 4096):
        text = decode.decode(chunk)
        for sink in sinks:
            sink.write(text)
            sink.flush()


def wait_with_peak_memory(proc: subprocess.Popen) -> tuple[int, float | None]:
    """Wait for a child; -> (exit code, its peak resident memory in MB, None where the OS does not say)."""
    if not hasattr(os, "wait4"):  # not on Windows
        return proc.wait(), None
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20  # ru_maxrss: KiB on Linux, bytes on macOS
    return proc.returncode, round(usage.ru_maxrss * scale, 1)


def run_one(cfg, run_dir: Path) -> dict:
    """Run `metatuner train` in a child process, its output shown and logged; -> status dict."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for f in ("metrics.json", "predictions.jsonl", "compare.json"):  # results of other settings must not
        (run_dir / f).unlink(missing_ok=True)                         # pass for this run's if it fails
    save_config(cfg, run_dir / "requested.yaml")
    t0 = time.time()
    with open(run_dir / "stdout.log", "w") as out, open(run_dir / "stderr.log", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "metatuner.cli", "train", "--config",
                                 str(run_dir / "requested.yaml")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})  # the child's lines as they come
        pumps = [threading.Thread(target=_pump, args=(proc.stdout, [out, sys.stdout])),
                 threading.Thread(target=_pump, args=(proc.stderr, [err, sys.stderr]))]
        for th in pumps:
            th.start()
        for th in pumps:
            th.join()
        code, peak_rss_mb = wait_with_peak_memory(proc)
    wall = round(time.time() - t0, 1)
    if code != 0 or not (run_dir / "metrics.json").is_file():
        lines = [ln.split("\r")[-1] for ln in (run_dir / "stderr.log").read_text().splitlines() if ln.strip()]
        # our one-line errors first, then the last exception line of a traceback, then the last line
        errs = ([ln for ln in lines if ln.startswith("error:")]
                or [ln for ln in lines if not ln.startswith((" ", "\t")) and ("Error" in ln or "Exception" in ln)]
                or lines or [f"exit code {code}"])
        status = {"status": "failed", "error": errs[-1].strip()[:500], "wall_seconds": wall}
    else:
        status = {"status": "complete", "wall_seconds": wall}
    if peak_rss_mb is not None:
        status["peak_rss_mb"] = peak_rss_mb
    write_json(run_dir / "compare.json", status)
    return status


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m{s:02d}s" if m >= 60 else f"{m}m{s:02d}s"


def run_compare(path: str, overrides: list[str], report_only: bool = False, only: list[str] | None = None) -> dict:
    """Run every method and seed, write the report; raises MetatunerError (exit non-zero) after writing
    it when any run failed. `report_only`: run nothing, report the runs already complete with these
    settings (the rest show as not run). `only`: run just these methods (by name); the report still
    shows every method, the others from their finished runs."""
    spec = load_compare(path, overrides)
    names = [m["name"] for m in spec["methods"]]
    unknown = [n for n in (only or []) if n not in names]
    if unknown:
        raise MetatunerError(f"--only: {', '.join(unknown)} not among {path}'s methods ({', '.join(names)})")
    out = Path(spec["output_dir"])
    # resolve and validate every run's config before running anything: a typo fails in seconds, not hours
    plan = [(seed, m, method_config(spec, m, seed, out / m["name"] / f"seed_{seed}"))
            for seed in spec["seeds"] for m in spec["methods"]]
    out.mkdir(parents=True, exist_ok=True)
    statuses = {}
    t0 = time.time()
    for i, (seed, m, cfg) in enumerate(plan, 1):
        run_dir = out / m["name"] / f"seed_{seed}"
        tag = f"[{i}/{len(plan)}] {m['name']} seed {seed}"
        if is_done(cfg, run_dir):
            statuses[(m["name"], seed)] = {"status": "complete"}
            print(f"{tag}: already complete with these settings, skipped", flush=True)
            continue
        if report_only or (only and m["name"] not in only):
            print(f"{tag}: not complete, not run ({'--report-only' if report_only else '--only'})", flush=True)
            continue
        print(f"{tag}: running (method={cfg.method}; compare elapsed {_clock(time.time() - t0)}) -> {run_dir}",
              flush=True)
        st = run_one(cfg, run_dir)
        statuses[(m["name"], seed)] = st
        print(f"{tag}: {st['status']} in {_clock(st['wall_seconds'])} (compare elapsed {_clock(time.time() - t0)})"
              + (f": {st['error']}" if st["status"] == "failed" else ""), flush=True)
    results = summarize(spec, statuses)
    write_json(out / "results.json", results)
    md = markdown(results)
    atomic_write_text(out / "results.md", md + "\n")
    atomic_write_text(out / "gallery.md", gallery(results))
    plot(results, out / "results.png")
    print(md)
    print(f"wrote {out}/results.json, results.md, results.png, gallery.md")
    failed = [f"{name} seed {seed} ({st['error']})" for (name, seed), st in statuses.items()
              if st["status"] == "failed"]
    if failed:
        raise MetatunerError(f"{len(failed)} of {len(plan)} runs failed: {'; '.join(failed)}; the others are "
                             f"in {out}/results.md")
    return results
