"""Training runs end to end through tools/train.py: EMA with exact resume, release checkpoints,
damaged checkpoints, the run-directory lock, another process count on resume, elastic restarts,
stops on signals sent to the whole process group (data-loader workers included)."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from cli import ROOT, assert_ok, run_tool, signal_tool, tiny, to_group, torchrun


def one_line_error(result, *fragments):
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.slow
def test_ema_resume_is_bit_identical_and_best_is_a_release_file(tmp_path, data_root):
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = ["trainer.epochs=2", "trainer.ema_decay=0.9", "dataset.num_workers=0"]
    result = run_tool("train", *tiny(whole, data_root, *common))
    assert_ok(result)
    assert "keeping an EMA of the weights" in result.stdout
    assert_ok(run_tool("train", *tiny(split, data_root, *common, "trainer.max_steps=3")))
    (split / ".tmp_k3y9x2ab.pth").write_bytes(b"x" * 1000)  # left by a save that was killed
    result = run_tool("train", *tiny(split, data_root, *common))
    assert_ok(result)
    assert "removed 1 temporary file(s)" in result.stdout and not (split / ".tmp_k3y9x2ab.pth").exists()
    a = torch.load(whole / "checkpoint_last.pth", weights_only=True)
    b = torch.load(split / "checkpoint_last.pth", weights_only=True)
    assert a["step"] == b["step"] == 8
    for part in ("model",):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), key
    assert int(a["ema"]["n_averaged"]) == int(b["ema"]["n_averaged"]) == 8
    for key, value in a["ema"]["model"].items():
        assert torch.equal(value, b["ema"]["model"][key]), key
    best = torch.load(whole / "checkpoint_best.pth", weights_only=True)
    assert "optimizer" not in best and "ema" not in best
    assert os.path.getsize(whole / "checkpoint_best.pth") < 0.6 * os.path.getsize(whole / "checkpoint_last.pth")
    evaluation = tmp_path / "eval"
    assert_ok(run_tool("eval", f"checkpoint={whole / 'checkpoint_best.pth'}", f"hydra.run.dir={evaluation}", "device=cpu"))
    # evaluating the release file gives the numbers training logged for the EMA weights
    history = [json.loads(line) for line in (whole / "log.jsonl").read_text().splitlines()]
    assert json.loads((evaluation / "metrics.json").read_text())["AP"] == pytest.approx(max(h["val_AP"] for h in history if "val_AP" in h))


@pytest.mark.slow
def test_damaged_checkpoints_never_restart_a_run_silently(tmp_path, data_root):
    run = tmp_path / "run"
    assert_ok(run_tool("train", *tiny(run, data_root, "trainer.epochs=1")))
    best_before = (run / "checkpoint_best.pth").read_bytes()
    data = (run / "checkpoint_last.pth").read_bytes()
    (run / "checkpoint_last.pth").write_bytes(data[: len(data) // 3])
    line = one_line_error(run_tool("train", *tiny(run, data_root, "trainer.epochs=2")), "checkpoint_last.pth", "resume=null")
    assert "none can resume" in line
    one_line_error(run_tool("train", *tiny(run, data_root, "trainer.epochs=2", "resume=null")), "checkpoint_best.pth", "overwrite=true")
    one_line_error(run_tool("train", *tiny(tmp_path / "other", data_root, f"resume={run / 'checkpoint_last.pth'}")),
                   f"resume={run / 'checkpoint_last.pth'}", "not a readable PyTorch checkpoint")
    assert (run / "checkpoint_best.pth").read_bytes() == best_before


@pytest.mark.slow
def test_a_second_run_into_a_locked_directory_stops_at_once(tmp_path, data_root):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from deformable_detr.engine.run_lock import RunLock; RunLock({str(run)!r}).acquire(); "
                               "print('locked', flush=True); input()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        one_line_error(run_tool("train", *tiny(run, data_root)), f"hydra.run.dir={run} is in use", f"pid {holder.pid}")
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not (run / "checkpoint_last.pth").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_two_process_run_continues_exactly_on_one_process(tmp_path, data_root):
    run = tmp_path / "run"
    launcher = torchrun(2)
    assert_ok(run_tool("train", *tiny(run, data_root, "trainer.max_steps=1", "trainer.epochs=2"), launcher=launcher, timeout=900))
    stopped = torch.load(run / "checkpoint_last.pth", weights_only=True)
    assert (stopped["world_size"], stopped["epoch_step"], stopped["step"]) == (2, 1, 1)
    # 4 images seen of epoch 0: a 3-image step cannot continue after them exactly
    one_line_error(run_tool("train", *tiny(run, data_root, "trainer.epochs=2", "dataset.batch_size=3")), "cannot continue that epoch")
    result = run_tool("train", *tiny(run, data_root, "trainer.epochs=2"))
    assert_ok(result)
    assert "continuing epoch 0 after the same 4 images (step 2 of 4)" in result.stdout
    finished = torch.load(run / "checkpoint_last.pth", weights_only=True)
    assert (finished["world_size"], finished["epoch"], finished["step"]) == (1, 2, 8)
    assert finished["scheduler"]["last_epoch"] == 8


@pytest.mark.slow
@pytest.mark.multiprocess
def test_an_elastic_restart_resumes_from_the_last_checkpoint(tmp_path, data_root):
    run, marker = tmp_path / "run", tmp_path / "failed-once"
    command = torchrun(1, "--max-restarts", "1") + [os.path.join(ROOT, "tests", "elastic_train.py"),
                                                   f"hydra.searchpath=[file://{ROOT}/tests/configs]", *tiny(run, data_root, "trainer.checkpoint_every_steps=2")]
    environment = dict(os.environ, OMP_NUM_THREADS="1", DDETR_FAIL_AT_STEP="3", DDETR_FAIL_MARKER=str(marker), PYTHONUNBUFFERED="1",
                       PYTHONPATH=os.path.join(ROOT, "tools"))
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=environment)
    assert_ok(result)
    assert marker.exists() and "injected failure at step 3" in result.stdout + result.stderr
    assert "resumed from" in (run / "train.log").read_text()
    finished = torch.load(run / "checkpoint_last.pth", weights_only=True)
    assert (finished["epoch"], finished["step"]) == (2, 8)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ema_and_accumulation_under_two_processes(tmp_path, data_root):
    run = tmp_path / "run"
    launcher = torchrun(2)
    result = run_tool("train", *tiny(run, data_root, "trainer.epochs=1", "trainer.ema_decay=0.9", "trainer.accumulate_steps=2",
                                     "dataset.batch_size=1"), launcher=launcher, timeout=900)
    assert_ok(result)
    state = torch.load(run / "checkpoint_last.pth", weights_only=True)
    # 8 images, 2 processes x 1 image x 2 micro-batches per optimizer step: 2 steps, each one EMA update
    assert (state["step"], state["world_size"], state["batch_size"]) == (2, 2, 2)
    assert int(state["ema"]["n_averaged"]) == 2
    assert any(not torch.equal(state["ema"]["model"][k], state["model"][k]) for k in state["model"] if state["model"][k].is_floating_point())


@pytest.mark.slow
def test_a_signal_to_the_process_group_stops_with_a_checkpoint_and_its_exit_status(tmp_path, data_root):
    run = tmp_path / "run"
    common = ["trainer.epochs=3", "trainer.eval_every=10", "dataset.num_workers=2"]
    # preemption (SLURM, Kubernetes): SIGTERM to the group reaches the data-loader workers too; they leave it to the training
    result = signal_tool("train", tiny(run, data_root, *common), to_group(signal.SIGTERM), after="[epoch 0] 2/4")
    assert result.returncode == 143, result.stdout[-3000:]
    assert "stopped on SIGTERM (exit status 143)" in result.stdout and "killed by signal" not in result.stdout
    first = torch.load(run / "checkpoint_last.pth", weights_only=True)["step"]
    # Ctrl-C, this time after a resume: the stop is announced once, not once more by each worker
    result = signal_tool("train", tiny(run, data_root, *common), to_group(signal.SIGINT), after="[epoch 1] 2/4")
    assert result.returncode == 130, result.stdout[-3000:]
    assert result.stdout.count("stopping after this step") == 1 and "stopped on SIGINT (exit status 130)" in result.stdout
    assert "resumed from" in result.stdout
    second = torch.load(run / "checkpoint_last.pth", weights_only=True)["step"]
    assert 2 <= first < second < 12
    result = run_tool("train", *tiny(run, data_root, *common))
    assert_ok(result)
    assert f"step {second % 4} of 4 in the epoch ({second} steps in total)" in result.stdout
    assert torch.load(run / "checkpoint_last.pth", weights_only=True)["step"] == 12


def rank_processes(launcher):
    """The pids of the ranks that torchrun process ``launcher`` started."""
    with open(f"/proc/{launcher.pid}/task/{launcher.pid}/children") as f:
        children = [int(pid) for pid in f.read().split()]
    return [pid for pid in children if "train.py" in open(f"/proc/{pid}/cmdline").read()]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_torchrun_ranks_stop_together_with_a_checkpoint(tmp_path, data_root):
    run = tmp_path / "run"
    common = ["trainer.epochs=4", "trainer.eval_every=10", "dataset.num_workers=2"]
    launcher = torchrun(2)
    # preemption: SIGTERM to torchrun's group; its agent passes it on to each rank's group, data-loader workers included
    result = signal_tool("train", tiny(run, data_root, *common), to_group(signal.SIGTERM), after="[epoch 1] 1/2", launcher=launcher)
    assert "stopped on SIGTERM (exit status 143)" in result.stdout and "killed by signal" not in result.stdout, result.stdout[-3000:]
    stopped = torch.load(run / "checkpoint_last.pth", weights_only=True)
    assert stopped["world_size"] == 2 and 2 < stopped["step"] < 8
    # one rank signalled: both agree, checkpoint and exit 143, which torchrun lists (exiting 1 itself)
    result = signal_tool("train", tiny(run, data_root, *common), lambda process: os.kill(rank_processes(process)[-1], signal.SIGTERM),
                         after=" eta ", launcher=launcher)
    assert result.returncode == 1 and result.stdout.count("exitcode  : 143") == 2, result.stdout[-3000:]
    assert "resumed from" in result.stdout
    assert torch.load(run / "checkpoint_last.pth", weights_only=True)["step"] > stopped["step"]
    # and one process finishes the run
    assert_ok(run_tool("train", *tiny(run, data_root, *common)))
    assert torch.load(run / "checkpoint_last.pth", weights_only=True)["epoch"] == 4
