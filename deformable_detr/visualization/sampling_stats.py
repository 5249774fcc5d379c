"""Summary statistics of where and how strongly deformable attention samples, per recorded layer.

Legend: N batch, Lq queries, M heads, L levels, P points per head and level.
"""
from typing import Dict

import torch

from ..models.sampling_recorder import SamplingRecord

NEAR_ZERO = 1e-3


def _summary(values: torch.Tensor) -> Dict[str, float]:
    values = values.double().flatten()
    return {"min": float(values.min()), "max": float(values.max()), "mean": float(values.mean()), "std": float(values.std(unbiased=False))}


def sampling_statistics(record: SamplingRecord, batch_index: int = 0) -> Dict[str, object]:
    """Statistics over every query, head and point of one image of ``record``.

    Returns a dict with
        ``queries``, ``heads``, ``levels``, ``points``: the sizes Lq, M, L, P;
        ``offset_pixels``: per level ``level<l>``, the distance from the reference point (its centre for box
        references) to the sampling point, in pixels of that level's feature map: min, max, mean, std;
        ``attention_weights``: min, max, mean; ``entropy``: the mean over queries and heads of the entropy (nats)
        of each head's distribution over its L * P points (log(L * P) is uniform, 0 one point);
        ``near_zero_share``: the share of weights below 1e-3;
        ``outside_share``: the share of sampling points outside [0, 1] of their level's map (they read zeros);
        ``outside_valid_share``: the share outside the unpadded part of the map (they read padding, also zeros).
    """
    locations = record.sampling_locations[batch_index].double()  # (Lq, M, L, P, 2)
    weights = record.attention_weights[batch_index].double()  # (Lq, M, L, P)
    queries, heads, levels, points, _ = locations.shape
    sizes = record.spatial_shapes.flip(-1).to(locations)  # (L, 2) (W_l, H_l)
    centres = record.reference_points[batch_index, :, :, :2].double()  # (Lq, L, 2), in each level's padded coordinates
    offsets = (locations - centres[:, None, :, None, :]) * sizes[None, None, :, None, :]
    distance = offsets.norm(dim=-1)  # (Lq, M, L, P)
    per_head = weights.flatten(2)  # (Lq, M, L * P)
    entropy = -(per_head * per_head.clamp_min(1e-30).log()).sum(-1)
    ratios = record.valid_ratios()[batch_index].to(locations)  # (L, 2)
    outside = ((locations < 0) | (locations > 1)).any(-1)
    outside_valid = ((locations < 0) | (locations > ratios[None, None, :, None, :])).any(-1)
    return {
        "queries": queries,
        "heads": heads,
        "levels": levels,
        "points": points,
        "offset_pixels": {f"level{level}": _summary(distance[:, :, level]) for level in range(levels)},
        "attention_weights": {
            "min": float(weights.min()),
            "max": float(weights.max()),
            "mean": float(weights.mean()),
            "entropy": float(entropy.mean()),
            "near_zero_share": float((weights < NEAR_ZERO).double().mean()),
        },
        "outside_share": float(outside.double().mean()),
        "outside_valid_share": float(outside_valid.double().mean()),
    }
