"""What a MetaTuner checkpoint holds, counted at real shapes without weights (meta device).

    .venv/bin/python benchmarks/checkpoint_size.py                   # paper.yaml: Qwen2.5-7B G, Qwen2.5-3B M
    .venv/bin/python benchmarks/checkpoint_size.py --embedded        # the embedded SmolLM2-135M as G and M

Builds G and the actor on the meta device from their configs (no download), injects G's LoRA as
`generator.lora_rank` / `lora_targets` say, builds F, and counts the tensors `step_N/` saves
(G's trained tensors + phi_p' + F) against the base weights it no longer saves, plus the AdamW state
(2 tensors per trained parameter, fp32), and the size of the earlier layout (all of G plus a full
copy of its upper layers). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch

QWEN25 = {  # public config.json values of the Qwen2.5 instruct models
    "7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "3B": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}


def meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def count(gen_cfg, actor_cfg, lora_rank: int, lora_targets: list[str], share_ratio: float, actor_rank: int,
          hidden: int, bytes_per_param: int) -> dict:
    import metatuner.generator as G
    from metatuner.generator import SplitGenerator

    G._check_no_meta = lambda shell: None  # every tensor is on the meta device here, by design
    from metatuner.hypernet import ParameterDecoder
    from metatuner.lora import find_targets
    from metatuner.methods.metatuner.system import add_generator_lora

    gen = meta_model(gen_cfg)
    base_g = sum(p.numel() for p in gen.parameters())
    if lora_rank > 0:
        add_generator_lora(gen, lora_rank, lora_targets)
    split = SplitGenerator(gen, share_ratio)
    actor = meta_model(actor_cfg)
    base_m = sum(p.numel() for p in actor.parameters())
    targets = find_targets(actor, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    with torch.device("meta"):
        f = ParameterDecoder(gen_cfg.hidden_size, targets, actor_rank, 2 * actor_rank, hidden)
    trained_g = sum(p.numel() for p in gen.parameters() if p.requires_grad)
    frozen = sum(t.numel() for t in split.frozen_state().values())
    f_n = sum(p.numel() for p in f.parameters())
    saved = trained_g + frozen + f_n
    # the earlier layout saved all of G plus a deep copy of layers [k, K), norm and an untied LM head
    all_g = sum(p.numel() for p in gen.parameters())
    head = gen.get_output_embeddings().weight.numel() if gen_cfg.tie_word_embeddings else 0
    old = all_g + sum(p.numel() for p in split.decoder_parameters()) + head + f_n
    gb = 1024 ** 3
    return {"generator_base_params": base_g, "actor_base_params": base_m, "generator_trained_params": trained_g,
            "frozen_copy_params": frozen, "hypernet_params": f_n,
            "checkpoint_weights_gb": round(saved * bytes_per_param / gb, 3),
            "optimizer_state_gb": round(2 * (trained_g + f_n) * 4 / gb, 3),
            "base_weights_not_saved_gb": round((base_g + base_m) * bytes_per_param / gb, 2),
            "earlier_layout_checkpoint_gb": round(old * bytes_per_param / gb, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--embedded", action="store_true", help="count for the embedded SmolLM2-135M (G = M)")
    args = ap.parse_args()
    from transformers import AutoConfig, Qwen2Config

    if args.embedded:
        from metatuner.models import embedded_model_dir

        c = AutoConfig.from_pretrained(embedded_model_dir())
        # configs/compare/quickstart.yaml: generator.lora_rank 16 on q/v, share 0.25, lora.rank 8, hypernet 64, fp32 on CPU
        res = {"shapes": "SmolLM2-135M G and M", **count(c, c, 16, ["q_proj", "v_proj"], 0.25, 8, 64, 4)}
    else:
        g, m = Qwen2Config(**QWEN25["7B"]), Qwen2Config(**QWEN25["3B"])
        # configs/compare/paper.yaml: generator.lora_rank 64 on every linear, share 0.25, lora.rank 16, hypernet 64, bf16
        res = {"shapes": "Qwen2.5-7B G, Qwen2.5-3B M (paper.yaml)", **count(g, m, 64, [], 0.25, 16, 64, 2)}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
