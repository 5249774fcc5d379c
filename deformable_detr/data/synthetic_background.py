"""Textured backgrounds for the synthetic dataset (vectorized numpy, no per-pixel loops)."""
from __future__ import annotations

import math

import numpy as np
import PIL.Image

__all__ = ["BACKGROUND_KINDS", "random_colour", "render_background"]

BACKGROUND_KINDS = ("noise", "gradient", "stripes", "checker", "blotches")


def random_colour(rng: np.random.Generator) -> np.ndarray:
    """Uniform RGB colour, (3,) float32 in [0, 255]."""
    return rng.uniform(0, 255, size=3).astype(np.float32)


def _coordinates(width: int, height: int, angle: float) -> np.ndarray:
    """(height, width) distance of every pixel along direction ``angle``."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    return xs * math.cos(angle) + ys * math.sin(angle)


def _blend(weight: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    return first + weight[..., None] * (second - first)


def _gradient(rng, width, height):
    t = _coordinates(width, height, rng.uniform(0, 2 * math.pi))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return _blend(t, random_colour(rng), random_colour(rng))


def _stripes(rng, width, height):
    period = rng.uniform(6, 48)
    t = _coordinates(width, height, rng.uniform(0, math.pi)) / period + rng.uniform(0, 1)
    if rng.random() < 0.5:
        weight = np.floor(t) % 2
    else:
        weight = 0.5 + 0.5 * np.sin(2 * math.pi * t)
    return _blend(weight.astype(np.float32), random_colour(rng), random_colour(rng))


def _checker(rng, width, height):
    cell = rng.uniform(6, 40)
    angle = rng.uniform(-0.5, 0.5)
    u = _coordinates(width, height, angle) / cell
    v = _coordinates(width, height, angle + math.pi / 2) / cell
    weight = (np.floor(u) + np.floor(v)) % 2
    return _blend(weight.astype(np.float32), random_colour(rng), random_colour(rng))


def _blotches(rng, width, height):
    grid = rng.integers(0, 256, size=(int(rng.integers(2, 9)), int(rng.integers(2, 9)), 3), dtype=np.uint8)
    smooth = PIL.Image.fromarray(grid).resize((width, height), PIL.Image.BICUBIC)
    return np.asarray(smooth, dtype=np.float32)


def _noise(rng, width, height):
    # Noise drawn at a coarser grid and enlarged gives grains of a few pixels.
    grain = int(rng.choice([1, 2, 4]))
    small = rng.normal(0, rng.uniform(15, 45), size=(math.ceil(height / grain), math.ceil(width / grain), 3))
    grains = np.repeat(np.repeat(small, grain, axis=0), grain, axis=1)[:height, :width]
    return (random_colour(rng) + grains).astype(np.float32)


_RENDERERS = {"noise": _noise, "gradient": _gradient, "stripes": _stripes, "checker": _checker, "blotches": _blotches}


def render_background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Random texture, (height, width, 3) float32, roughly in [0, 255] (not yet clipped).

    One kind of ``BACKGROUND_KINDS``, half of the time blended with a second kind, plus a
    little pixel noise.
    """
    kinds = list(BACKGROUND_KINDS)
    image = _RENDERERS[kinds[int(rng.integers(len(kinds)))]](rng, width, height)
    if rng.random() < 0.5:
        overlay = _RENDERERS[kinds[int(rng.integers(len(kinds)))]](rng, width, height)
        image = _blend(np.full((height, width), rng.uniform(0.2, 0.5), dtype=np.float32), image, overlay)
    image = image + rng.normal(0, rng.uniform(2, 8), size=image.shape).astype(np.float32)
    return image.astype(np.float32)
