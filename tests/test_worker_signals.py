"""Data-loader workers leave SIGTERM and SIGINT to the main process, and still end with it."""
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cli import ROOT
from deformable_detr.data.worker_signals import SignalSafeDataLoader, stop_signals_blocked

pytestmark = pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="POSIX signals with their sender (Linux)")


class WorkerPids(torch.utils.data.Dataset):
    """Item i: (i, the pid of the process that loaded it, what ``mark`` set in that process)."""

    def __len__(self):
        return 64

    def __getitem__(self, index):
        time.sleep(0.01)
        return index, os.getpid(), os.environ.get("MARKED_BY_INIT")


def mark(worker_id):
    os.environ["MARKED_BY_INIT"] = str(worker_id)


def running(pid):
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_drop_stop_signals_from_others_but_end_on_their_parents():
    loader = SignalSafeDataLoader(WorkerPids(), batch_size=None, num_workers=2, worker_init_fn=mark)
    iterator = iter(loader)
    first = [next(iterator) for _ in range(2)]
    workers = [pid for _, pid, _ in first]
    assert len(set(workers)) == 2 and os.getpid() not in workers
    assert [marked for _, _, marked in first] == ["0", "1"]  # the loader's own worker_init_fn ran after
    # a scheduler's SIGTERM to the process group, and Ctrl-C's SIGINT, sent by another process
    subprocess.run(["kill", "-TERM", *map(str, workers)], check=True)
    subprocess.run(["kill", "-INT", *map(str, workers)], check=True)
    time.sleep(0.5)
    assert [index for index, _, _ in iterator] == list(range(2, 64))
    # the parent's SIGTERM (as multiprocessing's terminate() at exit sends it) still ends a worker
    iterator = iter(loader)
    worker = next(iterator)[1]
    os.kill(worker, signal.SIGTERM)
    process = next(p for p in multiprocessing.active_children() if p.pid == worker)
    process.join(timeout=10)
    assert process.exitcode == 0
    del iterator


@pytest.mark.slow
@pytest.mark.parametrize("end", ["exit", "kill"])
def test_workers_end_with_the_main_process(tmp_path, end):
    """``exit``: the interpreter exits with an iterator still alive (multiprocessing then terminates
    and joins the workers, which would wait forever on workers that ignore SIGTERM); ``kill``: the
    main process dies at once (PyTorch's watchdog ends the workers within seconds)."""
    script = tmp_path / "main.py"
    script.write_text(
        "import os, signal, sys\n"
        "from test_worker_signals import WorkerPids\n"
        "from deformable_detr.data.worker_signals import SignalSafeDataLoader\n"
        "iterator = iter(SignalSafeDataLoader(WorkerPids(), batch_size=None, num_workers=2))\n"
        "print(*sorted({next(iterator)[1] for _ in range(4)}), flush=True)\n"
        f"os.kill(os.getpid(), signal.SIGKILL) if {end == 'kill'} else sys.exit(0)\n"
    )
    environment = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests"))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=environment)
    assert result.returncode == (-signal.SIGKILL if end == "kill" else 0), result.stderr
    workers = [int(pid) for pid in result.stdout.split()]
    assert len(workers) == 2
    deadline = time.monotonic() + 15
    while any(map(running, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(running, workers))


def test_stop_signals_are_held_back_while_workers_start():
    before = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    with stop_signals_blocked():
        held = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    assert {signal.SIGTERM, signal.SIGINT} <= held
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == before
