"""Shape categories of the synthetic dataset and their rasterized masks."""
from __future__ import annotations

import math
from typing import Dict, Tuple

import numpy as np
import PIL.Image
import PIL.ImageDraw

__all__ = ["SHAPE_CATEGORIES", "FILL_RATIO", "shape_mask"]

# (category id, name). Ids are deliberately not contiguous so that code relying on
# "label == category id" with gaps is exercised, as with COCO's ids 1..90.
SHAPE_CATEGORIES: Tuple[Tuple[int, str], ...] = (
    (2, "circle"),
    (3, "square"),
    (5, "triangle"),
    (8, "star"),
    (13, "ring"),
    (21, "cross"),
)

# Typical filled fraction of a shape's bounding box, used to aim at a target pixel area.
FILL_RATIO: Dict[str, float] = {
    "circle": 0.78,
    "square": 0.7,
    "triangle": 0.5,
    "star": 0.38,
    "ring": 0.5,
    "cross": 0.55,
}

_CIRCLE_VERTICES = 48


def _regular(count: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(count) / count
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star() -> np.ndarray:
    outer = _regular(5, 1.0, -math.pi / 2)
    inner = _regular(5, 0.45, -math.pi / 2 + math.pi / 5)
    return np.stack([outer, inner], axis=1).reshape(-1, 2)


def _cross(arm: float = 0.3) -> np.ndarray:
    a = arm
    return np.array(
        [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)],
        dtype=np.float64,
    )


def _outline(name: str) -> np.ndarray:
    if name in ("circle", "ring"):
        return _regular(_CIRCLE_VERTICES)
    if name == "square":
        return _regular(4, 1.0, math.pi / 4)
    if name == "triangle":
        return _regular(3, 1.0, -math.pi / 2)
    if name == "star":
        return _star()
    if name == "cross":
        return _cross()
    raise ValueError(f"unknown shape {name!r}; known shapes: {[n for _, n in SHAPE_CATEGORIES]}")


def shape_mask(name: str, width: int, height: int, angle: float, hole: float = 0.55) -> Tuple[np.ndarray, np.ndarray]:
    """Rasterize shape ``name`` rotated by ``angle`` (radians) and stretched to fill a box.

    Returns ``mask`` (height, width) bool and ``outline`` (k, 2) float64 polygon vertices
    (x, y) in the box's pixel coordinates. ``hole`` is a ring's inner radius relative to its
    outer radius. Stretching after rotation gives ellipses, rhombi and skewed shapes.
    """
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    outer = _outline(name) @ rotation.T
    low = outer.min(axis=0)
    scale = np.array([width - 1, height - 1], dtype=np.float64) / np.maximum(outer.max(axis=0) - low, 1e-9)
    outline = (outer - low) * scale
    canvas = PIL.Image.new("L", (width, height), 0)
    draw = PIL.ImageDraw.Draw(canvas)
    draw.polygon([tuple(point) for point in outline], fill=255)
    if name == "ring":
        inner = (_regular(_CIRCLE_VERTICES, hole) @ rotation.T - low) * scale
        draw.polygon([tuple(point) for point in inner], fill=0)
    return np.asarray(canvas) > 0, outline
