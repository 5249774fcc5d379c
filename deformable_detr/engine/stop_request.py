"""Stops on SIGTERM and SIGINT: after the current step, with a checkpoint, on every rank, and with
an exit status that says so."""
import logging
import signal
from typing import Optional

import torch
import torch.distributed as dist

from ..utils import distributed

logger = logging.getLogger(__name__)


def stop_exit_status(signum: int) -> int:
    """The exit status of a run stopped by signal ``signum`` (once its checkpoint is written):
    128 + the signal's number, as shells report a process the signal killed, so 143 for SIGTERM
    and 130 for SIGINT; ``train && eval`` goes no further and a scheduler can requeue the run."""
    return 128 + signum


def describe_signal(signum: int) -> str:
    """E.g. ``SIGTERM (exit status 143)``."""
    return f"{signal.Signals(signum).name} (exit status {stop_exit_status(signum)})"


class StopRequest:
    """SIGTERM/SIGINT ask for a stop at the end of the current step (with a checkpoint); a second
    SIGINT interrupts at once. All ranks agree on stopping so none waits in a collective, and on
    the signal (``signum``; the highest number where ranks received different ones) so all of
    them exit with the same status."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:  # a scheduler may signal twice (the process and its group): said once
            logger.warning("signal %d: stopping after this step with a checkpoint (Ctrl-C again to abort)", signum)
        self.signum = max(signum, self.signum or 0)

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank was asked to stop (then ``signum`` is the agreed signal on every rank);
        a collective under torchrun."""
        if distributed.get_world_size() > 1:
            flag = torch.tensor([float(self.signum or 0)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.signum = int(flag.item()) or None
        return self.requested
