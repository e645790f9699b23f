"""benchmarks/paper_scale.py at tiny shapes: it runs end to end on CPU and its JSON line is consistent."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "paper_scale.py"


def test_paper_scale_tiny_runs_and_reports_consistent_numbers(capsys):
    run = runpy.run_path(str(SCRIPT))["run"]
    res = run(["--shapes", "tiny", "--device", "cpu", "--batch", "2", "--query-tokens", "16", "--target-tokens", "8",
               "--gen-batch", "3", "--gen-tokens", "4", "--reps", "1", "--peak-tflops", "1.0", "--no-vllm"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == res  # the last line printed is the JSON object
    assert res["shapes"] == "tiny" and res["device"] == "cpu" and res["batch"] == 2
    for k in ("joint_step_ms", "sft_step_ms", "actor_fwd_bwd_ms", "param_gen_ms_per_query", "hf_tokens_per_s",
              "peak_rss_mb", "param_gen_batch_ms"):
        assert res[k] > 0, k
    assert res["ratio_joint_vs_sft"] == pytest.approx(res["joint_step_ms"] / res["sft_step_ms"], rel=0.01)
    # MFU = model FLOPs / time / peak (here a 1 TFLOP/s peak was given)
    assert res["actor_tflops_per_s"] == pytest.approx(res["actor_model_flops"] / (res["actor_fwd_bwd_ms"] / 1000) / 1e12,
                                                      rel=0.02, abs=1e-4)
    assert res["actor_mfu"] == pytest.approx(res["actor_tflops_per_s"], abs=1e-4)
    assert res["actor_tokens"] <= 2 * res["actor_seq_len"]
    assert res["vllm_tokens_per_s"] is None and res["vllm_speedup"] is None and res["vllm_note"] == "not measured: --no-vllm"
    assert res["generator_trainable_params_m"] > 0 and res["split_k"] == 2
    # the same pass without the LoRA hooks: same FLOPs, its own time
    assert res["actor_base_fwd_bwd_ms"] > 0
    assert res["lora_hooks_vs_base"] == pytest.approx(res["actor_fwd_bwd_ms"] / res["actor_base_fwd_bwd_ms"], rel=0.01)
    # same FLOPs over the base pass's time, against the 1 TFLOP/s peak given (rounded to 4 places)
    assert res["actor_base_mfu"] == pytest.approx(res["actor_model_flops"] / (res["actor_base_fwd_bwd_ms"] / 1000) / 1e12,
                                                  rel=0.02, abs=1e-4)
    assert "actor_compiled_fwd_bwd_ms" not in res  # only with --compile


@pytest.mark.slow
def test_paper_scale_compiled_actor_gives_the_same_loss(capsys):
    """--compile: the actor with its per-query LoRA hooks under torch.compile computes the eager loss and is
    not recompiled for every new set of factors (about a minute on CPU: compilation)."""
    run = runpy.run_path(str(SCRIPT))["run"]
    res = run(["--shapes", "tiny", "--device", "cpu", "--batch", "2", "--query-tokens", "16", "--target-tokens", "8",
               "--gen-batch", "3", "--gen-tokens", "4", "--reps", "3", "--compile"])
    assert res["compiled_loss_rel_diff"] < 1e-5
    assert res["actor_compiled_fwd_bwd_ms"] > 0 and res["compiled_vs_eager"] > 0
    assert 1 <= res["compiled_graphs"] <= 4  # one graph (a few with graph breaks), not one per repetition


def test_paper_scale_flops_and_shapes():
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    ns = runpy.run_path(str(SCRIPT))
    # 4 N per token + 12 L d len^2 per sequence + 4 V d per logit position, by hand for a toy case
    assert ns["actor_flops"](10, 2, 3, 7, [4, 5], 6) == 4 * 10 * 9 + 12 * 2 * 3 * (16 + 25) + 4 * 7 * 3 * 6
    g, m, over = ns["shapes"]("paper")
    # the published parameter counts of Qwen2.5-7B and Qwen2.5-3B (built on the meta device)
    with torch.device("meta"):
        assert sum(p.numel() for p in Qwen2ForCausalLM(Qwen2Config(**g)).parameters()) == 7_615_616_512
        assert sum(p.numel() for p in Qwen2ForCausalLM(Qwen2Config(**m)).parameters()) == 3_085_938_688
    # the paper's settings come from configs/compare/paper.yaml (G's LoRA on every linear)
    assert {"generator.share_ratio=0.25", "generator.lora_targets=[]", "generator.lora_rank=64", "lora.rank=16"} <= set(over)
    with pytest.raises(SystemExit, match="expected paper, small or tiny"):
        ns["shapes"]("huge")


def test_paper_scale_says_why_vllm_was_not_measured(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "vllm", None)  # as on a machine without the extra
    tps, note = runpy.run_path(str(SCRIPT))["vllm_throughput"](None, None, [], None, False, None)
    assert tps is None and "vLLM is not installed" in note and "pip install -e '.[vllm]'" in note


def test_sharded_step_tiny_under_two_processes_reports_halved_generator_state():
    """benchmarks/sharded_step.py at tiny shapes under torchrun (2 processes, gloo): the same first-step loss in
    both layouts, and each process holds about half of G's weights, of what trains in G's gradients and of
    its AdamW state when sharded (all of G trains here); F's stay whole."""
    import os
    import subprocess
    import sys

    torchrun = Path(sys.executable).parent / "torchrun"
    script = SCRIPT.parent / "sharded_step.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(script), "--shapes", "tiny", "--batch",
                        "2", "--query-tokens", "12", "--target-tokens", "6", "--reps", "1", "--full-g"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["processes"] == 2 and res["generator_lora_rank"] == 0
    assert res["loss_rel_diff"] < 1e-5
    for part in ("generator_params", "generator_grads", "generator_adam"):
        assert 0.45 <= res[f"sharded_{part}_mb"] / res[f"ddp_{part}_mb"] <= 0.6, part
    assert res["sharded_f_adam_mb"] == res["ddp_f_adam_mb"] > 0
    assert res["step_ratio_sharded_vs_ddp"] == pytest.approx(res["sharded_step_ms"] / res["ddp_step_ms"], rel=0.01)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "launch with torchrun" in r.stderr
