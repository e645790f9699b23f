"""Check every setting before any work starts: ranges, choices and combinations.

`validate(cfg)` needs nothing but the config (load_config calls it); `validate_models(cfg)` also
reads the models' config.json (no weights) for the checks that need a model's depth, and is called
by run code before training. Every error is one line: the key, the value and what is allowed.

    cfg = load_config(None, ["eval.limit=-3"])
    # MetatunerError: eval.limit = -3: expected an integer >= 0 (0 = all)
"""

from __future__ import annotations

import math
import re
from typing import Any

from metatuner.errors import MetatunerError

METATUNER_METHODS = ("metatuner_j", "metatuner_i", "metatuner_gumbel")
METHODS = ("zero_shot", "sft", "dpo", "opro", "bpo", "bettertogether", "continual", "inference_select",
           *METATUNER_METHODS)
SAPO_METHODS = ("sft", "continual", *METATUNER_METHODS)
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")

CHOICES = {
    "method": METHODS,
    "model.dtype": DTYPES,
    "generator.dtype": DTYPES,
    "eval.split": ("test", "validation", "train"),
    "task.split_order": ("shuffled", "generation"),
    "inference.strategy": ("greedy", "best_of_n", "majority", "weighted_majority", "early_majority"),
    "hypernet.pooling": ("mean", "last"),
    "hypernet.heads": ("shared", "per_target"),
    "train.scheduler": ("constant", "linear", "cosine"),
    "train.report_to": ("jsonl", "tensorboard", "none"),
    "rollout.criterion": ("answer", "nll"),
    "rollout.targets": ("all", "decisive"),
    "generator.prompt_space": ("free", "pool", "mixed"),
    "generator.pool_score": ("gain", "likelihood"),
    "generator.pool_loss": ("best", "listwise"),
    "prompt_selection": ("none", "sapo"),
    "select.rule": ("lcb", "halving"),
    "select.early_test": ("chosen", "cheapest", "all"),
    "generation.backend": ("hf", "vllm"),
    "resume_from_checkpoint": (False, True, "auto"),
}

# (keys, test, what is allowed)
RANGES = [
    (("seed", "eval.limit", "task.train_size", "task.test_size", "task.max_new_tokens",
      "generator.lora_rank", "warmup.max_steps", "warmup.generator_steps", "warmup.queries", "train.max_steps",
      "train.save_steps", "train.save_total_limit", "bpo.max_steps", "opro.steps", "opro.exemplars", "sapo.candidates",
      "sapo.reselect_steps", "rollout.n", "select.opro_prompts", "select.rewrites", "bettertogether.instructions",
      "bettertogether.demo_sets", "bettertogether.max_demos", "prompts.paraphrases", "prompts.demos",
      "select.explore_budget", "generation.max_model_len"),
     lambda v: v >= 0, "an integer >= 0"),
    (("train.weight_decay", "train.max_grad_norm", "train.alpha", "select.cost_weight",
      "select.stop_tolerance"),
     lambda v: v >= 0, "a number >= 0"),
    (("eval.batch_size", "train.batch_size", "train.grad_accum", "rollout.batch_size", "inference.n",
      "generator.max_prompt_tokens", "lora.rank", "hypernet.hidden", "hypernet.embed_dim", "train.sync_steps",
      "inference.stop_min", "inference.stop_chunk", "train.alternate_steps", "train.max_length", "train.log_steps",
      "opro.candidates", "opro.subset", "opro.top_k", "opro.max_new_tokens", "opro.max_chars", "bpo.queries", "dpo.queries",
      "dpo.pairs_per_query", "sapo.subset", "sapo.max_new_tokens", "select.subsets", "select.val_examples",
      "select.max_per_query", "bettertogether.queries", "bettertogether.val_examples", "prompts.pool_size", "prompts.val_examples"),
     lambda v: v >= 1, "an integer >= 1"),
    (("lora.alpha", "hypernet.lr", "warmup.lr", "warmup.generator_lr", "train.lr", "train.generator_lr",
      "train.gumbel_tau", "dpo.lr", "dpo.beta", "bpo.lr", "generation.kv_cache_gb"),
     lambda v: v > 0, "a number > 0"),
    (("inference.temperature", "rollout.temperature", "generator.pool_temperature", "opro.temperature", "dpo.temperature", "sapo.temperature"),
     lambda v: v > 0, "a number > 0 (greedy decoding is inference.strategy=greedy, not temperature 0)"),
    (("generator.share_ratio", "inference.top_p", "rollout.top_p", "generation.gpu_memory_utilization"),
     lambda v: 0 < v <= 1, "a number in (0, 1]"),
    (("select.confidence",), lambda v: 0.5 <= v < 1, "a number in [0.5, 1)"),
    (("inference.stop_threshold",), lambda v: 0.5 <= v < 1, "a number in [0.5, 1) (the probability the vote's leader is the majority)"),
    (("lora.dropout", "train.lr_warmup_ratio"), lambda v: 0 <= v < 1, "a number in [0, 1)"),
    (("dpo.sft_steps", "task.split_seed", "task.val_size"), lambda v: v >= -1, "an integer >= -1 (-1 = the default)"),
    (("dpo.k",), lambda v: v >= 2, "an integer >= 2 (a correct and an incorrect sample make a pair)"),
    (("select.budget",), lambda v: v >= 1, "a number >= 1 (average samples per test query)"),
]

NOT_EMPTY = ("method", "model.name", "task.name", "lora.target_modules", "dpo.loss_type",
             "select.n_values", "select.temperatures")
DEVICE = re.compile(r"^(auto|cpu|mps|cuda|xpu|npu)(:\d+)?$")
SLICE = re.compile(r"^\s*-?\d*\s*:\s*-?\d*\s*(:\s*-?\d*\s*)?$")
VERIFIER = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def get(cfg, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def fail(key: str, value: Any, allowed: str) -> MetatunerError:
    return MetatunerError(f"{key} = {value!r}: expected {allowed}")


def validate(cfg) -> None:
    """Raise a one-line MetatunerError for the first setting out of range, not among its choices, or
    inconsistent with another setting."""
    for key, allowed in CHOICES.items():
        value = get(cfg, key)
        if not any(value is c or (type(value) is type(c) and value == c) for c in allowed):
            raise fail(key, value, "one of " + ", ".join(str(c).lower() if isinstance(c, bool) else c for c in allowed))
    for keys, ok, allowed in RANGES:
        for key in keys:
            if not ok(get(cfg, key)):
                raise fail(key, get(cfg, key), allowed + (" (0 = all)" if key == "eval.limit" else ""))
    for key in NOT_EMPTY:
        if not get(cfg, key):
            raise fail(key, get(cfg, key), "a non-empty value")
    _check_formats(cfg)
    _check_combinations(cfg)


def _check_formats(cfg) -> None:
    if not DEVICE.match(cfg.model.device):
        raise fail("model.device", cfg.model.device, "auto, cpu, cuda or cuda:N")
    if cfg.lora.layers.strip() and not SLICE.match(cfg.lora.layers):
        raise fail("lora.layers", cfg.lora.layers, "empty (all layers) or a python slice 'start:end' of integers")
    steps = [s.strip() for s in cfg.bettertogether.strategy.split("->")]
    if not all(s in ("p", "w") for s in steps):
        raise fail("bettertogether.strategy", cfg.bettertogether.strategy, "steps p and w joined by '->', e.g. 'p -> w -> p'")
    g = cfg.inference.stop_score
    if g is not None and not math.isfinite(g):
        raise fail("inference.stop_score", g, "null (no gate) or a finite number (a sample's score to stop at)")
    v = cfg.inference.verifier
    if v not in ("", "oracle") and not VERIFIER.match(v):
        raise fail("inference.verifier", v, "'' (the actor's log-probability), 'oracle' or 'module:function'")
    for n in cfg.select.n_values:
        if not isinstance(n, int) or n < 1:
            raise fail("select.n_values", cfg.select.n_values, "a list of integers >= 1")
    for t in cfg.select.temperatures:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0:
            raise fail("select.temperatures", cfg.select.temperatures, "a list of numbers > 0")
    for st in cfg.select.strategies:
        if st not in ("majority", "best_of_n", "weighted_majority", "early_majority"):
            raise fail("select.strategies", cfg.select.strategies,
                       "a list of majority, best_of_n, weighted_majority, early_majority (greedy is always an arm)")
    for name, params in cfg.task.params_by_task.items():
        if not isinstance(params, dict):
            raise fail(f"task.params_by_task.{name}", params, "a mapping of that task's parameters")


def _check_combinations(cfg) -> None:
    m, train = cfg.method, cfg.train
    if m in METATUNER_METHODS and cfg.warmup.max_steps > train.max_steps:
        raise fail("warmup.max_steps", cfg.warmup.max_steps,
                   f"<= train.max_steps ({train.max_steps}): train.max_steps is the total, warm-up included")
    if m == "dpo" and cfg.dpo.sft_steps > train.max_steps:
        raise fail("dpo.sft_steps", cfg.dpo.sft_steps,
                   f"-1 or <= train.max_steps ({train.max_steps}): train.max_steps is the total, SFT included")
    if cfg.rollout.targets == "decisive" and cfg.rollout.criterion != "answer":
        raise fail("rollout.targets", "decisive", "all with rollout.criterion=nll (decisive needs answers to "
                   "tell right from wrong: rollout.criterion=answer)")
    g = cfg.generator
    if m in METATUNER_METHODS and g.prompt_space != "free" and g.pool_score == "gain" and g.lora_rank == 0:
        raise fail("generator.pool_score", g.pool_score,
                   "likelihood with generator.lora_rank=0 (gain compares G with and without its LoRA)")
    if m in METATUNER_METHODS and g.pool_loss == "listwise" and (g.prompt_space != "pool" or cfg.rollout.criterion != "answer"):
        raise fail("generator.pool_loss", "listwise", "best unless generator.prompt_space=pool and rollout.criterion=answer "
                   "(listwise learns from which pool candidates answered right)")
    if train.batch_size % train.grad_accum:
        raise fail("train.grad_accum", train.grad_accum, f"a divisor of train.batch_size ({train.batch_size})")
    if cfg.inference.strategy == "greedy" and cfg.inference.n != 1:
        raise fail("inference.n", cfg.inference.n, "1 with inference.strategy=greedy (or use best_of_n / majority / weighted_majority)")
    if VERIFIER.match(cfg.inference.verifier) and not cfg.inference.trust_verifier:
        raise fail("inference.verifier", cfg.inference.verifier,
                   "'' or 'oracle'; a 'module:function' verifier runs that module's code: set inference.trust_verifier=true to allow it")
    if cfg.select.budget > cfg.select.max_per_query:
        raise fail("select.budget", cfg.select.budget, f"<= select.max_per_query ({cfg.select.max_per_query})")
    if cfg.warmup.generator_steps > 0 and cfg.warmup.queries < 1 and m in METATUNER_METHODS:
        raise fail("warmup.queries", cfg.warmup.queries, "an integer >= 1 when warmup.generator_steps > 0")
    if cfg.prompt_selection == "sapo" and m not in SAPO_METHODS:
        raise fail("prompt_selection", "sapo", f"none with method={m} (SAPO selects the training prompt of "
                   + ", ".join(SAPO_METHODS) + ")")
    if m == "continual" and not cfg.continual.tasks:
        raise fail("continual.tasks", cfg.continual.tasks, "at least one task with method=continual")


def validate_models(cfg) -> None:
    """Checks that need the models' files (config.json, no weights): model.adapter must be a PEFT adapter
    directory; the generator's split depth k = round(generator.share_ratio x K) must satisfy 1 <= k < K;
    lora.layers must select layers of the actor. Called by run code before any training."""
    from metatuner.generator import split_depth
    from metatuner.lora import _parse_layers
    from metatuner.models import check_adapter, model_config

    if cfg.model.adapter:
        check_adapter(cfg.model.adapter)
    actor_layers = _num_layers(model_config(cfg.model.name, cfg.model.trust_remote_code, key="model.name"),
                               "model.name", cfg.model.name)
    if cfg.lora.layers.strip():
        _parse_layers(cfg.lora.layers, actor_layers)
    if cfg.method in METATUNER_METHODS:
        name, key = (cfg.generator.name, "generator.name") if cfg.generator.name else (cfg.model.name, "model.name")
        layers = _num_layers(model_config(name, cfg.generator.trust_remote_code, key=key), key, name)
        split_depth(layers, cfg.generator.share_ratio)


def _num_layers(config, key: str, name: str) -> int:
    text = getattr(config, "text_config", None) or config
    n = getattr(text, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise MetatunerError(f"{key}={name!r}: its config has no num_hidden_layers (not a decoder LM?)")
    return n
