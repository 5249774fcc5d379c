import itertools

import pytest
import torch

from deformable_detr.models import HungarianMatcher
from deformable_detr.utils.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


def random_boxes(n, generator):
    centre = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
    size = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
    return torch.cat([centre, size], -1)


def official_cost(matcher, logits, boxes, labels, tgt_boxes):
    """The cost of one image written out term by term: (Q, T)."""
    prob = logits.sigmoid()
    neg = 0.75 * prob**2 * -(1 - prob + 1e-8).log()
    pos = 0.25 * (1 - prob) ** 2 * -(prob + 1e-8).log()
    cost_class = pos[:, labels] - neg[:, labels]
    cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)
    cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
    return matcher.cost_bbox * cost_bbox + matcher.cost_class * cost_class + matcher.cost_giou * cost_giou


@pytest.mark.parametrize("num_queries,counts", [(4, [3, 0, 4]), (5, [1, 2]), (3, [3])])
def test_matching_is_the_brute_force_optimum(num_queries, counts):
    generator = torch.Generator().manual_seed(num_queries)
    matcher = HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2)
    logits = torch.randn(len(counts), num_queries, 6, generator=generator)
    boxes = torch.stack([random_boxes(num_queries, generator) for _ in counts])
    targets = [{"labels": torch.randint(0, 6, (t,), generator=generator), "boxes": random_boxes(t, generator)} for t in counts]

    indices = matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)

    for b, (t, (rows, cols)) in enumerate(zip(targets, indices)):
        assert rows.dtype == cols.dtype == torch.int64
        assert len(rows) == len(cols) == min(num_queries, len(t["labels"]))
        cost = official_cost(matcher, logits[b], boxes[b], t["labels"], t["boxes"])
        if len(t["labels"]) == 0:
            continue
        best = min(
            sum(cost[q, j] for j, q in enumerate(perm)) for perm in itertools.permutations(range(num_queries), len(t["labels"]))
        )
        assert float(cost[rows, cols].sum()) == pytest.approx(float(best), abs=1e-5)
        assert sorted(cols.tolist()) == list(range(len(t["labels"])))


def test_batched_costs_equal_the_per_image_costs():
    generator = torch.Generator().manual_seed(1)
    matcher = HungarianMatcher()
    logits = torch.randn(3, 7, 5, generator=generator)
    boxes = torch.stack([random_boxes(7, generator) for _ in range(3)])
    targets = [{"labels": torch.randint(0, 5, (t,), generator=generator), "boxes": random_boxes(t, generator)} for t in (2, 5, 0)]
    costs = matcher.cost_matrices({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert costs.shape == (3, 7, 5)
    for b, t in enumerate(targets):
        expected = official_cost(matcher, logits[b], boxes[b], t["labels"], t["boxes"])
        torch.testing.assert_close(costs[b, :, : len(t["labels"])], expected, rtol=1e-5, atol=1e-5)


def test_no_targets_anywhere():
    matcher = HungarianMatcher()
    outputs = {"pred_logits": torch.randn(2, 4, 3), "pred_boxes": torch.rand(2, 4, 4)}
    targets = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)} for _ in range(2)]
    for rows, cols in matcher(outputs, targets):
        assert rows.numel() == 0 and cols.numel() == 0


def test_all_zero_weights_are_rejected():
    with pytest.raises(ValueError, match="non-zero"):
        HungarianMatcher(0, 0, 0)
