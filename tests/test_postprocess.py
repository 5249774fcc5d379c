import pytest
import torch

from deformable_detr.models import PostProcess


def test_top_k_over_queries_and_classes_in_original_pixels():
    logits = torch.full((1, 3, 4), -10.0)
    logits[0, 2, 1] = 3.0  # best: query 2, class 1
    logits[0, 0, 3] = 1.0  # second: query 0, class 3
    logits[0, 0, 1] = 0.0  # third: the same query, another class
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.25, 0.75, 0.5, 0.5]]])
    sizes = torch.tensor([[100, 200]])  # h, w

    result = PostProcess(num_select=3)({"pred_logits": logits, "pred_boxes": boxes}, sizes)[0]

    torch.testing.assert_close(result["scores"], torch.tensor([3.0, 1.0, 0.0]).sigmoid())
    assert result["labels"].tolist() == [1, 3, 1]
    torch.testing.assert_close(
        result["boxes"],
        torch.tensor([[0.0, 50.0, 100.0, 100.0], [80.0, 30.0, 120.0, 70.0], [80.0, 30.0, 120.0, 70.0]]),
    )


def test_per_image_sizes_and_k_capped_by_candidates():
    logits = torch.randn(2, 2, 3)
    boxes = torch.tensor([[[0.5, 0.5, 1.0, 1.0]] * 2, [[0.5, 0.5, 1.0, 1.0]] * 2])
    results = PostProcess(num_select=100)({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[10, 20], [30, 40]]))
    assert [len(r["scores"]) for r in results] == [6, 6]
    assert results[0]["boxes"][0].tolist() == [0.0, 0.0, 20.0, 10.0]
    assert results[1]["boxes"][0].tolist() == [0.0, 0.0, 40.0, 30.0]
    assert all(bool((r["scores"][:-1] >= r["scores"][1:]).all()) for r in results)


def test_wrong_target_sizes_are_rejected():
    with pytest.raises(ValueError, match="target_sizes"):
        PostProcess()({"pred_logits": torch.zeros(2, 3, 4), "pred_boxes": torch.zeros(2, 3, 4)}, torch.zeros(1, 2))
