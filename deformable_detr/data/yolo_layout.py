"""A YOLO-format dataset folder: its data.yaml (class names, each split's image folder) and where an
image's label file lies.

The standard layout, and what is read of data.yaml (``dataset.root`` is ROOT or the .yaml file itself):

    ROOT/data.yaml            names: [cat, dog] or {0: cat, 1: dog}; nc, path, train, val optional
    ROOT/images/{train,val}/  the images (.jpg, .png, ...; sub-folders too)
    ROOT/labels/{train,val}/  one <image stem>.txt per image

``names`` gives class k's name (k = 0..n-1); ``nc``, when present, must be n. ``path`` (the dataset
folder): absolute, or relative to data.yaml's folder; data.yaml's folder when absent or when that
folder does not exist (Ultralytics resolves it against its own datasets folder). ``train``/``val``:
an image folder, absolute or relative to ``path``; a ``../x`` that does not exist is read as ``x``, as
Ultralytics does (Roboflow's ``../train/images``); default ``images/train`` and ``images/val``. Lists
and .txt lists of images are not read. ``kpt_shape: [K, D]`` (pose data): lines carry K*D keypoint
values after the box. An image's label file is its path with the last ``images`` folder replaced by
``labels`` and the extension by ``.txt`` (next to the image when its path has no ``images`` folder).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List

import yaml

from ..errors import DataError, MissingFileError

__all__ = ["DATA_YAML", "YoloLayout", "label_dir_of", "looks_like_yolo"]

DATA_YAML = "data.yaml"
_LAYOUT = "expected a YOLO dataset: ROOT/data.yaml (names: [...]), ROOT/images/{train,val}/ and ROOT/labels/{train,val}/"


@dataclasses.dataclass(frozen=True)
class YoloLayout:
    """What data.yaml says: ``data_yaml`` its path, ``names`` class k's name at k, ``folder`` the
    dataset folder split paths are relative to, ``splits`` data.yaml's ``train``/``val`` values (when
    given), ``keypoint_values`` the numbers after the box on a pose line (0 without ``kpt_shape``)."""

    data_yaml: str
    names: List[str]
    folder: str
    splits: Dict[str, str]
    keypoint_values: int = 0

    @classmethod
    def read(cls, root: str, context: str = "dataset.root") -> "YoloLayout":
        """The layout of ``root`` (a dataset folder holding data.yaml, or a .yaml file); errors name
        ``context={root}`` or data.yaml and the fix."""
        root = os.path.abspath(os.path.expanduser(os.fspath(root)))
        path = root if root.endswith((".yaml", ".yml")) else os.path.join(root, DATA_YAML)
        if not os.path.exists(root):
            raise MissingFileError(f"{context}={root} does not exist; {_LAYOUT}")
        if not os.path.isfile(path):
            raise MissingFileError(f"{context}={root} has no {DATA_YAML}; write {path} with the class names in class-index order "
                                   "(names: [cat, dog]), or point it at the dataset's .yaml file")
        try:
            with open(path, encoding="utf-8") as handle:
                content = yaml.safe_load(handle)
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise DataError(f"{path} is not valid YAML ({' '.join(str(error).split())}); fix the file") from error
        if not isinstance(content, dict):
            raise DataError(f"{path} is not a mapping of keys (names:, train:, val:); see the YOLO layout: {_LAYOUT}")
        names = _names(content, path)
        shape = content.get("kpt_shape")
        keypoint_values = 0
        if shape is not None:
            if not (isinstance(shape, (list, tuple)) and len(shape) == 2 and all(isinstance(v, int) and v > 0 for v in shape)):
                raise DataError(f"{path}: kpt_shape: {shape} is not [keypoints, values per keypoint] (e.g. [17, 3]); fix or remove it")
            keypoint_values = shape[0] * shape[1]
        splits = {}
        for split in ("train", "val"):
            value = content.get(split)
            if value is None:
                continue
            if not isinstance(value, str) or value.endswith(".txt"):
                raise DataError(f"{path}: {split}: {value} is not a folder; point {split} at the folder of its images (e.g. images/{split})")
            splits[split] = value
        folder = os.path.dirname(path)
        if isinstance(content.get("path"), str):
            named = os.path.join(folder, os.path.expanduser(content["path"]))
            folder = os.path.abspath(named) if os.path.isdir(named) else folder
        return cls(path, names, folder, splits, keypoint_values)

    def image_dir(self, split: str) -> str:
        """The image folder of ``split`` ("train" or "val"); missing, an error naming data.yaml's key."""
        value = self.splits.get(split)
        if value is None:
            default = os.path.join(self.folder, "images", split)
            if not os.path.isdir(default):
                raise MissingFileError(f"{self.data_yaml} names no {split} folder and {default} does not exist; "
                                       f"add {split}: <folder of the {split} images> to it, or put the images there")
            return default
        candidate = os.path.normpath(os.path.join(self.folder, os.path.expanduser(value)))
        if not os.path.isdir(candidate) and value.startswith("../"):
            candidate = os.path.normpath(os.path.join(self.folder, value[3:]))
        if not os.path.isdir(candidate):
            raise MissingFileError(f"{self.data_yaml}: {split}: {value} is no folder ({candidate} does not exist); "
                                   f"point {split} at the folder of the {split} images, relative to {self.folder}")
        return candidate

    def categories(self) -> List[Dict[str, Any]]:
        """[{id, name}]: class k is category id k."""
        return [{"id": index, "name": name} for index, name in enumerate(self.names)]


def _names(content: Dict[str, Any], path: str) -> List[str]:
    """data.yaml's ``names`` as a list (class k's name at k), checked against ``nc``."""
    names = content.get("names")
    if names is None:
        raise DataError(f"{path} has no names; add the class names in class-index order, e.g. names: [cat, dog]")
    if isinstance(names, dict):
        try:
            by_index = {int(index): name for index, name in names.items()}
        except (TypeError, ValueError):
            raise DataError(f"{path}: names has keys that are not class indices ({list(names)}); use {{0: cat, 1: dog}} or a list") from None
        if sorted(by_index) != list(range(len(by_index))):
            raise DataError(f"{path}: names has class indices {sorted(by_index)}; they must be 0..{len(by_index) - 1}, one name each")
        names = [by_index[index] for index in range(len(by_index))]
    if not isinstance(names, list) or not names:
        raise DataError(f"{path}: names is {names!r}; list the class names in class-index order, e.g. names: [cat, dog]")
    count = content.get("nc")
    if count is not None and count != len(names):
        raise DataError(f"{path}: nc is {count} but names has {len(names)} classes; make them agree (or remove nc)")
    return [str(name) for name in names]


def label_dir_of(image_dir: str) -> str:
    """The label folder of ``image_dir``: its last ``images`` folder replaced by ``labels``
    (``image_dir`` itself when its path has no ``images`` folder)."""
    parts = os.path.normpath(image_dir).split(os.sep)
    if "images" not in parts:
        return image_dir
    last = len(parts) - 1 - parts[::-1].index("images")
    return os.sep.join(parts[:last] + ["labels"] + parts[last + 1:])


def looks_like_yolo(root: str) -> bool:
    """Whether ``root`` looks like a YOLO dataset: a .yaml file, or a folder with data.yaml or with
    both images/ and labels/."""
    root = os.path.expanduser(os.fspath(root))
    if os.path.isfile(root):
        return root.endswith((".yaml", ".yml"))
    return os.path.isfile(os.path.join(root, DATA_YAML)) or all(os.path.isdir(os.path.join(root, d)) for d in ("images", "labels"))
