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


def _outputs_favouring_other_ids(batch=2, queries=5, num_classes=43):
    """Logits (B, Q, 43) where ids of no category (0, 2, 5, 11, ...) score highest."""
    logits = torch.randn(batch, queries, num_classes, generator=torch.Generator().manual_seed(0))
    logits[:, :, [1, 7, 42]] -= 5.0
    boxes = torch.rand(batch, queries, 4, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.25
    return {"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[60, 80], [30, 40]])[:batch]


def test_predictions_carry_only_the_dataset_category_ids():
    outputs, sizes = _outputs_favouring_other_ids()
    results = PostProcess(num_select=10, category_ids=[42, 7, 1])(outputs, sizes)
    for result, logits, boxes, (h, w) in zip(results, outputs["pred_logits"], outputs["pred_boxes"], sizes.tolist()):
        # the best 10 of the 5 x 3 (query, dataset id) candidates, in score order
        best = logits[:, [1, 7, 42]].sigmoid().flatten().topk(10)
        assert torch.equal(result["scores"], best.values)
        assert result["labels"].tolist() == [[1, 7, 42][i] for i in (best.indices % 3).tolist()]
        cx, cy, bw, bh = boxes[best.indices // 3].unbind(-1)
        expected = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)
        torch.testing.assert_close(result["boxes"], expected)


def test_candidates_are_capped_by_the_dataset_ids_and_ids_beyond_the_classifier_ignored():
    outputs, sizes = _outputs_favouring_other_ids(batch=1)
    result = PostProcess(num_select=100, category_ids=[1, 7, 42, 90])(outputs, sizes)[0]
    assert len(result["labels"]) == 5 * 3 and set(result["labels"].tolist()) == {1, 7, 42}


def test_restriction_off_is_the_official_selection_over_every_logit():
    outputs, sizes = _outputs_favouring_other_ids()
    unrestricted = PostProcess(num_select=10, restrict_to_dataset_categories=False, category_ids=[1, 7, 42])(outputs, sizes)
    no_ids = PostProcess(num_select=10)(outputs, sizes)
    for official, plain, logits in zip(unrestricted, no_ids, outputs["pred_logits"]):
        expected = logits.sigmoid().flatten().topk(10)
        assert torch.equal(official["scores"], expected.values) and torch.equal(official["labels"], expected.indices % 43)
        assert all(torch.equal(official[key], plain[key]) for key in official)
    assert not set(unrestricted[0]["labels"].tolist()) <= {1, 7, 42}


def test_category_ids_can_be_set_later_and_are_checked():
    outputs, sizes = _outputs_favouring_other_ids()
    postprocess = PostProcess(num_select=4)
    assert postprocess.set_category_ids({7}) is postprocess
    assert all(set(r["labels"].tolist()) == {7} for r in postprocess(outputs, sizes))
    with pytest.raises(ValueError, match="category_ids"):
        postprocess.set_category_ids([])


def test_eval_config_restricts_by_default():
    from cli import compose_config

    assert compose_config("eval", ["checkpoint=x"]).postprocess.restrict_to_dataset_categories is True
    assert compose_config("train").postprocess.restrict_to_dataset_categories is True
