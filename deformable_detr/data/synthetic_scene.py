"""One synthetic image: shapes on a textured background, with occlusion-aware annotations."""
from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .synthetic_background import random_colour, render_background
from .synthetic_shapes import FILL_RATIO, SHAPE_CATEGORIES, shape_mask

__all__ = ["SIZE_AREA_RANGES", "SceneObject", "render_scene"]

# Pixel-area ranges aimed at for COCO's small (< 32^2), medium (< 96^2) and large objects.
# They stay clear of the class borders because occlusion and rasterization shift the
# final area a little. The small range starts at ``min_small_area`` (80 unless set).
SIZE_AREA_RANGES = ((80.0, 900.0), (1200.0, 8000.0), (10000.0, 40000.0))

_MIN_SIDE = 6  # pixels; smaller shapes are not recognizable
_PLACEMENT_TRIES = 10
_COLOUR_TRIES = 8
_MIN_CONTRAST = 80.0  # RGB distance between a shape and what it covers
_HUE_JITTER = 0.04  # hue spread of category-coloured shapes; neighbouring categories are 1/6 apart


@dataclass
class SceneObject:
    """One visible shape: category id, visible box [x, y, w, h] in pixels, visible pixel count
    ``area`` and the unoccluded ``outline`` polygon [x0, y0, x1, y1, ...] in image pixels."""

    category_id: int
    bbox: List[int]
    area: int
    outline: List[float]


def _target_area(rng: np.random.Generator, size_probabilities: Sequence[float], image_area: float, min_small_area: float) -> float:
    size_class = int(rng.choice(3, p=np.asarray(size_probabilities, dtype=np.float64)))
    # Large objects may not cover more than about half of a small image.
    limit = 0.45 * image_area
    for candidate in range(size_class, -1, -1):
        low, high = SIZE_AREA_RANGES[candidate]
        low = min_small_area if candidate == 0 else low
        high = min(high, limit)
        if high > low:
            return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    return min_small_area


def _hue_colour(rng: np.random.Generator, hue: float) -> np.ndarray:
    """Saturated, bright RGB colour near ``hue`` (in [0, 1)), (3,) float32 in [0, 255]."""
    jittered = (hue + rng.uniform(-_HUE_JITTER, _HUE_JITTER)) % 1.0
    rgb = colorsys.hsv_to_rgb(jittered, rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0))
    return np.asarray(rgb, dtype=np.float32) * 255.0


def _pick_colour(rng: np.random.Generator, covered: np.ndarray, hue: Optional[float]) -> np.ndarray:
    """Colour far from the mean of the pixels it will cover; the farthest of a few draws otherwise.

    With ``hue`` the draws stay near that hue (category-coloured shapes); without, any RGB colour.
    """
    reference = covered.mean(axis=0)
    best, best_distance = None, -1.0
    for _ in range(_COLOUR_TRIES):
        colour = random_colour(rng) if hue is None else _hue_colour(rng, hue)
        distance = float(np.linalg.norm(colour - reference))
        if distance > best_distance:
            best, best_distance = colour, distance
        if distance >= _MIN_CONTRAST:
            break
    return best


def render_scene(
    rng: np.random.Generator,
    width: int,
    height: int,
    num_objects: int,
    size_probabilities: Sequence[float],
    min_visible_fraction: float,
    colour_by_category: bool = False,
    min_small_area: float = SIZE_AREA_RANGES[0][0],
) -> Tuple[np.ndarray, List[SceneObject]]:
    """Draw up to ``num_objects`` shapes over a random background.

    Shapes are drawn in order, later ones over earlier ones. A placement that would leave
    an already drawn shape with less than ``min_visible_fraction`` of its pixels visible is
    retried elsewhere and, after a few failures, the new shape is left out; so every drawn
    shape is annotated and reasonably visible. Boxes and areas are measured on the final
    visible pixels. Returns the image (height, width, 3) uint8 and its objects.
    """
    canvas = render_background(rng, width, height)
    owner = np.full((height, width), -1, dtype=np.int32)  # index of the shape on top, -1 for background
    placed: List[Tuple[int, int, int, np.ndarray, np.ndarray]] = []  # (category, x0, y0, mask, outline)
    visible: List[int] = []
    full: List[int] = []
    for _ in range(num_objects):
        category_index = int(rng.integers(len(SHAPE_CATEGORIES)))
        category_id, name = SHAPE_CATEGORIES[category_index]
        area = _target_area(rng, size_probabilities, width * height, min_small_area)
        aspect = math.exp(rng.uniform(math.log(0.8), math.log(1.25)))
        box_area = area / FILL_RATIO[name]
        box_w = int(round(min(max(math.sqrt(box_area * aspect), _MIN_SIDE), width - 2)))
        box_h = int(round(min(max(math.sqrt(box_area / aspect), _MIN_SIDE), height - 2)))
        mask, outline = shape_mask(name, box_w, box_h, rng.uniform(0, 2 * math.pi), rng.uniform(0.45, 0.65))
        pixels = int(mask.sum())
        if pixels == 0:
            continue
        for _ in range(_PLACEMENT_TRIES):
            x0 = int(rng.integers(0, width - box_w + 1))
            y0 = int(rng.integers(0, height - box_h + 1))
            covered = owner[y0 : y0 + box_h, x0 : x0 + box_w][mask]
            lost = np.bincount(covered[covered >= 0], minlength=len(placed))
            remaining = np.asarray(visible, dtype=np.int64) - lost
            if np.all(remaining >= min_visible_fraction * np.asarray(full, dtype=np.float64)):
                break
        else:
            continue
        region = canvas[y0 : y0 + box_h, x0 : x0 + box_w]
        hue = category_index / len(SHAPE_CATEGORIES) if colour_by_category else None
        colour = _pick_colour(rng, region[mask], hue)
        # Mild shading and grain so shapes are not perfectly flat.
        shade = np.linspace(-1, 1, box_w, dtype=np.float32)[None, :] * rng.uniform(-20, 20)
        grain = rng.normal(0, 5, size=(box_h, box_w)).astype(np.float32)
        region[mask] = colour[None, :] + (shade + grain)[mask][:, None]
        owner[y0 : y0 + box_h, x0 : x0 + box_w][mask] = len(placed)
        for index, count in enumerate(lost):
            visible[index] -= int(count)
        placed.append((category_id, x0, y0, mask, outline))
        visible.append(pixels)
        full.append(pixels)

    objects = []
    for index, (category_id, x0, y0, mask, outline) in enumerate(placed):
        box_h, box_w = mask.shape
        mine = owner[y0 : y0 + box_h, x0 : x0 + box_w] == index
        rows = np.flatnonzero(mine.any(axis=1))
        cols = np.flatnonzero(mine.any(axis=0))
        left, top = x0 + int(cols[0]), y0 + int(rows[0])
        objects.append(
            SceneObject(
                category_id=category_id,
                bbox=[left, top, x0 + int(cols[-1]) + 1 - left, y0 + int(rows[-1]) + 1 - top],
                area=int(mine.sum()),
                outline=[round(float(v), 2) for v in (outline + np.array([x0, y0])).reshape(-1)],
            )
        )
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return image, objects
