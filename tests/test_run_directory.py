"""A run directory that cannot be created or written is one error line naming it and the fix
(exit status 2) from every tool, before Hydra tries to create it."""
import contextlib
import subprocess

import pytest

from cli import run_tool
from deformable_detr.cli.command_line import unwritable_because

TOOL_ARGUMENTS = {
    "train": ["device=cpu"],
    "eval": ["checkpoint=missing.pth", "device=cpu"],
    "infer": ["checkpoint=missing.pth", "input=missing.png", "device=cpu"],
    "visualize": ["checkpoint=missing.pth", "input=missing.png", "device=cpu"],
    "benchmark": ["device=cpu"],
    "export": ["checkpoint=missing.pth", "device=cpu"],
}


def assert_one_error_line(result, expected):
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr + result.stdout, result.stderr
    assert result.stderr.startswith(f"error: {expected}"), result.stderr
    assert result.stderr.rstrip().endswith("; choose another run directory with hydra.run.dir=DIR")


# each a fresh interpreter: train's in the quick tier, the other tools' slow
@pytest.mark.parametrize("tool", [t if t == "train" else pytest.param(t, marks=pytest.mark.slow) for t in sorted(TOOL_ARGUMENTS)])
def test_a_file_where_the_run_directory_should_go(tmp_path, tool):
    (tmp_path / "file.txt").write_text("not a directory")
    run = tmp_path / "file.txt" / "run"
    result = run_tool(tool, *TOOL_ARGUMENTS[tool], f"hydra.run.dir={run}", timeout=120)
    assert_one_error_line(result, f"hydra.run.dir={run} cannot be created: {tmp_path / 'file.txt'} is a file, not a directory")


@contextlib.contextmanager
def read_only_bind_mount(source, target):
    """``source`` mounted read-only at ``target`` (skips where mounting is not allowed)."""
    target.mkdir()
    try:
        bound = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command")
    if bound.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {bound.stderr.strip()}")
    try:
        remounted = subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], capture_output=True, text=True)
        if remounted.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {remounted.stderr.strip()}")
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=False)


@pytest.mark.slow
def test_a_read_only_mount(tmp_path):
    (tmp_path / "source" / "existing").mkdir(parents=True)
    with read_only_bind_mount(tmp_path / "source", tmp_path / "mounted") as mounted:
        result = run_tool("train", "device=cpu", f"hydra.run.dir={mounted / 'new' / 'run'}", timeout=120)
        assert_one_error_line(result, f"hydra.run.dir={mounted / 'new' / 'run'} cannot be created: {mounted} is not writable (Read-only file system)")
        # an existing run directory (resuming) on it: cannot be written
        assert unwritable_because(str(mounted / "existing")) == f"cannot be written: {mounted / 'existing'} is not writable (Read-only file system)"


@pytest.mark.slow
def test_an_immutable_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    try:
        made = subprocess.run(["chattr", "+i", str(locked)], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no chattr command")
    if made.returncode != 0:
        pytest.skip(f"cannot make a directory immutable here: {made.stderr.strip()}")
    try:
        assert unwritable_because(str(locked / "run")) == f"cannot be created: {locked} is not writable (Operation not permitted)"
        result = run_tool("eval", "checkpoint=missing.pth", "device=cpu", f"hydra.run.dir={locked}", timeout=120)
        assert_one_error_line(result, f"hydra.run.dir={locked} cannot be written: {locked} is not writable (Operation not permitted)")
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=False)


def test_writable_directories_pass_and_leave_nothing_behind(tmp_path):
    assert unwritable_because(str(tmp_path / "a" / "b")) is None and unwritable_because(str(tmp_path)) is None
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert unwritable_because(str(tmp_path / "dangling" / "run")) == f"cannot be created: {tmp_path / 'dangling'} is a broken symbolic link, not a directory"
