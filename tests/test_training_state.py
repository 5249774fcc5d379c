"""Gradient accumulation, checkpoint files and the run-directory lock, without the command line."""
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from deformable_detr.engine.checkpoint import (
    BEST,
    LAST,
    CheckpointKeeper,
    find_resume,
    refuse_to_overwrite,
    remove_stale_temporaries,
    save_atomic,
)
from deformable_detr.engine.optim import build_optimizer, build_scheduler
from deformable_detr.engine.run_lock import RunDirectoryBusyError, RunLock
from deformable_detr.engine.train_step import TrainStep
from deformable_detr.errors import CheckpointError
from deformable_detr.models import HungarianMatcher, SetCriterion, loss_weights
from model_builders import tiny_model


def batch(first_id, count, generator, size=64):
    """``count`` same-size images (no padding) with one or two boxes each."""
    images = torch.randn(count, 3, size, size, generator=generator, dtype=torch.float64)
    targets = []
    for i in range(count):
        boxes = 0.25 + 0.5 * torch.rand(1 + i % 2, 4, generator=generator, dtype=torch.float64)
        boxes[:, 2:] = boxes[:, 2:] * 0.4
        targets.append({"boxes": boxes, "labels": torch.randint(0, 10, (len(boxes),), generator=generator), "image_id": torch.tensor(first_id + i)})
    return images, torch.zeros(count, size, size, dtype=torch.bool), targets


def trained_parameters(micro_batches):
    torch.manual_seed(0)
    model = tiny_model(norm="frozen_bn").double()
    criterion = SetCriterion(10, HungarianMatcher(), loss_weights(num_decoder_layers=2))
    optimizer = build_optimizer(model, lr=1e-3, lr_backbone=1e-3)
    step = TrainStep(model, criterion, optimizer, build_scheduler(optimizer, iters_per_epoch=10), torch.device("cpu"), max_norm=0.1)
    result = step.accumulate(micro_batches)
    return {k: v.detach().clone() for k, v in model.named_parameters()}, result


def test_two_micro_batches_of_two_update_like_one_batch_of_four():
    generator = torch.Generator().manual_seed(3)
    images, masks, targets = batch(1, 4, generator)
    whole, whole_result = trained_parameters([(images, masks, targets)])
    split, split_result = trained_parameters([(images[:2], masks[:2], targets[:2]), (images[2:], masks[2:], targets[2:])])
    assert whole_result.images == split_result.images == 4
    torch.testing.assert_close(split_result.values["loss"], whole_result.values["loss"], rtol=0, atol=1e-10)
    torch.testing.assert_close(split_result.values["grad_norm"], whole_result.values["grad_norm"], rtol=0, atol=1e-10)
    for name, value in whole.items():
        torch.testing.assert_close(split[name], value, rtol=0, atol=1e-10, msg=name)
    torch.manual_seed(0)
    initial = dict(tiny_model(norm="frozen_bn").double().named_parameters())
    assert not torch.equal(whole["class_embed.0.weight"], initial["class_embed.0.weight"])  # the step did update


def test_stale_temporary_files_of_interrupted_saves_are_removed_and_nothing_else(tmp_path):
    for name in (".tmp_ab12cd_3.pth", ".tmp_zz99yy00.pth"):
        (tmp_path / name).write_bytes(b"partial")
    for name in (".tmp_notes.txt", "tmp_ab12cd34.pth", ".tmp_ab12cd34.pth.bak", "checkpoint_last.pth", "my.tmp"):
        (tmp_path / name).write_bytes(b"keep")
    removed = remove_stale_temporaries(str(tmp_path))
    assert sorted(os.path.basename(p) for p, _ in removed) == [".tmp_ab12cd_3.pth", ".tmp_zz99yy00.pth"]
    assert sorted(os.listdir(tmp_path)) == sorted([".tmp_notes.txt", "tmp_ab12cd34.pth", ".tmp_ab12cd34.pth.bak", "checkpoint_last.pth", "my.tmp"])


def test_saved_checkpoints_get_the_umask_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        save_atomic({"step": 1}, str(tmp_path / "a.pth"))
        os.umask(0o027)
        save_atomic({"step": 1}, str(tmp_path / "b.pth"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "a.pth").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "b.pth").st_mode) == 0o640


def test_the_best_checkpoint_is_a_release_file(tmp_path):
    keeper = CheckpointKeeper(str(tmp_path))
    state = {"model": {"w": torch.ones(2)}, "optimizer": {"state": {}}, "scheduler": {}, "epoch": 1, "step": 4, "epoch_step": 0,
             "rng": [], "config": {"name": "x"}, "ema": {"model": {"w": torch.zeros(2)}, "n_averaged": torch.tensor(4)}}
    keeper.save(state, finished_epoch=0, is_best=True)
    best = torch.load(tmp_path / BEST, weights_only=True)
    assert "optimizer" not in best and "scheduler" not in best and "rng" not in best and best["config"] == {"name": "x"}
    assert torch.equal(best["model"]["w"], torch.zeros(2)) and torch.equal(best["raw_model"]["w"], torch.ones(2))
    assert "optimizer" in torch.load(tmp_path / LAST, weights_only=True)


def test_a_truncated_last_checkpoint_beside_a_best_one_is_not_a_fresh_start(tmp_path):
    keeper = CheckpointKeeper(str(tmp_path))
    keeper.save({"model": {}, "optimizer": {}, "scheduler": {}, "epoch": 1, "step": 4, "epoch_step": 0}, finished_epoch=0, is_best=True)
    data = (tmp_path / LAST).read_bytes()
    (tmp_path / LAST).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"none can resume the run \(checkpoint_last.pth unreadable\).*resume=null overwrite=true"):
        find_resume(str(tmp_path))
    os.unlink(tmp_path / LAST)
    assert find_resume(str(tmp_path)) is None  # the release file cannot resume ...
    with pytest.raises(CheckpointError, match="already holds checkpoint_best.pth .* overwrite=true"):
        refuse_to_overwrite(str(tmp_path))  # ... and a fresh start would overwrite it


def test_a_second_process_cannot_take_a_locked_run_directory(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from deformable_detr.engine.run_lock import RunLock
            lock = RunLock({str(tmp_path)!r}).acquire()
            print("locked", flush=True)
            sys.stdin.readline()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryBusyError, match=rf"hydra.run.dir={tmp_path} is in use by another training run \(host .+, pid {holder.pid}\)"):
            RunLock(str(tmp_path)).acquire()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    with RunLock(str(tmp_path)):  # released when its holder exits
        pass
