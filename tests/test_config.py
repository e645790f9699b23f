"""Typed config: defaults, YAML + overrides, coercion, errors, save/reload, --help."""

from __future__ import annotations

from typing import Union

import dataclasses

import pytest
import yaml

from metatuner.cli import main
from metatuner.config import Config, all_keys, load_config, save_config, set_key, to_dict
from metatuner.errors import MetatunerError


def write(path, text):
    path.write_text(text)
    return path


def test_defaults_are_the_documented_values():
    cfg = load_config()
    assert cfg.method == "zero_shot"
    assert cfg.seed == 0
    assert cfg.model.name == "smollm2-135m-instruct"
    assert cfg.task.name == "chain_sum"
    assert cfg.task.params == {}
    assert cfg.eval.batch_size == 16 and cfg.eval.limit == 0 and cfg.eval.split == "test"
    assert cfg.inference.strategy == "greedy" and cfg.inference.trust_verifier is False
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert isinstance(cfg.lora.alpha, float)
    assert cfg.train.max_steps == 60 and cfg.warmup.max_steps == 30 and cfg.dpo.sft_steps == -1
    assert cfg.resume_from_checkpoint is False and cfg.overwrite is False
    assert not hasattr(cfg.dpo, "max_steps")


def test_defaults_round_trip_through_a_file_and_an_override_changes_them(tmp_path):
    """The resolved defaults written and read back give the same settings, key for key; one override
    changes exactly that key (so the comparison can fail)."""
    save_config(load_config(), tmp_path / "defaults.yaml")
    again = load_config(tmp_path / "defaults.yaml")
    assert to_dict(again) == to_dict(Config())
    changed = load_config(tmp_path / "defaults.yaml", ["train.max_steps=7"])
    a, b = _flat(to_dict(changed)), _flat(to_dict(again))
    assert {k for k in a if a[k] != b[k]} == {"train.max_steps"}
    assert changed.train.max_steps == 7


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not k.startswith("params"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def test_mutable_defaults_are_not_shared():
    a, b = Config(), Config()
    a.task.params["x"] = 1
    a.lora.target_modules.append("lm_head")
    assert b.task.params == {}
    assert "lm_head" not in b.lora.target_modules
    assert Config().task.params == {}


def test_every_key_has_help_and_a_default_of_its_type():
    keys = all_keys()
    assert len(keys) > 20
    for key, tp, default, help in keys:
        assert help.strip(), key
        origin = getattr(tp, "__origin__", tp)
        if key == "resume_from_checkpoint":  # false, true or auto: typed Any, checked by validate
            assert default is False
            continue
        if origin is Union:  # Optional[X]: None or an X
            assert default is None or isinstance(default, tp.__args__), (key, tp, default)
            continue
        assert isinstance(default, origin), (key, tp, default)


def test_yaml_then_overrides_precedence(tmp_path):
    p = write(tmp_path / "run.yaml", "seed: 3\ntask:\n  name: gsm8k\n  test_size: 50\neval:\n  limit: 7\n")
    cfg = load_config(p, ["seed=5", "eval.batch_size=4"])
    assert cfg.seed == 5  # override beats YAML
    assert cfg.task.name == "gsm8k" and cfg.task.test_size == 50 and cfg.eval.limit == 7  # YAML beats defaults
    assert cfg.eval.batch_size == 4
    assert cfg.task.val_size == Config().task.val_size  # untouched keys keep defaults
    # later overrides win over earlier ones
    assert load_config(p, ["seed=5", "seed=6"]).seed == 6


def test_yaml_params_merge_with_dotted_overrides(tmp_path):
    p = write(tmp_path / "run.yaml", "task:\n  params:\n    min_terms: 2\n    max_terms: 3\n")
    cfg = load_config(p, ["task.params.max_terms=5", "task.params.min_digits=1"])
    assert cfg.task.params == {"min_terms": 2, "max_terms": 5, "min_digits": 1}


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("seed=7", "seed", 7),
        ("lora.alpha=32", "lora.alpha", 32.0),
        ("inference.temperature=1e-3", "inference.temperature", 0.001),
        ("inference.top_p=.5", "inference.top_p", 0.5),
        ("model.trust_remote_code=true", "model.trust_remote_code", True),
        ("model.trust_remote_code=yes", "model.trust_remote_code", True),
        ("model.trust_remote_code=0", "model.trust_remote_code", False),
        ("generator.share_encoder=false", "generator.share_encoder", False),
        ("lora.target_modules=q_proj,v_proj", "lora.target_modules", ["q_proj", "v_proj"]),
        ("lora.target_modules=[q_proj, k_proj]", "lora.target_modules", ["q_proj", "k_proj"]),
        ("task.params.min_terms=2", "task.params", {"min_terms": 2}),
        ("task.params.name=abc", "task.params", {"name": "abc"}),
        ("task.params={a: 1, b: [1, 2]}", "task.params", {"a": 1, "b": [1, 2]}),
        ("task.prompt=Solve: x = 1", "task.prompt", "Solve: x = 1"),
        ("task.prompt=123", "task.prompt", "123"),
        ("task.prompt=true", "task.prompt", "true"),
        ("model.name=/tmp/some dir/model", "model.name", "/tmp/some dir/model"),
    ],
)
def test_override_coercion(override, key, expected):
    cfg = load_config(None, [override])
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    assert obj == expected
    assert type(obj) is type(expected)


def test_yaml_coercion(tmp_path):
    p = write(tmp_path / "c.yaml", "seed: 2.0\nlora:\n  alpha: 8\n  target_modules: q_proj\nmodel:\n  trust_remote_code: 1\n"
                                   "task:\n  prompt: 42\n")
    cfg = load_config(p)
    assert cfg.seed == 2 and type(cfg.seed) is int
    assert cfg.lora.alpha == 8.0 and type(cfg.lora.alpha) is float
    assert cfg.lora.target_modules == ["q_proj"]
    assert cfg.model.trust_remote_code is True
    assert cfg.task.prompt == "42"


def test_params_values_keep_yaml_types():
    cfg = load_config(None, ["task.params.min_terms=2", "task.params.ratio=0.5", "task.params.flag=true"])
    assert cfg.task.params == {"min_terms": 2, "ratio": 0.5, "flag": True}
    assert type(cfg.task.params["min_terms"]) is int


@pytest.mark.parametrize(
    "override, close",
    [("task.nmae=x", "task.name"), ("evl.limit=3", "eval.limit"), ("sed=1", "seed"), ("lora.rnak=4", "lora.rank")],
)
def test_unknown_override_key_names_key_and_close_keys(override, close):
    with pytest.raises(MetatunerError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert f"'{override.split('=')[0]}'" in msg
    assert "unknown" in msg
    assert close in msg


def test_unknown_key_without_close_match_points_to_help():
    with pytest.raises(MetatunerError, match="metatuner --help"):
        load_config(None, ["zzzzzzzz=1"])


def test_unknown_nested_key_under_leaf():
    with pytest.raises(MetatunerError, match="unknown config key 'model.name.x'"):
        load_config(None, ["model.name.x=1"])


def test_unknown_yaml_key_names_file_and_key(tmp_path):
    p = write(tmp_path / "c.yaml", "seed: 1\ntask:\n  nmae: gsm8k\n")
    with pytest.raises(MetatunerError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "'task.nmae'" in msg and "task.name" in msg


@pytest.mark.parametrize(
    "override, key, tname",
    [
        ("seed=abc", "seed", "int"),
        ("eval.limit=1.5", "eval.limit", "int"),
        ("lora.rank=true", "lora.rank", "int"),
        ("lora.alpha=high", "lora.alpha", "float"),
        ("model.trust_remote_code=2", "model.trust_remote_code", "bool"),
        ("model.trust_remote_code=maybe", "model.trust_remote_code", "bool"),
        ("lora.target_modules={a: 1}", "lora.target_modules", "list"),
        ("task.params=3", "task.params", "dict"),
        ("seed=", "seed", "int"),
    ],
)
def test_bad_type_names_key(override, key, tname):
    with pytest.raises(MetatunerError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert f"'{key}'" in msg and tname in msg


def test_bad_type_in_yaml_names_file(tmp_path):
    p = write(tmp_path / "c.yaml", "eval:\n  batch_size: many\n")
    with pytest.raises(MetatunerError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "'eval.batch_size'" in str(e.value)


def test_override_without_equals():
    with pytest.raises(MetatunerError, match="expected key=value"):
        load_config(None, ["seed"])


def test_section_cannot_be_set_to_scalar():
    with pytest.raises(MetatunerError, match="section"):
        load_config(None, ["task=gsm8k"])


@pytest.mark.parametrize(
    "text, line",
    [
        ("seed: 1\nmethod: zero_shot\noutput_dir: a: b\n", 3),
        ("seed: 1\ntask:\n\tname: x\n", 3),
        ("seed: 1\nmodel:\n  name: x\n  dtype: [a, b\nlora:\n  rank: 2\n", 5),  # where the parser gives up
    ],
)
def test_malformed_yaml_names_file_and_line(tmp_path, text, line):
    p = write(tmp_path / "bad.yaml", text)
    with pytest.raises(MetatunerError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg
    assert f"line {line}" in msg
    assert "\n" not in msg


def test_missing_config_file(tmp_path):
    with pytest.raises(MetatunerError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_top_level_must_be_mapping(tmp_path):
    p = write(tmp_path / "c.yaml", "- 1\n- 2\n")
    with pytest.raises(MetatunerError, match="mapping"):
        load_config(p)


def test_empty_yaml_is_defaults(tmp_path):
    assert to_dict(load_config(write(tmp_path / "c.yaml", ""))) == to_dict(Config())


def test_resolved_config_saves_and_reloads_equal(tmp_path):
    cfg = load_config(None, ["seed=4", "task.name=gsm8k", "task.params.min_terms=2", "task.params.tag=x",
                             "lora.target_modules=q_proj,v_proj", "lora.alpha=8", "model.trust_remote_code=true",
                             "task.prompt=Say: yes", "inference.temperature=0.3", "output_dir=runs/x"])
    p = tmp_path / "out" / "config.yaml"
    save_config(cfg, p)
    assert yaml.safe_load(p.read_text()) == to_dict(cfg)
    again = load_config(p)
    assert again == cfg
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)
    # and once more through the file: a fixed point
    save_config(again, tmp_path / "again.yaml")
    assert (tmp_path / "again.yaml").read_text() == p.read_text()


def _help_output(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--help"], ["eval", "--help"]])
def test_help_lists_every_key_with_help_text(argv, capsys):
    out = _help_output(argv, capsys)
    for key, _tp, default, help in all_keys():
        assert f"  {key} (" in out, key
        assert help in out, key
    assert "task.params.min_terms=2" in out  # the example in the params help
    if argv[0] == "eval":
        assert "--config" in out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "eval" in out and "seed" in out


def test_params_by_task_nests_per_task(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("task:\n  params_by_task:\n    basic_arithmetic: {max_digits: 2, operators: ['+', '-']}\n")
    cfg = load_config(p, ["task.params_by_task.basic_arithmetic.min_terms=2", "task.params_by_task.products.max_digits=1"])
    assert cfg.task.params_by_task == {"basic_arithmetic": {"max_digits": 2, "operators": ["+", "-"], "min_terms": 2},
                                       "products": {"max_digits": 1}}
    assert cfg.task.params == {}


# ----------------------------------------------------------------------------- OmegaConf parsing


def test_yaml_floats_without_a_dot_and_typed_lists(tmp_path):
    """YAML 1.1 reads `1e-4` as a string; OmegaConf's loader reads it as a float. List items are typed."""
    p = write(tmp_path / "c.yaml", "train:\n  lr: 1e-4\nselect:\n  n_values: [1, 3]\n")
    cfg = load_config(p, ["hypernet.lr=2e-5"])
    assert cfg.train.lr == 1e-4 and type(cfg.train.lr) is float
    assert cfg.hypernet.lr == 2e-5
    assert cfg.select.n_values == [1, 3]
    with pytest.raises(MetatunerError, match=r"'select.n_values' expects list\[int\]"):
        load_config(None, ["select.n_values=[1, many]"])
    # an optional number: a float, or null for off
    assert load_config(None, ["inference.stop_score=-0.2"]).inference.stop_score == -0.2
    assert load_config(None, ["inference.stop_score=null"]).inference.stop_score is None
    with pytest.raises(MetatunerError, match="'inference.stop_score' expects float or null, got 'abc'"):
        load_config(None, ["inference.stop_score=abc"])


def test_interpolation_resolves_and_is_saved_resolved(tmp_path):
    p = write(tmp_path / "c.yaml", "task:\n  name: gsm8k\noutput_dir: runs/${task.name}-${seed}\n")
    cfg = load_config(p, ["seed=3"])
    assert cfg.output_dir == "runs/gsm8k-3"
    save_config(cfg, tmp_path / "out.yaml")
    assert "runs/gsm8k-3" in (tmp_path / "out.yaml").read_text()
    with pytest.raises(MetatunerError, match="output_dir"):
        load_config(None, ["output_dir=runs/${task.nmae}"])


def test_dict_override_replaces_and_dotted_key_merges(tmp_path):
    p = write(tmp_path / "c.yaml", "task:\n  params: {min_terms: 2, max_terms: 3}\n")
    assert load_config(p, ["task.params={max_digits: 1}"]).task.params == {"max_digits": 1}
    assert load_config(p, ["task.params.max_digits=1"]).task.params == {"min_terms": 2, "max_terms": 3, "max_digits": 1}


def test_duplicate_yaml_key_names_file_and_line(tmp_path):
    p = write(tmp_path / "c.yaml", "seed: 1\ntask:\n  name: a\n  name: b\n")
    with pytest.raises(MetatunerError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "line 4" in str(e.value) and "duplicate" in str(e.value)


def test_yaml_that_is_not_utf8(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes("task:\n  prompt: caf\xe9\n".encode("latin-1"))
    with pytest.raises(MetatunerError, match="not UTF-8"):
        load_config(p)


def test_removed_key_says_what_replaced_it(tmp_path):
    with pytest.raises(MetatunerError, match=r"'dpo.max_steps' was removed: .*train.max_steps - dpo.sft_steps"):
        load_config(None, ["dpo.max_steps=20"])
    p = write(tmp_path / "c.yaml", "dpo:\n  max_steps: 20\n")
    with pytest.raises(MetatunerError, match=str(p)):
        load_config(p)


@pytest.mark.parametrize("text, expected", [("false", False), ("true", True), ("auto", "auto"), ("no", False)])
def test_resume_from_checkpoint_values(text, expected, tmp_path):
    cfg = load_config(None, [f"resume_from_checkpoint={text}"])
    assert cfg.resume_from_checkpoint == expected and type(cfg.resume_from_checkpoint) is type(expected)
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml").resume_from_checkpoint == expected


def test_set_key_checks_types_and_keys():
    """compare builds run configs with set_key: same parsing and errors as load_config."""
    cfg = Config()
    set_key(cfg, "train.max_steps", 5)
    set_key(cfg, "lora.target_modules", "q_proj,v_proj")
    set_key(cfg, "task.params_by_task.products.max_digits", 2)
    set_key(cfg, "task.params_by_task.products.min_digits", "1", raw=True)
    set_key(cfg, "task", {"name": "gsm8k", "test_size": 9})
    assert (cfg.train.max_steps, cfg.lora.target_modules) == (5, ["q_proj", "v_proj"])
    assert cfg.task.params_by_task == {"products": {"max_digits": 2, "min_digits": 1}}
    assert (cfg.task.name, cfg.task.test_size) == ("gsm8k", 9)
    with pytest.raises(MetatunerError, match="c.yaml base: key 'train.max_steps' expects int, got 'x'"):
        set_key(cfg, "train.max_steps", "x", where="c.yaml base")
    with pytest.raises(MetatunerError, match="close valid keys: train.max_steps"):
        set_key(cfg, "train.max_stesp", 3)
    assert cfg.train.max_steps == 5


def test_help_shows_types_and_budget_meaning(capsys):
    out = _help_output(["--help"], capsys)
    assert "  resume_from_checkpoint (false|true|auto, default False)" in out
    assert "  lora.target_modules (list[str]," in out
    assert "  inference.trust_verifier (bool, default False)" in out
    assert "dpo.max_steps" not in out
    assert "TOTAL optimizer steps" in out
