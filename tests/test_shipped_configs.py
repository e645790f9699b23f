"""Every shipped YAML loads and validates against the config schema (torchtune/LitGPT habit), with the
budget keys meaning one thing (train.max_steps = the total of every phase)."""

from pathlib import Path

import pytest
import yaml

from metatuner.compare import load_compare, method_config
from metatuner.config import load_config
from metatuner.models import EMBEDDED
from metatuner.validate import METATUNER_METHODS, validate, validate_models

ROOT = Path(__file__).resolve().parents[1] / "configs"


def check_budget(cfg):
    if cfg.method in METATUNER_METHODS:
        assert 0 < cfg.warmup.max_steps < cfg.train.max_steps  # some joint steps after the warm-up
    if cfg.method == "dpo":
        assert 0 < cfg.dpo.sft_steps < cfg.train.max_steps  # some DPO steps after SFT


@pytest.mark.parametrize("path", sorted((ROOT / "compare").glob("*.yaml")), ids=lambda p: p.name)
def test_compare_configs_validate(path, tmp_path):
    spec = load_compare(str(path), [])
    header = "\n".join(path.read_text().splitlines()[:15])
    assert "metatuner compare --config" in header  # the launch command is in the header comment
    for m in spec["methods"]:
        cfg = method_config(spec, m, spec["seeds"][0], tmp_path / m["name"])
        assert cfg.method == m["method"]
        validate(cfg)
        check_budget(cfg)
        if cfg.model.name in EMBEDDED and cfg.method in METATUNER_METHODS:
            validate_models(cfg)  # share ratio against the embedded generator's depth (config.json only)


@pytest.mark.parametrize("path", sorted((ROOT / "chain_sum").glob("*.yaml")), ids=lambda p: p.name)
def test_run_configs_validate(path):
    cfg = load_config(path)
    assert cfg.method in ("sft", "metatuner_j")
    assert "metatuner train --config" in path.read_text()
    check_budget(cfg)
    assert cfg.train.max_steps == 60  # sft.yaml and metatuner_j.yaml: the same optimizer steps


def test_budgets_match_within_each_comparison():
    """Weight-training methods of one comparison get the same total optimizer steps."""
    for name, total in [("quickstart", 60), ("all_methods", 60), ("basic_arithmetic", 60), ("metatuner_vs_sft", 60),
                        ("generalization_cpu", 60), ("paper", 1000)]:
        spec = load_compare(str(ROOT / "compare" / f"{name}.yaml"), [])
        for m in spec["methods"]:
            cfg = method_config(spec, m, 0, Path("/tmp/unused"))
            if cfg.method in ("sft", "dpo", *METATUNER_METHODS):
                assert cfg.train.max_steps == total, (name, m["name"])


@pytest.mark.parametrize("path", sorted((ROOT / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    d = yaml.safe_load(path.read_text())
    assert d["num_processes"] >= 2 and "accelerate launch --config_file" in path.read_text()
