"""generation.backend=vllm beyond static evaluation: MetaTuner's generator G samples its prompts through an
engine that takes G's current weights before each call (checked against a fake engine holding its own copy
of G's checkpoint, and, with vLLM installed, against the real engine), and inference_select sends its
validation arms and test samples to the actor's engine."""

from __future__ import annotations

import importlib.util
import json
import sys
from types import SimpleNamespace

import pytest
import torch

from metatuner import vllm_backend as vb
from metatuner.config import load_config
from metatuner.generator import SplitGenerator
from metatuner.methods import metatuner as M
from metatuner.methods.metatuner import rollouts as R
from metatuner.methods.metatuner.system import add_generator_lora
from metatuner.models import load_model
from metatuner.run import start_run
from metatuner.testing import FakeVllm

HAVE_VLLM = importlib.util.find_spec("vllm") is not None

SMALL = ["task.name=chain_sum", "task.train_size=16", "task.test_size=4", "eval.limit=3", "eval.batch_size=2",
         "train.batch_size=2", "train.max_steps=2", "warmup.max_steps=0", "warmup.generator_steps=0",
         "warmup.queries=4", "rollout.n=2", "rollout.batch_size=8", "train.sync_steps=2",
         "generator.max_prompt_tokens=8", "task.max_new_tokens=4", "rollout.criterion=nll", "lora.rank=2",
         "hypernet.hidden=16", "hypernet.embed_dim=8", "generator.lora_rank=4", "train.bf16=false"]


@pytest.fixture(autouse=True)
def _no_vllm_needed(monkeypatch, tmp_path_factory):
    """VllmActor.generate imports vllm.inputs.TokensPrompt (a TypedDict): a plain dict where vLLM is absent."""
    monkeypatch.setenv("METATUNER_CACHE", str(tmp_path_factory.getbasetemp() / "vr_cache"))
    if not HAVE_VLLM:
        monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace())
        monkeypatch.setitem(sys.modules, "vllm.inputs", SimpleNamespace(TokensPrompt=dict))


def _jolt(params, seed: int, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g))


def _fake_engine(path, tok, cls=vb.GeneratorEngine):
    """A GeneratorEngine whose LLM is FakeVllm over its own fresh copy of the checkpoint at `path`."""
    engine = cls.__new__(cls)
    copy, _ = load_model(str(path), dtype="float32", device="cpu")
    engine.tokenizer, engine.seed, engine.stop, engine.llm = tok, 0, [tok.eos_token_id], FakeVllm(copy.eval(), tok)
    engine._vllm = SimpleNamespace(SamplingParams=lambda **kw: SimpleNamespace(**kw))
    return engine


def _greedy_prompts_both_ways(system, exs) -> dict[bool, list[list[str]]]:
    """G's greedy prompts through hf and through the engine, with phi_p' (False) and the live phi_p (True);
    asserts the two backends agree and returns the engine's."""
    got = {}
    for live in (False, True):
        system.cfg.generation.backend = "hf"
        want = R.sample_prompts(system, exs, 1, live=live, greedy=True)
        system.cfg.generation.backend = "vllm"
        got[live] = R.sample_prompts(system, exs, 1, live=live, greedy=True)
        assert got[live] == want, live
    return got


@pytest.mark.parametrize("lora_rank", [4, 0])
def test_current_weights_make_a_fresh_checkpoint_compute_as_the_generator(tiny_model_path, lora_rank):
    """Reloaded into a fresh copy of G's checkpoint, current_weights gives G's logits: with the live phi_p, and
    inside frozen_decoder with phi_p'; G itself is left exactly as it was."""
    model, _ = load_model(str(tiny_model_path), dtype="float32", device="cpu")
    if lora_rank:
        add_generator_lora(model, lora_rank)
    gen = SplitGenerator(model, share_ratio=0.5)
    _jolt([p for p in model.parameters() if p.requires_grad], seed=1, scale=0.3 if lora_rank else 0.05)
    gen.sync_frozen()
    _jolt([p for p in gen.decoder_parameters() if p.requires_grad], seed=2,
          scale=0.3 if lora_rank else 0.05)  # training moves phi_p away from phi_p'
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.tensor([[5, 9, 14, 3, 7, 22]])
    fresh = FakeVllm(load_model(str(tiny_model_path), dtype="float32", device="cpu")[0].eval(), None)
    model.eval()
    with torch.no_grad():
        live = model(input_ids=ids).logits
        fresh.collective_rpc("reload_weights", kwargs={"weights_iterator": vb.current_weights(model)})
        assert torch.allclose(fresh.model(input_ids=ids).logits, live, atol=1e-5)
        with gen.frozen_decoder():
            frozen = model(input_ids=ids).logits
            fresh.collective_rpc("reload_weights", kwargs={"weights_iterator": vb.current_weights(model)})
        assert torch.allclose(fresh.model(input_ids=ids).logits, frozen, atol=1e-5)
    assert not torch.allclose(live, frozen, atol=1e-3)  # the two weight sets really differ
    # every tensor of the checkpoint, once, under its own name (vLLM reloads a layer from all of its tensors)
    assert sorted(fresh.loaded[-1]) == sorted(n for n, _ in fresh.model.named_parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_rollout_prompts_through_the_engine_equal_hf_and_take_each_calls_weights(tiny_model_path, tmp_path, monkeypatch):
    cfg = load_config(None, [f"model.name={tiny_model_path}", f"output_dir={tmp_path / 'r'}", "method=metatuner_j",
                             *SMALL, "generation.backend=vllm"])
    system, _, _ = M.prepare(cfg, start_run(cfg))
    gen = system.gen
    _jolt([p for n, p in gen.model.named_parameters() if ".lora_" in n], seed=3)
    gen.sync_frozen()
    _jolt([p for p in gen.decoder_parameters() if p.requires_grad], seed=4)
    made = []

    def fake(path, model, tok, gen_cfg, seed=0):
        made.append(str(path))
        return _fake_engine(path, tok)

    monkeypatch.setattr(vb, "generator_engine", fake)
    exs = system.task.train[:4]
    got = _greedy_prompts_both_ways(system, exs)
    assert got[False] != got[True]  # phi_p' and phi_p write different prompts: the push is what made them agree
    assert made == [str(tiny_model_path)]  # one engine over G's checkpoint for the whole run
    llm = system.gen_engine.llm
    assert len(llm.loaded) == 2 and llm.resets == 2  # G's weights before every call, the stale prefix cache dropped
    (prompts, params), = llm.calls[-1:]
    assert len(prompts) == len(exs) and all(p.temperature == 0.0 for p in params)  # every query in one request
    # sampled: rollout settings, and seeds that never repeat across calls
    calls = system.counts["generation_calls"]
    out = R.sample_prompts(system, exs, 3)
    assert len(out) == len(exs) and all(len(o) == 3 for o in out)
    seeds = [p.seed for p in llm.calls[-1][1]]
    R.sample_prompts(system, exs, 3)
    seeds += [p.seed for p in llm.calls[-1][1]]
    assert len(set(seeds)) == 2 * len(exs) and system.counts["generation_calls"] == calls + 2 * 3 * len(exs)
    assert {(p.temperature, p.top_p, p.n) for p in llm.calls[-1][1]} == {(cfg.rollout.temperature, cfg.rollout.top_p, 3)}


def test_a_joint_run_samples_its_rollouts_through_the_engine(tiny_model_path, tmp_path, monkeypatch):
    """metatuner_j end to end (free prompt space) with generation.backend=vllm: every rollout goes through
    G's engine (none through G's hf generate), and the actor's per-query evaluation stays on hf."""
    engines = []

    def fake(path, model, tok, gen_cfg, seed=0):
        engines.append(_fake_engine(path, tok))
        return engines[-1]

    monkeypatch.setattr(vb, "generator_engine", fake)
    monkeypatch.setattr(SplitGenerator, "sample_prompts", lambda *a, **k: pytest.fail("G sampled through hf"))
    cfg = load_config(None, [f"model.name={tiny_model_path}", f"output_dir={tmp_path / 'j'}", "method=metatuner_j",
                             *SMALL, "generation.backend=vllm"])
    metrics = M.run(cfg)
    assert len(engines) == 1 and engines[0].llm.calls and len(engines[0].llm.loaded) == len(engines[0].llm.calls)
    assert metrics["generation_backend"] == "hf" and metrics["n"] == 3
    assert metrics["prompt_sampling_backend"] == "vllm"


class _Recorder:
    """An actor engine answering '7' or '5' by (row key, sample), recording every request."""

    def __init__(self):
        self.requests = []

    def generate(self, texts, max_new_tokens, do_sample=False, temperature=1.0, top_p=1.0, num_return_sequences=1,
                 return_logprobs=False, answer_end="", keys=None):
        keys = list(range(len(texts))) if keys is None else list(keys)
        self.requests.append({"n_texts": len(texts), "keys": keys, "sample": do_sample, "t": temperature})
        k = num_return_sequences if do_sample else 1
        gens = [[("7" if (key + j) % 3 else "5") for j in range(k)] for key in keys]
        return gens, [[1] * k for _ in keys], ([[-0.5] * k for _ in keys] if return_logprobs else None)


def test_inference_select_generates_through_the_actor_engine(tiny_model_path, tmp_path, monkeypatch):
    """Validation arms, the test evaluation, the greedy baselines and the test samples all come from one
    engine (hf generation would fail here); test top-ups are seeded apart from the evaluation's samples."""
    import metatuner.evaluate as E
    import metatuner.generation as G
    from metatuner.methods import inference_select as S

    eng = _Recorder()
    monkeypatch.setattr(S, "actor_engine", lambda cfg, model, tok: eng)
    monkeypatch.setattr(vb, "actor_engine", lambda *a: pytest.fail("a second engine"))
    for mod in (E, G):
        for name in ("generate_texts", "greedy_texts"):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, lambda *a, **k: pytest.fail("hf generation"))
    cfg = load_config(None, [f"model.name={tiny_model_path}", f"output_dir={tmp_path / 's'}", "method=inference_select",
                             "task.name=chain_sum", "task.train_size=16", "task.val_size=6", "task.test_size=5",
                             "task.max_new_tokens=4", "select.n_values=[1,2]", "select.temperatures=[0.7]",
                             "select.val_examples=6", "select.opro_prompts=0", "select.rewrites=0",
                             "select.prompts=[Add.]", "select.max_per_query=4", "select.subsets=10",
                             "generation.backend=vllm"])
    metrics = S.run(cfg)
    assert metrics["generation_backend"] == "vllm" and metrics["n"] == 5
    val = [r for r in eng.requests if r["n_texts"] == 6]
    assert len(val) == 4  # greedy and samples for each of the two prompts, every validation query in one request
    assert all(r["keys"] == list(range(6)) for r in val)
    top_ups = [r for r in eng.requests if r["keys"] and min(r["keys"]) >= S.TOP_UP_KEYS]
    # up to select.max_per_query samples per test query: beyond what the chosen arm drew, new ones seeded apart
    assert top_ups and all(r["sample"] and all(k - S.TOP_UP_KEYS < 5 for k in r["keys"]) for r in top_ups)


def test_several_processes_each_build_an_engine_over_the_launchers_group(monkeypatch, tmp_path):
    """Launched with WORLD_SIZE > 1, an engine joins the launcher's process group (set up first) through
    vLLM's external_launcher executor, which puts it on this process's device; one process: vLLM's default."""
    made, states = [], []
    for var in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING", "RANK", "LOCAL_RANK"):
        monkeypatch.setenv(var, "0")  # restored after the test (the engine sets the first two for its process)

    class LLM:
        def __init__(self, **kw):
            made.append(kw)

    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(LLM=LLM))
    import accelerate

    monkeypatch.setattr(accelerate, "PartialState", lambda cpu=False: states.append(cpu))
    from metatuner.schema import GenerationConfig

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    vb.VllmActor(str(tmp_path), None, GenerationConfig(enforce_eager=True))
    assert "distributed_executor_backend" not in made[-1] and states == []
    monkeypatch.setenv("WORLD_SIZE", "2")
    vb.GeneratorEngine(str(tmp_path), None, GenerationConfig(enforce_eager=True))
    assert made[-1]["distributed_executor_backend"] == "external_launcher"
    assert states == [not torch.cuda.is_available()]  # the group exists before vLLM looks for it
    monkeypatch.delenv("LOCAL_RANK")
    with pytest.raises(vb.MetatunerError, match="WORLD_SIZE=2: LOCAL_RANK not set"):
        vb.VllmActor(str(tmp_path), None, GenerationConfig(enforce_eager=True))


def test_each_process_seeds_its_rollout_rows_apart(tiny_model_path, tmp_path, monkeypatch):
    """Two processes sample for different queries from the same count: their row seeds never coincide, and
    one process keeps the keys it had."""
    cfg = load_config(None, [f"model.name={tiny_model_path}", f"output_dir={tmp_path / 'r'}", "method=metatuner_j",
                             *SMALL, "generation.backend=vllm"])
    system, _, _ = M.prepare(cfg, start_run(cfg))
    monkeypatch.setattr(vb, "generator_engine", lambda path, model, tok, gen_cfg, seed=0: _fake_engine(path, tok))
    exs = system.task.train[:3]
    seeds = {}
    for world, rank in ((1, 0), (2, 0), (2, 1)):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("RANK", str(rank))
        system.counts["generation_calls"] = 10
        R.sample_prompts(system, exs, 2)
        seeds[world, rank] = [p.seed for p in system.gen_engine.llm.calls[-1][1]]
    assert seeds[1, 0] == [(cfg.seed * 1_000_003 + 10 + i) % 2**31 for i in range(3)]  # as before
    assert not set(seeds[2, 0]) & set(seeds[2, 1]) and len(set(seeds[2, 0] + seeds[2, 1])) == 6


DIST_SCRIPT = '''
import json, os, sys
import torch
from metatuner import vllm_backend as vb
from metatuner.config import load_config
from metatuner.evaluate import evaluate
from metatuner.methods import metatuner as M
from metatuner.methods.metatuner import rollouts as R
from metatuner.run import start_run

torch.set_num_threads(1)
path, out, small = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
rank = int(os.environ["RANK"])
cfg = load_config(None, [f"model.name={path}", f"output_dir={out}/r", "method=metatuner_j", *small,
                         "generation.backend=vllm", "generation.enforce_eager=true"])
system, _, _ = M.prepare(cfg, start_run(cfg))
g = torch.Generator().manual_seed(3)
with torch.no_grad():  # the same change to G on both processes
    for n, p in system.gen.model.named_parameters():
        if ".lora_" in n:
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    system.gen.sync_frozen()
    for p in system.gen.decoder_parameters():
        if p.requires_grad:
            p.add_(0.1 * torch.randn(p.shape, generator=g))
exs = system.task.train[rank * 3 : rank * 3 + 3]  # each process its own queries
res = {"rank": rank}
for live in (False, True):
    cfg.generation.backend = "hf"
    want = R.sample_prompts(system, exs, 1, live=live, greedy=True)
    cfg.generation.backend = "vllm"
    res[f"live={live}"] = [want, R.sample_prompts(system, exs, 1, live=live, greedy=True)]
res["gen_backend"] = system.gen_engine.llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend
actor = vb.engine_for(system.actor, system.tok, cfg.generation, weights_dir=path)
task = system.task
hf, _ = evaluate(system.actor, system.tok, task, task.test, batch_size=2, progress=False)
got, _ = evaluate(system.actor, system.tok, task, task.test, batch_size=2, progress=False, engine=actor,
                  output_dir=f"{out}/eval")
res["eval"] = [[r["generation"] for r in hf], [r["generation"] for r in got]]
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump(res, f)
'''


@pytest.mark.slow
def test_real_vllm_under_two_processes(tmp_path):
    """vLLM installed only: torchrun --nproc_per_node 2, each process with its own engines (external_launcher):
    G's greedy prompts for the process's own queries equal hf's after the weights are pushed, and an
    evaluation split over the two processes equals hf's on every example (a few minutes on a CPU)."""
    if not HAVE_VLLM:
        pytest.skip("vLLM is not installed")
    import os
    import subprocess
    from pathlib import Path

    from metatuner.testing import tiny_model_dir

    path = tiny_model_dir(tmp_path / "m", hidden_size=128, num_heads=2, intermediate_size=256)  # head_dim 64
    script = tmp_path / "dist_vllm.py"
    script.write_text(DIST_SCRIPT)
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(script), str(path), str(tmp_path),
                        json.dumps(SMALL + ["task.test_size=6", "eval.limit=6"])],
                       capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    for res in ranks:
        assert res["gen_backend"] == "external_launcher"
        for live in (False, True):
            want, got = res[f"live={live}"]
            assert got == want and len(got) == 3
        assert res["eval"][0] == res["eval"][1] and len(res["eval"][0]) == 6  # every example, in order
    assert all(res["live=True"][1] != res["live=False"][1] for res in ranks)  # so each call's push counted
    preds = [json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [p["generation"] for p in preds] == ranks[0]["eval"][0]


@pytest.mark.slow
def test_real_vllm_rollout_prompts_equal_hf(tmp_path):
    """vLLM installed only: G's greedy prompts through the real engine, after its weights are pushed in, equal
    transformers' with the live phi_p and with phi_p' (eager engine; a minute or two on a CPU)."""
    if not HAVE_VLLM:
        pytest.skip("vLLM is not installed")
    from metatuner.testing import tiny_model_dir

    path = tiny_model_dir(tmp_path / "m", hidden_size=128, num_heads=2, intermediate_size=256)  # head_dim 64
    cfg = load_config(None, [f"model.name={path}", f"output_dir={tmp_path / 'r'}", "method=metatuner_j", *SMALL,
                             "generation.backend=vllm", "generation.enforce_eager=true"])
    system, _, _ = M.prepare(cfg, start_run(cfg))
    _jolt([p for n, p in system.gen.model.named_parameters() if ".lora_" in n], seed=3, scale=0.1)
    system.gen.sync_frozen()
    _jolt([p for p in system.gen.decoder_parameters() if p.requires_grad], seed=4, scale=0.1)
    threads = torch.get_num_threads()
    got = _greedy_prompts_both_ways(system, system.task.train[:6])
    assert got[False] != got[True]
    assert torch.get_num_threads() == threads  # hf training after the engine starts keeps its threads


def test_the_pools_opro_scores_through_the_engine_and_its_cache_key_names_an_adapter(tiny_model_path, tmp_path,
                                                                                     monkeypatch):
    import metatuner.metaprompt as MP
    from metatuner import pool as P

    seen = {}

    def spy(cfg, actor, tok, gen, gtok, task, log_path=None, seeds=None, engine=None):
        seen["engine"] = engine
        rows = [{"instruction": s, "train_accuracy": 0.0} for s in seeds] + [{"instruction": "New.", "train_accuracy": 0.5}]
        return "New.", 0.5, rows, 1

    eng = object()

    def fake_engine(model, tok, gen_cfg, seed=0, weights_dir=None):
        seen["dir"] = weights_dir
        return eng

    monkeypatch.setattr(MP, "optimize", spy)
    monkeypatch.setattr(vb, "engine_for", fake_engine)
    cfg = load_config(None, [f"model.name={tiny_model_path}", f"output_dir={tmp_path / 'p'}", "task.name=chain_sum",
                             "task.train_size=8", "task.val_size=2", "task.test_size=2", "prompts.opro=1",
                             "generation.backend=vllm"])
    task = start_run(cfg)
    assert P.opro_members(cfg, task, [task.prompt]) == ["New."]
    assert seen == {"engine": eng, "dir": str(tiny_model_path)}  # the loaded weights are the model's own directory
    key = P.opro_key(cfg, task, [task.prompt])
    cfg.generation.backend = "hf"
    assert P.opro_key(cfg, task, [task.prompt]) == key  # greedy scoring agrees across backends: one cached pool
    cfg.model.adapter = str(tmp_path)
    assert P.opro_key(cfg, task, [task.prompt]) != key  # scored with an adapter merged: a pool of its own
