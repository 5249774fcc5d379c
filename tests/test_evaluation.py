import json
import os

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from deformable_detr.evaluation.coco_evaluator import (
    STAT_NAMES,
    CocoEvaluator,
    evaluate_coco,
    merge_gathered,
    to_coco_results,
)
from deformable_detr.utils.atomic_files import write_json_atomic


def _ground_truth(images, annotations, categories=((1, "cat"), (4, "dog"))):
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 400, "height": 300} for i in images],
        "annotations": [
            {"id": n + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for n, (i, c, b) in enumerate(annotations)
        ],
        "categories": [{"id": c, "name": name, "supercategory": "animal"} for c, name in categories],
    }
    coco.createIndex()
    return coco


# One small (20x20), one medium (50x50) and one large (150x150) object, one per image.
GT_ANNOTATIONS = [(1, 1, [10, 10, 20, 20]), (2, 4, [100, 50, 50, 50]), (3, 1, [20, 30, 150, 150])]


def _result(boxes_xywh, scores, labels):
    boxes = torch.tensor(boxes_xywh, dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    return {"boxes": boxes, "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels)}


def _perfect(annotations):
    results = {}
    for image_id, category_id, bbox in annotations:
        results.setdefault(image_id, []).append((bbox, category_id))
    return {
        image_id: _result([b for b, _ in items], [0.9] * len(items), [c for _, c in items])
        for image_id, items in results.items()
    }


def test_perfect_predictions_score_one(capsys):
    coco = _ground_truth([1, 2, 3], GT_ANNOTATIONS)
    capsys.readouterr()
    evaluator = CocoEvaluator(coco)
    evaluator.update(_perfect(GT_ANNOTATIONS))
    result = evaluator.summarize()
    assert list(result.stats) == list(STAT_NAMES)
    for name, value in result.stats.items():
        assert value == pytest.approx(1.0), name
    assert result.per_category == [("cat", 1, pytest.approx(1.0)), ("dog", 4, pytest.approx(1.0))]
    assert result.image_ids == [1, 2, 3]
    assert "Average Precision" in result.log
    assert capsys.readouterr().out == ""  # pycocotools' prints are captured
    assert "AP50" in result.table and "dog" in result.table


def test_known_imperfect_case():
    # Image 1: two cats; one found exactly, one missed, plus a lower-scored false positive.
    # Precision is 1 up to recall 0.5 and recall never exceeds 0.5: AP = 51 / 101 on the
    # 101-point recall grid at every IoU threshold.
    # Image 2: a dog found with IoU 0.62 (100 x 62 inside 100 x 100): a match at IoU
    # thresholds 0.50, 0.55, 0.60 only, so AP = 3 / 10, AP50 = 1, AP75 = 0.
    annotations = [(1, 1, [0, 0, 40, 40]), (1, 1, [200, 100, 60, 60]), (2, 4, [0, 0, 100, 100])]
    evaluator = CocoEvaluator(_ground_truth([1, 2], annotations))
    evaluator.update(
        {
            1: _result([[0, 0, 40, 40], [300, 200, 30, 30]], [0.9, 0.8], [1, 1]),
            2: _result([[0, 0, 100, 62]], [0.7], [4]),
        }
    )
    result = evaluator.summarize()
    cat_ap, dog_ap = 51 / 101, 3 / 10
    assert dict((name, ap) for name, _, ap in result.per_category) == {
        "cat": pytest.approx(cat_ap),
        "dog": pytest.approx(dog_ap),
    }
    assert result.stats["AP"] == pytest.approx((cat_ap + dog_ap) / 2)
    assert result.stats["AP50"] == pytest.approx((51 / 101 + 1) / 2)
    assert result.stats["AP75"] == pytest.approx((51 / 101 + 0) / 2)
    assert result.stats["AR100"] == pytest.approx((0.5 + 0.3) / 2)
    # Every object here is medium or large: no small ground truth gives -1.
    assert result.stats["APs"] == -1 and result.stats["ARs"] == -1


def test_per_category_stats_are_kept_by_id_and_name():
    # the case above: the cats (40 x 40, 60 x 60: medium) at AP 51 / 101 at every threshold;
    # the dog (100 x 100: large) matched at IoU 0.62, so AP50 = 1, AP75 = 0, recall 3 / 10
    annotations = [(1, 1, [0, 0, 40, 40]), (1, 1, [200, 100, 60, 60]), (2, 4, [0, 0, 100, 100])]
    evaluator = CocoEvaluator(_ground_truth([1, 2], annotations))
    evaluator.update({1: _result([[0, 0, 40, 40], [300, 200, 30, 30]], [0.9, 0.8], [1, 1]), 2: _result([[0, 0, 100, 62]], [0.7], [4])})
    result = evaluator.summarize()
    cat, dog = result.category_stats
    assert (cat["id"], cat["name"], cat["instances"]) == (1, "cat", 2) and (dog["id"], dog["name"], dog["instances"]) == (4, "dog", 1)
    assert [cat[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")] == pytest.approx([51 / 101] * 3 + [-1, 51 / 101, -1, 0.5])
    assert [dog[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")] == pytest.approx([0.3, 1, 0, -1, -1, 0.3, 0.3])
    assert [row["AP"] for row in result.category_stats] == [ap for _, _, ap in result.per_category]
    metrics = json.loads(json.dumps(result.metrics()))
    assert list(metrics) == list(STAT_NAMES) + ["per_category"]
    assert {k: metrics[k] for k in STAT_NAMES} == result.stats
    assert metrics["per_category"][1]["name"] == "dog" and metrics["per_category"][1]["AP50"] == pytest.approx(1.0)
    assert "dog" in result.table and "AP75" in result.table


def test_per_category_stats_without_evaluated_images_are_minus_one():
    result = CocoEvaluator(_ground_truth([1, 2, 3], GT_ANNOTATIONS)).summarize()
    assert [row["id"] for row in result.category_stats] == [1, 4]
    assert all(row[k] == -1 for row in result.category_stats for k in ("AP", "AP50", "AR100"))
    assert all(row["instances"] == 0 for row in result.category_stats)


def test_no_predictions_score_zero():
    evaluator = CocoEvaluator(_ground_truth([1, 2, 3], GT_ANNOTATIONS))
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    evaluator.update({image_id: empty for image_id in (1, 2, 3)})
    result = evaluator.summarize()
    assert result.predictions == []
    assert all(value == 0 for value in result.stats.values())
    assert [ap for _, _, ap in result.per_category] == [0, 0]


def test_nothing_evaluated_reports_minus_one():
    result = CocoEvaluator(_ground_truth([1, 2, 3], GT_ANNOTATIONS)).summarize()
    assert result.image_ids == [] and all(value == -1 for value in result.stats.values())


def test_only_evaluated_images_count():
    # Image 3's object is never predicted, but image 3 is not evaluated either.
    evaluator = CocoEvaluator(_ground_truth([1, 2, 3], GT_ANNOTATIONS))
    evaluator.update(_perfect(GT_ANNOTATIONS[:2]))
    result = evaluator.summarize()
    assert result.image_ids == [1, 2]
    assert result.stats["AP"] == pytest.approx(1.0)
    assert result.stats["APl"] == -1


def test_predictions_are_plain_coco_results():
    converted = to_coco_results({np.int64(7): _result([[1.5, 2.0, 3.0, 4.25]], [0.5], [4])})
    assert converted == {7: [{"image_id": 7, "category_id": 4, "bbox": [1.5, 2.0, 3.0, 4.25], "score": 0.5}]}
    detection = converted[7][0]
    assert type(detection["image_id"]) is int and type(detection["category_id"]) is int
    assert type(detection["score"]) is float and all(type(v) is float for v in detection["bbox"])
    json.dumps(converted[7])


def test_mismatched_lengths_and_unknown_images_are_rejected():
    with pytest.raises(ValueError, match="same length"):
        to_coco_results({1: {"boxes": torch.zeros(2, 4), "scores": torch.zeros(1), "labels": torch.zeros(2)}})
    evaluator = CocoEvaluator(_ground_truth([1], GT_ANNOTATIONS[:1]))
    with pytest.raises(ValueError, match="image_id 99 is not in the ground truth"):
        evaluator.update({99: _result([[0, 0, 1, 1]], [0.5], [1])})


def test_duplicate_images_across_ranks_count_once():
    coco = _ground_truth([1, 2, 3], GT_ANNOTATIONS)
    perfect = to_coco_results(_perfect(GT_ANNOTATIONS))
    # A padded sampler gave image 2 to both ranks; rank 1's copy must not add detections.
    rank0 = {1: perfect[1], 2: perfect[2]}
    rank1 = {2: perfect[2], 3: perfect[3]}
    image_ids, predictions = merge_gathered([rank0, rank1])
    assert image_ids == [1, 2, 3]
    assert len(predictions) == 3
    result = evaluate_coco(coco, predictions, image_ids)
    assert result.stats["AP"] == pytest.approx(1.0)
    # Counting both copies would make the second one a false positive.
    doubled = evaluate_coco(coco, [*predictions, *perfect[2]], image_ids)
    assert doubled.stats["APm"] < 1.0


def test_images_with_no_detections_on_one_rank_are_still_evaluated():
    coco = _ground_truth([1, 2, 3], GT_ANNOTATIONS)
    perfect = to_coco_results(_perfect(GT_ANNOTATIONS))
    image_ids, predictions = merge_gathered([{1: perfect[1], 3: []}, {2: perfect[2]}])
    assert image_ids == [1, 2, 3]
    result = evaluate_coco(coco, predictions, image_ids)
    assert result.stats["APl"] == 0.0 and result.stats["APs"] == pytest.approx(1.0)


def test_repeated_update_of_an_image_keeps_the_first():
    evaluator = CocoEvaluator(_ground_truth([1, 2, 3], GT_ANNOTATIONS))
    evaluator.update(_perfect(GT_ANNOTATIONS))
    evaluator.update({1: _result([[300, 200, 10, 10]], [0.99], [1])})
    assert evaluator.summarize().stats["AP"] == pytest.approx(1.0)


def test_ground_truth_is_not_modified():
    coco = _ground_truth([1, 2, 3], GT_ANNOTATIONS)
    before = json.dumps(coco.dataset, sort_keys=True)
    evaluator = CocoEvaluator(coco)
    evaluator.update(_perfect(GT_ANNOTATIONS))
    evaluator.summarize()
    assert json.dumps(coco.dataset, sort_keys=True) == before


def test_write_json_atomic(tmp_path):
    path = tmp_path / "out" / "predictions.json"
    write_json_atomic(str(path), [{"image_id": 1, "score": 0.5}])
    write_json_atomic(str(path), [{"image_id": 2, "score": 0.25}])
    assert json.loads(path.read_text()) == [{"image_id": 2, "score": 0.25}]
    assert os.listdir(tmp_path / "out") == ["predictions.json"]
    with pytest.raises(TypeError):
        write_json_atomic(str(path), {"bad": object()})
    assert json.loads(path.read_text()) == [{"image_id": 2, "score": 0.25}]
    assert os.listdir(tmp_path / "out") == ["predictions.json"]
