"""Training checkpoints: written atomically, kept as last / best / every N epochs, found again on resume.

A checkpoint is one dict of plain types and tensors:
``model``, ``optimizer``, ``scheduler``, ``scaler`` (state_dicts), ``epoch`` (the epoch in progress),
``step`` (optimizer steps done in total), ``epoch_step`` (steps done in ``epoch``), ``rng`` (per-rank
random states), ``recipe`` (architecture facts, see ``models.weights.Recipe``), ``config`` (the
composed run config), ``best`` (best metric so far), ``history`` (per-epoch metrics).
"""
import glob
import logging
import os
import re
import tempfile
from typing import Any, Dict, List, Optional

import torch

from ..errors import CheckpointError
from ..models.weights import read_checkpoint

logger = logging.getLogger(__name__)

LAST = "checkpoint_last.pth"
BEST = "checkpoint_best.pth"
_EPOCH = re.compile(r"checkpoint_epoch(\d+)\.pth$")


def save_atomic(state: Dict[str, Any], path: str) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename over ``path``,
    so ``path`` always holds either the previous or the new complete checkpoint."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".pth", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def epoch_checkpoint_name(epoch: int) -> str:
    return f"checkpoint_epoch{epoch:04d}.pth"


def resume_candidates(run_dir: str) -> List[str]:
    """Checkpoints of a run directory, newest first: last, then per-epoch ones by epoch."""
    candidates = []
    last = os.path.join(run_dir, LAST)
    if os.path.isfile(last):
        candidates.append(last)
    epochs = []
    for path in glob.glob(os.path.join(run_dir, "checkpoint_epoch*.pth")):
        match = _EPOCH.search(path)
        if match:
            epochs.append((int(match.group(1)), path))
    candidates += [path for _, path in sorted(epochs, reverse=True)]
    return candidates


def load_resumable(path: str) -> Dict[str, Any]:
    """Read a training checkpoint and check that it can resume a run."""
    checkpoint = read_checkpoint(path, "resume")
    missing = [k for k in ("model", "optimizer", "scheduler", "epoch", "step") if k not in checkpoint]
    if missing:
        raise CheckpointError(
            f"resume={path} is not a training checkpoint of this framework (no {', '.join(missing)}); "
            "to start a new run from its weights use init_weights=PATH"
        )
    return checkpoint


def find_resume(run_dir: str) -> Optional[Dict[str, Any]]:
    """The newest readable training checkpoint of ``run_dir`` (with its ``path``), or None.

    Writes are atomic, so the last checkpoint is complete; an unreadable one (e.g. the disk was
    damaged) is reported and the next newest is tried rather than failing the resume.
    """
    for path in resume_candidates(run_dir):
        try:
            checkpoint = load_resumable(path)
        except (ValueError, OSError) as error:
            logger.warning("skipping unreadable checkpoint %s: %s", path, error)
            continue
        checkpoint["path"] = path
        return checkpoint
    return None


class CheckpointKeeper:
    """Writes a run's checkpoints: ``checkpoint_last.pth`` every time, ``checkpoint_best.pth``
    when the tracked metric improves, and ``checkpoint_epochNNNN.pth`` every ``keep_every``
    finished epochs (0: never). Only the main process writes."""

    def __init__(self, run_dir: str, keep_every: int = 0):
        self.run_dir = run_dir
        self.keep_every = keep_every

    def save(self, state: Dict[str, Any], *, finished_epoch: Optional[int], is_best: bool) -> List[str]:
        """Write ``state``; ``finished_epoch`` is the epoch that just ended (None within an epoch)."""
        written = [os.path.join(self.run_dir, LAST)]
        if is_best:
            written.append(os.path.join(self.run_dir, BEST))
        if finished_epoch is not None and self.keep_every and (finished_epoch + 1) % self.keep_every == 0:
            written.append(os.path.join(self.run_dir, epoch_checkpoint_name(finished_epoch)))
        for path in written:
            save_atomic(state, path)
        return written
