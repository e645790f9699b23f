"""The MetaTuner system: generator G split at depth k, parameter decoder F, actor M with per-query LoRA,
and the two losses of one training step."""

from __future__ import annotations

import contextlib

import torch

from metatuner.config import Config
from metatuner.errors import MetatunerError
from metatuner.generation import chat_text
from metatuner.generator import SplitGenerator
from metatuner.hypernet import ParameterDecoder, pool
from metatuner.lora import attach_per_query_lora, find_targets
from metatuner.rewrite import rewrite_messages
from metatuner.tasks import Example, Task
from metatuner.training import actor_batch, autocast, completion_text, forward_nll, lm_batch, use_bf16


def add_generator_lora(gen_model, rank: int, targets: list[str] | None = None) -> None:
    """LoRA (PEFT layers injected in place, model class unchanged) on the named linears of every
    layer of G (all of them when `targets` is empty); the base weights are frozen, so phi_s and
    phi_p train as LoRA factors."""
    from peft import LoraConfig, inject_adapter_in_model

    present = sorted({n.split(".")[-1] for n, m in gen_model.named_modules()
                      if isinstance(m, torch.nn.Linear) and ".layers." in n})
    names = list(targets) if targets else present
    missing = [n for n in names if n not in present]
    if missing:
        raise MetatunerError(f"generator.lora_targets: {missing} not in the generator; available: {', '.join(present)}")
    gen_model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=names, lora_dropout=0.0), gen_model)


class MetaTunerSystem:
    """G (phi_s, phi_p, phi_p'), F (phi_q) and the actor with batched per-query LoRA hooks.

    The actor's own weights never train (the warm-up adapter is merged before the system is built);
    what trains is G (LoRA factors, or all of G with generator.lora_rank=0) and F.
    """

    def __init__(self, cfg: Config, actor, actor_tok, gen_model, gen_tok, task: Task):
        self.cfg, self.task = cfg, task
        self.actor, self.tok = actor, actor_tok
        self.gen_tok = gen_tok
        self.p_tilde = task.prompt
        self.pool = [task.prompt]  # the candidate prompt pool (generator.prompt_space=pool|mixed); set by the recipe
        if cfg.generator.lora_rank > 0:
            add_generator_lora(gen_model, cfg.generator.lora_rank, list(cfg.generator.lora_targets))
        self.gen = SplitGenerator(gen_model, cfg.generator.share_ratio, cfg.generator.share_encoder)
        self.targets = find_targets(actor, list(cfg.lora.target_modules), cfg.lora.layers)
        self.lora = attach_per_query_lora(actor, self.targets, cfg.lora.rank, cfg.lora.alpha)
        self.decoder = ParameterDecoder(gen_model.config.hidden_size, self.targets, cfg.lora.rank, cfg.lora.alpha,
                                        cfg.hypernet.hidden, cfg.hypernet.heads, cfg.hypernet.embed_dim)
        self.decoder.to(gen_model.device)
        self.use_f = cfg.train.param_decoder
        self.use_p = cfg.train.prompt_rewrite
        self.actor_adapter = None  # the warm-up adapter merged into the actor (copied to final/)
        self.pooled = None  # {id(example): pooled h_k} inside `pooled_states`
        self.sharded = False  # G sharded with FSDP2 (set by the joint phase's Runner, `metatuner.sharding`)
        self.counts = {"generation_calls": 0, "train_tokens": 0}  # costs, for the comparison report
        actor.requires_grad_(False)

    @property
    def device(self):
        return self.gen.model.device

    # -- generator inputs

    def gen_prefixes(self, examples: list[Example]) -> list[str]:
        return [chat_text(self.gen_tok, rewrite_messages(self.p_tilde, ex.query)) for ex in examples]

    def gen_encode(self, examples: list[Example]) -> dict:
        """Left-padded generator inputs (p~, x) for generation and for F at test time."""
        tok = self.gen_tok
        tok.padding_side = "left"
        enc = tok(self.gen_prefixes(examples), return_tensors="pt", padding=True, add_special_tokens=False)
        return {k: v.to(self.device) for k, v in enc.items()}

    def factors(self, examples: list[Example], hidden_k=None, mask=None) -> dict | None:
        """F(pool(h_k)) for these queries; None in the w/o F ablation. Positions count real tokens
        only, so h_i of a query is the same left-padded (here) or right-padded (in the joint pass)."""
        if not self.use_f:
            return None
        if hidden_k is None and self.pooled is not None:  # computed once for a rollout (`pooled_states`)
            return self.decoder(torch.stack([self.pooled[id(ex)] for ex in examples]))
        if hidden_k is None or not self.gen.share_encoder:
            enc = self.gen_encode(examples)
            hidden_k, mask = self.gen.param_encode(enc["input_ids"], enc["attention_mask"]), enc["attention_mask"]
        return self.decoder(pool(hidden_k, mask, self.cfg.hypernet.pooling))

    @contextlib.contextmanager
    def pooled_states(self, examples: list[Example]):
        """Inside the block `factors` reads these queries' pooled meta-encoder states computed here, once,
        in chunks of rollout.batch_size (D2's candidate scoring: the actor answers every candidate with its
        query's LoRA, and G need not encode the query again for each batch). With G sharded every pass of G
        is a collective, and the scoring takes a different number of batches on each process."""
        bs = self.cfg.rollout.batch_size
        pooled = {}
        with torch.no_grad():
            for s in range(0, len(examples), bs):
                chunk = examples[s : s + bs]
                enc = self.gen_encode(chunk)
                h = pool(self.gen.param_encode(enc["input_ids"], enc["attention_mask"]), enc["attention_mask"],
                         self.cfg.hypernet.pooling)
                pooled.update({id(ex): row for ex, row in zip(chunk, h)})
        self.pooled = pooled
        try:
            yield
        finally:
            self.pooled = None

    def with_factors(self, examples: list[Example]):
        """Context in which the actor runs with these queries' generated LoRA (nothing in w/o F)."""
        f = self.factors(examples)
        return self.lora.use_factors(f) if f is not None else contextlib.nullcontext()

    # -- losses

    def joint_losses(self, examples: list[Example], task_prompts: list[str], best_prompts: list,
                     need_task: bool = True, need_reg: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(task loss, regularization loss), from one generator pass over (p~, x, p*) and one actor pass.
        A query without a D2 target (best prompt None, rollout.targets=decisive) is left out of the
        regulariser's mean (its row still feeds F through h_i, with p~ as the placeholder completion);
        the mean is over the micro-batch's rows with a target, so with sparse targets each one weighs
        more, as if train.alpha grew. With generator.pool_loss=listwise a target is a list of pool indices
        (the candidates that answered right) and the regulariser is `rollouts.pool_choice_loss`."""
        cfg = self.cfg
        dev = self.device
        zero = torch.zeros((), device=dev)
        listwise = cfg.generator.pool_loss == "listwise"
        keep = torch.tensor([p is not None for p in best_prompts], dtype=torch.float, device=dev)
        with autocast(use_bf16(cfg.train, dev), dev):
            prefixes = self.gen_prefixes(examples)
            comps = [completion_text(self.gen_tok, rewrite_messages(self.p_tilde, ex.query),
                                     p if isinstance(p, str) else self.p_tilde)[1]
                     for ex, p in zip(examples, best_prompts)]
            gb = lm_batch(self.gen_tok, prefixes, comps, cfg.train.max_length, dev)
            run_gen = (need_reg and not listwise) or (need_task and self.use_f)
            reg, hidden_k = zero, None
            if run_gen:
                # one pass of G over (p~, x, p*): layer-k states of the prefix feed F, logits of p* give reg
                from metatuner.generator import position_ids

                rows, out = forward_nll(self.gen.model, gb, output_hidden_states=True,
                                        position_ids=position_ids(gb["attention_mask"]))
                if torch.is_grad_enabled():
                    self.counts["train_tokens"] += int(gb["attention_mask"].sum())
                hidden_k = out.hidden_states[self.gen.k]
                if need_reg and not listwise:
                    reg = (rows * keep).sum() / keep.sum().clamp(min=1.0)
            if need_reg and listwise:
                from .rollouts import pool_choice_loss

                reg = pool_choice_loss(self, examples, best_prompts)
            task = zero
            if need_task:
                f = self.factors(examples, hidden_k, gb["prefix_mask"]) if self.use_f else None
                ab = actor_batch(self.tok, self.task, task_prompts, examples, cfg.train.max_length, self.actor.device)
                with self.lora.use_factors(f) if f is not None else contextlib.nullcontext():
                    task = forward_nll(self.actor, ab)[0].mean()
                if torch.is_grad_enabled():
                    self.counts["train_tokens"] += int(ab["attention_mask"].sum())
        return task, reg

    # -- parameters, saving

    def generator_parameters(self) -> list:
        """Trainable phi_s + phi_p (LoRA factors when generator.lora_rank > 0)."""
        return [p for p in self.gen.encoder_parameters() + self.gen.decoder_parameters() if p.requires_grad]

    def trainable_groups(self) -> list[dict]:
        cfg = self.cfg
        groups = [{"params": self.generator_parameters(), "lr": cfg.train.generator_lr}]
        if self.use_f:
            enc_copy = [p for p in self.gen.param_encoder_parameters() if p.requires_grad]
            groups.append({"params": list(self.decoder.parameters()) + enc_copy, "lr": cfg.hypernet.lr})
        return groups

    def save(self, out_dir, write: bool = True) -> None:
        """generator.safetensors + hypernet.json; with G sharded every process calls it and one writes."""
        from metatuner.generator import save_metatuner

        save_metatuner(out_dir, self.gen, self.decoder, write=write)

    def load(self, out_dir) -> None:
        from metatuner.generator import load_metatuner

        load_metatuner(out_dir, self.gen, self.decoder)
