"""Loading the actor and the generator as the run's settings say (each its own copy)."""

from __future__ import annotations

import os

from metatuner.config import Config


def device_of(cfg: Config) -> str:
    import torch

    if cfg.model.device == "auto" and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return cfg.model.device


def load_actor(cfg: Config):
    """(actor, tokenizer) as model.* says (model.adapter merged when set), freshly loaded."""
    from metatuner.models import load_model, merge_adapter

    actor, tok = load_model(cfg.model.name, cfg.model.dtype, device_of(cfg), cfg.model.trust_remote_code)
    return (merge_adapter(actor, cfg.model.adapter) if cfg.model.adapter else actor), tok


def load_generator(cfg: Config):
    """(generator model, tokenizer): its own copy, even when it is the actor's checkpoint."""
    from metatuner.models import load_model

    return load_model(cfg.generator.name or cfg.model.name, cfg.generator.dtype, device_of(cfg),
                      cfg.generator.trust_remote_code)
