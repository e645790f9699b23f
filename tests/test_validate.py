"""Every setting is checked before any work starts: one-line errors naming key, value and what is allowed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from metatuner.config import Config, load_config
from metatuner.errors import MetatunerError
from metatuner.validate import validate, validate_models


def error(*overrides) -> str:
    with pytest.raises(MetatunerError) as e:
        load_config(None, list(overrides))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    "override, expected",
    [
        # ranges (the bad inputs of issue 14 first)
        ("eval.limit=-3", "eval.limit = -3: expected an integer >= 0 (0 = all)"),
        ("train.max_steps=-5", "train.max_steps = -5: expected an integer >= 0"),
        ("train.batch_size=0", "train.batch_size = 0: expected an integer >= 1"),
        ("eval.batch_size=0", "eval.batch_size = 0: expected an integer >= 1"),
        ("generator.share_ratio=1.5", "generator.share_ratio = 1.5: expected a number in (0, 1]"),
        ("generator.share_ratio=0", "generator.share_ratio = 0.0: expected a number in (0, 1]"),
        ("train.lr=0", "train.lr = 0.0: expected a number > 0"),
        ("hypernet.lr=-1e-4", "hypernet.lr = -0.0001: expected a number > 0"),
        ("inference.temperature=0", "inference.temperature = 0.0: expected a number > 0 (greedy decoding is"),
        ("rollout.temperature=-1", "rollout.temperature = -1.0: expected a number > 0"),
        ("inference.top_p=0", "inference.top_p = 0.0: expected a number in (0, 1]"),
        ("rollout.top_p=1.2", "rollout.top_p = 1.2: expected a number in (0, 1]"),
        ("rollout.n=-1", "rollout.n = -1: expected an integer >= 0"),  # 0: p~ is the only candidate
        ("lora.rank=0", "lora.rank = 0: expected an integer >= 1"),
        ("lora.dropout=1", "lora.dropout = 1.0: expected a number in [0, 1)"),
        ("train.lr_warmup_ratio=-0.1", "train.lr_warmup_ratio = -0.1: expected a number in [0, 1)"),
        ("dpo.k=1", "dpo.k = 1: expected an integer >= 2"),
        ("dpo.sft_steps=-2", "dpo.sft_steps = -2: expected an integer >= -1"),
        ("task.test_size=-1", "task.test_size = -1: expected an integer >= 0"),
        ("seed=-1", "seed = -1: expected an integer >= 0"),
        ("select.budget=0.5", "select.budget = 0.5: expected a number >= 1"),
        ("select.n_values=[]", "select.n_values = []: expected a non-empty value"),
        ("select.n_values=[2, 0]", "select.n_values = [2, 0]: expected a list of integers >= 1"),
        ("select.temperatures=[]", "select.temperatures = []: expected a non-empty value"),
        ("select.temperatures=[0.7, 0]", "select.temperatures = [0.7, 0.0]: expected a list of numbers > 0"),
        ("select.strategies=[greedy]", "select.strategies = ['greedy']: expected a list of majority, best_of_n, weighted_majority, early"),
        ("select.confidence=1", "select.confidence = 1.0: expected a number in [0.5, 1)"),
        ("select.explore_budget=-1", "select.explore_budget = -1: expected an integer >= 0"),
        ("select.rule=ucb", "select.rule = 'ucb': expected one of lcb, halving"),
        ("inference.stop_threshold=1", "inference.stop_threshold = 1.0: expected a number in [0.5, 1)"),
        ("inference.stop_min=0", "inference.stop_min = 0: expected an integer >= 1"),
        ("inference.stop_score=-.inf", "inference.stop_score = -inf: expected null (no gate) or a finite number"),
        ("inference.stop_chunk=0", "inference.stop_chunk = 0: expected an integer >= 1"),
        ("lora.target_modules=[]", "lora.target_modules = []: expected a non-empty value"),
        ("model.name=", "model.name = '': expected a non-empty value"),
        # choices
        ("method=metatuner", "method = 'metatuner': expected one of zero_shot, sft, dpo"),
        ("inference.strategy=beam", "inference.strategy = 'beam': expected one of greedy, best_of_n, majority, weighted_majority, early_majority"),
        ("train.scheduler=step", "train.scheduler = 'step': expected one of constant, linear, cosine"),
        ("hypernet.pooling=max", "hypernet.pooling = 'max': expected one of mean, last"),
        ("hypernet.heads=many", "hypernet.heads = 'many': expected one of shared, per_target"),
        ("rollout.criterion=loss", "rollout.criterion = 'loss': expected one of answer, nll"),
        ("eval.split=dev", "eval.split = 'dev': expected one of test, validation, train"),
        ("model.dtype=int8", "model.dtype = 'int8': expected one of auto, float32"),
        ("train.report_to=wandb", "train.report_to = 'wandb': expected one of jsonl, tensorboard, none"),
        ("prompt_selection=opro", "prompt_selection = 'opro': expected one of none, sapo"),
        ("resume_from_checkpoint=maybe", "resume_from_checkpoint = 'maybe': expected one of false, true, auto"),
        ("resume_from_checkpoint=1", "resume_from_checkpoint = 1: expected one of false, true, auto"),
        # formats
        ("model.device=gpu", "model.device = 'gpu': expected auto, cpu, cuda or cuda:N"),
        ("lora.layers=2-4", "lora.layers = '2-4': expected empty (all layers) or a python slice"),
        ("bettertogether.strategy=p -> x", "bettertogether.strategy = 'p -> x': expected steps p and w"),
        ("inference.verifier=my verifier", "inference.verifier = 'my verifier': expected '' (the actor's"),
    ],
)
def test_bad_value_names_key_value_and_allowed(override, expected):
    assert error(override).startswith(expected)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["method=metatuner_j", "train.max_steps=20", "warmup.max_steps=30"],
         "warmup.max_steps = 30: expected <= train.max_steps (20)"),
        (["method=dpo", "train.max_steps=30", "dpo.sft_steps=40"], "dpo.sft_steps = 40: expected -1 or <= train.max_steps (30)"),
        (["train.batch_size=8", "train.grad_accum=3"], "train.grad_accum = 3: expected a divisor of train.batch_size (8)"),
        (["inference.n=4"], "inference.n = 4: expected 1 with inference.strategy=greedy"),
        (["select.budget=9", "select.max_per_query=8"], "select.budget = 9.0: expected <= select.max_per_query (8)"),
        (["method=opro", "prompt_selection=sapo"], "prompt_selection = 'sapo': expected none with method=opro"),
        (["method=continual", "continual.tasks=[]"], "continual.tasks = []: expected at least one task"),
        (["task.params_by_task.products=3"], "task.params_by_task.products = 3: expected a mapping"),
    ],
)
def test_inconsistent_settings(overrides, expected):
    assert error(*overrides).startswith(expected)


@pytest.mark.parametrize(
    "overrides",
    [
        ["method=metatuner_j", "train.max_steps=20", "warmup.max_steps=20"],  # all warm-up: allowed
        ["method=sft", "train.max_steps=20", "warmup.max_steps=30"],  # warm-up is not sft's
        ["method=dpo", "train.max_steps=30", "dpo.sft_steps=30"],
        ["inference.strategy=majority", "inference.n=8"],
        ["method=metatuner_i", "prompt_selection=sapo"],
        ["resume_from_checkpoint=auto", "lora.layers=2:", "model.device=cuda:1", "eval.limit=0", "train.max_steps=0"],
    ],
)
def test_consistent_settings_pass(overrides):
    load_config(None, overrides)


def test_custom_verifier_needs_opt_in():
    msg = error("inference.strategy=best_of_n", "inference.n=4", "inference.verifier=my_pkg.checks:score")
    assert msg.startswith("inference.verifier = 'my_pkg.checks:score'") and "inference.trust_verifier=true" in msg
    cfg = load_config(None, ["inference.strategy=best_of_n", "inference.n=4", "inference.verifier=my_pkg.checks:score",
                             "inference.trust_verifier=true"])
    assert cfg.inference.verifier == "my_pkg.checks:score"
    load_config(None, ["inference.verifier=oracle"])  # built-in scorers need no opt-in


def test_yaml_values_are_validated_too(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("eval:\n  limit: -3\n")
    with pytest.raises(MetatunerError, match=r"eval.limit = -3"):
        load_config(p)


def test_validate_on_a_config_built_in_code():
    cfg = Config()
    cfg.train.batch_size = 0
    with pytest.raises(MetatunerError, match="train.batch_size = 0"):
        validate(cfg)


# ----------------------------------------------------------------------------- checks that read the model config


@pytest.fixture(scope="module")
def config_only_model(tmp_path_factory) -> Path:
    """A model folder with config.json only (4 layers): validate_models must not need weights."""
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("cfg_only")
    LlamaConfig(num_hidden_layers=4, hidden_size=16, intermediate_size=32, num_attention_heads=4,
                vocab_size=32).save_pretrained(path)
    return path


def test_validate_models_share_ratio_against_generator_depth(config_only_model, tmp_path):
    base = ["method=metatuner_j", f"model.name={config_only_model}"]
    validate_models(load_config(None, base + ["generator.share_ratio=0.25"]))  # k = 1 of 4
    validate_models(load_config(None, base + ["generator.share_ratio=0.75"]))  # k = 3 of 4
    for ratio in ("0.9", "1.0", "0.1"):
        with pytest.raises(MetatunerError, match=rf"generator.share_ratio {float(ratio)} gives split depth k=\d+ for 4 layers"):
            validate_models(load_config(None, base + [f"generator.share_ratio={ratio}"]))
    # the generator's own depth counts when generator.name is set (0.75 of the actor's 4 layers is fine)
    from transformers import LlamaConfig

    LlamaConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=4,
                vocab_size=32).save_pretrained(tmp_path / "gen")
    with pytest.raises(MetatunerError, match="k=2 for 2 layers"):
        validate_models(load_config(None, base + [f"generator.name={tmp_path / 'gen'}", "generator.share_ratio=0.75"]))
    # not a MetaTuner method: share_ratio is not used
    validate_models(load_config(None, ["method=sft", f"model.name={config_only_model}", "generator.share_ratio=1.0"]))


def test_validate_models_lora_layers_against_actor_depth(config_only_model):
    validate_models(load_config(None, [f"model.name={config_only_model}", "lora.layers=1:3"]))
    with pytest.raises(MetatunerError, match="lora.layers '6:8' selects no layer of the 4 decoder layers"):
        validate_models(load_config(None, [f"model.name={config_only_model}", "lora.layers=6:8"]))


def test_validate_models_unreadable_model_names_the_key(tmp_path):
    with pytest.raises(MetatunerError, match=r"model.name='.*nothing-here': cannot read its config"):
        validate_models(load_config(None, [f"model.name={tmp_path / 'nothing-here'}"]))


# ----------------------------------------------------------------------------- test selection (conftest)


def test_plain_pytest_runs_slow_tests_and_make_test_deselects_them(tmp_path):
    """`make test-all` (plain pytest) runs every test, slow ones included; `make test`'s marker expression
    keeps the ci_slow ones and drops the other slow ones."""
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "conftest.py").write_text((root / "tests" / "conftest.py").read_text())
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: s\n    ci_slow: c\n")
    (tmp_path / "test_x.py").write_text(textwrap.dedent("""
        import pytest
        def test_fast(): pass
        @pytest.mark.slow
        def test_slow(): pass
        @pytest.mark.slow
        @pytest.mark.ci_slow
        def test_ci_slow(): pass
    """))

    def run(*args):
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
        return r.stdout

    assert "3 passed" in run()
    out = run("-m", "not slow or ci_slow")
    assert "2 passed, 1 deselected" in out


@pytest.mark.slow
def test_validate_models_on_the_embedded_model():
    """SmolLM2-135M has 30 layers: share_ratio 0.99 gives k = 30, not a split."""
    validate_models(load_config(None, ["method=metatuner_j", "generator.share_ratio=0.75"]))
    with pytest.raises(MetatunerError, match="k=30 for 30 layers"):
        validate_models(load_config(None, ["method=metatuner_j", "generator.share_ratio=0.99"]))
