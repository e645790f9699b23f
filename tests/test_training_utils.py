"""training.py: checkpoints that resume never half-reads, NaN stops, logs, batches and schedules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from metatuner.errors import MetatunerError
from metatuner.training import (TrainLog, check_finite, list_checkpoints, lm_batch, logits_to_keep, make_scheduler,
                                newest_checkpoint, sequence_nll, write_checkpoint)


def _write(step_text):
    def write(tmp):
        (tmp / "payload.txt").write_text(step_text)
    return write


def test_newest_checkpoint_ignores_hidden_temp_folders(tmp_path):
    write_checkpoint(tmp_path, 2, _write("two"), keep=0)
    # a run killed while writing step 3 leaves a hidden temp folder, even one that looks complete
    half = tmp_path / ".step_3.abc123"
    half.mkdir()
    (half / "payload.txt").write_text("half")
    (half / "COMPLETE").write_text("3")
    # and a step_N folder without its COMPLETE marker (copied by hand, interrupted) is not a checkpoint either
    (tmp_path / "step_4").mkdir()
    (tmp_path / "step_x").mkdir()
    assert newest_checkpoint(tmp_path) == tmp_path / "step_2"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_2"]


def test_newest_checkpoint_orders_numerically_and_prunes(tmp_path):
    assert newest_checkpoint(tmp_path / "missing") is None
    for step in (2, 10, 4):
        write_checkpoint(tmp_path, step, _write(str(step)), keep=0)
    assert newest_checkpoint(tmp_path).name == "step_10"
    write_checkpoint(tmp_path, 12, _write("12"), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_10", "step_12"]
    assert (tmp_path / "step_12" / "payload.txt").read_text() == "12"


def test_failed_checkpoint_write_leaves_nothing(tmp_path):
    write_checkpoint(tmp_path, 2, _write("two"), keep=0)

    def boom(tmp):
        (tmp / "partial").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_checkpoint(tmp_path, 4, boom, keep=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2"]
    assert newest_checkpoint(tmp_path).name == "step_2"


def test_check_finite_names_step_and_checkpoint():
    check_finite(torch.tensor(1.5), 3, None)
    with pytest.raises(MetatunerError, match=r"loss became nan at step 3: .*last good checkpoint is /runs/x/step_2"):
        check_finite(torch.tensor(float("nan")), 3, "/runs/x/step_2")
    with pytest.raises(MetatunerError, match=r"gradient norm became inf at step 1: .*no checkpoint was written yet"):
        check_finite(torch.tensor(float("inf")), 1, None, what="gradient norm")


def _finite_on_two(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        value = torch.tensor(float("nan") if rank == 1 else 0.5)
        try:
            check_finite(value, 4, None, everywhere=True)
            msg = "no error"
        except MetatunerError as e:
            msg = str(e)
        dist.barrier()  # both came back from the check: nobody is left waiting in a collective
        Path(out, f"rank{rank}.txt").write_text(msg)
    finally:
        dist.destroy_process_group()


def test_check_finite_everywhere_stops_every_process_together(tmp_path):
    """A loss that went NaN on one process of two stops both (one all-reduce of a flag), so the healthy
    process raises too instead of waiting in the next collective; each names what it saw."""
    import torch.multiprocessing as mp

    mp.start_processes(_finite_on_two, args=(f"file://{tmp_path / 'pg'}", str(tmp_path)), nprocs=2,
                       start_method="spawn", join=True)
    msgs = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert msgs[1].startswith("loss became nan at step 4: stopping; no checkpoint")
    assert msgs[0].startswith("loss became non-finite on another process at step 4: stopping")


def test_train_log_append_and_keep(tmp_path):
    log = TrainLog(tmp_path)
    for s in range(1, 5):
        log.log(s, stage="joint", loss=float(s))
    log.keep(lambda r: r["step"] <= 2)
    log2 = TrainLog(tmp_path, append=True)
    log2.log(3, stage="joint", loss=3.0)
    rows = [json.loads(ln) for ln in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    TrainLog(tmp_path)  # a fresh (not resumed) run starts a new log
    assert not (tmp_path / "train_log.jsonl").exists()
    off = TrainLog(tmp_path / "other", enabled=False)  # non-main processes write nothing
    off.log(1, loss=1.0)
    assert not (tmp_path / "other").exists()


def test_lm_batch_labels_only_on_completion(tiny_model):
    _, tok = tiny_model
    b = lm_batch(tok, ["abc", "a"], ["xy", "xyz"], max_length=512)
    assert b["input_ids"].shape == (2, 5)
    assert b["labels"][0].tolist()[:3] == [-100] * 3 and (b["labels"][0, 3:] != -100).all()
    assert b["labels"][1, :1].tolist() == [-100] and (b["labels"][1, 1:4] != -100).all()
    assert b["prefix_mask"].sum(1).tolist() == [3, 1]
    assert b["attention_mask"].sum(1).tolist() == [5, 4]
    # over-long rows lose prefix tokens from the left, never completion tokens
    short = lm_batch(tok, ["abcdef"], ["xy"], max_length=4)
    assert short["input_ids"].shape[1] == 4 and short["prefix_mask"].sum() == 2
    assert logits_to_keep(b["labels"]) == 5  # from the token before the earliest label (row 1: position 0)
    assert logits_to_keep(lm_batch(tok, ["abc", "ab"], ["x", "xy"])["labels"]) == 3


def test_forward_nll_with_trimmed_logits_matches_full_logits(tiny_model):
    from metatuner.training import forward_nll

    model, tok = tiny_model
    b = lm_batch(tok, ["hello there", "hi"], [" 12", " 345"])
    with torch.no_grad():
        nll, _ = forward_nll(model, b)
        full = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert torch.allclose(nll, sequence_nll(full, b["labels"]), atol=1e-5)


def test_sequence_nll_is_mean_over_labelled_tokens():
    logits = torch.zeros(1, 4, 5)
    labels = torch.tensor([[-100, 1, 2, -100]])
    assert torch.allclose(sequence_nll(logits, labels), torch.tensor([math.log(5)]))


@pytest.mark.parametrize("kind,expected", [("constant", [1, 1, 1, 1]), ("linear", [1, 0.75, 0.5, 0.25])])
def test_make_scheduler(kind, expected):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = make_scheduler(opt, kind, 4, 0.0)
    lrs = []
    for _ in range(4):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(expected)
    with pytest.raises(MetatunerError, match="train.scheduler"):
        make_scheduler(opt, "bogus", 4, 0.0).step()


def test_step_indices_walk_one_permutation_per_epoch():
    from metatuner.training import step_indices

    stream = [i for s in range(5) for i in step_indices(10, 3, s, 4)]  # 20 = two epochs of 10
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:], "each epoch has its own permutation"
    assert step_indices(10, 3, 2, 4) == stream[8:12], "a step across the epoch boundary"
    assert step_indices(10, 4, 0, 4) != stream[:4], "the seed sets the order"


def test_sft_without_examples_says_so(tiny_model_path, tmp_path):
    from metatuner.config import load_config
    from metatuner.lora_sft import step_ordered

    cfg = load_config(None, [f"model.name={tiny_model_path}"])
    with pytest.raises(MetatunerError, match="no training examples"):
        step_ordered(cfg, [], "p", 0, 3)
