"""What ``Detector.predict`` accepts as an image, turned into the RGB PIL image evaluation reads."""
import os
from typing import Any

import numpy as np
import PIL.Image
import torch

from ..data.image_files import read_image, to_rgb


def as_rgb_image(image: Any) -> PIL.Image.Image:
    """A PIL image (any mode; 16-bit grey is scaled to 8 bits), a path (str or os.PathLike; EXIF
    orientation applied, as evaluation reads files), or an (H, W, 3) uint8 RGB array or tensor
    ((H, W) and (H, W, 1) are grey, (H, W, 4) RGBA) -> an RGB PIL image.

    Raises:
        TypeError: anything else, naming what was given and what is accepted.
        ValueError: an array of another dtype or shape, naming it and the fix.
    """
    if isinstance(image, PIL.Image.Image):
        return to_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        return read_image(os.fspath(image))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        return _array_image(image)
    raise TypeError(f"an image must be a PIL image, a path, or an (H, W, 3) uint8 RGB array or tensor; got {type(image).__name__}")


def _array_image(array: np.ndarray) -> PIL.Image.Image:
    if array.dtype != np.uint8:
        raise ValueError(f"an image array must be uint8 (H, W, 3) RGB, got dtype {array.dtype}; "
                         "for floats in [0, 1] pass (array * 255).round().astype(np.uint8)")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        return PIL.Image.fromarray(np.ascontiguousarray(array)).convert("RGB")
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        hint = "; a (3, H, W) tensor is channels-first: pass image.permute(1, 2, 0)" if array.ndim == 3 and array.shape[0] in (3, 4) else ""
        raise ValueError(f"an image array must be (H, W, 3) RGB (or (H, W) grey, (H, W, 4) RGBA), got shape {tuple(array.shape)}{hint}")
    if min(array.shape[:2]) == 0:
        raise ValueError(f"an image array must not be empty, got shape {tuple(array.shape)}")
    # uint8 (H, W, 3) reads as RGB, (H, W, 4) as RGBA
    return PIL.Image.fromarray(np.ascontiguousarray(array)).convert("RGB")
