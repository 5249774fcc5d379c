"""COCO annotation files: loading with clear errors, and conversion to detection targets."""
from __future__ import annotations

import collections
import contextlib
import io
import json
import os
from typing import Dict, Hashable, List, Optional

import torch
from pycocotools.coco import COCO

from ..errors import DataError, MissingFileError

__all__ = ["AnnotationFormatError", "coco_index", "load_coco_annotations", "coco_target", "num_classes_of"]


class AnnotationFormatError(DataError):
    """An annotation file that is not valid COCO-format JSON; the message names the file."""


def _prefix(context: Optional[str]) -> str:
    return f"{context}: " if context else ""


def load_coco_annotations(annotation_file: str, context: Optional[str] = None) -> COCO:
    """Read a COCO-format JSON file into a pycocotools ``COCO`` index, without its prints.

    Raises ``FileNotFoundError`` when the file is missing and ``AnnotationFormatError``
    when it is not JSON or lacks the fields detection needs (``images`` with ``id`` and
    ``file_name``; ``annotations`` with ``id``, ``image_id``, ``category_id`` and a 4-number
    ``bbox``; ``categories`` with ``id``), or gives two images, annotations or categories one
    ``id``. ``context`` prefixes every message.
    """
    prefix = _prefix(context)
    if not os.path.isfile(annotation_file):
        raise MissingFileError(
            f"{prefix}annotation file {annotation_file} does not exist; "
            "point the dataset at an existing COCO-format JSON file"
        )
    try:
        with open(annotation_file, "r", encoding="utf-8") as handle:
            dataset = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AnnotationFormatError(
            f"{prefix}annotation file {annotation_file} is not valid JSON ({error}); "
            "re-download or regenerate it"
        ) from error
    _validate(dataset, annotation_file, prefix)
    try:
        return coco_index(dataset)
    except (KeyError, TypeError) as error:
        raise AnnotationFormatError(
            f"{prefix}annotation file {annotation_file} could not be indexed ({error!r}); "
            "it is not in COCO format"
        ) from error


def coco_index(dataset: dict) -> COCO:
    """A pycocotools ``COCO`` index of a COCO-format dict (``images``, ``annotations``,
    ``categories``) held in memory, without its prints."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex reports progress on stdout
        coco.createIndex()
    return coco


def _validate(dataset, annotation_file: str, prefix: str) -> None:
    def fail(problem: str) -> None:
        raise AnnotationFormatError(
            f"{prefix}annotation file {annotation_file} is not in COCO format: {problem}"
        )

    if not isinstance(dataset, dict):
        fail(f"the top level is a {type(dataset).__name__}, expected an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            fail(f'missing list "{key}"')
    if not dataset["categories"]:
        fail('"categories" is empty')
    for position, image in enumerate(dataset["images"]):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            fail(f'images[{position}] needs "id" and "file_name"')
    for position, category in enumerate(dataset["categories"]):
        if not isinstance(category, dict) or not isinstance(category.get("id"), int):
            fail(f'categories[{position}] needs an integer "id"')
    for position, annotation in enumerate(dataset["annotations"]):
        if not isinstance(annotation, dict):
            fail(f"annotations[{position}] is not an object")
        for key in ("id", "image_id", "category_id", "bbox"):
            if key not in annotation:
                fail(f'annotations[{position}] has no "{key}"')
        bbox = annotation["bbox"]
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            fail(f'annotations[{position}]["bbox"] must be [x, y, width, height]')
    # the index keeps one entry per id, so evaluation would silently drop or merge the others
    for key, noun in (("images", "image"), ("annotations", "annotation"), ("categories", "category")):
        repeated = _repeated_ids(dataset[key])
        if repeated:
            shown = ", ".join(map(str, repeated[:5])) + (", ..." if len(repeated) > 5 else "")
            ids = f"1 {noun} id occurs" if len(repeated) == 1 else f"{len(repeated)} {noun} ids occur"
            fail(f'{ids} more than once in "{key}" ({shown}); give every {noun} its own id')


def _repeated_ids(items: List[dict]) -> List:
    """The ``id`` values that more than one of ``items`` has, in the order they first appear."""
    counts = collections.Counter(item["id"] for item in items if isinstance(item["id"], Hashable))
    return [value for value, count in counts.items() if count > 1]


def num_classes_of(coco: COCO) -> int:
    """Largest category id + 1: class indices are category ids, gaps included."""
    return max(coco.cats.keys()) + 1


def coco_target(annotations: List[dict], image_id: int, width: int, height: int) -> Dict[str, torch.Tensor]:
    """COCO annotations of one image -> target with absolute ``xyxy`` boxes.

    Crowd annotations are left out; boxes are clipped to the image (``width`` x ``height``)
    and boxes with no width or height after clipping are dropped.

    Returns ``boxes`` (n, 4) float32 xyxy pixels, ``labels`` (n,) int64 category ids,
    ``image_id`` () int64, ``area`` (n,) float32 (the annotation's area, box area when the
    file has none), ``iscrowd`` (n,) int64, ``orig_size`` and ``size`` (2,) int64 (h, w).
    """
    kept = [annotation for annotation in annotations if not annotation.get("iscrowd", 0)]
    boxes = torch.as_tensor([annotation["bbox"] for annotation in kept], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2].clamp_(min=0, max=width)
    boxes[:, 1::2].clamp_(min=0, max=height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    labels = torch.as_tensor([annotation["category_id"] for annotation in kept], dtype=torch.int64)
    area = torch.as_tensor(
        [
            annotation["area"] if "area" in annotation else annotation["bbox"][2] * annotation["bbox"][3]
            for annotation in kept
        ],
        dtype=torch.float32,
    )
    return {
        "boxes": boxes[keep],
        "labels": labels[keep],
        "image_id": torch.tensor(image_id, dtype=torch.int64),
        "area": area[keep],
        "iscrowd": torch.zeros(int(keep.sum()), dtype=torch.int64),
        "orig_size": torch.tensor([height, width], dtype=torch.int64),
        "size": torch.tensor([height, width], dtype=torch.int64),
    }
