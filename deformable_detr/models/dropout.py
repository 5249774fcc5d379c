"""The transformer's dropout layer: ``nn.Dropout`` through the op package's one-pass CPU kernel."""
import torch
from torch import nn

import deformable_detr_ops


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same arguments, no state) computed by ``deformable_detr_ops.dropout``: on the
    CPU one pass with a hashed mask, several times faster than PyTorch's and storing no mask for
    the backward; elsewhere ``torch.nn.functional.dropout``. Same distribution, other random
    numbers; ``torch.manual_seed`` still makes runs reproducible. ``inplace`` is not used: the
    kernel writes a new tensor."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """input (*) -> (*), unchanged in eval mode."""
        return deformable_detr_ops.dropout(input, self.p, self.training)
