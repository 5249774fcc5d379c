"""Deformable DETR: backbone -> per-level input projections -> deformable transformer -> class/box heads.

Legend: B batch, Q queries, K classes (class index = dataset category id), S encoder tokens.
"""
import copy
import math
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import Backbone, downsample_mask
from .box_refinement import refine_boxes
from .deformable_transformer import DeformableTransformer


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class DeformableDETR(nn.Module):
    """The detector.

    Args:
        backbone: returns (feature, mask) per level (see ``Backbone``), with ``num_channels``.
        position_encoding: (feature, mask) -> (B, C, H, W) positional embedding.
        transformer: the ``DeformableTransformer``; its ``num_feature_levels`` and ``two_stage`` rule
            (two-stage: initial boxes and queries from encoder proposals).
        num_classes: K, the largest category id + 1 (91 for COCO).
        num_queries: Q (also the number of two-stage proposals).
        aux_loss: also return every decoder layer's predictions.
        with_box_refine: each decoder layer refines the boxes with its own heads.

    The heads: ``class_embed`` and ``bbox_embed`` hold one head per decoder layer (plus one for the
    encoder proposals in two-stage mode). Without refinement they are the same module repeated,
    as in the official checkpoints, where they appear once per layer with tied values.
    """

    def __init__(
        self,
        backbone: Backbone,
        position_encoding: nn.Module,
        transformer: DeformableTransformer,
        num_classes: int,
        num_queries: int = 300,
        aux_loss: bool = True,
        with_box_refine: bool = False,
    ):
        super().__init__()
        two_stage = transformer.two_stage
        hidden_dim = transformer.d_model
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.num_feature_levels = transformer.num_feature_levels
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.backbone = backbone
        self.position_encoding = position_encoding
        self.transformer = transformer

        if len(backbone.num_channels) > self.num_feature_levels:
            raise ValueError(
                f"the backbone returns {len(backbone.num_channels)} levels but the transformer uses "
                f"{self.num_feature_levels}; build the backbone with return_interm_layers=False for single-scale"
            )
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)
        self.input_proj = self._input_projections(backbone.num_channels, hidden_dim, self.num_feature_levels)

        class_embed = nn.Linear(hidden_dim, num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        prior_prob = 0.01
        nn.init.constant_(class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.constant_(bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

        num_decoder_layers = transformer.decoder.num_layers
        num_pred = num_decoder_layers + 1 if two_stage else num_decoder_layers
        if with_box_refine:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
            # the first layer turns a point into a box: start its size small (sigmoid(-2) ~ 0.12);
            # later layers start from that box (a zero correction)
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
        else:
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            self.class_embed = nn.ModuleList(class_embed for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(bbox_embed for _ in range(num_pred))
        if two_stage:
            # two-stage references are already boxes: heads predict size corrections around 0
            for head in self.bbox_embed:
                nn.init.constant_(head.layers[-1].bias[2:], 0.0)

    @property
    def two_stage(self) -> bool:
        """Whether the transformer proposes the initial boxes and queries (its flag is the only one)."""
        return self.transformer.two_stage

    @staticmethod
    def _input_projections(in_channels: List[int], hidden_dim: int, num_levels: int) -> nn.ModuleList:
        """1x1 conv + GroupNorm per backbone level; extra 3x3 stride-2 levels when L > backbone levels."""
        projections = [nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim)) for c in in_channels]
        channels = in_channels[-1]
        for _ in range(num_levels - len(in_channels)):
            projections.append(
                nn.Sequential(nn.Conv2d(channels, hidden_dim, kernel_size=3, stride=2, padding=1), nn.GroupNorm(32, hidden_dim))
            )
            channels = hidden_dim
        return nn.ModuleList(projections)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> Dict:
        """
        Args:
            images: (B, 3, H, W) normalized, zero-padded at the bottom/right.
            mask: (B, H, W) bool, True on padding.
        Returns:
            ``pred_logits`` (B, Q, K) class logits (sigmoid, no background class);
            ``pred_boxes`` (B, Q, 4) (cx, cy, w, h) in [0, 1] of the unpadded image;
            ``aux_outputs``: the same two keys for every decoder layer but the last (when aux_loss);
            ``enc_outputs``: the encoder proposals' ``pred_logits`` (B, S, K) and ``pred_boxes`` (two-stage).
        """
        features = self.backbone(images, mask)
        srcs, masks, pos = [], [], []
        for level, (feature, feature_mask) in enumerate(features):
            srcs.append(self.input_proj[level](feature))
            masks.append(feature_mask)
            pos.append(self.position_encoding(feature, feature_mask).to(feature.dtype))
        for level in range(len(features), self.num_feature_levels):
            # the first extra level downsamples the last backbone map, later ones the previous extra level
            src = self.input_proj[level](features[-1][0] if level == len(features) else srcs[-1])
            level_mask = downsample_mask(mask, src.shape[-2:])
            srcs.append(src)
            masks.append(level_mask)
            pos.append(self.position_encoding(src, level_mask).to(src.dtype))

        hidden_states, init_reference, references, enc_class, enc_coord_unact = self.transformer(
            srcs,
            masks,
            pos,
            query_embed=None if self.two_stage else self.query_embed.weight,
            box_heads=self.bbox_embed if self.with_box_refine else None,
            proposal_class_head=self.class_embed[-1] if self.two_stage else None,
            proposal_box_head=self.bbox_embed[-1] if self.two_stage else None,
            num_proposals=self.num_queries if self.two_stage else None,
        )

        logits, boxes = [], []
        for layer in range(hidden_states.shape[0]):
            if self.with_box_refine:
                # the decoder applied this layer's box head to correct its reference: that box (kept
                # in the graph there) is the output, so each head runs once per layer
                boxes.append(references[layer])
            else:
                reference = init_reference if layer == 0 else references[layer - 1]
                boxes.append(refine_boxes(reference, self.bbox_embed[layer](hidden_states[layer])))
            logits.append(self.class_embed[layer](hidden_states[layer]))

        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        if self.two_stage:
            out["enc_outputs"] = {"pred_logits": enc_class, "pred_boxes": enc_coord_unact.sigmoid()}
        return out
