"""A disk (or quota) that fills while a checkpoint is written: the previous checkpoint stays, the
temporary file goes, and the run ends with one error line naming the file and the space."""
import errno
import os
import subprocess
import uuid

import pytest
import torch

from cli import run_tool_in_process, tiny
from deformable_detr.engine.checkpoint import BEST, LAST, CheckpointKeeper, save_atomic
from deformable_detr.errors import DiskFullError, UserError
from deformable_detr.utils.disk_space import disk_full_errno

STATE = {"model": {"w": torch.ones(64, 64)}, "optimizer": {}, "scheduler": {}, "epoch": 1, "step": 4}


class FullFile:
    """A file on a disk with ``room`` bytes left: ``write`` raises OSError(``code``) once they are
    used up, as a real file does (torch.save then fails the way it does on a full disk)."""

    def __init__(self, f, room, code):
        self.f, self.room, self.code = f, room, code

    def write(self, data):
        if len(data) > self.room:
            raise OSError(self.code, os.strerror(self.code))
        self.room -= len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def fill_disk(monkeypatch, room=0, code=errno.ENOSPC, after=0):
    """torch.save writes into a ``FullFile`` from its ``after``-th call on (the earlier ones fit)."""
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        return real_save(obj, FullFile(f, room, code) if len(calls) > after else f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    return calls


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_a_full_disk_keeps_the_previous_checkpoint_and_names_file_and_space(tmp_path, monkeypatch, code):
    path = tmp_path / LAST
    save_atomic({"step": 1, "w": torch.zeros(8000)}, str(path))  # larger than STATE: its size is the estimate
    previous = path.read_bytes()
    fill_disk(monkeypatch, room=100, code=code)
    with pytest.raises(DiskFullError) as raised:
        save_atomic(STATE, str(path))
    message = str(raised.value)
    assert message.startswith(f"cannot write checkpoint {path}: {os.strerror(code).lower()} (it needs about ")
    assert f"it needs about {len(previous) / 1024:.1f} KiB, " in message  # the previous file's size
    assert " free there); the last good checkpoint, " + str(path) + ", is kept intact: " in message
    fix = {errno.ENOSPC: "free space on that disk", errno.EDQUOT: "within your quota", errno.EFBIG: "ulimit -f"}[code]
    assert fix in message and message.endswith(", then resume=auto continues the run from its last good checkpoint")
    assert raised.value.errno == code and isinstance(raised.value, (UserError, OSError)) and "\n" not in message
    assert path.read_bytes() == previous and os.listdir(tmp_path) == [LAST]


def test_the_zip_writers_own_failure_is_a_full_disk(tmp_path, monkeypatch):
    """torch.save to a path reports a full disk only as RuntimeErrors of its zip writer."""
    def fail(obj, f, *args, **kwargs):
        try:
            raise RuntimeError("basic_ios::clear: iostream error")
        finally:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(DiskFullError, match=r"checkpoint_last.pth: no space left on device \(it needs about 16.0 KiB, .* free there\); "
                                            "no earlier checkpoint of this run exists to keep"):
        save_atomic(STATE, str(tmp_path / LAST))  # 64 x 64 float32: 16 KiB of tensors
    assert os.listdir(tmp_path) == []


def test_other_write_failures_are_not_a_full_disk(tmp_path, monkeypatch):
    fill_disk(monkeypatch, room=100, code=errno.EIO)
    with pytest.raises(RuntimeError, match="unexpected pos") as raised:
        save_atomic(STATE, str(tmp_path / LAST))
    assert not isinstance(raised.value, UserError) and os.listdir(tmp_path) == []
    assert disk_full_errno(OSError("no errno")) is None and disk_full_errno(ValueError("unexpected pos")) is None


def test_the_keeper_names_the_checkpoint_it_wrote_before_the_disk_filled(tmp_path, monkeypatch):
    keeper = CheckpointKeeper(str(tmp_path))
    fill_disk(monkeypatch, after=1)  # checkpoint_last.pth fits, checkpoint_best.pth does not
    with pytest.raises(DiskFullError, match=f"cannot write checkpoint {tmp_path / BEST}: .*the last good checkpoint, {tmp_path / LAST}, is kept"):
        keeper.save(STATE, finished_epoch=0, is_best=True)
    assert os.listdir(tmp_path) == [LAST]


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 256 KiB tmpfs mounted at tmp_path/disk (skips where mounting is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", f"tmpfs-{uuid.uuid4().hex[:8]}", str(disk)],
                                 capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


def test_a_real_full_tmpfs(tiny_tmpfs):
    keeper = CheckpointKeeper(str(tiny_tmpfs))
    keeper.save(STATE, finished_epoch=None, is_best=False)  # 16 KiB: fits
    previous = (tiny_tmpfs / LAST).read_bytes()
    big = dict(STATE, model={"w": torch.ones(512, 512)})  # 1 MiB: does not
    with pytest.raises(DiskFullError, match=rf"cannot write checkpoint {tiny_tmpfs / LAST}: no space left on device "
                                            rf"\(it needs about 1.0 MiB, 2\d\d\.\d KiB free there\); the last good checkpoint"):
        keeper.save(big, finished_epoch=None, is_best=False)
    assert (tiny_tmpfs / LAST).read_bytes() == previous and os.listdir(tiny_tmpfs) == [LAST]


@pytest.mark.slow
def test_a_training_run_that_fills_the_disk_ends_with_one_error_line(tmp_path, monkeypatch):
    run = tmp_path / "run"
    calls = fill_disk(monkeypatch, room=4096, after=1)  # the first checkpoint fits, the next does not
    result = run_tool_in_process("train", *tiny(run, tmp_path / "data", "trainer.epochs=2", "trainer.eval_every=2"))
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert len(calls) == 2 and "Traceback" not in result.stderr + result.stdout
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: cannot write checkpoint {run / LAST}: no space left on device")
    assert f"the last good checkpoint, {run / LAST}, is kept intact" in result.stderr
    assert torch.load(run / LAST, weights_only=False)["epoch"] == 1
    assert not [name for name in os.listdir(run) if name.startswith(".tmp_")]
