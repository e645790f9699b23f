"""Every shipped YAML parses and validates against the config schema (torchtune/LitGPT habit)."""

from pathlib import Path

import pytest
import yaml

from metatuner.compare import load_compare, method_config
from metatuner.config import load_config

ROOT = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted((ROOT / "compare").glob("*.yaml")), ids=lambda p: p.name)
def test_compare_configs_validate(path, tmp_path):
    spec = load_compare(str(path), [])
    header = "\n".join(path.read_text().splitlines()[:15])
    assert "metatuner compare --config" in header  # the launch command is in the header comment
    for m in spec["methods"]:
        cfg = method_config(spec, m, spec["seeds"][0], tmp_path / m["name"])
        assert cfg.method == m["method"]


@pytest.mark.parametrize("path", sorted((ROOT / "chain_sum").glob("*.yaml")), ids=lambda p: p.name)
def test_run_configs_validate(path):
    cfg = load_config(path)
    assert cfg.method in ("sft", "metatuner_j")
    assert "metatuner train --config" in path.read_text()


@pytest.mark.parametrize("path", sorted((ROOT / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    d = yaml.safe_load(path.read_text())
    assert d["num_processes"] >= 2 and "accelerate launch --config_file" in path.read_text()
