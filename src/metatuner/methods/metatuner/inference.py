"""A trained MetaTuner system after training: rebuild it from a run folder, answer queries, evaluate,
and export one query's generated LoRA (or G's adapter) in PEFT format."""

from __future__ import annotations

from pathlib import Path

import torch

from metatuner.config import Config
from metatuner.errors import MetatunerError
from metatuner.generation import chat_text, generate_texts
from metatuner.tasks import Example

from .rollouts import test_prompts
from .system import MetaTunerSystem


def save_generator_adapter(system: MetaTunerSystem, out: Path, write: bool = True) -> None:
    """G's LoRA factors as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors), loadable
    with PeftModel.from_pretrained(G's base model, out). With G sharded every process calls it (the factors
    are gathered) and the one with write=True writes."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from metatuner.sharding import whole

    cfg = system.cfg
    tensors = {}
    for n, p in system.gen.model.named_parameters():
        if "lora_" in n:
            t = whole(p)  # a gather when sharded: every process takes part, the writer keeps the copy
            if write:
                tensors["base_model.model." + n.replace(".default", "")] = t.cpu().contiguous().clone()
    if not write:
        return
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    targets = list(cfg.generator.lora_targets) or sorted({n.split(".")[-3] for n in tensors})
    LoraConfig(r=cfg.generator.lora_rank, lora_alpha=2 * cfg.generator.lora_rank, target_modules=targets,
               lora_dropout=0.0, base_model_name_or_path=cfg.generator.name or cfg.model.name).save_pretrained(str(out))


def load_system(run_dir: str | Path) -> MetaTunerSystem:
    """Rebuild a trained system from a run's output_dir (config.yaml + final/), without its training data."""
    from peft import PeftModel

    from metatuner.config import load_config
    from metatuner.tasks import task_rules

    from .loading import load_actor, load_generator

    run_dir = Path(run_dir)
    final = run_dir / "final"
    if not (final / "generator.safetensors").is_file():
        raise MetatunerError(f"run_dir={run_dir}: no final/generator.safetensors (is this a finished MetaTuner run?)")
    cfg = load_config(run_dir / "config.yaml")
    task = task_rules(cfg.task)
    actor, tok = load_actor(cfg)
    gen, gtok = load_generator(cfg)
    if (final / "actor_adapter" / "adapter_config.json").is_file():
        actor = PeftModel.from_pretrained(actor, str(final / "actor_adapter")).merge_and_unload()
    system = MetaTunerSystem(cfg, actor, tok, gen, gtok, task)
    system.load(final)
    if (final / "pool.json").is_file():
        import json

        system.pool = json.loads((final / "pool.json").read_text())["pool"]
    system.gen.model.eval()
    system.decoder.eval()
    return system


@torch.no_grad()
def answer(system: MetaTunerSystem, queries: list[str]) -> list[dict]:
    """Rewritten prompt and answer for new queries (the Python API behind `metatuner infer`)."""
    exs = [Example(query=q, answer="", target="") for q in queries]
    prompts = test_prompts(system, exs)
    out = []
    bs = system.cfg.eval.batch_size
    for s in range(0, len(exs), bs):
        chunk, ps = exs[s : s + bs], prompts[s : s + bs]
        texts = [chat_text(system.tok, system.task.render(p, ex.query)) for p, ex in zip(ps, chunk)]
        with system.with_factors(chunk):
            gens, _, _ = generate_texts(system.actor, system.tok, texts, system.task.max_new_tokens)
        for ex, p, g in zip(chunk, ps, gens):
            out.append({"query": ex.query, "prompt": p, "generation": g[0], "answer": system.task.extract(g[0])})
    return out


@torch.no_grad()
def export_query_adapter(system: MetaTunerSystem, query: str, out_dir: str | Path) -> Path:
    """The LoRA F generates for one query, as a static PEFT adapter of the warmed-up actor (the base
    model with final/actor_adapter merged)."""
    from metatuner.lora import export_peft_adapter

    ex = Example(query=query, answer="", target="")
    f = system.factors([ex])
    if f is None:
        raise MetatunerError("export: this run has no parameter decoder (train.param_decoder=false)")
    cfg = system.cfg
    one = {k: (A[0], B[0]) for k, (A, B) in f.items()}
    return export_peft_adapter(system.targets, one, cfg.lora.rank, cfg.lora.alpha, Path(out_dir), cfg.model.name)


def evaluate_system(cfg: Config, system: MetaTunerSystem, extra: dict) -> dict:
    from metatuner.run import eval_examples, final_eval

    examples = eval_examples(cfg, system.task)
    with torch.no_grad():
        chosen = test_prompts(system, examples)
    from collections import Counter

    counts = Counter(chosen)
    extra = {**extra, "prompts_rewritten": sum(p != system.p_tilde for p in chosen) / max(1, len(chosen)),
             "prompt_counts": dict(counts.most_common(10))}
    if cfg.generator.prompt_space != "free":
        extra["pool"] = system.pool

    def ctx(idx):
        return system.with_factors([examples[i] for i in idx])

    return final_eval(cfg, system.actor, system.tok, system.task, chosen, batch_context=ctx, extra=extra)
