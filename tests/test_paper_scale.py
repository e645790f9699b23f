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
               "--gen-batch", "3", "--gen-tokens", "4", "--reps", "1", "--peak-tflops", "1.0"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == res  # the last line printed is the JSON object
    assert res["shapes"] == "tiny" and res["device"] == "cpu" and res["batch"] == 2
    for k in ("joint_step_ms", "sft_step_ms", "actor_fwd_bwd_ms", "param_gen_ms_per_query", "hf_tokens_per_s",
              "peak_memory_mb"):
        assert res[k] > 0, k
    assert res["ratio_joint_vs_sft"] == pytest.approx(res["joint_step_ms"] / res["sft_step_ms"], rel=0.01)
    # MFU = model FLOPs / time / peak (here a 1 TFLOP/s peak was given)
    assert res["actor_mfu"] == pytest.approx(res["actor_model_flops"] / (res["actor_fwd_bwd_ms"] / 1000) / 1e12,
                                             rel=0.02, abs=1e-4)
    assert res["vllm_tokens_per_s"] is None and "vllm" in res["vllm_note"]
    # the paper's shape sets are the published configs
    shapes = runpy.run_path(str(SCRIPT))["shapes"]
    g, m, over = shapes("paper")
    assert (g["hidden_size"], g["num_hidden_layers"], m["hidden_size"], m["num_hidden_layers"]) == (3584, 28, 2048, 36)
    assert "generator.share_ratio=0.25" in over
    with pytest.raises(SystemExit, match="expected paper, small or tiny"):
        shapes("huge")
