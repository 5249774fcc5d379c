"""YOLO-format folders as COCO-format data: a COCO view built in memory from the label files, read by
``CocoDetection`` (items, transforms, skipping, evaluation) like any COCO dataset.

Class k of data.yaml's names becomes category id k with that name (ids 0..n-1, the model's logit
indices). Images get ids 1, 2, ... in the order of their paths, their width and height read from
the file's header (EXIF orientation applied, the pixels not decoded); each label line becomes an
annotation with its box in those pixels (see ``yolo_labels``). An image without a label file, or
with an empty one, has no objects; a label file without its image is an error. The layout and what
is read of data.yaml: see ``yolo_layout``.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Dict, List, Optional

from pycocotools.coco import COCO

from ..errors import DataError
from .coco import CocoDetection, UnreadableImageError, displayed_size
from .coco_annotations import coco_index
from .image_files import IMAGE_EXTENSIONS
from .yolo_labels import read_label_file
from .yolo_layout import YoloLayout, label_dir_of

__all__ = ["build_yolo_dataset", "yolo_view"]

logger = logging.getLogger(__name__)


def build_yolo_dataset(root: str, split: str, transforms: Callable, *, seed: int = 0, skip_unreadable: bool = False,
                       context: Optional[str] = None) -> CocoDetection:
    """Dataset for ``split`` ("train" or "val") of the YOLO folder (or data.yaml) ``root``; ``context``
    names where ``root`` came from (e.g. ``dataset.root``)."""
    layout = YoloLayout.read(root, context or "YOLO root")
    image_dir = layout.image_dir(split)
    view = yolo_view(layout, image_dir, skip_unreadable=skip_unreadable)
    return CocoDetection(image_dir, layout.data_yaml, transforms, coco=view, seed=seed, skip_unreadable=skip_unreadable, context=context)


def yolo_view(layout: YoloLayout, image_dir: str, *, skip_unreadable: bool = False) -> COCO:
    """The COCO index of the images in ``image_dir`` (and sub-folders) and their label files.

    ``file_name`` is the image's path relative to ``image_dir``; an image whose header cannot be
    read is an ``UnreadableImageError``, or left out (logged) with ``skip_unreadable``.
    """
    names = _image_names(image_dir)
    if not names:
        raise DataError(f"{image_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}); put them there, or point "
                        f"{layout.data_yaml}'s train/val at the folders that hold them")
    label_dir = label_dir_of(image_dir)
    _refuse_orphan_labels(label_dir, image_dir, names)
    if not os.path.isdir(label_dir):
        logger.warning("%s does not exist: the %d images of %s have no objects", label_dir, len(names), image_dir)
    images: List[Dict] = []
    annotations: List[Dict] = []
    for image_id, name in enumerate(names, start=1):
        path = os.path.join(image_dir, name)
        try:
            width, height = displayed_size(path)
        except Exception as error:  # any decoder failure means the same thing: unusable file
            message = f"image {path} cannot be read ({error}); replace the file, or enable skipping of unreadable images (dataset.skip_unreadable=true)"
            if not skip_unreadable:
                raise UnreadableImageError(message) from error
            logger.warning("skipping image: %s", message)
            continue
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        label_file = os.path.join(label_dir, os.path.splitext(name)[0] + ".txt")
        if not os.path.isfile(label_file):
            continue
        boxes = read_label_file(label_file, len(layout.names), width, height, keypoint_values=layout.keypoint_values, names_source=layout.data_yaml)
        for class_index, box in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": class_index, "bbox": box,
                                "area": box[2] * box[3], "iscrowd": 0})
    return coco_index({"images": images, "annotations": annotations, "categories": layout.categories()})


def _image_names(image_dir: str) -> List[str]:
    """The images under ``image_dir``, as sorted paths relative to it."""
    found = []
    for folder, _, files in os.walk(image_dir):
        found += [os.path.relpath(os.path.join(folder, f), image_dir) for f in files if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def _refuse_orphan_labels(label_dir: str, image_dir: str, names: List[str]) -> None:
    """A label file whose image does not exist is an error naming it: its objects would be lost."""
    stems = {os.path.splitext(name)[0] for name in names}
    for folder, _, files in os.walk(label_dir):
        for file in sorted(files):
            # LabelImg keeps the class names in classes.txt beside the labels
            if not file.endswith(".txt") or file == "classes.txt":
                continue
            stem = os.path.splitext(os.path.relpath(os.path.join(folder, file), label_dir))[0]
            if stem not in stems:
                raise DataError(f"{os.path.join(folder, file)} has no image {os.path.join(image_dir, stem)}.* "
                                f"({', '.join(IMAGE_EXTENSIONS)}); restore the image, or remove the label file")
