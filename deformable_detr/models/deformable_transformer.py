"""The deformable transformer: flattens the feature pyramid, encodes it, and decodes object queries.

Legend: N batch, S = sum_l H_l * W_l tokens, C channels (d_model), L levels, Q queries.
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .decoder import DeformableDecoder, DeformableDecoderLayer
from .deformable_attention import MSDeformAttn
from .encoder import DeformableEncoder, DeformableEncoderLayer
from .valid_ratios import valid_ratios, valid_sizes


class DeformableTransformer(nn.Module):
    """Encoder + decoder with reference points, optionally two-stage.

    Single-stage, the queries are learned embeddings whose positional half predicts a 2-d reference
    point. Two-stage, every encoder pixel proposes a box; the top-Q proposals become the initial
    reference boxes and, through a sine embedding, the queries.

    Args:
        d_model: C. nhead: heads. num_encoder_layers, num_decoder_layers: depths.
        dim_feedforward: FFN width. dropout: dropout everywhere.
        num_feature_levels: L. enc_n_points, dec_n_points: sampling points per head and level.
        two_stage: use encoder proposals (the detector reads this flag; Q comes with ``forward``).
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        num_feature_levels: int = 4,
        dec_n_points: int = 4,
        enc_n_points: int = 4,
        two_stage: bool = False,
    ):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        self.num_feature_levels = num_feature_levels
        self.two_stage = two_stage
        encoder_layer = DeformableEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points)
        self.encoder = DeformableEncoder(encoder_layer, num_encoder_layers)
        decoder_layer = DeformableDecoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead, dec_n_points)
        self.decoder = DeformableDecoder(decoder_layer, num_decoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self.reset_parameters()

    def reset_parameters(self):
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    @staticmethod
    def shapes_tensor(level_shapes: Sequence[Tuple[int, int]], device: torch.device) -> torch.Tensor:
        """(H_l, W_l) per level -> (L, 2) int64 ``spatial_shapes``.

        Built from one scalar tensor per size rather than ``torch.as_tensor(level_shapes)``, which
        ``torch.export`` can only trace by fixing the sizes to those of the example input.
        """
        sizes = [torch.scalar_tensor(size, dtype=torch.long, device=device) for shape in level_shapes for size in shape]
        return torch.stack(sizes).view(len(level_shapes), 2)

    def proposal_pos_embed(self, proposals: torch.Tensor) -> torch.Tensor:
        """(N, Q, 4) unnormalized (logit) boxes -> (N, Q, 2C) sine embedding of the box (C/2 per coordinate)."""
        num_pos_feats, temperature, scale = self.d_model // 2, 10000, 2 * math.pi
        dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
        dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
        pos = proposals.sigmoid() * scale
        pos = pos[:, :, :, None] / dim_t
        return torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)

    def encoder_proposals(self, memory: torch.Tensor, padding_mask: torch.Tensor, level_shapes: Sequence[Tuple[int, int]]):
        """One proposal per encoder pixel: a box at the pixel centre, 0.05 * 2^level wide.

        ``level_shapes``: (H_l, W_l) per level as Python ints (symbolic sizes under ``torch.export``);
        an (L, 2) tensor is read on the host.

        Returns the projected memory (N, S, C) (padding and border pixels zeroed) and the proposals
        (N, S, 4) as logits, +inf where invalid (padding, or centre/size outside (0.01, 0.99)).
        """
        if isinstance(level_shapes, torch.Tensor):
            level_shapes = level_shapes.tolist()
        n = memory.shape[0]
        proposals = []
        start = 0
        for level, (h, w) in enumerate(level_shapes):
            valid_h, valid_w = valid_sizes(padding_mask[:, start : start + h * w].view(n, h, w))
            # pixel indices 0 .. h - 1: the same float32 numbers as linspace(0, h - 1, h), sized by h alone
            grid_y, grid_x = torch.meshgrid(
                torch.arange(h, dtype=torch.float32, device=memory.device),
                torch.arange(w, dtype=torch.float32, device=memory.device),
                indexing="ij",
            )
            grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
            scale = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(n, 1, 1, 2)
            grid = (grid.unsqueeze(0).expand(n, -1, -1, -1) + 0.5) / scale
            wh = torch.ones_like(grid) * 0.05 * (2.0**level)
            proposals.append(torch.cat((grid, wh), -1).view(n, -1, 4))
            start += h * w
        proposals = torch.cat(proposals, 1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        proposals = proposals.masked_fill(padding_mask.unsqueeze(-1), float("inf"))
        proposals = proposals.masked_fill(~valid, float("inf"))
        output_memory = memory.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        output_memory = output_memory.masked_fill(~valid, 0.0)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        return output_memory, proposals

    def forward(
        self,
        srcs: List[torch.Tensor],
        masks: List[torch.Tensor],
        pos_embeds: List[torch.Tensor],
        query_embed: Optional[torch.Tensor] = None,
        box_heads: Optional[Sequence[nn.Module]] = None,
        proposal_class_head: Optional[nn.Module] = None,
        proposal_box_head: Optional[nn.Module] = None,
        num_proposals: Optional[int] = None,
    ):
        """
        Args:
            srcs: L maps (N, C, H_l, W_l); masks: L masks (N, H_l, W_l) True on padding;
            pos_embeds: L maps (N, C, H_l, W_l).
            query_embed: (Q, 2C) learned queries (positional half, content half); single-stage only.
            box_heads: per decoder layer box heads for iterative refinement, or None.
            proposal_class_head, proposal_box_head: the heads scoring and regressing encoder proposals
                (two-stage only).
            num_proposals: Q, the number of encoder proposals that become queries (two-stage only).
        Returns:
            hidden states (num_decoder_layers, N, Q, C), initial references (N, Q, 2|4), references
            after each layer (num_decoder_layers, N, Q, 2|4; with ``box_heads`` the refined boxes,
            see ``DeformableDecoder.forward``), and in two-stage mode the encoder
            proposals' logits (N, S, num_classes) and unnormalized boxes (N, S, 4) (else None, None).
        """
        if len(srcs) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature levels, got {len(srcs)}")
        src_flatten, mask_flatten, pos_flatten, level_shapes = [], [], [], []
        for level, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
            # sizes stay Python (or, under torch.export, symbolic) ints: nothing below reads a
            # shape back from a tensor, which would make the graph depend on data
            level_shapes.append((src.shape[-2], src.shape[-1]))
            src_flatten.append(src.flatten(2).transpose(1, 2))
            mask_flatten.append(mask.flatten(1))
            pos_flatten.append(pos.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1))
        src_flatten = torch.cat(src_flatten, 1)
        mask_flatten = torch.cat(mask_flatten, 1)
        pos_flatten = torch.cat(pos_flatten, 1)
        spatial_shapes = self.shapes_tensor(level_shapes, src_flatten.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        ratios = valid_ratios(masks)

        memory = self.encoder(src_flatten, spatial_shapes, level_start_index, ratios, pos_flatten, mask_flatten, level_shapes)

        n, _, c = memory.shape
        enc_class = enc_coord_unact = None
        if self.two_stage:
            if proposal_class_head is None or proposal_box_head is None or num_proposals is None:
                raise ValueError("two-stage mode needs proposal_class_head, proposal_box_head and num_proposals")
            output_memory, output_proposals = self.encoder_proposals(memory, mask_flatten, level_shapes)
            enc_class = proposal_class_head(output_memory)
            enc_coord_unact = proposal_box_head(output_memory) + output_proposals
            # rank proposals by their first-class (foreground) logit, as the encoder loss trains it
            topk = torch.topk(enc_class[..., 0], num_proposals, dim=1)[1]
            topk_coords_unact = torch.gather(enc_coord_unact, 1, topk.unsqueeze(-1).repeat(1, 1, 4)).detach()
            reference_points = topk_coords_unact.sigmoid()
            pos_trans = self.pos_trans_norm(self.pos_trans(self.proposal_pos_embed(topk_coords_unact)))
            query_pos, tgt = torch.split(pos_trans, c, dim=2)
        else:
            if query_embed is None:
                raise ValueError("single-stage mode needs query_embed (Q, 2C)")
            query_pos, tgt = torch.split(query_embed, c, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(n, -1, -1)
            tgt = tgt.unsqueeze(0).expand(n, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()
        init_reference = reference_points

        hidden_states, references = self.decoder(
            tgt, reference_points, memory, spatial_shapes, level_start_index, ratios, query_pos, mask_flatten, box_heads
        )
        return hidden_states, init_reference, references, enc_class, enc_coord_unact
