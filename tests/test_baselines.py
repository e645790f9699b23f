"""The baselines (zero_shot, sft, dpo, opro, bpo, bettertogether) end to end on a tiny random Llama, and
their building blocks (DPO pairs, OPRO's meta-prompt and selection, rank_prompts, BetterTogether's
program selection) with deterministic fakes; budget semantics (train.max_steps is the total), the
training log, and the rule that method modules never import each other.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from metatuner.cli import main
from metatuner.config import load_config
from metatuner.tasks import Example

SMALL = ["task.name=chain_sum", "task.train_size=16", "task.val_size=4", "task.test_size=4", "eval.limit=2",
         "eval.batch_size=2", "task.max_new_tokens=4", "train.max_steps=2", "train.batch_size=2", "lora.rank=2",
         "rollout.n=2", "rollout.batch_size=8", "generator.max_prompt_tokens=6",
         "opro.steps=2", "opro.candidates=2", "opro.subset=4", "opro.max_new_tokens=8",
         "bpo.queries=4", "bpo.max_steps=2", "dpo.queries=4", "dpo.k=2",
         "bettertogether.queries=4", "bettertogether.val_examples=2", "bettertogether.instructions=1",
         "bettertogether.demo_sets=1", "bettertogether.strategy=p -> w"]

ARTIFACTS = {
    "zero_shot": [],
    "sft": ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"],
    "dpo": ["dpo_pairs.jsonl", "sft/adapter/adapter_config.json", "adapter/adapter_config.json"],
    "opro": ["opro_history.jsonl"],
    "bpo": ["bpo_pairs.jsonl", "rewriter/adapter/adapter_config.json"],
    "bettertogether": ["bettertogether_history.jsonl"],
}
EXTRA = {"dpo": ["train.max_steps=6", "dpo.sft_steps=4"]}  # 4 SFT + 2 DPO steps out of the total 6
COST_KEYS = {
    "sft": ["train_steps", "train_examples", "train_tokens"],
    "dpo": ["train_steps", "train_examples", "train_tokens", "generation_calls", "pairs"],
    "opro": ["train_steps", "train_examples", "generation_calls"],
    "bpo": ["train_steps", "train_examples", "train_tokens", "generation_calls"],
    "bettertogether": ["train_steps", "train_examples", "train_tokens", "generation_calls"],
}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TQDM_DISABLE", "1")


@pytest.fixture
def captured(monkeypatch):
    """Records (model, prompts, extra) of each final_eval call, then runs the real one."""
    import metatuner.run as run_mod

    calls = []
    real = run_mod.final_eval

    def spy(cfg, model, tok, task, prompts=None, *a, **kw):
        calls.append({"model": model, "prompts": prompts, "extra": kw.get("extra")})
        return real(cfg, model, tok, task, prompts, *a, **kw)

    monkeypatch.setattr(run_mod, "final_eval", spy)
    return calls


def lora_state(model, adapter="default") -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n and f".{adapter}." in n}


def base_state(model) -> dict[str, torch.Tensor]:
    """The base weights of a PeftModel under the plain model's key names."""
    sd = model.get_base_model().state_dict()
    return {k.replace(".base_layer", ""): v for k, v in sd.items() if "lora_" not in k}


def adapter_file_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("method", list(ARTIFACTS))
def test_baseline_end_to_end(method, tiny_model_path, tmp_path, captured, monkeypatch):
    from metatuner.methods import bettertogether, dpo

    if method == "dpo":  # a random actor is never right: give DPO one right and one wrong sample per query
        monkeypatch.setattr(dpo, "sample_answers", lambda m, t, task, exs, p, k, temp, bs:
                            [[ex.target, "Answer: nope"] for ex in exs])
    if method == "bettertogether":  # ... and BetterTogether correct traces, so its w step trains
        monkeypatch.setattr(bettertogether, "bootstrap_traces", lambda m, t, task, exs, p, bs=16:
                            [(ex, ex.target) for ex in exs[:2]])
    out = tmp_path / method
    assert main(["train", f"method={method}", f"model.name={tiny_model_path}", f"output_dir={out}", *SMALL,
                 *EXTRA.get(method, [])]) == 0

    for f in ["config.yaml", "metrics.json", "predictions.jsonl", *ARTIFACTS[method]]:
        assert (out / f).is_file(), f
    assert load_config(out / "config.yaml").method == method
    metrics = json.loads((out / "metrics.json").read_text())
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 2 and metrics["n"] == 2
    assert metrics["accuracy"] == pytest.approx(sum(p["correct"] for p in preds) / 2)
    assert metrics["method"] == method
    for key in COST_KEYS.get(method, []):
        assert isinstance(metrics[key], (int, float)) and metrics[key] >= 0, key

    if method == "sft":
        _check_sft(out, tiny_model_path, captured[-1]["model"], metrics)
    elif method == "dpo":
        _check_dpo(out, tiny_model_path, captured[-1]["model"], metrics)
    elif method == "opro":
        rows = [json.loads(x) for x in (out / "opro_history.jsonl").read_text().splitlines()]
        assert rows[0]["step"] == 0 and len(rows) >= 1
        best = max(rows, key=lambda r: r["train_accuracy"])  # first of the best: p~ on ties
        assert metrics["prompt"] == best["instruction"] and all(p["prompt"] == best["instruction"] for p in preds)
        assert metrics["generation_calls"] >= 2 * 2  # optimizer samples + scoring
    elif method == "bpo":
        pairs = [json.loads(x) for x in (out / "bpo_pairs.jsonl").read_text().splitlines()]
        assert len(pairs) == 4 and all(p["better_prompt"] for p in pairs)
        assert metrics["train_steps"] == 2 and metrics["train_tokens"] > 0  # the rewriter's tokens
    elif method == "bettertogether":
        hist = [json.loads(x) for x in (out / "bettertogether_history.jsonl").read_text().splitlines()]
        assert [h["step"] for h in hist] == ["start", "0:p", "1:w"]
        best = max(hist, key=lambda h: h["val_accuracy"])  # first of the best
        assert metrics["best_step"] == best["step"] and metrics["val_accuracy"] == best["val_accuracy"]
        assert metrics["train_steps"] == 2 and (out / "w1" / "adapter" / "adapter_config.json").is_file()
        assert metrics["train_tokens"] > 0 and metrics["bettertogether_strategy"] == "p -> w"
        assert metrics["strategy"] == "greedy"  # the inference strategy, not BetterTogether's


def _check_sft(out: Path, model_path: Path, peft_model, metrics: dict) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    from metatuner.models import load_model

    assert metrics["train_steps"] == 2 and metrics["train_examples"] == 4 and metrics["train_tokens"] > 0
    # train_log.jsonl: one line per optimizer step (train.log_steps=1), the Trainer's own log values
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["phase"] == "sft" for r in log)
    for r in log:
        assert r["loss"] > 0 and r["lr"] > 0 and r["epoch"] > 0 and r["elapsed"] >= 0
    assert log[0]["elapsed"] <= log[1]["elapsed"]
    # LoRA moved (B starts at zero), the base weights did not
    lora = lora_state(peft_model)
    assert lora and any(v.abs().sum() > 0 for n, v in lora.items() if "lora_B" in n)
    orig = load_file(str(model_path / "model.safetensors"))
    base = base_state(peft_model)
    for k, v in orig.items():
        assert torch.equal(base[k], v), k
    # the saved adapter loads with PEFT onto a fresh base and holds the trained weights
    fresh, _ = load_model(str(model_path), dtype="float32", device="cpu")
    loaded = PeftModel.from_pretrained(fresh, str(out / "adapter"))
    got = lora_state(loaded)
    assert set(got) == set(lora)
    for k in lora:
        assert torch.allclose(got[k], lora[k]), k


def _check_dpo(out: Path, model_path: Path, policy, metrics: dict) -> None:
    pairs = [json.loads(x) for x in (out / "dpo_pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 4 and all(p["chosen"] != p["rejected"] for p in pairs)  # 4 queries x 1 pair
    assert metrics["pairs"] == 4 and metrics["sft_steps"] == 4 and metrics["dpo_steps"] == 2
    assert metrics["train_steps"] == 6 and metrics["generation_calls"] == 4 * 2
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in log] == [("sft", 1), ("sft", 2), ("sft", 3), ("sft", 4),
                                                      ("dpo", 1), ("dpo", 2)]
    assert metrics["sft_tokens"] > 0 and metrics["train_tokens"] == metrics["sft_tokens"] + metrics["dpo_tokens"]
    from metatuner.config import TaskConfig
    from metatuner.methods.dpo import pair_tokens
    from metatuner.models import load_model
    from metatuner.tasks import load_task

    _, tok = load_model(str(model_path), dtype="float32", device="cpu")
    task = load_task(TaskConfig(name="chain_sum", train_size=16, val_size=4, test_size=4, max_new_tokens=4), 0)
    mean_pair = sum(pair_tokens(tok, task, task.prompt, p) for p in pairs) / len(pairs)
    assert metrics["dpo_tokens"] == round(2 * 2 * mean_pair)  # 2 DPO steps x batch 2
    # DPO started from the SFT adapter; TRL's frozen "ref" adapter is a copy of it and stayed put
    assert "ref" in policy.peft_config
    sft_file = adapter_file_state(out / "sft" / "adapter")
    ref = lora_state(policy, "ref")
    default = lora_state(policy, "default")
    assert len(ref) == len(sft_file) == len(default)
    for n, v in ref.items():  # PEFT names the file's keys without the adapter name
        assert torch.equal(v, sft_file[n.replace(".ref.", ".")]), n
        assert not v.requires_grad, n
    assert any(not torch.equal(default[n.replace(".ref.", ".default.")], v) for n, v in ref.items())
    # the saved final adapter is the DPO-trained one
    final = adapter_file_state(out / "adapter")
    assert sorted(final) == sorted(sft_file)
    assert any(not torch.equal(final[k], sft_file[k]) for k in final)


def test_zero_steps_means_no_training(tiny_model_path, tmp_path, captured):
    """train.max_steps=0 trains nothing (the HF Trainer alone would read 0 as "train by epochs")."""
    out = tmp_path / "sft0"
    assert main(["train", "method=sft", f"model.name={tiny_model_path}", f"output_dir={out}", *SMALL,
                 "train.max_steps=0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == 0 and metrics["train_examples"] == 0 and metrics["train_loss"] is None
    lora = lora_state(captured[-1]["model"])
    assert lora and all(v.abs().sum() == 0 for n, v in lora.items() if "lora_B" in n)
    assert (out / "adapter" / "adapter_config.json").is_file()


# ----------------------------------------------------------------------------- DPO pairs


def test_dpo_build_pairs(make_task):
    from metatuner.methods.dpo import build_pairs

    task = make_task([("q1", "1"), ("q2", "5"), ("q3", "7"), ("q4", "2")])
    exs = task.test
    samples = [["1a", "1b", "2", "3", "1a", "2"],   # 2 right x 2 wrong (after dedup) = 4 pairs, capped at 3
               ["5", "5x", "5"],                    # all right: none
               ["0", "9", ""],                      # all wrong: none
               ["2!", "x"]]                         # exactly one pair
    pairs = build_pairs(task, exs, samples, max_pairs=3, seed=0)
    by_q = {}
    for p in pairs:
        by_q.setdefault(p["query"], []).append((p["chosen"], p["rejected"]))
    assert set(by_q) == {"q1", "q4"}
    assert len(by_q["q1"]) == 3 and len(set(by_q["q1"])) == 3
    for c, r in by_q["q1"]:
        assert c in ("1a", "1b") and r in ("2", "3")
    assert by_q["q4"] == [("2!", "x")]
    # no cap: every (right, wrong) combination once
    allp = build_pairs(task, exs, samples, max_pairs=10)
    assert sorted((p["chosen"], p["rejected"]) for p in allp if p["query"] == "q1") == \
        [("1a", "2"), ("1a", "3"), ("1b", "2"), ("1b", "3")]
    assert build_pairs(task, exs, samples, max_pairs=0) == []


# ----------------------------------------------------------------------------- OPRO


def test_opro_meta_prompt_order_scores_and_cap():
    from metatuner.metaprompt import meta_prompt

    hist = [("alpha rule", 0.5), ("bravo rule", 0.1), ("charlie rule", 0.9), ("delta rule", 0.333)]
    probs = [Example(query="What is 2+2?", answer="4", target="4"), Example(query="What is 3+5?", answer="8", target="8")]
    mp = meta_prompt(hist, probs, top_k=3)
    assert "bravo rule" not in mp  # the worst falls outside the top 3
    pos = [mp.index(f"text:\n{t}\nscore:\n{s}\n") for t, s in [("delta rule", 33), ("alpha rule", 50), ("charlie rule", 90)]]
    assert pos == sorted(pos)  # ascending score order, scores on 0-100
    assert mp.startswith("Your task is to generate the instruction <INS>.")
    assert "The score ranges from 0 to 100." in mp
    assert "Q: <INS>\nWhat is 2+2?\nA:\nGround truth answer:\n4" in mp and "Ground truth answer:\n8" in mp
    assert mp.index("charlie rule") < mp.index("Below are some problems.") < mp.index("What is 2+2?")
    assert mp.rstrip().endswith("generally applicable to all problems above.") and "<INS> and end with </INS>" in mp


def test_opro_parse_instruction():
    from metatuner.metaprompt import parse_instruction

    assert parse_instruction("Sure! <INS> Add the numbers. </INS> hope it helps") == "Add the numbers."
    assert parse_instruction("<INS>Think step by step") == "Think step by step"  # no closing tag
    assert parse_instruction("<INS>Line one\nline two") == "Line one\nline two"
    assert parse_instruction("\n  Plain instruction here.  \nsecond line") == "Plain instruction here."
    assert parse_instruction("") == "" and parse_instruction("  \n ") == ""
    assert parse_instruction("<INS></INS>\nfallback") == "<INS></INS>"  # empty tag: first line (dropped later: 'INS')


def test_opro_keeps_the_best_instruction(monkeypatch, make_task):
    from metatuner.methods import opro

    task = make_task([(f"q{i}", str(i % 10)) for i in range(6)], prompt="Seed prompt.")
    task.train = task.test
    scores = {"Seed prompt.": 0.2, "Think step by step.": 0.5, "Add carefully.": 0.9, "Best one": 0.7}
    scored, metas = [], []
    outputs = iter([
        ["<INS>Think step by step.</INS>", "<INS>Add carefully.", "<INS>use INS here</INS>"],
        ["<INS>Think step by step.</INS>", "<INS>" + "x" * 600 + "</INS>", "Best one\nmore", "<INS>Seed prompt.</INS>"],
    ])

    def fake_acc(actor, tok, task_, examples, prompt, bs=16, engine=None):
        scored.append(prompt)
        assert examples == task.train[:4]
        return scores[prompt]

    def fake_sample(model, tok, messages, n, max_new_tokens, temperature=1.0, **kw):
        metas.append(messages[0][0]["content"])
        return [next(outputs)]

    from metatuner import metaprompt

    monkeypatch.setattr(metaprompt, "accuracy_of", fake_acc)
    monkeypatch.setattr(metaprompt, "sample_texts", fake_sample)
    cfg = load_config(None, ["opro.steps=2", "opro.candidates=3", "opro.subset=4", "opro.top_k=2", "opro.exemplars=2"])
    best, acc, rows, calls = opro.optimize(cfg, None, None, None, None, task)
    assert (best, acc) == ("Add carefully.", 0.9)
    assert calls == 7
    # each instruction scored once; duplicates, 'INS', over-long (> 500 chars) and p~ again are dropped
    assert scored == ["Seed prompt.", "Think step by step.", "Add carefully.", "Best one"]
    assert [(r["step"], r["instruction"]) for r in rows] == [(0, "Seed prompt."), (1, "Think step by step."),
                                                            (1, "Add carefully."), (2, "Best one")]
    # step 2's meta-prompt: the top 2 so far, ascending
    assert "Seed prompt." not in metas[1].split("Below are some problems.")[0]
    assert metas[1].index("text:\nThink step by step.\nscore:\n50") < metas[1].index("text:\nAdd carefully.\nscore:\n90")


def test_opro_ties_keep_p_tilde(monkeypatch, make_task):
    from metatuner.methods import opro

    task = make_task([("q", "1")], prompt="Seed.")
    task.train = task.test
    from metatuner import metaprompt

    monkeypatch.setattr(metaprompt, "accuracy_of", lambda *a, **k: 0.0)
    monkeypatch.setattr(metaprompt, "sample_texts", lambda *a, **k: [["<INS>Other.</INS>"]])
    cfg = load_config(None, ["opro.steps=1", "opro.candidates=1"])
    assert opro.optimize(cfg, None, None, None, None, task)[0] == "Seed."


# ----------------------------------------------------------------------------- rank_prompts


def test_rank_prompts_correct_first_then_nll(monkeypatch, make_task):
    from metatuner import prompts as P

    nll = {"wrong low": 0.1, "RIGHT high": 2.0, "wrong a": 1.0, "wrong b": 0.5, "RIGHT c": 0.3, "RIGHT d": 0.9}
    # the prompt text stands for the (prompt, query) prefix; the answer and the NLL come from one pass
    monkeypatch.setattr(P, "completion_text", lambda tok, msgs, target: (msgs[0]["content"].split("\n\n")[0], target))
    monkeypatch.setattr(P, "fits", lambda tok, pairs, max_length: True)
    batches = []

    def one_pass(model, tok, prefixes, comps, n, *a):
        batches.append(list(prefixes))
        return [["7" if "RIGHT" in t else "?"] for t in prefixes], None, torch.tensor([nll[p] for p in prefixes])

    monkeypatch.setattr(P, "greedy_with_nll", one_pass)
    monkeypatch.setattr(P, "lm_batch", lambda tok, prefixes, comps, max_length, device: {"prompts": list(prefixes)})
    monkeypatch.setattr(P, "forward_nll", lambda model, batch: (torch.tensor([nll[p] for p in batch["prompts"]]), None))

    class Dev:
        device = torch.device("cpu")

    task = make_task([("q1", "7"), ("q2", "7"), ("q3", "7")])
    cands = [["wrong low", "RIGHT high", "wrong low"], ["wrong a", "wrong b"], ["RIGHT d", "RIGHT c"]]
    def chars(text, add_special_tokens=False):  # a tokenizer stand-in: one token per character
        return {"input_ids": list(text)}

    got = P.rank_prompts(Dev(), chars, task, task.test, cands, "answer", batch_size=2, bf16=False)
    assert got == [("RIGHT high", True, pytest.approx(2.0)), ("wrong b", False, pytest.approx(0.5)),
                   ("RIGHT c", True, pytest.approx(0.3))]
    # the rows ran shortest prompt first (batches of similar length), and came back in the caller's order
    assert batches == [["wrong a", "wrong b"], ["RIGHT d", "RIGHT c"], ["wrong low", "RIGHT high"]]
    batches.clear()
    unsorted = P.prompt_outcomes(Dev(), chars, task, task.test, cands, "answer", batch_size=2, bf16=False,
                                 by_length=False)
    assert batches == [["wrong low", "RIGHT high"], ["wrong a", "wrong b"], ["RIGHT d", "RIGHT c"]]
    assert unsorted == P.prompt_outcomes(Dev(), chars, task, task.test, cands, "answer", batch_size=2, bf16=False)
    # decisive: whether the candidates disagree on correctness (q2 all wrong, q3 all right: no)
    got = P.rank_prompts(Dev(), chars, task, task.test, cands, "answer", batch_size=2, bf16=False, decisive=True)
    assert [g[3] for g in got] == [True, False, False] and [g[0] for g in got] == ["RIGHT high", "wrong b", "RIGHT c"]
    # criterion=nll: no generation, the lowest NLL wins
    monkeypatch.setattr(P, "greedy_texts", lambda *a, **k: pytest.fail("nll criterion must not generate"))
    monkeypatch.setattr(P, "greedy_with_nll", lambda *a, **k: pytest.fail("nll criterion must not generate"))
    got = P.rank_prompts(Dev(), chars, task, task.test, cands, "nll", batch_size=4, bf16=False)
    assert [g[0] for g in got] == ["wrong low", "wrong b", "RIGHT c"]


def test_prompt_outcomes_by_length_keeps_each_row_with_its_query(monkeypatch, make_task):
    """D2's rows run sorted by prompt length: each row's answer, NLL and per-query weights (factors_ctx gets
    the examples in the same sorted order) stay with its own query; results as in (query, candidate) order."""
    import contextlib

    from metatuner import prompts as P

    monkeypatch.setattr(P, "completion_text", lambda tok, msgs, target: (msgs[0]["content"], target))
    monkeypatch.setattr(P, "fits", lambda tok, pairs, max_length: True)
    active = []  # the examples whose per-query weights the current batch runs under

    @contextlib.contextmanager
    def factors(exs):
        active[:] = list(exs)
        yield None

    def one_pass(model, tok, prefixes, comps, n, *a):
        prompts_, queries = zip(*(t.split("\n\n") for t in prefixes))
        assert [ex.query for ex in active] == list(queries)  # weights of the row's own query
        # the answer is the query's own digit when the prompt says RIGHT; the NLL names prompt and query
        gens = [[q[-1] if "RIGHT" in p else "?"] for p, q in zip(prompts_, queries)]
        return gens, None, torch.tensor([len(p) + int(q[-1]) / 10 for p, q in zip(prompts_, queries)])

    monkeypatch.setattr(P, "greedy_with_nll", one_pass)

    class Dev:
        device = torch.device("cpu")

    def chars(text, add_special_tokens=False):
        return {"input_ids": list(text)}

    task = make_task([("q1", "1"), ("q2", "2"), ("q3", "3"), ("q4", "4")])
    cands = [["RIGHT, a long prompt here", "w"], ["RIGHT", "a wrong and long one"], ["RIGHT x", "wr"],
             ["RIGHT but longest of all of them", "RIGHT"]]
    got = P.prompt_outcomes(Dev(), chars, task, task.test, cands, "answer", batch_size=3, bf16=False,
                            factors_ctx=factors)
    want = [[(p, "RIGHT" in p, pytest.approx(len(p) + (i + 1) / 10)) for p in c] for i, c in enumerate(cands)]
    assert got == want
    assert got == P.prompt_outcomes(Dev(), chars, task, task.test, cands, "answer", batch_size=3, bf16=False,
                                    factors_ctx=factors, by_length=False)


# ----------------------------------------------------------------------------- BetterTogether


@pytest.mark.parametrize("s, steps", [("p -> w -> p", ["p", "w", "p"]), ("w", ["w"]), ("p->p", ["p", "p"])])
def test_parse_strategy_ok(s, steps):
    from metatuner.methods.bettertogether import parse_strategy

    assert parse_strategy(s) == steps


@pytest.mark.parametrize("s", ["", "p -> x", "p ->", "p w", "-> p", "P -> W", None, 3])
def test_parse_strategy_errors(s):
    from metatuner.errors import MetatunerError
    from metatuner.methods.bettertogether import parse_strategy

    with pytest.raises(MetatunerError) as e:
        parse_strategy(s)
    msg = str(e.value)
    assert "bettertogether.strategy" in msg and "\n" not in msg


def test_bad_strategy_cli_one_line(tiny_model_path, tmp_path, capsys):
    assert main(["train", "method=bettertogether", "bettertogether.strategy=p -> q", f"model.name={tiny_model_path}",
                 f"output_dir={tmp_path / 'o'}", *SMALL[:4]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: bettertogether.strategy")


@pytest.mark.parametrize("strategy, accs, want_step, want_prompt, want_delta", [
    # start 0.1; p 0.5; w 0.8 (best); p 0.6; w 0.3 -> the program after the first w: its weights come back
    ("p -> w -> p -> w", [0.5, 0.8, 0.6, 0.3], "1:w", "prompt0", 1),
    # nothing beats the unoptimized program: p~ on the original weights (reloaded after the w step)
    ("w -> p", [0.0, 0.05], "start", None, 0),
    # the best program is a p step before any w step: its prompt on the original weights
    ("p -> w", [0.5, 0.2], "0:p", "prompt0", 0),
    # the last step is best: the live weights
    ("w -> w", [0.2, 0.4], "1:w", None, 2),
])
def test_bettertogether_returns_best_program(strategy, accs, want_step, want_prompt, want_delta, tiny_model_path,
                                             tmp_path, monkeypatch):
    import metatuner.run as run_mod
    from metatuner.methods import bettertogether as BT

    base0 = {}
    it = iter(accs)
    step_acc = {}  # (prompt, weight delta) -> val accuracy, filled as steps happen

    def delta(actor) -> int:
        return round(actor.lm_head.weight[0, 0].item() - base0["v"])

    def fake_acc(actor, tok, task, examples, prompt, bs=16):
        base0.setdefault("v", actor.lm_head.weight[0, 0].item())
        return step_acc.get((prompt, delta(actor)), 0.1 if delta(actor) == 0 and prompt == task.prompt else 0.0)

    n_p = iter(range(10))

    def fake_prompt_step(cfg, actor, tok, gen, gtok, task, instruction, rng, val, train=None, pool=()):
        i = next(n_p)
        acc = next(it)
        step_acc[(f"prompt{i}", delta(actor))] = acc
        return f"ins{i}", f"prompt{i}", acc, 1

    def fake_weight_step(cfg, actor, tok, task, prompt, out_dir, step_i, train=None, steps=-1, log=None):
        with torch.no_grad():
            actor.lm_head.weight[0, 0] += 1.0
        step_acc[(prompt, delta(actor))] = next(it)
        return actor, 3, 4, 5, steps

    got = {}

    def fake_final_eval(cfg, model, tok, task, prompts=None, *a, **kw):
        got.update(model=model, prompt=prompts, extra=kw["extra"], p_tilde=task.prompt)
        return {"accuracy": 0.0}

    monkeypatch.setattr(BT, "accuracy_of", fake_acc)
    monkeypatch.setattr(BT, "prompt_step", fake_prompt_step)
    monkeypatch.setattr(BT, "weight_step", fake_weight_step)
    monkeypatch.setattr(run_mod, "final_eval", fake_final_eval)
    cfg = load_config(None, [f"model.name={tiny_model_path}", f"output_dir={tmp_path / 'bt'}", "method=bettertogether",
                             f"bettertogether.strategy={strategy}", *SMALL[:4]])
    BT.run(cfg)
    assert got["extra"]["best_step"] == want_step
    assert got["extra"]["train_tokens"] == 5 * strategy.count("w")
    assert got["extra"]["train_steps"] == cfg.train.max_steps  # the total, split across the w steps
    assert got["prompt"] == (want_prompt or got["p_tilde"])
    assert delta(got["model"]) == want_delta
    hist = [json.loads(x) for x in (tmp_path / "bt" / "bettertogether_history.jsonl").read_text().splitlines()]
    assert got["extra"]["val_accuracy"] == max(h["val_accuracy"] for h in hist)
    assert len(hist) == 1 + len(accs)


def test_with_demos_and_bootstrap_shape():
    from metatuner.prompts import with_demos

    assert with_demos("Do it.", []) == "Do it."
    text = with_demos("Do it.", [("1+1?", "Answer: 2"), ("2+2?", "Answer: 4")])
    assert text.startswith("Do it.\n\n") and "Example question: 1+1?\nExample answer: Answer: 2" in text
    assert text.index("1+1?") < text.index("2+2?")


@pytest.mark.parametrize("method", ["sft", "opro"])
def test_train_on_other_tasks_test_on_target(method, tiny_model_path, tmp_path, captured, monkeypatch):
    """task.train_tasks: training data (SFT) / the scoring subset (OPRO) come from the other tasks,
    the evaluation from task.name's test split."""
    from metatuner import metaprompt
    from metatuner.config import TaskConfig
    from metatuner.methods import sft
    from metatuner.tasks import load_task

    seen = []
    real_train, real_acc = sft.train_sft, metaprompt.accuracy_of
    monkeypatch.setattr(sft, "train_sft", lambda cfg, m, t, task, exs, *a, **kw:
                        seen.append(list(exs)) or real_train(cfg, m, t, task, exs, *a, **kw))
    monkeypatch.setattr(metaprompt, "accuracy_of", lambda m, t, task, exs, *a, **kw:
                        seen.append(list(exs)) or real_acc(m, t, task, exs, *a, **kw))
    out = tmp_path / method
    args = ["train", f"method={method}", f"model.name={tiny_model_path}", f"output_dir={out}", *SMALL,
            "task.train_tasks=[basic_arithmetic,products]"]
    assert main(args) == 0
    assert seen and all(ex.meta["task"] in ("basic_arithmetic", "products") for exs in seen for ex in exs)
    assert {ex.meta["task"] for exs in seen for ex in exs} == {"basic_arithmetic", "products"}
    target = load_task(TaskConfig(name="chain_sum", train_size=16, val_size=4, test_size=4, max_new_tokens=4), 0)
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["query"] for p in preds] == [e.query for e in target.test[:2]]
    assert load_config(out / "config.yaml").task.train_tasks == ["basic_arithmetic", "products"]


# ----------------------------------------------------------------------------- budgets, logs, structure


@pytest.mark.parametrize("total, sft_steps, want", [(6, 4, (4, 2)), (6, -1, (4, 2)), (10, -1, (7, 3)), (5, 5, (5, 0)),
                                                    (5, 0, (0, 5)), (0, -1, (0, 0))])
def test_dpo_budget_splits_the_total(total, sft_steps, want):
    from metatuner.methods.dpo import budget

    cfg = load_config(None, [f"train.max_steps={total}", f"dpo.sft_steps={sft_steps}"])
    assert budget(cfg) == want


def test_dpo_budget_over_total_is_one_line_error(tiny_model_path, tmp_path, capsys):
    assert main(["train", "method=dpo", f"model.name={tiny_model_path}", f"output_dir={tmp_path / 'd'}", *SMALL,
                 "train.max_steps=3", "dpo.sft_steps=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: dpo.sft_steps = 4") and "train.max_steps (3)" in err[0]
    assert not (tmp_path / "d" / "sft").exists()  # refused before any training


@pytest.mark.parametrize("total, parts, want", [(3, 2, [2, 1]), (4, 2, [2, 2]), (1, 3, [1, 0, 0]), (0, 2, [0, 0]),
                                                (5, 1, [5]), (5, 0, [])])
def test_split_steps(total, parts, want):
    from metatuner.lora_sft import split_steps

    assert split_steps(total, parts) == want and sum(want) == (total if parts else 0)


def test_bettertogether_splits_the_total_across_w_steps(tiny_model_path, tmp_path, monkeypatch):
    """train.max_steps=3 over 'w -> w': 2 then 1 real optimizer steps, both in train_log.jsonl."""
    from metatuner.methods import bettertogether

    monkeypatch.setattr(bettertogether, "bootstrap_traces", lambda m, t, task, exs, p, bs=16:
                        [(ex, ex.target) for ex in exs[:2]])
    out = tmp_path / "bt"
    assert main(["train", "method=bettertogether", f"model.name={tiny_model_path}", f"output_dir={out}", *SMALL,
                 "bettertogether.strategy=w -> w", "train.max_steps=3"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == 3
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in log] == [("w0", 1), ("w0", 2), ("w1", 1)]


def test_zero_shot_module_runs(tiny_model_path, tmp_path):
    """methods.zero_shot.run: the untrained model with p~; same files and numbers as `metatuner eval`."""
    from metatuner.methods import zero_shot

    out = tmp_path / "zs"
    cfg = load_config(None, [f"model.name={tiny_model_path}", f"output_dir={out}", *SMALL[:6]])
    metrics = zero_shot.run(cfg)
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert metrics["method"] == "zero_shot" and metrics["train_steps"] == 0 and metrics["n"] == 2 == len(preds)
    assert "train_bf16" not in metrics  # nothing was trained: no training precision to report
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == metrics["accuracy"]
    assert load_config(out / "config.yaml").model.name == str(tiny_model_path)
    assert main(["eval", f"model.name={tiny_model_path}", f"output_dir={tmp_path / 'ev'}", *SMALL[:6]]) == 0
    assert (tmp_path / "ev" / "predictions.jsonl").read_text() == (out / "predictions.jsonl").read_text()


def method_imports(path: Path) -> set[str]:
    """Modules a file imports (absolute names; `from . import x` resolved against metatuner.methods)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = "metatuner.methods" + ("." + path.parent.name if path.parent.name != "methods" else "")
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}
    return names


def test_method_modules_never_import_each_other():
    """Shared blocks live outside methods/: a method module (or package) imports no other method."""
    import metatuner.methods as M

    root = Path(M.__file__).parent
    methods = {p.stem for p in root.glob("*.py") if p.stem != "__init__"} | \
              {p.name for p in root.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert {"sft", "dpo", "opro", "bpo", "bettertogether", "continual", "inference_select", "zero_shot"} <= methods
    bad = []
    for name in sorted(methods):
        files = [root / f"{name}.py"] if (root / f"{name}.py").is_file() else sorted((root / name).rglob("*.py"))
        for f in files:
            for imp in method_imports(f):
                parts = imp.split(".")
                if parts[:2] == ["metatuner", "methods"] and len(parts) > 2 and parts[2] in methods and parts[2] != name:
                    bad.append(f"{f.relative_to(root)} imports {imp}")
    assert not bad, bad


def test_sft_resumes_through_find_resume_checkpoint(tiny_model_path, tmp_path, monkeypatch):
    """A TRL trainer resumes from the checkpoint metatuner.checkpoints.find_resume_checkpoint names (asked
    with directory = the trainer's folder); train_log.jsonl drops what was logged after that checkpoint."""
    import sys
    import types

    out = tmp_path / "sft"
    base = ["train", "method=sft", f"model.name={tiny_model_path}", f"output_dir={out}", *SMALL, "train.save_steps=1",
            "train.save_total_limit=5"]
    assert main(base) == 0
    assert (out / "checkpoint-1" / "trainer_state.json").is_file() and (out / "checkpoint-2").is_dir()
    first = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    # resume=true with a larger budget: continues from the newest checkpoint (checkpoint-2) for one more step
    assert main([*base, "train.max_steps=3", "resume_from_checkpoint=true"]) == 0
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and log[:2] == first
    assert json.loads((out / "metrics.json").read_text())["train_steps"] == 3
    asked = []

    def find_resume_checkpoint(cfg, directory=None):
        asked.append((str(directory), cfg.resume_from_checkpoint))
        return Path(directory) / "checkpoint-1"

    try:
        import metatuner.checkpoints as ck

        monkeypatch.setattr(ck, "find_resume_checkpoint", find_resume_checkpoint)
    except ImportError:  # before the `run` branch's checkpoints module is merged
        monkeypatch.setitem(sys.modules, "metatuner.checkpoints",
                            types.SimpleNamespace(find_resume_checkpoint=find_resume_checkpoint))
    assert main([*base, "train.max_steps=3", "resume_from_checkpoint=true"]) == 0
    assert asked and all(a == (str(out), True) for a in asked)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert log[0] == first[0]  # the line before the checkpoint is kept as it was; steps 2-3 are new
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == 3
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and len([h for h in state["log_history"] if "loss" in h]) == 3


def test_trl_trainers_stop_at_the_first_non_finite_gradient(tiny_model_path, tmp_path):
    """A NaN in the forward at step 3 stops the SFT run before its optimizer step with a one-line error naming
    the phase, the step and the last checkpoint (the Trainer alone would step on with NaN weights and hide
    the loss in its log); the checkpoints written before stay whole, no adapter is written."""
    from metatuner.errors import MetatunerError
    from metatuner.lora_sft import train_sft
    from metatuner.models import load_model
    from metatuner.tasks import load_task

    cfg = load_config(None, ["method=sft", f"model.name={tiny_model_path}", f"output_dir={tmp_path}", *SMALL,
                             "train.save_steps=1", "train.save_total_limit=5", "train.bf16=false"])
    task = load_task(cfg.task, seed=0)
    model, tok = load_model(str(tiny_model_path), dtype="float32", device="cpu")
    calls = {"n": 0}

    def poison(module, args, output):  # the third optimizer step's forward (batch 2, no accumulation)
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 3 else output

    model.model.norm.register_forward_hook(poison)
    with pytest.raises(MetatunerError, match=r"^sft: the gradient became nan at step 3: stopping; the last good "
                                             r"checkpoint is .*checkpoint-2 "):
        train_sft(cfg, model, tok, task, task.train, task.prompt, tmp_path, 4, 0.05)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not (tmp_path / "adapter").exists()
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "checkpoint-2" / "adapter_model.safetensors")
    assert saved and all(torch.isfinite(v).all() for v in saved.values())


def test_trained_sft_model_evaluates_like_its_saved_adapter(tiny_model_path, tmp_path):
    """With train.bf16 the Trainer wraps forward in bf16 autocast; the model train_sft returns (the one
    every method then evaluates) must run in its own dtype, exactly as its saved adapter loaded again."""
    from peft import PeftModel

    from metatuner.lora_sft import train_sft
    from metatuner.models import load_model
    from metatuner.tasks import load_task

    cfg = load_config(None, ["method=sft", f"model.name={tiny_model_path}", f"output_dir={tmp_path}", *SMALL,
                             "train.bf16=true", "train.bf16_emulated=true", "model.dtype=float32"])
    task = load_task(cfg.task, seed=0)
    model, tok = load_model(str(tiny_model_path), dtype="float32", device="cpu")
    trained = train_sft(cfg, model, tok, task, task.train, task.prompt, tmp_path, 2, 0.05)
    assert "_original_forward" not in trained.__dict__  # no autocast wrapper left on forward
    fresh = PeftModel.from_pretrained(load_model(str(tiny_model_path), dtype="float32", device="cpu")[0],
                                      str(tmp_path / "adapter")).eval()
    ids = tok(["12 + 7 = ", "3 4 5"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a, b = trained(**ids).logits, fresh(**ids).logits
    assert a.dtype == torch.float32
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_bf16_applies_only_where_the_device_has_it_or_when_forced(monkeypatch):
    """train.bf16 on a CPU without native bf16 trains in fp32 (TRL's bf16 flag off, autocast off) unless
    train.bf16_emulated; with native bf16 (or train.bf16=false) the flag is what the config says."""
    from metatuner import training
    from metatuner.lora_sft import trl_common_args

    cpu = torch.device("cpu")
    for native, overrides, want in [(False, [], False), (False, ["train.bf16_emulated=true"], True),
                                    (True, [], True), (True, ["train.bf16=false"], False),
                                    (False, ["train.bf16=false", "train.bf16_emulated=true"], False)]:
        monkeypatch.setattr(training, "bf16_native", lambda device, _n=native: _n)
        cfg = load_config(None, overrides)
        assert training.use_bf16(cfg.train, cpu) is want, (native, overrides)
        assert trl_common_args(cfg, "/tmp/x", 1, 1e-3, cpu)["bf16"] is want, (native, overrides)
        on_gpu = trl_common_args(cfg, "/tmp/x", 1, 1e-3, torch.device("cuda", 0))  # the model's device decides
        assert on_gpu["bf16"] is want and on_gpu["use_cpu"] is False, (native, overrides)


def test_sft_run_records_the_precision_it_trained_in(tiny_model_path, tmp_path, monkeypatch):
    """metrics.json says whether training ran under bf16; without native bf16 the run says so and trains
    in fp32."""
    from metatuner import training
    from metatuner.methods import sft

    monkeypatch.setattr(training, "bf16_native", lambda device: False)
    cfg = load_config(None, ["method=sft", f"model.name={tiny_model_path}", f"output_dir={tmp_path}", *SMALL,
                             "train.max_steps=1"])
    assert cfg.train.bf16
    metrics = sft.run(cfg)
    assert metrics["train_bf16"] is False
    assert json.loads((tmp_path / "metrics.json").read_text())["train_bf16"] is False


def test_sft_says_when_trl_drops_rows_from_the_data_stream(tiny_model_path, tmp_path):
    """An example whose prompt alone fills train.max_length has no completion token left; TRL drops it, which
    shifts the shared data stream (training.step_indices). train_sft warns, naming the key to raise, and
    records the count; examples that fit give no warning and drop nothing."""
    import dataclasses
    import warnings

    from metatuner.errors import MetatunerWarning
    from metatuner.lora_sft import train_sft
    from metatuner.models import load_model
    from metatuner.tasks import load_task

    cfg = load_config(None, ["method=sft", f"model.name={tiny_model_path}", f"output_dir={tmp_path}", *SMALL,
                             "train.bf16=false", "train.max_length=1024"])
    task = load_task(cfg.task, seed=0)
    examples = list(task.train[:4])
    model, tok = load_model(str(tiny_model_path), dtype="float32", device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", MetatunerWarning)
        fine = train_sft(cfg, model, tok, task, examples, task.prompt, tmp_path / "fits", 1, 0.05)
    assert fine.train_metrics["train_rows_dropped"] == 0

    examples[1] = dataclasses.replace(examples[1], query=examples[1].query + " 1 +" * 1200)
    model, tok = load_model(str(tiny_model_path), dtype="float32", device="cpu")
    with pytest.warns(MetatunerWarning, match=r"LoRA SFT \(sft\): 1 of 4 training rows .*raise train\.max_length"):
        long = train_sft(cfg, model, tok, task, examples, task.prompt, tmp_path / "long", 2, 0.05)  # one epoch
    assert long.train_metrics["train_rows_dropped"] == 1
