"""A box head's correction of a reference, in logit space: the one step of iterative box refinement
(the decoder) and of the detector's box outputs without it."""
import torch

from ..utils.box_ops import inverse_sigmoid


def refine_boxes(reference: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """sigmoid(delta + inverse_sigmoid(reference)): the reference corrected by a box head's output.

    Args:
        reference: (..., 4) boxes (cx, cy, w, h) or (..., 2) points (x, y), in [0, 1].
        delta: (..., 4) the box head's output, in logit space.
    Returns:
        (..., 4) boxes in [0, 1]; a point reference becomes a box whose size is the head's from scratch.
    """
    if reference.shape[-1] == 4:
        return (delta + inverse_sigmoid(reference)).sigmoid()
    return torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1).sigmoid()
