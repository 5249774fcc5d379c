"""Plain image files for inference: finding them, decoding them upright, preprocessing them as at evaluation."""
from __future__ import annotations

import glob
import logging
import os
import random
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from torch.utils.data import Dataset

from ..errors import DataError, MissingFileError
from .skip_counter import SkipCounter

__all__ = ["IMAGE_EXTENSIONS", "ImageFiles", "UnreadableImageFileError", "list_image_files", "read_image", "to_rgb"]

logger = logging.getLogger(__name__)

# what PIL decodes out of the box and people keep photos in
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_GLOB_CHARACTERS = set("*?[")
# how PIL holds 16-bit grey samples (0..65535): I;16* from PNG and TIFF, I (int32) from 16-bit PGM
_SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class UnreadableImageFileError(DataError):
    """An image file that exists but cannot be decoded; the message names the file."""


def list_image_files(source: str, key: str = "input") -> List[str]:
    """The images ``source`` names: one file, a folder's images (sorted by name, not recursive), or a glob (sorted).

    A single file is taken as it is, whatever its extension; from folders and globs only files with an
    ``IMAGE_EXTENSIONS`` extension are taken. Nothing found is an error naming ``key=source``.
    """
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = sorted(os.path.join(path, name) for name in os.listdir(path) if _is_image(os.path.join(path, name)))
        if not files:
            raise DataError(f"{key}={source} is a folder without images ({', '.join(IMAGE_EXTENSIONS)}); name a folder of images, an image or a glob")
        return files
    if _GLOB_CHARACTERS & set(path):
        files = sorted(p for p in glob.glob(path, recursive=True) if _is_image(p))
        if not files:
            raise DataError(f"{key}={source} matches no image file; check the pattern (quote it so the shell does not expand it)")
        return files
    raise MissingFileError(f"{key}={source} does not exist; name an image, a folder of images or a glob")


def _is_image(path: str) -> bool:
    return os.path.isfile(path) and os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """``image`` as 8-bit RGB.

    16-bit grey (modes I;16, I;16B, ... and I) is scaled from 0..65535 to 0..255, rounded (PIL's
    own conversion clips it, turning most pixels white); samples of a 32-bit I image outside that
    range are clipped. 16-bit colour and grey+alpha PNGs need nothing here: PIL decodes them as 8-bit
    RGB / RGBA already, keeping each sample's high byte.
    """
    if image.mode in _SIXTEEN_BIT_GREY:
        samples = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        grey = (samples * 255 + 32767) // 65535  # round(v * 255 / 65535)
        return PIL.Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def read_image(path: str) -> PIL.Image.Image:
    """Decode ``path`` as 8-bit RGB (see ``to_rgb``), turned upright by its EXIF orientation (as a
    camera meant it to be seen)."""
    try:
        with PIL.Image.open(path) as opened:
            upright = PIL.ImageOps.exif_transpose(opened)
            return to_rgb(upright)
    except Exception as error:  # any decoder failure means the same thing: unusable file
        raise UnreadableImageFileError(f"image {path} cannot be decoded ({type(error).__name__}: {error}); replace it, or skip such files") from error


class ImageFiles(Dataset):
    """Images of a list of paths, as ``(image, target)`` pairs for ``collate``.

    ``image`` is ``transforms``' output (normally a normalized float tensor (3, H, W)); ``target``
    holds ``index`` () int64 (into ``paths``), ``orig_size`` and ``size`` (2,) int64 (h, w) of the
    upright decoded image and after the transforms. With ``skip_unreadable`` an undecodable file
    gives ``None`` (``collate`` drops it), is logged and counted in ``skipped``; otherwise it raises.
    """

    def __init__(self, paths: Sequence[str], transforms: Callable, skip_unreadable: bool = False, skip_key: str = "skip_unreadable"):
        self.paths = list(paths)
        self.skip_key = skip_key
        self.transforms = transforms
        self.skip_unreadable = skip_unreadable
        self.skipped = SkipCounter()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Optional[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]:
        try:
            image = read_image(self.paths[index])
        except UnreadableImageFileError as error:
            if not self.skip_unreadable:
                raise UnreadableImageFileError(f"{error} with {self.skip_key}=true") from None
            self.skipped.increment()
            logger.warning("skipping image: %s", error)
            return None
        w, h = image.size
        target = {"index": torch.tensor(index), "orig_size": torch.tensor([h, w]), "size": torch.tensor([h, w])}
        # evaluation transforms draw nothing at random; the generator only satisfies the interface
        return self.transforms(image, target, random.Random(index))
