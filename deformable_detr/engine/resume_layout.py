"""Resuming with another number of processes or batch size: where the interrupted epoch continues."""
import dataclasses

from ..errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class ProcessLayout:
    """How a run deals out its images: ``world_size`` processes taking ``batch_size`` images each
    per optimizer step (the micro-batches of gradient accumulation together)."""

    world_size: int
    batch_size: int

    @property
    def images_per_step(self) -> int:
        return self.world_size * self.batch_size


def continued_epoch_step(epoch: int, epoch_step: int, saved: ProcessLayout, current: ProcessLayout, *, accumulate: int,
                         path: str) -> int:
    """The step of ``epoch`` at which ``current`` continues an epoch that ``saved`` stopped after
    ``epoch_step`` steps: right after exactly the images already seen. The sampler deals one
    permutation round-robin, so those are its first ``epoch_step * saved.images_per_step``
    positions, and ``current`` can only continue when its images per step divide that count;
    otherwise a ``CheckpointError`` says how to resume (``accumulate``: this run's micro-batches
    per step; ``path``: the checkpoint)."""
    seen = epoch_step * saved.images_per_step
    if seen % current.images_per_step:
        raise CheckpointError(
            f"resume={path} stopped after {seen} images of epoch {epoch} with {saved.world_size} process(es) x batch {saved.batch_size}; "
            f"{current.world_size} process(es) x batch {current.batch_size} cannot continue that epoch without skipping or "
            f"repeating images: resume with {saved.world_size} process(es) and dataset.batch_size={saved.batch_size // accumulate} "
            "(trainer.accumulate_steps as before), or from a checkpoint written at the end of an epoch"
        )
    return seen // current.images_per_step
