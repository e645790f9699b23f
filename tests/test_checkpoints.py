"""find_resume_checkpoint on hand-made folders: false/true/auto, damaged newest falls back, orphans go."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from metatuner.checkpoints import (check_weights_file, config_saver, find_resume_checkpoint, remember_previous_config,
                                   resume_mode, save_checkpoint_config)
from metatuner.config import Config, save_config
from metatuner.errors import MetatunerError


def make_step(out, n, cfg=None, complete=True, truncate=False, torch_file=False):
    d = out / f"step_{n}"
    d.mkdir(parents=True)
    save_file({"w": torch.arange(64, dtype=torch.float32).reshape(8, 8)}, str(d / "generator.safetensors"))
    if torch_file:
        torch.save({"step": n}, d / "optimizer.pt")
    if truncate:
        p = d / "generator.safetensors"
        p.write_bytes(p.read_bytes()[:-40])
    if cfg is not None:
        save_checkpoint_config(cfg, d)
    if complete:
        (d / "COMPLETE").write_text(str(n))
    return d


@pytest.fixture
def cfg(tmp_path):
    return Config(output_dir=str(tmp_path / "run"))


def test_modes(cfg):
    assert resume_mode(False) == "false" and resume_mode(True) == "true"
    assert resume_mode("auto") == "auto" and resume_mode("True") == "true" and resume_mode("false") == "false"
    with pytest.raises(MetatunerError, match="resume_from_checkpoint"):
        resume_mode("sometimes")


def test_false_starts_fresh_even_with_checkpoints(cfg, tmp_path):
    make_step(tmp_path / "run", 2, cfg)
    assert find_resume_checkpoint(cfg) is None


def test_true_without_checkpoint_is_an_error(cfg, tmp_path):
    cfg.resume_from_checkpoint = True
    with pytest.raises(MetatunerError, match="no complete checkpoint.*there is none"):
        find_resume_checkpoint(cfg)
    (tmp_path / "run").mkdir()
    make_step(tmp_path / "run", 4, cfg, complete=False)
    with pytest.raises(MetatunerError, match="incomplete or damaged \\(step_4\\)"):
        find_resume_checkpoint(cfg)


def test_true_takes_the_newest_complete(cfg, tmp_path):
    out = tmp_path / "run"
    make_step(out, 2, cfg)
    make_step(out, 10, cfg)
    make_step(out, 4, cfg)
    cfg.resume_from_checkpoint = True
    assert find_resume_checkpoint(cfg) == out / "step_10"


def test_corrupt_newest_falls_back_with_a_warning(cfg, tmp_path):
    out = tmp_path / "run"
    make_step(out, 2, cfg)
    make_step(out, 4, cfg, truncate=True)
    make_step(out, 6, cfg, complete=False)
    cfg.resume_from_checkpoint = True
    with pytest.warns(UserWarning) as rec:
        assert find_resume_checkpoint(cfg) == out / "step_2"
    msgs = " ".join(str(w.message) for w in rec)
    assert "step_6" in msgs and "incomplete" in msgs
    assert "step_4" in msgs and "generator.safetensors" in msgs


def test_truncated_torch_file_is_damage(cfg, tmp_path):
    out = tmp_path / "run"
    make_step(out, 1, cfg, torch_file=True)
    bad = make_step(out, 3, cfg, torch_file=True)
    (bad / "optimizer.pt").write_bytes((bad / "optimizer.pt").read_bytes()[:50])
    cfg.resume_from_checkpoint = True
    with pytest.warns(UserWarning, match="optimizer.pt"):
        assert find_resume_checkpoint(cfg) == out / "step_1"


def test_truncated_safetensors_error_names_the_file(tmp_path):
    p = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(100)}, str(p))
    check_weights_file(p)
    p.write_bytes(p.read_bytes()[:-8])
    with pytest.raises(MetatunerError, match=f"{p}.*(truncated|corrupt)"):
        check_weights_file(p)
    p.write_bytes(b"garbage")
    with pytest.raises(MetatunerError, match=str(p)):
        check_weights_file(p)


def test_orphans_are_removed(cfg, tmp_path):
    out = tmp_path / "run"
    keep = make_step(out, 2, cfg)
    orphan = out / ".step_4.abc123"
    orphan.mkdir()
    (orphan / "generator.safetensors").write_bytes(b"half")
    other = out / ".lock"
    other.write_text("{}")
    with pytest.warns(UserWarning, match="unfinished checkpoint"):
        assert find_resume_checkpoint(cfg) is None  # false: fresh, but the garbage still goes
    assert not orphan.exists() and keep.is_dir() and other.exists()


def test_trainer_checkpoints_are_recognised(cfg, tmp_path):
    out = tmp_path / "run"
    for n, done in ((5, True), (10, False)):
        d = out / f"checkpoint-{n}"
        d.mkdir(parents=True)
        save_file({"w": torch.ones(3)}, str(d / "adapter_model.safetensors"))
        if done:
            (d / "trainer_state.json").write_text("{}")
    cfg.resume_from_checkpoint = True
    with pytest.warns(UserWarning, match="checkpoint-10.*trainer_state.json"):
        assert find_resume_checkpoint(cfg) == out / "checkpoint-5"
    sub = out / "sft"
    (sub / "checkpoint-1").mkdir(parents=True)
    (sub / "checkpoint-1" / "trainer_state.json").write_text("{}")
    assert find_resume_checkpoint(cfg, directory=sub) == sub / "checkpoint-1"


def test_auto_resumes_only_on_equal_settings(cfg, tmp_path):
    out = tmp_path / "run"
    make_step(out, 3, cfg)
    cfg.resume_from_checkpoint = "auto"
    assert find_resume_checkpoint(cfg) == out / "step_3"
    # output_dir, resume and overwrite are not settings of the training
    same = Config(output_dir=str(out), resume_from_checkpoint="auto", overwrite=True)
    assert find_resume_checkpoint(same) == out / "step_3"
    changed = Config(output_dir=str(out), resume_from_checkpoint="auto")
    changed.train.lr = 0.5
    assert find_resume_checkpoint(changed) is None
    changed.train.lr = cfg.train.lr
    changed.seed = 7
    assert find_resume_checkpoint(changed) is None


def test_auto_without_checkpoint_config_uses_the_earlier_run_config(cfg, tmp_path):
    out = tmp_path / "run"
    make_step(out, 3)  # no config inside the checkpoint
    earlier = Config(output_dir=str(out))
    earlier.train.lr = 0.25
    save_config(earlier, out / "config.yaml")
    remember_previous_config(out)  # start_run does this before writing the new config.yaml
    now = Config(output_dir=str(out), resume_from_checkpoint="auto")
    save_config(now, out / "config.yaml")
    assert find_resume_checkpoint(now) is None  # lr differs from the run that wrote step_3
    now.train.lr = 0.25
    assert find_resume_checkpoint(now) == out / "step_3"


def test_auto_with_no_checkpoint_starts_fresh(cfg):
    cfg.resume_from_checkpoint = "auto"
    assert find_resume_checkpoint(cfg) is None


def test_config_saver_writes_into_trainer_checkpoints(cfg, tmp_path):
    from types import SimpleNamespace

    out = tmp_path / "trl"
    (out / "checkpoint-7").mkdir(parents=True)
    cb = config_saver(cfg)
    cb.on_save(SimpleNamespace(output_dir=str(out)), SimpleNamespace(global_step=7, is_world_process_zero=True), None)
    assert "output_dir:" in (out / "checkpoint-7" / "config.yaml").read_text()


def test_auto_for_a_trainer_subfolder_uses_the_run_config(tmp_path):
    out = tmp_path / "run"
    ck = out / "sft" / "checkpoint-2"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text("{}")
    earlier = Config(output_dir=str(out))
    save_config(earlier, out / "config.yaml")
    remember_previous_config(out)
    now = Config(output_dir=str(out), resume_from_checkpoint="auto")
    assert find_resume_checkpoint(now, directory=out / "sft") == ck
    now.seed = 5
    assert find_resume_checkpoint(now, directory=out / "sft") is None
