"""Data-loader workers that leave SIGTERM and SIGINT to the main process.

Schedulers (SLURM, Kubernetes, torchrun's agent) and Ctrl-C signal a whole process group. PyTorch's
workers die of a SIGTERM that their parent did not send, and the main process then fails with
"DataLoader worker (pid N) is killed by signal: Terminated" before it can checkpoint; workers that
inherited the trainer's handler also report the stop once more each. Here workers drop both
signals, so only the main process decides how to stop. They still end as PyTorch ends them: when
the iterator shuts them down, on their parent's SIGTERM (``terminate()``, as PyTorch's own handler
allows), and when the main process dies (PyTorch's worker watchdog).
"""
import contextlib
import functools
import os
import signal
import threading
from typing import Callable, Optional

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# a thread that receives SIGTERM and tells who sent it: Linux; elsewhere SIGTERM is ignored
_SENDER_KNOWN = hasattr(signal, "sigwaitinfo") and hasattr(signal, "pthread_sigmask")


def leave_stop_signals_to_main(worker_id: int, then: Optional[Callable[[int], None]] = None) -> None:
    """A ``worker_init_fn``: SIGINT ignored; SIGTERM dropped unless the parent sends it (then the
    worker exits); then ``then(worker_id)``, the loader's own ``worker_init_fn``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _SENDER_KNOWN:
        # blocked in this thread and every thread it starts, so only the waiting thread receives it
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        threading.Thread(target=_exit_on_parents_sigterm, args=(os.getppid(),), name="sigterm", daemon=True).start()
    else:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        # the main process blocked it while starting this worker (see SignalSafeDataLoader)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if then is not None:
        then(worker_id)


def _exit_on_parents_sigterm(parent: int) -> None:
    """Receive this worker's SIGTERMs: the parent's (or any, once the parent is gone) ends it."""
    while True:
        sender = signal.sigwaitinfo({signal.SIGTERM}).si_pid
        if sender == parent or os.getppid() != parent:
            os._exit(0)


@contextlib.contextmanager
def stop_signals_blocked():
    """SIGTERM and SIGINT held back from the calling thread (and the processes and threads it starts)
    until the block ends, when those that arrived are delivered."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class SignalSafeDataLoader(torch.utils.data.DataLoader):
    """A ``torch.utils.data.DataLoader`` whose workers leave SIGTERM and SIGINT to this process (see
    the module's docstring); its own ``worker_init_fn``, if any, runs after that in each worker."""

    def __init__(self, dataset, *, worker_init_fn: Optional[Callable[[int], None]] = None, **kwargs):
        super().__init__(dataset, worker_init_fn=functools.partial(leave_stop_signals_to_main, then=worker_init_fn), **kwargs)

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        # a signal between a worker's start and its worker_init_fn would still kill it: held back until then
        with stop_signals_blocked():
            return super().__iter__()
