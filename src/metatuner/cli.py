"""The `metatuner` command line.

    metatuner eval [--config FILE.yaml] [key=value ...]

Each subcommand takes an optional YAML config followed by dotted `key=value` overrides; every
config key can be overridden. `metatuner --help` lists all keys with their help text.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from metatuner.config import Config, help_text, load_config, save_config
from metatuner.errors import MetatunerError, MetatunerWarning

SUBCOMMANDS = {
    "eval": "Evaluate a model (default: the embedded model on the default task) and write predictions.jsonl + metrics.json.",
    "train": "Train with `method=...` (metatuner_j, metatuner_i, metatuner_gumbel, sft, ...), then evaluate on the test split.",
    "compare": "Run several methods on the same task, splits and seeds (--config configs/compare/NAME.yaml); write results.json/.md/.png.",
    "infer": "Answer new queries with a finished run (any method): run_dir=DIR query='...' (or query_file=FILE).",
    "export": "Write the LoRA a MetaTuner run generates for one query as a PEFT adapter: run_dir=DIR query='...' export_dir=DIR.",
}


def run_train(cfg: Config) -> dict:
    """Dispatch on cfg.method to the method's own module."""
    from metatuner.methods import bettertogether, bpo, continual, dpo, inference_select, metatuner, opro, sft, zero_shot

    if cfg.method in metatuner.METHODS:
        return metatuner.run(cfg)
    runners = {"zero_shot": zero_shot.run, "sft": sft.run, "dpo": dpo.run, "opro": opro.run, "bpo": bpo.run,
               "bettertogether": bettertogether.run, "continual": continual.run,
               "inference_select": inference_select.run}
    if cfg.method not in runners:
        raise MetatunerError(f"method: unknown method {cfg.method!r}; expected one of "
                             + ", ".join(list(runners) + list(metatuner.METHODS)))
    return runners[cfg.method](cfg)


def read_queries(cfg: Config) -> list[str]:
    if cfg.query:
        return [cfg.query]
    if not cfg.query_file:
        raise MetatunerError("infer needs query='...' or query_file=FILE")
    from pathlib import Path

    p = Path(cfg.query_file)
    if not p.is_file():
        raise MetatunerError(f"query_file: {p} not found")
    if p.suffix == ".jsonl":
        from metatuner.io import read_jsonl

        rows = read_jsonl(p)
        for i, r in enumerate(rows):
            if "query" not in r:
                raise MetatunerError(f"{p} line {i + 1}: no 'query' field (fields: {sorted(r)})")
        if not rows:
            raise MetatunerError(f"query_file: {p} holds no queries (expected JSONL rows with a 'query' field)")
        return [str(r["query"]) for r in rows]
    from metatuner.io import read_text

    queries = [ln.strip() for ln in read_text(p).splitlines() if ln.strip()]
    if not queries:
        raise MetatunerError(f"query_file: {p} holds no queries (expected one per line)")
    return queries


def run_infer(cfg: Config) -> list[dict]:
    """Answer queries with a finished run (any method that produced a model or chose a prompt)."""
    from metatuner.infer import infer

    if not cfg.run_dir:
        raise MetatunerError("infer needs run_dir=DIR (the output_dir of a finished run)")
    queries = read_queries(cfg)
    return infer(cfg.run_dir, queries)


def run_export(cfg: Config) -> None:
    """One query's generated LoRA as a PEFT adapter of the warmed-up actor, and the prompt it gets."""
    from metatuner.methods.metatuner import export_query_adapter, load_system, test_prompts
    from metatuner.tasks import Example

    if not (cfg.run_dir and cfg.query and cfg.export_dir):
        raise MetatunerError("export needs run_dir=DIR (a finished MetaTuner run), query='...' and export_dir=DIR")
    system = load_system(cfg.run_dir)
    path = export_query_adapter(system, cfg.query, cfg.export_dir)
    prompt = test_prompts(system, [Example(query=cfg.query, answer="", target="")])[0]
    from pathlib import Path

    merged = (Path(cfg.run_dir) / "final" / "actor_adapter").is_dir()
    print(f"wrote {path}: PEFT adapter for {system.cfg.model.name}"
          + (f" with {cfg.run_dir}/final/actor_adapter merged first" if merged else "")
          + f"\nprompt for this query: {prompt}")


PERCENT_COLUMNS = ("accuracy", "em", "f1", "score", "floor_accuracy", "no_answer_rate")


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table; the score columns (PERCENT_COLUMNS) print as percentages, other floats as they are."""
    def fmt(c, v):
        if isinstance(v, float):
            return f"{100 * v:.1f}" if c in PERCENT_COLUMNS else f"{v:.1f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(c, r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def run_eval(cfg: Config) -> dict:
    """Zero-shot evaluation of cfg.model with the task's prompt (or task.prompt)."""
    from metatuner.models import load_from_config
    from metatuner.run import final_eval, stage, start_run

    task = start_run(cfg, needs_train=False)
    stage(f"loading model {cfg.model.name}")
    model, tok = load_from_config(cfg.model)
    return final_eval(cfg, model, tok, task, task.prompt, extra={
        "method": "zero_shot", "train_steps": 0, "train_examples": 0, "generation_calls": 0})


def _quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("always", category=MetatunerWarning)  # ours are meant for the user
    library_show = warnings.showwarning
    if getattr(library_show, "metatuner", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, MetatunerWarning):
            print(f"warning: {message}", file=sys.stderr, flush=True)
        else:
            library_show(message, category, filename, lineno, file, line)

    show.metatuner = True
    warnings.showwarning = show
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def build_parser() -> argparse.ArgumentParser:
    epilog = ("config keys, set in the --config YAML or as dotted key=value (lists as [a,b] or a,b; entries of a\n"
              "mapping as task.params.NAME=VALUE; ${other.key} refers to another key). Every value is checked\n"
              "before any work starts:" + help_text())
    parser = argparse.ArgumentParser(
        prog="metatuner",
        description="Prompt and parameter co-optimization for LLMs (MetaTuner) with fair baselines.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, desc in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=desc, description=desc, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", help="YAML config file; its keys are overridden by key=value arguments.")
        p.add_argument("overrides", nargs="*", help="dotted key=value settings, e.g. task.name=gsm8k eval.limit=20")
        if name == "compare":
            p.add_argument("--report-only", action="store_true",
                           help="Run nothing: write results.json/.md/.png from the runs already finished (others: not run).")
            p.add_argument("--only", default="", metavar="NAME[,NAME]",
                           help="Run only these methods of the config (by name); the report still shows the others' finished runs.")
    return parser


def _close_process_group(wait: bool = True) -> None:
    """Shut a launched run's process group down before exit (a sharded run's device mesh otherwise aborts
    the interpreter's exit with 'terminate called without an active exception'); after an error, without
    waiting for the other processes."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    _quiet()
    try:
        if args.command == "compare":
            from metatuner.compare import run_compare

            if not args.config:
                raise MetatunerError("compare needs --config configs/compare/NAME.yaml")
            run_compare(args.config, args.overrides, report_only=args.report_only,
                        only=[n.strip() for n in args.only.split(",") if n.strip()])
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "eval":
            from metatuner.rundir import claim

            with claim(cfg):
                metrics = run_eval(cfg)
            cols = (["task", "model", "n", "accuracy"] + [k for k in ("em", "f1", "score") if k in metrics]
                    + [k for k in ("floor_accuracy", "floor_answer", "no_answer_rate", "collapsed") if k in metrics]
                    + ["wall_seconds"])
            print(format_table([metrics], cols))
            if metrics.get("letter_distribution"):
                fmt = lambda d: " ".join(f"{k}:{100 * v:.0f}%" for k, v in sorted(d.items()))  # noqa: E731
                print(f"letters chosen {fmt(metrics['letter_distribution'])}; labels {fmt(metrics.get('label_distribution') or {})}")
            print(f"wrote {cfg.output_dir}/predictions.jsonl and metrics.json")
        elif args.command == "train":
            from metatuner.rundir import claim

            with claim(cfg):
                metrics = run_train(cfg)
            if int(os.environ.get("RANK", "0")) == 0:
                cols = ["method", "task", "n", "accuracy"] + [k for k in ("em", "f1") if k in metrics] + ["wall_seconds"]
                print(format_table([metrics], cols))
                print(f"wrote {cfg.output_dir}/")
            _close_process_group()
        elif args.command == "infer":
            for r in run_infer(cfg):
                print(f"query:  {r['query']}\nprompt: {r['prompt']}\nanswer: {r['answer']}\n  (generation: {r['generation']!r})")
        elif args.command == "export":
            run_export(cfg)
    except MetatunerError as e:
        print(f"error: {e}", file=sys.stderr)
        _close_process_group(wait=False)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
