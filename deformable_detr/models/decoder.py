"""The deformable decoder: object queries self-attend, then sample the encoder memory around reference points.

Legend: N batch, Q queries, S value tokens, C channels, L levels.
"""
import copy
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import deformable_detr_ops

from .box_refinement import refine_boxes
from .deformable_attention import MSDeformAttn
from .dropout import Dropout, feed_forward_hidden


class DeformableDecoderLayer(nn.Module):
    """Post-norm layer: multi-head self-attention, deformable cross-attention, ReLU feed-forward."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index, memory_padding_mask=None):
        """tgt, query_pos (N, Q, C); reference_points (N, Q, L, 2|4); memory (N, S, C) -> (N, Q, C)."""
        q = tgt + query_pos
        tgt2 = self.query_self_attention(q, tgt)
        # norm2 before norm1: the official checkpoint names the self-attention's norm norm2 and the cross-attention's norm1
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index, memory_padding_mask)
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.linear2(feed_forward_hidden(self.linear1, self.dropout3, tgt))
        return self.norm3(tgt + self.dropout4(tgt2))

    def query_self_attention(self, q: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention of the queries: q (queries and keys) and value (N, Q, C) -> (N, Q, C).

        Under CPU autocast it runs in float32: PyTorch's CPU flash-attention backward is slower in
        bfloat16 than in float32 with 16 channels per head and no faster with 32, and these few
        hundred queries are a small share of the compute (docs/benchmarks.md, Design measurements).
        """
        if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return self._self_attention(q.float(), value.float())
        return self._self_attention(q, value)

    def _self_attention(self, q: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        attention = self.self_attn
        if attention.training and attention.dropout > 0 and q.device.type == "cpu":
            return attention_with_dropout(attention, q, value)
        return attention(q, q, value, need_weights=False)[0]


def attention_with_dropout(attention: nn.MultiheadAttention, q: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``attention(q, q, value, need_weights=False)[0]`` in training, written out so that the dropout
    of the attention weights is ``deformable_detr_ops.dropout``: with dropout, PyTorch's CPU
    attention takes its plain path (products, softmax, dropout, product) and draws the mask with
    ``bernoulli_``, one element at a time, a slow share of each layer's step (docs/benchmarks.md,
    Design measurements); the rest is the same computation. Other random numbers, the same
    distribution.

    attention: batch_first, packed input projection (as built above). q, value (N, Q, C) -> (N, Q, C).
    """
    n, queries, channels = q.shape
    heads = attention.num_heads
    head_channels = channels // heads
    weight, bias = attention.in_proj_weight, attention.in_proj_bias
    # queries and keys from the same input: one product for both
    qk = F.linear(q, weight[: 2 * channels], bias[: 2 * channels]).view(n, queries, 2, heads, head_channels)
    query_heads, key_heads = qk.permute(2, 0, 3, 1, 4).unbind(0)  # (N, H, Q, D) each
    value_heads = F.linear(value, weight[2 * channels:], bias[2 * channels:])
    value_heads = value_heads.view(n, queries, heads, head_channels).transpose(1, 2)
    weights = torch.softmax((query_heads * head_channels ** -0.5) @ key_heads.transpose(-2, -1), dim=-1)
    weights = deformable_detr_ops.dropout(weights, attention.dropout, True)  # (N, H, Q, Q)
    output = (weights @ value_heads).transpose(1, 2).reshape(n, queries, channels)
    return attention.out_proj(output)


class DeformableDecoder(nn.Module):
    """A stack of decoder layers returning every layer's output and reference.

    With iterative bounding box refinement, layer l's box head predicts a correction of its
    reference box; the corrected box is layer l's predicted box and, detached (so each layer
    learns its own correction), the reference of layer l + 1. The heads are passed to
    ``forward`` rather than owned here: they belong to the detector, which takes the corrected
    boxes from here as its box outputs instead of applying the heads a second time.
    """

    def __init__(self, layer: DeformableDecoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])
        self.num_layers = num_layers

    def forward(
        self,
        tgt: torch.Tensor,
        reference_points: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        valid_ratios: torch.Tensor,
        query_pos: torch.Tensor,
        memory_padding_mask: Optional[torch.Tensor] = None,
        box_heads: Optional[Sequence[nn.Module]] = None,
    ):
        """
        Args:
            tgt, query_pos: (N, Q, C) content queries and their positional part.
            reference_points: (N, Q, 2) points or (N, Q, 4) boxes, normalized to the valid image.
            memory: (N, S, C); valid_ratios (N, L, 2); memory_padding_mask (N, S).
            box_heads: one box head per layer for iterative refinement, or None.
        Returns:
            hidden states (num_layers, N, Q, C) and the references after each layer
            (num_layers, N, Q, 2|4). Without ``box_heads`` every entry is the initial reference.
            With them entry l is layer l's corrected box (N, Q, 4) in [0, 1], kept in the graph
            (its loss trains layer l's head and hidden state, and the initial reference for l = 0);
            layer l + 1 receives it detached.
        """
        output = tgt
        hidden_states, references = [], []
        for index, layer in enumerate(self.layers):
            # the valid image occupies valid_ratios of each padded level: scale into it
            if reference_points.shape[-1] == 4:
                scale = torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            else:
                scale = valid_ratios[:, None]
            reference_input = reference_points[:, :, None] * scale
            output = layer(output, query_pos, reference_input, memory, spatial_shapes, level_start_index, memory_padding_mask)
            if box_heads is not None:
                refined = refine_boxes(reference_points, box_heads[index](output))
                references.append(refined)
                reference_points = refined.detach()
            else:
                references.append(reference_points)
            hidden_states.append(output)
        return torch.stack(hidden_states), torch.stack(references)
