"""Images named on the command line: one file or every image of a directory."""
import os
from typing import List

import PIL.Image

from ..errors import DataError, MissingFileError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(path: str, key: str = "input") -> List[str]:
    """``path`` itself if it is a file, else the images directly inside the directory, sorted by name."""
    path = os.path.expanduser(path)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise MissingFileError(f"{key}={path} does not exist; pass an image file or a directory of images")
    files = sorted(os.path.join(path, name) for name in os.listdir(path) if name.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise MissingFileError(f"{key}={path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def read_rgb(path: str) -> PIL.Image.Image:
    """The image at ``path`` as RGB; DataError if it cannot be decoded."""
    try:
        with PIL.Image.open(path) as opened:
            return opened.convert("RGB")
    except Exception as error:  # any decoder failure means the same thing: unusable file
        raise DataError(f"image {path} cannot be decoded ({error}); replace or remove it") from error
