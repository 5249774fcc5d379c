"""Joint image + target transforms with an explicit random source.

Targets entering these transforms hold absolute ``xyxy`` pixel boxes (``boxes`` (n, 4)
float32), ``labels`` (n,), ``area`` (n,) float32, ``iscrowd`` (n,) and ``size`` (2,) int64
(h, w). ``Normalize`` turns the image into a normalized tensor and the boxes into
``cxcywh`` fractions of the final image size.

The size arithmetic, the order of random draws and the box updates follow the reference
Deformable DETR pipeline, so that evaluation preprocessing matches it pixel for pixel.
Every random choice is drawn from the ``random.Random`` passed to ``__call__``; nothing
reads the global ``random`` or ``torch`` generators, which makes an item a pure function
of its seed.

Every transform also has ``output_size(size, rng)``: the (w, h) it would output for an input
of PIL size ``size``, making the same random draws without touching pixels, so the size of an
augmented item is known before its image is read (batching by size uses this).
"""
from __future__ import annotations

import random
from typing import Dict, Optional, Sequence, Tuple

import PIL.Image
import torch
import torchvision.transforms.functional as F

from deformable_detr.utils.box_ops import box_xyxy_to_cxcywh

Target = Dict[str, torch.Tensor]
Size = Tuple[int, int]  # PIL's (width, height)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRAIN_SCALES = tuple(range(480, 801, 32))  # 480, 512, ..., 800
TRAIN_MAX_SIZE = 1333
CROP_RESIZE_SIZES = (400, 500, 600)
CROP_MIN_SIZE = 384
CROP_MAX_SIZE = 600
EVAL_SIZE = 800
EVAL_MAX_SIZE = 1333

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "get_size_with_aspect_ratio",
    "resize",
    "hflip",
    "crop",
    "Compose",
    "RandomHorizontalFlip",
    "RandomResize",
    "RandomSizeCrop",
    "RandomSelect",
    "ToTensor",
    "Normalize",
    "predicts_size",
    "make_train_transforms",
    "make_eval_transforms",
]


def get_size_with_aspect_ratio(
    image_size: Tuple[int, int], size: int, max_size: Optional[int] = None
) -> Tuple[int, int]:
    """Output (h, w) for shorter side ``size`` and longer side at most ``max_size``.

    ``image_size`` is PIL's (w, h). When the longer side would exceed ``max_size`` the
    shorter side becomes ``int(round(max_size * short / long))``; the longer side is then
    derived by truncation (``int``), and an image whose shorter side already equals the
    target is returned unchanged.
    """
    w, h = image_size
    if max_size is not None:
        short_side = float(min(w, h))
        long_side = float(max(w, h))
        if long_side / short_side * size > max_size:
            size = int(round(max_size * short_side / long_side))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def resize(image: PIL.Image.Image, target: Optional[Target], size: int, max_size: Optional[int] = None):
    """Resize the shorter side to ``size`` (longer side capped at ``max_size``); scale boxes and area."""
    out_h, out_w = get_size_with_aspect_ratio(image.size, size, max_size)
    resized = F.resize(image, [out_h, out_w])
    if target is None:
        return resized, None
    ratio_w = float(resized.size[0]) / float(image.size[0])
    ratio_h = float(resized.size[1]) / float(image.size[1])
    target = dict(target)
    if "boxes" in target:
        target["boxes"] = target["boxes"] * torch.as_tensor([ratio_w, ratio_h, ratio_w, ratio_h])
    if "area" in target:
        target["area"] = target["area"] * (ratio_w * ratio_h)
    target["size"] = torch.tensor([out_h, out_w])
    return resized, target


def hflip(image: PIL.Image.Image, target: Optional[Target]):
    """Mirror left-right; box x0' = w - x1, x1' = w - x0."""
    flipped = F.hflip(image)
    if target is None:
        return flipped, None
    w = image.size[0]
    target = dict(target)
    if "boxes" in target:
        boxes = target["boxes"]
        target["boxes"] = boxes[:, [2, 1, 0, 3]] * torch.as_tensor([-1, 1, -1, 1]) + torch.as_tensor([w, 0, w, 0])
    return flipped, target


def crop(image: PIL.Image.Image, target: Optional[Target], region: Tuple[int, int, int, int]):
    """Crop ``region`` = (top, left, height, width).

    Boxes are shifted and clipped to the crop; ``area`` becomes the clipped box area; boxes
    left with zero width or height are dropped together with their labels, area and iscrowd.
    """
    top, left, height, width = region
    cropped = F.crop(image, top, left, height, width)
    if target is None:
        return cropped, None
    target = dict(target)
    target["size"] = torch.tensor([height, width])
    if "boxes" in target:
        limit = torch.as_tensor([width, height], dtype=torch.float32)
        corners = (target["boxes"] - torch.as_tensor([left, top, left, top])).reshape(-1, 2, 2)
        corners = torch.min(corners, limit).clamp(min=0)
        target["boxes"] = corners.reshape(-1, 4)
        target["area"] = (corners[:, 1, :] - corners[:, 0, :]).prod(dim=1)
        keep = torch.all(corners[:, 1, :] > corners[:, 0, :], dim=1)
        for field in ("boxes", "labels", "area", "iscrowd"):
            if field in target:
                target[field] = target[field][keep]
    return cropped, target


class Compose:
    """Apply transforms in order, threading the same random source through them."""

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, image, target, rng: random.Random):
        for transform in self.transforms:
            image, target = transform(image, target, rng)
        return image, target

    def output_size(self, size: Size, rng: random.Random) -> Size:
        for transform in self.transforms:
            size = transform.output_size(size, rng)
        return size

    def __repr__(self) -> str:
        inner = "".join(f"\n    {transform!r}" for transform in self.transforms)
        return f"{type(self).__name__}({inner}\n)"


class RandomHorizontalFlip:
    """Flip with probability ``p`` (one ``rng.random()`` draw)."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target, rng: random.Random):
        if rng.random() < self.p:
            return hflip(image, target)
        return image, target

    def output_size(self, size: Size, rng: random.Random) -> Size:
        rng.random()
        return size

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomResize:
    """Resize the shorter side to ``rng.choice(sizes)``, longer side capped at ``max_size``."""

    def __init__(self, sizes: Sequence[int], max_size: Optional[int] = None):
        if not sizes:
            raise ValueError("RandomResize needs at least one size")
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image, target, rng: random.Random):
        return resize(image, target, rng.choice(self.sizes), self.max_size)

    def output_size(self, size: Size, rng: random.Random) -> Size:
        out_h, out_w = get_size_with_aspect_ratio(size, rng.choice(self.sizes), self.max_size)
        return out_w, out_h

    def __repr__(self) -> str:
        return f"RandomResize(sizes={self.sizes}, max_size={self.max_size})"


class RandomSizeCrop:
    """Crop a random region with width and height drawn from [min_size, max_size].

    The upper bound of each side is the image side when that is smaller. An image side
    below ``min_size`` is kept whole (the reference pipeline would fail there; it never
    meets such images because it resizes to at least ``min_size`` first).
    """

    def __init__(self, min_size: int, max_size: int):
        if min_size > max_size:
            raise ValueError(f"RandomSizeCrop needs min_size <= max_size, got {min_size} > {max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image, target, rng: random.Random):
        return crop(image, target, self.region(image.size, rng))

    def region(self, size: Size, rng: random.Random) -> Tuple[int, int, int, int]:
        """The crop (top, left, height, width) of an image of PIL size (w, h)."""
        image_w, image_h = size
        crop_w = rng.randint(min(self.min_size, image_w), min(image_w, self.max_size))
        crop_h = rng.randint(min(self.min_size, image_h), min(image_h, self.max_size))
        if crop_w == image_w and crop_h == image_h:
            return 0, 0, image_h, image_w
        top = rng.randint(0, image_h - crop_h)
        left = rng.randint(0, image_w - crop_w)
        return top, left, crop_h, crop_w

    def output_size(self, size: Size, rng: random.Random) -> Size:
        _, _, height, width = self.region(size, rng)
        return width, height

    def __repr__(self) -> str:
        return f"RandomSizeCrop(min_size={self.min_size}, max_size={self.max_size})"


class RandomSelect:
    """Apply ``first`` with probability ``p``, else ``second`` (one ``rng.random()`` draw)."""

    def __init__(self, first, second, p: float = 0.5):
        self.first = first
        self.second = second
        self.p = p

    def __call__(self, image, target, rng: random.Random):
        if rng.random() < self.p:
            return self.first(image, target, rng)
        return self.second(image, target, rng)

    def output_size(self, size: Size, rng: random.Random) -> Size:
        if rng.random() < self.p:
            return self.first.output_size(size, rng)
        return self.second.output_size(size, rng)

    def __repr__(self) -> str:
        return f"RandomSelect(p={self.p}, first={self.first!r}, second={self.second!r})"


class ToTensor:
    """PIL image -> float tensor (3, H, W) in [0, 1]."""

    def __call__(self, image, target, rng: random.Random):
        return F.to_tensor(image), target

    def output_size(self, size: Size, rng: random.Random) -> Size:
        return size

    def __repr__(self) -> str:
        return "ToTensor()"


class Normalize:
    """Normalize the image tensor; boxes become cxcywh fractions of the image (w, h)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = list(mean)
        self.std = list(std)

    def __call__(self, image, target, rng: random.Random):
        image = F.normalize(image, mean=self.mean, std=self.std)
        if target is None:
            return image, None
        target = dict(target)
        if "boxes" in target:
            h, w = image.shape[-2:]
            boxes = box_xyxy_to_cxcywh(target["boxes"])
            target["boxes"] = boxes / torch.tensor([w, h, w, h], dtype=torch.float32)
        return image, target

    def output_size(self, size: Size, rng: random.Random) -> Size:
        return size

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


def predicts_size(transform) -> bool:
    """Whether ``transform`` (and every transform inside a ``Compose`` or ``RandomSelect``) has
    ``output_size``: a user's own transform without it makes item sizes unknown."""
    if isinstance(transform, Compose):
        return all(predicts_size(inner) for inner in transform.transforms)
    if isinstance(transform, RandomSelect):
        return predicts_size(transform.first) and predicts_size(transform.second)
    return callable(getattr(transform, "output_size", None))


def make_train_transforms(
    scales: Sequence[int] = TRAIN_SCALES,
    max_size: int = TRAIN_MAX_SIZE,
    crop_resize_sizes: Sequence[int] = CROP_RESIZE_SIZES,
    crop_min_size: int = CROP_MIN_SIZE,
    crop_max_size: int = CROP_MAX_SIZE,
    flip_p: float = 0.5,
    select_p: float = 0.5,
) -> Compose:
    """Training augmentation: flip, then either a multi-scale resize or resize-crop-resize.

    Defaults are the reference COCO recipe (scales 480..800 step 32, max 1333; crop branch
    resizes to 400/500/600 and crops sides in [384, 600]).
    """
    multi_scale = RandomResize(scales, max_size=max_size)
    return Compose(
        [
            RandomHorizontalFlip(flip_p),
            RandomSelect(
                multi_scale,
                Compose(
                    [
                        RandomResize(crop_resize_sizes),
                        RandomSizeCrop(crop_min_size, crop_max_size),
                        multi_scale,
                    ]
                ),
                p=select_p,
            ),
            ToTensor(),
            Normalize(),
        ]
    )


def make_eval_transforms(size: int = EVAL_SIZE, max_size: int = EVAL_MAX_SIZE) -> Compose:
    """Evaluation preprocessing: shorter side ``size`` (longer at most ``max_size``), normalize."""
    return Compose([RandomResize([size], max_size=max_size), ToTensor(), Normalize()])
