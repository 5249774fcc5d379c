"""Training checkpoints: written atomically, kept as last / best / every N epochs, found again on resume.

A training checkpoint is one dict of plain types and tensors:
``model``, ``optimizer``, ``scheduler``, ``scaler``, ``ema`` (state_dicts), ``epoch`` (the epoch in
progress), ``step`` (optimizer steps done in total), ``epoch_step`` (steps done in ``epoch``), ``rng``
(per-rank random states), ``recipe`` (architecture facts, see ``models.weights.Recipe``), ``config``
(the composed run config), ``categories`` (the dataset's ``[{id, name}]``), ``best`` (best metric so
far), ``history`` (per-epoch metrics). ``checkpoint_last.pth`` and the per-epoch files hold all of
it; ``checkpoint_best.pth`` is a release file: the weights that scored best (the EMA weights when
EMA is on) and what describes them, without the optimizer state.
"""
import errno
import glob
import logging
import os
import re
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..data.category_diff import category_differences
from ..errors import CheckpointError, DiskFullError
from ..models.weights import Recipe, read_checkpoint
from ..utils.atomic_files import replace_atomically, umask_permissions
from ..utils.disk_space import disk_full_errno, format_bytes, free_bytes

logger = logging.getLogger(__name__)

LAST = "checkpoint_last.pth"
BEST = "checkpoint_best.pth"
_EPOCH = re.compile(r"checkpoint_epoch(\d+)\.pth$")
TEMP_PREFIX = ".tmp_"
# what save_atomic's temporary files are called: tempfile's 8 random characters between these
_TEMP = re.compile(r"^\.tmp_[a-z0-9_]{8}\.pth$")
# the keys of a training state that a release file (the best checkpoint) leaves out
RESUME_ONLY = ("optimizer", "scheduler", "scaler", "rng", "epoch_step", "world_size", "batch_size", "evaluations_without_improvement",
               "stopped_early")


def save_atomic(state: Dict[str, Any], path: str, last_good: Optional[str] = None) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename over ``path``,
    so ``path`` always holds either the previous or the new complete checkpoint. The finished
    file gets the permissions the umask gives (the temporary file is private until then).

    A full disk or quota raises ``DiskFullError`` naming ``path``, the space needed and free, and
    the checkpoint that stays usable: ``last_good`` (default: the previous ``path``, if any). The
    temporary file is removed whatever went wrong.
    """
    try:
        replace_atomically(path, lambda stream: torch.save(state, stream), binary=True, prefix=TEMP_PREFIX, suffix=".pth",
                           permissions=umask_permissions())
    except Exception as error:
        code = disk_full_errno(error)
        if code is None:
            raise
        raise _disk_full_error(state, path, code, last_good) from error


_DISK_FULL_FIXES = {
    errno.ENOSPC: "free space on that disk",
    errno.EDQUOT: "free space within your quota or have it raised",
    errno.EFBIG: "lift the file-size limit (ulimit -f) or move the run to a file system that takes larger files",
}


def _disk_full_error(state: Dict[str, Any], path: str, code: int, last_good: Optional[str]) -> DiskFullError:
    """The one line for a checkpoint that did not fit: what was written, the room it needs (the
    state's tensor bytes, or the previous file's size when that is larger) and has, what is kept."""
    needed = max(_tensor_bytes(state), os.path.getsize(path) if os.path.isfile(path) else 0)
    free = free_bytes(path)
    room = f"it needs about {format_bytes(needed)}" + (f", {format_bytes(free)} free there" if free is not None else "")
    last_good = last_good or (path if os.path.isfile(path) else None)
    kept = (f"the last good checkpoint, {last_good}, is kept intact" if last_good
            else "no earlier checkpoint of this run exists to keep")
    error = DiskFullError(
        f"cannot write checkpoint {path}: {os.strerror(code).lower()} ({room}); {kept}: "
        f"{_DISK_FULL_FIXES.get(code, _DISK_FULL_FIXES[errno.ENOSPC])}, then resume=auto continues the run from its last good checkpoint"
    )
    error.errno = code  # set apart: OSError's two-argument form would prefix the message with it
    return error


def _tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in a (nested) state: about what torch.save writes."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(item) for item in value)
    return 0


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


def check_same_run(checkpoint: Dict[str, Any], recipe: Recipe, categories: Optional[List[Dict[str, Any]]]) -> None:
    """A CheckpointError unless ``checkpoint`` (with its ``path``) can continue a run that builds
    ``recipe`` on a dataset of ``categories`` (``[{id, name}]``; None: not checked)."""
    path = checkpoint.get("path", "the checkpoint")
    saved_categories = checkpoint.get("categories")
    differences = category_differences(saved_categories, categories, names=("checkpoint", "run's dataset")) \
        if saved_categories is not None and categories is not None else []
    if differences:
        raise CheckpointError(
            f"resume={path} was trained on other categories than this run's dataset: {'; '.join(differences)}. "
            f"Resume with the dataset it was trained on, or start a new run from its weights with init_weights={path}"
        )
    saved = Recipe(**checkpoint.get("recipe", {}))
    if checkpoint.get("recipe") and saved != recipe:
        raise CheckpointError(
            f"resume={path} was trained as {saved.name()} ({saved.describe()}, {saved.num_classes} classes) "
            f"but this run builds {recipe.name()} ({recipe.describe()}, {recipe.num_classes} classes); "
            "resume with the run's original config or start a new run directory"
        )


def remove_stale_temporaries(run_dir: str) -> List[Tuple[str, int]]:
    """Delete the temporary files that interrupted saves left in ``run_dir`` (only files of
    ``save_atomic``'s naming); call it while holding the run directory's lock. Returns their
    paths and sizes in bytes."""
    removed = []
    for name in sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []:
        path = os.path.join(run_dir, name)
        if _TEMP.match(name) and os.path.isfile(path):
            size = os.path.getsize(path)
            os.unlink(path)
            removed.append((path, size))
    return removed


def refuse_to_overwrite(run_dir: str) -> None:
    """A run about to start from scratch in ``run_dir`` must not replace checkpoints of an
    earlier run there unless asked (``overwrite=true``)."""
    existing = [name for name in (BEST, LAST) if os.path.isfile(os.path.join(run_dir, name))]
    if existing:
        raise CheckpointError(
            f"hydra.run.dir={run_dir} already holds {' and '.join(existing)} of an earlier run that this run would overwrite; "
            "resume=auto continues it, overwrite=true starts over and replaces them, or choose another hydra.run.dir"
        )


def find_resume(run_dir: str) -> Optional[Dict[str, Any]]:
    """The newest readable training checkpoint of ``run_dir`` (with its ``path``), or None when
    the directory holds no checkpoint at all.

    Writes are atomic, so the last checkpoint is complete unless something else damaged it; an
    unreadable one is reported and the next newest is tried. When checkpoints exist but none can
    resume the run, this raises rather than let the run silently start over.
    """
    problems = []
    for path in resume_candidates(run_dir):
        try:
            checkpoint = load_resumable(path)
        except (CheckpointError, OSError) as error:
            logger.warning("skipping unreadable checkpoint %s: %s", path, error)
            problems.append(os.path.basename(path))
            continue
        checkpoint["path"] = path
        return checkpoint
    if problems:
        raise CheckpointError(
            f"hydra.run.dir={run_dir} holds checkpoints but none can resume the run ({', '.join(problems)} unreadable); "
            "resume=PATH continues from another file, resume=null overwrite=true starts the run over in this directory"
        )
    return None


def release_state(state: Dict[str, Any]) -> Dict[str, Any]:
    """A training state without what only resuming needs: the best checkpoint's content.
    With EMA its ``model`` is the EMA weights (those that were evaluated)."""
    release = {k: v for k, v in state.items() if k not in RESUME_ONLY and k != "ema"}
    if state.get("ema") is not None:
        release["model"] = state["ema"]["model"]
        release["raw_model"] = state["model"]
    return release


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
        # what a full disk leaves usable: the newest resumable checkpoint, this save's once written
        last_good = next(iter(resume_candidates(self.run_dir)), None)
        for path in written:
            save_atomic(release_state(state) if path.endswith(BEST) else state, path, last_good)
            last_good = last_good if path.endswith(BEST) else path
        return written
