"""COCO box AP of detection results, correct across several processes."""
from __future__ import annotations

import contextlib
import copy
import io
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from deformable_detr.utils.box_ops import box_xyxy_to_xywh
from deformable_detr.utils.distributed import all_gather_object, is_main_process

__all__ = [
    "STAT_NAMES",
    "CATEGORY_STATS",
    "CocoEvaluation",
    "CocoEvaluator",
    "to_coco_results",
    "merge_gathered",
    "evaluate_coco",
]

# Order of COCOeval.stats for box detection.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

# Per category, as COCOeval.summarize computes its stats: (IoU threshold or None for .50:.95,
# area range, max detections). AR1/AR10 are left out: with 100 detections kept they say little per category.
CATEGORY_STATS = {
    "AP": (None, "all", 100),
    "AP50": (0.5, "all", 100),
    "AP75": (0.75, "all", 100),
    "APs": (None, "small", 100),
    "APm": (None, "medium", 100),
    "APl": (None, "large", 100),
    "AR100": (None, "all", 100),
}

# Per image id: its detections in COCO results format.
ImagePredictions = Dict[int, List[dict]]


@dataclass
class CocoEvaluation:
    """Outcome of one COCO evaluation.

    ``stats`` maps each of ``STAT_NAMES`` to a fraction in [0, 1], or -1 where the evaluated
    images hold no ground truth of that kind (pycocotools' convention). ``per_category``
    lists (name, category id, AP at IoU .50:.95), AP -1 for a category without ground truth.
    ``category_stats`` holds one dict per category, in category id order: ``id``, ``name``,
    ``instances`` (its non-crowd ground-truth boxes in the evaluated images) and each of
    ``CATEGORY_STATS`` (fractions, -1 without ground truth of that kind).
    ``predictions`` is the merged COCO results list (what ``predictions.json`` holds),
    ``image_ids`` the evaluated images, ``table`` a printable summary and ``log`` the text
    pycocotools printed.
    """

    stats: Dict[str, float]
    per_category: List[Tuple[str, int, float]]
    predictions: List[dict]
    image_ids: List[int]
    table: str
    log: str = field(repr=False)
    category_stats: List[Dict[str, Any]] = field(default_factory=list)

    def metrics(self) -> Dict[str, Any]:
        """What ``metrics.json`` holds: the 12 stats by name at the top level, and
        ``per_category``, the list of ``category_stats``."""
        return {**self.stats, "per_category": self.category_stats}


def to_coco_results(results: Mapping[int, Mapping[str, Any]]) -> ImagePredictions:
    """Detections per image -> COCO results entries per image id.

    ``results[image_id]`` holds ``scores`` (K,), ``labels`` (K,) category ids and ``boxes``
    (K, 4) xyxy in original-image pixels (tensors or arrays). Each entry is
    ``{"image_id": int, "category_id": int, "bbox": [x, y, w, h] floats, "score": float}``.
    """
    converted: ImagePredictions = {}
    for image_id, result in results.items():
        image_id = int(image_id)
        boxes = torch.as_tensor(result["boxes"], dtype=torch.float64).reshape(-1, 4)
        scores = torch.as_tensor(result["scores"], dtype=torch.float64).reshape(-1)
        labels = torch.as_tensor(result["labels"]).reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(
                f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores and {len(labels)} labels; "
                "they must have the same length"
            )
        xywh = box_xyxy_to_xywh(boxes).tolist()
        converted[image_id] = [
            {"image_id": image_id, "category_id": int(label), "bbox": [float(v) for v in box], "score": float(score)}
            for box, score, label in zip(xywh, scores.tolist(), labels.tolist())
        ]
    return converted


def merge_gathered(per_rank: Sequence[ImagePredictions]) -> Tuple[List[int], List[dict]]:
    """Predictions gathered from every rank -> (sorted image ids, predictions).

    An image reported by several ranks (a padded sampler repeats images) counts once,
    with the detections of the lowest rank that reported it.
    """
    merged: ImagePredictions = {}
    for predictions in per_rank:
        for image_id, detections in predictions.items():
            merged.setdefault(int(image_id), detections)
    image_ids = sorted(merged)
    return image_ids, [detection for image_id in image_ids for detection in merged[image_id]]


def _detections_coco(coco_gt: COCO, predictions: List[dict]) -> COCO:
    if predictions:
        # loadRes adds area/id/segmentation to the dicts it gets: give it copies, so the
        # predictions written out stay in the plain COCO results format
        return coco_gt.loadRes([dict(p) for p in predictions])
    # loadRes cannot take an empty list; an index with no annotations scores AP 0.
    empty = COCO()
    empty.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    empty.createIndex()
    return empty


def _category_ap(coco_eval: COCOeval) -> List[float]:
    # precision: (IoU thresholds, recall thresholds, categories, area ranges, max dets);
    # area range 0 is "all" and the last max-dets setting is 100.
    precision = coco_eval.eval["precision"]
    values = []
    for k in range(precision.shape[2]):
        valid = precision[:, :, k, 0, -1]
        valid = valid[valid > -1]
        values.append(float(np.mean(valid)) if valid.size else -1.0)
    return values


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def _category_stats(coco_eval: COCOeval) -> List[Dict[str, float]]:
    """Per category, each of ``CATEGORY_STATS`` from COCOeval's accumulated arrays."""
    params = coco_eval.params
    # precision: (IoU thresholds, recall thresholds, categories, area ranges, max dets);
    # recall: (IoU thresholds, categories, area ranges, max dets)
    precision, recall = coco_eval.eval["precision"], coco_eval.eval["recall"]
    rows = []
    for k in range(precision.shape[2]):
        row = {}
        for name, (iou, area, max_dets) in CATEGORY_STATS.items():
            a, m = params.areaRngLbl.index(area), list(params.maxDets).index(max_dets)
            t = slice(None) if iou is None else int(np.argmin(np.abs(params.iouThrs - iou)))
            values = recall[t, k, a, m] if name.startswith("AR") else precision[t, :, k, a, m]
            row[name] = _mean_valid(np.asarray(values))
        rows.append(row)
    return rows


def _instances(coco_gt: COCO, image_ids: Sequence[int]) -> Dict[int, int]:
    """Non-crowd ground-truth boxes per category id in ``image_ids``."""
    counts: Dict[int, int] = {}
    for image_id in image_ids:
        for annotation in coco_gt.imgToAnns.get(image_id, []):
            if not annotation.get("iscrowd", 0):
                counts[annotation["category_id"]] = counts.get(annotation["category_id"], 0) + 1
    return counts


def _format_table(stats: Dict[str, float], category_stats: List[Dict[str, Any]], num_images: int) -> str:
    lines = [f"COCO box evaluation on {num_images} images"]
    lines += [f"  {name:<6} {value:7.4f}" for name, value in stats.items()]
    if category_stats:
        width = max(len(row["name"]) for row in category_stats)
        lines.append(f"  {'category':<{width}}  {'id':>4}  " + "  ".join(f"{name:>7}" for name in CATEGORY_STATS) + f"  {'boxes':>7}")
        lines += [
            f"  {row['name']:<{width}}  {row['id']:>4}  " + "  ".join(f"{row[name]:7.4f}" for name in CATEGORY_STATS) + f"  {row['instances']:>7}"
            for row in category_stats
        ]
    return "\n".join(lines)


def evaluate_coco(coco_gt: COCO, predictions: List[dict], image_ids: Sequence[int]) -> CocoEvaluation:
    """Run COCOeval (bbox) on ``image_ids`` with ``predictions``; pycocotools' prints are captured."""
    image_ids = sorted(int(image_id) for image_id in image_ids)
    unknown = sorted(set(image_ids) - set(coco_gt.getImgIds()))
    if unknown:
        raise ValueError(f"image ids {unknown[:10]} are not in the ground truth annotations")
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        coco_dt = _detections_coco(coco_gt, predictions)
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        coco_eval.params.imgIds = image_ids
        if image_ids:
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
            raw_stats = [float(value) for value in coco_eval.stats]
            category_ap = _category_ap(coco_eval)
            category_rows = _category_stats(coco_eval)
        else:
            raw_stats = [-1.0] * len(STAT_NAMES)
            category_ap = [-1.0] * len(coco_eval.params.catIds)
            category_rows = [dict.fromkeys(CATEGORY_STATS, -1.0) for _ in coco_eval.params.catIds]
    stats = dict(zip(STAT_NAMES, raw_stats))
    per_category = [
        (coco_gt.cats[category_id].get("name", str(category_id)), int(category_id), ap)
        for category_id, ap in zip(coco_eval.params.catIds, category_ap)
    ]
    instances = _instances(coco_gt, image_ids)
    category_stats = [
        {"id": category_id, "name": name, "instances": instances.get(category_id, 0), **row}
        for (name, category_id, _), row in zip(per_category, category_rows)
    ]
    return CocoEvaluation(
        stats=stats,
        per_category=per_category,
        predictions=predictions,
        image_ids=image_ids,
        table=_format_table(stats, category_stats, len(image_ids)),
        log=log.getvalue(),
        category_stats=category_stats,
    )


class CocoEvaluator:
    """Accumulates detections over an evaluation pass and scores them with COCOeval.

    Usage: ``update(results)`` for every batch on every rank, then ``summarize()`` on every
    rank (it gathers the predictions of all ranks). An image seen twice (on one rank or on
    several) is counted once. Only images passed to ``update`` are evaluated, so an image
    with no detections must still appear in ``results`` (with K = 0).
    """

    def __init__(self, coco_gt: COCO):
        # COCOeval writes "ignore" flags into the ground-truth annotations; keep the
        # dataset's index untouched.
        self.coco_gt = copy.deepcopy(coco_gt)
        self._known_ids = set(self.coco_gt.getImgIds())
        self.predictions: ImagePredictions = {}

    def update(self, results: Mapping[int, Mapping[str, Any]]) -> None:
        """Add ``results`` = {image_id: {"scores" (K,), "labels" (K,), "boxes" (K, 4) xyxy pixels}}."""
        for image_id, detections in to_coco_results(results).items():
            if image_id not in self._known_ids:
                raise ValueError(
                    f"image_id {image_id} is not in the ground truth annotations; "
                    "results must be keyed by the dataset's image ids"
                )
            self.predictions.setdefault(image_id, detections)

    def gather(self) -> Tuple[List[int], List[dict]]:
        """(image ids, predictions) of all ranks, de-duplicated; a collective call."""
        return merge_gathered(all_gather_object(self.predictions))

    def summarize(self, main_process_only: bool = False) -> Optional[CocoEvaluation]:
        """Gather from all ranks and evaluate; with ``main_process_only`` other ranks get None."""
        image_ids, predictions = self.gather()
        if main_process_only and not is_main_process():
            return None
        return evaluate_coco(self.coco_gt, predictions, image_ids)

