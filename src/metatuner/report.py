"""results.md and gallery.md of a comparison, rendered from results.json's content (metatuner.results).

results.md: the verdict first (one line per question a user asks), then the accuracy table with the
paired comparisons, the cost table, and the floor and answer-collapse diagnostics.
"""

from __future__ import annotations

POWER_NOTE = ("examples needed: a paired McNemar test at 80% power and alpha 0.05 for the observed difference "
              "and discordance rate (Connor 1987)")


def pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def pval(p: float) -> str:
    return "<0.001" if p < 0.001 else f"={p:.3f}"


def count(x: float) -> str:
    """120000 -> 120k, 1500000 -> 1.5M."""
    return f"{x:.0f}" if abs(x) < 1000 else f"{x / 1e3:.3g}k" if abs(x) < 1e6 else f"{x / 1e6:.3g}M"


def cell(text) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def flags(r: dict) -> str:
    out = []
    if r["status"] != "complete":
        out.append(r["status"])
    if r.get("at_floor"):
        out.append("at floor")
    if r.get("collapsed"):
        out.append("collapsed")
    return ", ".join(out) or "-"


def verdict_lines(results: dict) -> list[str]:
    n_test = {r["name"]: r.get("n_test") for r in results["methods"]}
    tokens = {r["name"]: r.get("train_tokens") for r in results["methods"]}
    lines = []
    for v in results["verdict"]:
        if "missing" in v:
            lines.append(f"- **{v['question']}**: not answered ({v['missing']}).")
            continue
        text = (f"- **{v['question']}**: {v['a']} vs {v['b']}: {pts(v['diff'])} points "
                f"(95% CI {pts(v['ci95'][0])} to {pts(v['ci95'][1])}), p{pval(v['p'])} "
                f"(exact McNemar; Holm-adjusted p{pval(v['p_holm'])})")
        ta, tb = tokens.get(v["a"]) or 0, tokens.get(v["b"]) or 0
        costs = [f"x{v['cost_ratio_train_tokens']:.2g} training tokens ({count(ta)} vs {count(tb)})"
                 if v.get("cost_ratio_train_tokens") is not None else f"training tokens {count(ta)} vs {count(tb)}"]
        if v.get("cost_ratio_wall") is not None:
            costs.append(f"x{v['cost_ratio_wall']:.2g} wall time")
        text += "; cost " + ", ".join(costs) + "."
        if v["inconclusive"]:
            need = v.get("examples_needed")
            text += (" **Inconclusive**: the interval spans 0; "
                     + (f"about {need} test examples would tell them apart at this difference "
                        f"(this run has {n_test.get(v['a'])})." if need else "they disagree on no more examples "
                        "one way than the other, so no test size would tell them apart at this difference."))
        else:
            text += f" {v['a'] if v['diff'] > 0 else v['b']} is better."
        if v.get("at_floor"):
            text += f" Within the trivial floor's interval: {', '.join(v['at_floor'])}."
        lines.append(text)
    failed = [r for r in results["methods"] if r["status"] != "complete"]
    if failed:
        lines.append("- **not compared**: " + "; ".join(f"{r['name']} {r['status']}" + (f" ({r['error']})" if
                                                        r.get("error") else "") for r in failed) + ".")
    return lines


def accuracy_table(results: dict) -> list[str]:
    base, sft = results.get("best_baseline"), results.get("sft")
    cols = ["method", "accuracy % (95% CI)"]
    if base:
        cols.append(f"vs best baseline ({base}): pts (95% CI), Holm p")
    if sft:
        cols.append(f"vs {sft}: pts (95% CI), Holm p")
    cols += ["EM/F1", "inference", "flags", "status"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in results["methods"]:
        if "accuracy" not in r:
            acc = "-"
        else:
            lo, hi = r["accuracy_ci95_examples"]
            acc = f"{100 * r['accuracy']:.1f} ({100 * lo:.1f}-{100 * hi:.1f})"
            if "accuracy_ci95_seeds" in r:
                slo, shi = r["accuracy_ci95_seeds"]
                acc += f"; seeds {100 * slo:.1f}-{100 * shi:.1f}"
        cells = [r["name"], acc]
        for ref, table in ((base, "vs_best_baseline"), (sft, "vs_sft")):
            if ref:
                c = results[table].get(r["name"])
                cells.append("reference" if r["name"] == ref else "-" if c is None else
                             f"{pts(c['diff'])} ({pts(c['ci95'][0])} to {pts(c['ci95'][1])}), p{pval(c['p_holm'])}")
        cells.append(f"{100 * r['em']:.1f}/{100 * r['f1']:.1f}" if "f1" in r else "-")
        cells.append(r.get("inference", "-"))
        cells.append(flags(r))
        status = r["status"] + (f": {r['error']}" if r.get("error") else "")
        cells.append(status)
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    return lines


def _num(r: dict, key: str, fmt: str = "{:.0f}") -> str:
    return "-" if r.get(key) is None else fmt.format(r[key])


def cost_table(results: dict) -> list[str]:
    cols = ["method", "train steps", "train examples", "train tokens", "gen tokens (train + eval)", "gen calls",
            "wall s", "peak MB (run / RSS)", "notes"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in results["methods"]:
        if "accuracy" not in r:
            lines.append(f"| {r['name']} | " + " | ".join("-" for _ in cols[1:]) + " |")
            continue
        train_gen = r.get("tokens_generated_train")
        gen = (f"{r['tokens_generated']:.0f} ({train_gen:.0f} + {r['tokens_generated_eval']:.0f})" if train_gen
               is not None else f"{r['tokens_generated_eval']:.0f} (- + {r['tokens_generated_eval']:.0f})")
        peak = f"{_num(r, 'peak_memory_mb')} / {_num(r, 'peak_rss_mb')}"
        cells = [r["name"], _num(r, "train_steps"), _num(r, "train_examples"), _num(r, "train_tokens"), gen,
                 _num(r, "generation_calls"), _num(r, "wall_seconds"), peak, r.get("notes") or "-"]
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    return lines


def _dist(d) -> str:
    return " ".join(f"{k}:{100 * v:.0f}" for k, v in sorted(d.items())) if isinstance(d, dict) and d else "-"


def diagnostics_table(results: dict) -> list[str]:
    rows = [r for r in results["methods"] if "accuracy" in r]
    if not any(k in r for r in rows for k in ("floor", "no_answer_rate", "distinct_answers", "top_answer_share")):
        return []  # runs from before the diagnostics
    mc = any("letter_distribution" in r for r in rows)
    cols = ["method", "accuracy %", "floor % (95% CI; rule)", "no answer %", "distinct answers / references",
            "top answer (share % / of references %)"]
    if mc:
        cols.append("letters chosen % vs labels %")
    cols.append("flags")
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        if "floor" in r:
            rule = (f"letter {r.get('floor_letter')!r}" if r.get("floor_letter_accuracy") == r["floor"]
                    and "floor_letter" in r else f"always {r.get('floor_answer')!r}")
            lo, hi = r["floor_ci95"]
            floor = f"{100 * r['floor']:.1f} ({100 * lo:.1f}-{100 * hi:.1f}; {rule})"
        else:
            floor = "-"
        distinct = (f"{r['distinct_answers']:.0f} / {r['distinct_references']:.0f}"
                    if r.get("distinct_answers") is not None and r.get("distinct_references") is not None else "-")
        top = (f"{str(r.get('top_answer'))[:20]!r} ({100 * r['top_answer_share']:.0f} / "
               f"{100 * r.get('top_reference_share', 0):.0f})" if r.get("top_answer") is not None
               and r.get("top_answer_share") is not None else "-")
        cells = [r["name"], f"{100 * r['accuracy']:.1f}", floor, _num(r, "no_answer_rate", "{:.1%}").replace("%", ""),
                 distinct, top]
        if mc:
            cells.append(f"{_dist(r.get('letter_distribution'))} vs {_dist(r.get('label_distribution'))}")
        cells.append(flags(r))
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    return lines


def prompt_lines(results: dict) -> list[str]:
    """Per method, which prompts the test queries got: share that differ from p~, the most frequent prompts
    (pool index when the method used a pool), and a few examples. Empty when every method used p~ alone."""
    rows = [r for r in results["methods"] if r.get("status") == "complete" and "prompt_choices" in r]
    if not any(r["prompt_differs_from_p_tilde"] > 0 or r.get("distinct_prompts", 1) > 1 for r in rows):
        return []
    lines = ["| method | differ from p~ | distinct prompts | most frequent prompts (share) |", "|---|---|---|---|"]
    for r in rows:
        tops = "; ".join(f"{'p~' if c['is_p_tilde'] else ('pool #' + str(c['pool_index']) if c['pool_index'] is not None else 'new')} "
                         f"{cell(repr(_short(c['prompt'], 50)))}{' (its text differs by seed)' if c.get('texts', 1) > 1 else ''} "
                         f"{100 * c['share']:.0f}%" for c in r["prompt_choices"][:3])
        pool = f" of a pool of {r['pool_size']}" if r.get("pool_size") else ""
        lines.append(f"| {r['name']} | {100 * r['prompt_differs_from_p_tilde']:.0f}% | {r['distinct_prompts']}{pool} | {tops} |")
    lines.append("")
    for r in rows:
        if r["prompt_differs_from_p_tilde"] > 0:
            for e in r["prompt_examples"]:
                lines.append(f"- {r['name']}: query {cell(repr(_short(e['query'], 80)))} -> prompt "
                             f"{cell(repr(_short(e['prompt'], 120)))} ({'correct' if e['correct'] else 'wrong'})")
    return lines


def _short(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def markdown(results: dict) -> str:
    out = [f"# {results['title']}", ""] if results.get("title") else []
    out += ["## Verdict", ""] + verdict_lines(results) + [""]
    out += ["Differences are paired over the same test examples (pooled over seeds): a bootstrap 95% interval "
            "that resamples examples, and an exact McNemar p-value. " + POWER_NOTE + ". "
            "\"at floor\": accuracy within the 95% interval of a trivial rule (always the training split's most "
            "frequent answer or letter); \"collapsed\": one answer takes far more of the predictions than of the "
            "references, or few distinct answers. Peak memory: as the run reports it (`peak_memory_mb`) / the "
            "run process's peak resident memory measured by compare.", ""]
    out += ["## Accuracy", ""] + accuracy_table(results) + [""]
    out += ["## Cost", ""] + cost_table(results) + [""]
    prompts = prompt_lines(results)
    if prompts:
        out += ["## Prompts the test queries got", "", "Pooled over seeds. p~: the task's prompt; pool #i: the "
                "i-th candidate of the run's prompt pool (0 is p~; each seed's runs share one pool, which can differ "
                "by seed, e.g. OPRO's member); new: a prompt outside the pool (written by a generator or an "
                "optimizer).", ""] + prompts + [""]
    diag = diagnostics_table(results)
    if diag:
        out += ["## Floor and answer collapse", ""] + diag + [""]
    return "\n".join(out)


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
