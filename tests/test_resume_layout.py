"""Where an interrupted epoch continues when a run resumes with another number of processes or batch size."""
import pytest

from deformable_detr.engine.resume_layout import ProcessLayout, continued_epoch_step
from deformable_detr.errors import CheckpointError


@pytest.mark.parametrize("saved, current, epoch_step, expected", [
    (ProcessLayout(2, 4), ProcessLayout(1, 8), 3, 3),   # the same images per step
    (ProcessLayout(1, 2), ProcessLayout(1, 1), 1, 2),   # half the batch: twice the steps
    (ProcessLayout(4, 2), ProcessLayout(2, 2), 5, 10),  # half the processes
    (ProcessLayout(1, 2), ProcessLayout(2, 2), 6, 3),
    (ProcessLayout(1, 2), ProcessLayout(2, 2), 0, 0),   # an epoch's start continues anywhere
])
def test_the_epoch_continues_after_exactly_the_images_seen(saved, current, epoch_step, expected):
    assert continued_epoch_step(0, epoch_step, saved, current, accumulate=1, path="run/checkpoint_last.pth") == expected


def test_an_epoch_that_cannot_continue_says_how_to_resume():
    with pytest.raises(CheckpointError, match=r"stopped after 6 images of epoch 3 with 1 process\(es\) x batch 2; 2 process\(es\) x batch 2 "
                                              r".*resume with 1 process\(es\) and dataset\.batch_size=1 "):
        continued_epoch_step(3, 3, ProcessLayout(1, 2), ProcessLayout(2, 2), accumulate=2, path="run/checkpoint_last.pth")
