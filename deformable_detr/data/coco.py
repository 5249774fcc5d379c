"""COCO-format detection dataset with per-item seeded augmentation."""
from __future__ import annotations

import logging
import os
import random
from typing import Callable, Dict, List, Optional, Tuple

import PIL.Image
import PIL.ImageOps
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from ..errors import DataError, MissingFileError
from ..utils.category_layout import CategoryLayout
from .coco_annotations import coco_target, load_coco_annotations, num_classes_of
from .image_files import to_rgb
from .skip_counter import SkipCounter
from .transforms import predicts_size

__all__ = ["UnreadableImageError", "ImageSizeMismatchError", "CocoDetection", "coco_split_paths", "build_coco_dataset", "displayed_size"]

logger = logging.getLogger(__name__)

Item = Tuple[torch.Tensor, Dict[str, torch.Tensor]]
_EXIF_ORIENTATION = 0x0112


class UnreadableImageError(DataError, OSError):
    """An image file that exists but cannot be decoded; the message names the file. A user's
    mistake (tools print it as one line); still an OSError for callers that catch those."""


class ImageSizeMismatchError(DataError):
    """An image whose decoded size (EXIF orientation applied) is not the width and height its
    annotation file gives: its boxes would land in the wrong place. The message names the file
    and both sizes."""


def _prefix(context: Optional[str]) -> str:
    return f"{context}: " if context else ""


class CocoDetection(Dataset):
    """Images of a COCO-format annotation file, as ``(image, target)`` pairs.

    ``image`` is the output of ``transforms`` (normally a normalized float tensor (3, H, W));
    ``target`` holds ``boxes`` (n, 4) float32 cxcywh in [0, 1] of the transformed size,
    ``labels`` (n,) int64 category ids (the model's logit indices once ``layout`` is set), ``image_id`` () int64, ``area`` (n,) float32,
    ``iscrowd`` (n,) int64, ``orig_size`` and ``size`` (2,) int64 (h, w) before and after
    the transforms. Crowd annotations are not targets; see ``coco_target``.

    Item ``index`` in epoch ``epoch`` draws its augmentation from
    ``random.Random(f"{seed}:{epoch}:{index}")``, so it does not depend on which worker
    loads it or when. With ``skip_unreadable`` a missing or undecodable image, or one whose
    size is not its annotation's, gives ``None`` (``collate`` drops it) and increments
    ``skipped``; otherwise it raises.

    Images are decoded as displayed: the EXIF orientation is applied (a phone photo stored
    sideways with "rotate 90" is annotated upright by labelling tools), and the result must
    have the annotation's ``width`` x ``height`` (when the file gives them), else the boxes
    would be silently wrong.

    Items are ordered by ascending image id. ``num_classes`` is the largest category id + 1;
    ``category_ids`` the sorted ids of the file's categories (what predictions may carry);
    ``layout`` (a ``CategoryLayout``, set by the trainer) maps target labels to logits.

    ``coco``: annotations already indexed in memory (e.g. the COCO view of a YOLO folder, see
    ``yolo_view``) instead of read from ``annotation_file``, which then only names their source.
    """

    def __init__(
        self,
        image_dir: str,
        annotation_file: str,
        transforms: Callable,
        *,
        coco: Optional[COCO] = None,
        seed: int = 0,
        skip_unreadable: bool = False,
        context: Optional[str] = None,
    ):
        prefix = _prefix(context)
        self.image_dir = os.path.expanduser(os.fspath(image_dir))
        self.annotation_file = os.path.expanduser(os.fspath(annotation_file))
        if not os.path.isdir(self.image_dir):
            raise MissingFileError(
                f"{prefix}image directory {self.image_dir} does not exist; "
                f"point the dataset at the folder holding the images of {self.annotation_file}"
            )
        self.coco = coco if coco is not None else load_coco_annotations(self.annotation_file, context=context)
        self.ids = sorted(self.coco.imgs.keys())
        self.num_classes = num_classes_of(self.coco)
        self.category_ids = sorted(self.coco.cats)
        self.category_names = {
            category_id: category.get("name", str(category_id)) for category_id, category in self.coco.cats.items()
        }
        self.transforms = transforms
        self.seed = seed
        self.epoch = 0
        self.skip_unreadable = skip_unreadable
        self.skipped = SkipCounter()
        self.context = context
        # how target labels map to the model's logits (None: labels are the category ids)
        self.layout: Optional[CategoryLayout] = None
        self._source_sizes: Optional[List[Optional[Tuple[int, int]]]] = None

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch``.

        DataLoader workers hold copies of the dataset made when an iterator starts: call this
        before ``iter(loader)`` and do not combine it with ``persistent_workers=True``.
        """
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def output_sizes(self, epoch: int) -> Optional[List[Tuple[int, int]]]:
        """The (h, w) of every item's image in ``epoch`` after the transforms, without reading a
        pixel: the transforms replay their random draws on the image sizes (see
        ``transforms.output_size``). ``None`` when the transforms cannot tell (one without
        ``output_size``). An unreadable image counts as (0, 0)."""
        if not self.predicts_sizes:
            return None
        sizes = []
        for index, source in enumerate(self.source_sizes()):
            if source is None:
                sizes.append((0, 0))
                continue
            width, height = self.transforms.output_size(source, random.Random(f"{self.seed}:{epoch}:{index}"))
            sizes.append((height, width))
        return sizes

    @property
    def predicts_sizes(self) -> bool:
        """Whether ``output_sizes`` can tell (every transform has ``output_size``)."""
        return predicts_size(self.transforms)

    def source_sizes(self) -> List[Optional[Tuple[int, int]]]:
        """Every item's image size as displayed, PIL's (w, h): the annotation's ``width`` and
        ``height``, else read from the file's header once (``None`` when it cannot be read)."""
        if self._source_sizes is None:
            self._source_sizes = [self._source_size(image_id) for image_id in self.ids]
        return self._source_sizes

    def _source_size(self, image_id: int) -> Optional[Tuple[int, int]]:
        info = self.coco.imgs[image_id]
        if info.get("width") and info.get("height"):
            return int(info["width"]), int(info["height"])
        try:
            return displayed_size(os.path.join(self.image_dir, info["file_name"]))
        except Exception:  # noqa: BLE001 - reading it for real reports the problem
            return None

    def image_path(self, index: int) -> str:
        """Path of the image file of item ``index``."""
        return os.path.join(self.image_dir, self.coco.imgs[self.ids[index]]["file_name"])

    def __getitem__(self, index: int) -> Optional[Item]:
        image_id = self.ids[index]
        try:
            image = self._read_image(image_id)
        except (FileNotFoundError, UnreadableImageError, ImageSizeMismatchError) as error:
            if not self.skip_unreadable:
                raise
            self.skipped.increment()
            logger.warning("skipping image: %s", error)
            return None
        target = coco_target(self.coco.imgToAnns.get(image_id, []), image_id, *image.size)
        if self.layout is not None:
            target["labels"] = self.layout.logits_of(target["labels"])
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        return self.transforms(image, target, rng)

    def _read_image(self, image_id: int) -> PIL.Image.Image:
        prefix = _prefix(self.context)
        path = os.path.join(self.image_dir, self.coco.imgs[image_id]["file_name"])
        if not os.path.isfile(path):
            raise MissingFileError(
                f"{prefix}image {path} (id {image_id} in {self.annotation_file}) does not exist; "
                "restore the file, or enable skipping of unreadable images (dataset.skip_unreadable=true)"
            )
        try:
            with PIL.Image.open(path) as opened:
                # as displayed: labelling tools annotate the image after its EXIF rotation
                image = to_rgb(PIL.ImageOps.exif_transpose(opened))
        except Exception as error:  # any decoder failure means the same thing: unusable file
            raise UnreadableImageError(
                f"{prefix}image {path} (id {image_id}) cannot be decoded ({error}); "
                "replace the file, or enable skipping of unreadable images (dataset.skip_unreadable=true)"
            ) from error
        self._check_size(image, image_id, path)
        return image

    def _check_size(self, image: PIL.Image.Image, image_id: int, path: str) -> None:
        info = self.coco.imgs[image_id]
        expected = (info.get("width"), info.get("height"))
        if None in expected or tuple(image.size) == expected:
            return
        width, height = image.size
        raise ImageSizeMismatchError(
            f"{_prefix(self.context)}image {path} (id {image_id}) is {width}x{height} (width x height, EXIF orientation "
            f"applied) but {self.annotation_file} says {expected[0]}x{expected[1]}: its boxes would be misplaced; "
            "correct the image's width/height (and boxes) in the annotations or the image file, "
            "or enable skipping of unreadable images (dataset.skip_unreadable=true)"
        )


def displayed_size(path: str) -> Tuple[int, int]:
    """The (width, height) of the image file ``path`` as displayed (EXIF orientation applied),
    read from its header without decoding the pixels; PIL's errors when it cannot be read."""
    with PIL.Image.open(path) as opened:
        width, height = opened.size
        # EXIF orientations 5-8 store the picture transposed (see CocoDetection._read_image)
        if opened.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
            width, height = height, width
    return width, height


def coco_split_paths(root: str, split: str, year: str = "2017") -> Tuple[str, str]:
    """Standard layout paths: (``root/{split}{year}``, ``root/annotations/instances_{split}{year}.json``)."""
    root = os.path.expanduser(os.fspath(root))
    return (
        os.path.join(root, f"{split}{year}"),
        os.path.join(root, "annotations", f"instances_{split}{year}.json"),
    )


def build_coco_dataset(
    root: str,
    split: str,
    transforms: Callable,
    *,
    year: str = "2017",
    seed: int = 0,
    skip_unreadable: bool = False,
    context: Optional[str] = None,
) -> CocoDetection:
    """Dataset for ``split`` ("train" or "val") of a COCO-layout directory.

    ``context`` names where ``root`` came from (e.g. a config key); errors read
    ``{context}={root} has no ...``.
    """
    root = os.path.expanduser(os.fspath(root))
    name = context or "COCO root"
    image_dir, annotation_file = coco_split_paths(root, split, year)
    layout = (
        f"expected the COCO {year} layout ROOT/{split}{year}/ (images) and "
        f"ROOT/annotations/instances_{split}{year}.json"
    )
    if not os.path.isdir(root):
        raise MissingFileError(f"{name}={root} does not exist; {layout}")
    relative_annotation = os.path.relpath(annotation_file, root)
    if not os.path.isfile(annotation_file):
        raise MissingFileError(f"{name}={root} has no {relative_annotation}; {layout}")
    if not os.path.isdir(image_dir):
        raise MissingFileError(f"{name}={root} has no {split}{year}/ image directory; {layout}")
    return CocoDetection(
        image_dir,
        annotation_file,
        transforms,
        seed=seed,
        skip_unreadable=skip_unreadable,
        context=context,
    )
