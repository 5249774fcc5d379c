"""The transformer's dropout layer, and its feed-forward hidden layer, through the op package's
one-pass CPU kernels."""
import torch
from torch import nn

import deformable_detr_ops


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same arguments, no state) computed by ``deformable_detr_ops.dropout``: on the
    CPU one pass with a hashed mask, faster than PyTorch's (docs/benchmarks.md, Design
    measurements) and storing no mask for the backward; elsewhere ``torch.nn.functional.dropout``. Same distribution, other random
    numbers; ``torch.manual_seed`` still makes runs reproducible. ``inplace`` is not used: the
    kernel writes a new tensor."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """input (*) -> (*), unchanged in eval mode."""
        return deformable_detr_ops.dropout(input, self.p, self.training)


def feed_forward_hidden(linear: nn.Linear, dropout: nn.Dropout, input: torch.Tensor) -> torch.Tensor:
    """``dropout(relu(linear(input)))``, the hidden layer of a feed-forward network, through
    ``deformable_detr_ops.linear_relu_dropout``: on the CPU in training the bias, ReLU and dropout
    are one pass over the (often largest) activation of the layer, with the same values (see there).

    input (*, C_in) -> (*, C_out) for ``linear`` C_in -> C_out; ``dropout`` gives p and the mode."""
    return deformable_detr_ops.linear_relu_dropout(input, linear.weight, linear.bias, dropout.p, dropout.training)
