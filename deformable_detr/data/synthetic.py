"""The built-in synthetic detection dataset, written once to disk in the COCO 2017 layout.

``ensure_synthetic_dataset(root, config)`` produces::

    root/train2017/000000000001.png ...
    root/val2017/000000000001.png ...
    root/annotations/instances_train2017.json
    root/annotations/instances_val2017.json
    root/synthetic_manifest.json   (generator version and parameters)

which ``build_coco_dataset(root, split, ...)`` then reads like COCO itself.

Content: shapes of ``SHAPE_CATEGORIES`` (category ids 2, 3, 5, 8, 13, 21) in colours of a
hue per category (or random colours, ``colour_by_category=False``) over textured
backgrounds (noise, gradients, stripes, checkers, blotches). Object areas aim at COCO's
small / medium / large classes with ``size_probabilities``. Later shapes occlude earlier
ones; a placement that would leave an earlier shape less than ``min_visible_fraction``
visible is moved or abandoned, so every visible shape is annotated. ``bbox`` is the extent
of the visible pixels, ``area`` their count (COCO's size classes use it), ``segmentation``
the shape's unoccluded outline polygon. A share ``empty_image_fraction`` of the images
holds no object.

Each image is a function of (seed, split, index) only, and files are written with fixed
settings, so equal parameters give byte-identical files.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple

import numpy as np
import PIL.Image

from ..errors import ConfigError, ExistingPathError
from .file_lock import file_lock
from .synthetic_scene import render_scene
from .synthetic_shapes import SHAPE_CATEGORIES

__all__ = [
    "SYNTHETIC_VERSION",
    "MANIFEST_NAME",
    "SyntheticConfig",
    "ensure_synthetic_dataset",
    "write_synthetic_dataset",
    "synthetic_split",
    "object_size_counts",
]

logger = logging.getLogger(__name__)

# Bump whenever rendering or file layout changes, so stale copies on disk are regenerated.
SYNTHETIC_VERSION = 2
MANIFEST_NAME = "synthetic_manifest.json"
_SPLITS = ("train", "val")


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the synthetic dataset; equal parameters give identical files.

    Image sides are drawn independently in [min_image_size, max_image_size] pixels; each
    non-empty image gets [min_objects, max_objects] placement attempts (fewer objects when
    a placement fails the visibility rule). ``size_probabilities`` weights the small /
    medium / large area classes; small objects cover at least ``min_small_area`` pixels
    before occlusion. ``colour_by_category`` gives each category its own hue
    (shape alone is then not the only cue, which lets a small model learn in minutes);
    False draws every colour at random, a harder task.
    """

    seed: int = 0
    num_train_images: int = 800
    num_val_images: int = 200
    min_image_size: int = 160
    max_image_size: int = 224
    min_objects: int = 1
    max_objects: int = 6
    empty_image_fraction: float = 0.03
    min_visible_fraction: float = 0.6
    size_probabilities: Tuple[float, float, float] = (0.15, 0.45, 0.4)
    colour_by_category: bool = True
    min_small_area: float = 300.0

    def __post_init__(self) -> None:
        def check(condition: bool, problem: str) -> None:
            if not condition:
                raise ConfigError(f"dataset.synthetic.{problem}")

        check(self.num_train_images >= 0, f"num_train_images={self.num_train_images} must be >= 0")
        check(self.num_val_images >= 0, f"num_val_images={self.num_val_images} must be >= 0")
        check(self.min_image_size >= 32, f"min_image_size={self.min_image_size} must be >= 32")
        check(
            self.max_image_size >= self.min_image_size,
            f"max_image_size={self.max_image_size} must be >= min_image_size={self.min_image_size}",
        )
        check(0 <= self.min_objects <= self.max_objects, "needs 0 <= min_objects <= max_objects")
        check(0.0 <= self.empty_image_fraction <= 1.0, "empty_image_fraction must be in [0, 1]")
        check(0.0 <= self.min_visible_fraction <= 1.0, "min_visible_fraction must be in [0, 1]")
        check(36 <= self.min_small_area < 900, f"min_small_area={self.min_small_area} must be in [36, 900) pixels")
        probabilities = tuple(float(p) for p in self.size_probabilities)
        check(
            len(probabilities) == 3 and min(probabilities) >= 0 and abs(sum(probabilities) - 1.0) < 1e-6,
            f"size_probabilities={self.size_probabilities} must be 3 non-negative numbers summing to 1",
        )
        object.__setattr__(self, "size_probabilities", probabilities)

    def num_images(self, split: str) -> int:
        return {"train": self.num_train_images, "val": self.num_val_images}[split]


def _manifest(config: SyntheticConfig) -> dict:
    # JSON round trip so tuples compare equal to what is read back from disk.
    manifest = {
        "generator": "deformable_detr synthetic shapes",
        "version": SYNTHETIC_VERSION,
        "parameters": dataclasses.asdict(config),
    }
    return json.loads(json.dumps(manifest))


def _read_manifest(root: str) -> Optional[dict]:
    try:
        with open(os.path.join(root, MANIFEST_NAME), "r", encoding="utf-8") as handle:
            return json.load(handle)
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _write_json(path: str, data) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, separators=(",", ":"))


def synthetic_split(directory: str, split: str, config: SyntheticConfig) -> dict:
    """Render ``split`` ("train" or "val"): PNGs into ``directory/{split}2017``; returns the COCO dict."""
    count = config.num_images(split)
    split_code = _SPLITS.index(split)
    image_dir = os.path.join(directory, f"{split}2017")
    os.makedirs(image_dir, exist_ok=True)
    # Which images stay empty is drawn once per split so their number is exact.
    chooser = np.random.default_rng(np.random.SeedSequence([config.seed, split_code, 0]))
    empty = set(chooser.permutation(count)[: int(round(config.empty_image_fraction * count))].tolist())
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, split_code, 1, index]))
        width = int(rng.integers(config.min_image_size, config.max_image_size + 1))
        height = int(rng.integers(config.min_image_size, config.max_image_size + 1))
        num_objects = 0 if index in empty else int(rng.integers(config.min_objects, config.max_objects + 1))
        pixels, objects = render_scene(
            rng,
            width,
            height,
            num_objects,
            config.size_probabilities,
            config.min_visible_fraction,
            colour_by_category=config.colour_by_category,
            min_small_area=config.min_small_area,
        )
        image_id = index + 1
        file_name = f"{image_id:012d}.png"
        PIL.Image.fromarray(pixels).save(os.path.join(image_dir, file_name), format="PNG", compress_level=1)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for scene_object in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": scene_object.category_id,
                    "bbox": scene_object.bbox,
                    "area": scene_object.area,
                    "iscrowd": 0,
                    "segmentation": [scene_object.outline],
                }
            )
    return {
        "info": {"description": f"synthetic shapes, {split}", "version": str(SYNTHETIC_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": category_id, "name": name, "supercategory": "shape"} for category_id, name in SHAPE_CATEGORIES
        ],
    }


def write_synthetic_dataset(directory: str, config: SyntheticConfig) -> None:
    """Write both splits and their annotation files into ``directory``; the manifest goes last,
    so a directory with a manifest is complete."""
    os.makedirs(os.path.join(directory, "annotations"), exist_ok=True)
    for split in _SPLITS:
        coco = synthetic_split(directory, split, config)
        _write_json(os.path.join(directory, "annotations", f"instances_{split}2017.json"), coco)
    _write_json(os.path.join(directory, MANIFEST_NAME), _manifest(config))


def ensure_synthetic_dataset(
    root: str, config: SyntheticConfig = SyntheticConfig(), timeout_s: Optional[float] = 3600.0
) -> str:
    """Make ``root`` hold the synthetic dataset of ``config``; returns its absolute path (``~`` expanded).

    Call it from every rank.

    - ``root`` with a manifest of the same parameters: reused as it is.
    - ``root`` with a manifest of other parameters: replaced by a fresh generation (logged).
    - ``root`` that exists without a manifest (and is not empty): ``ExistingPathError``, since
      it is not ours to overwrite.

    Generation happens in a temporary directory beside ``root`` that is renamed into place,
    so no reader sees a partial dataset. A lock file ``.{name}.lock`` beside ``root`` lets a
    single process generate while concurrent callers wait (up to ``timeout_s``) and then
    reuse its result.
    """
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    expected = _manifest(config)
    if _read_manifest(root) == expected:
        return root
    parent, name = os.path.split(root)
    os.makedirs(parent, exist_ok=True)
    with file_lock(os.path.join(parent, f".{name}.lock"), timeout_s=timeout_s):
        found = _read_manifest(root)
        if found == expected:
            return root
        if os.path.exists(root):
            if found is None and not (os.path.isdir(root) and not os.listdir(root)):
                raise ExistingPathError(
                    f"dataset.root={root} exists but is not a synthetic dataset (no {MANIFEST_NAME}); "
                    "choose another directory for the synthetic data or remove this one"
                )
            if found is not None:
                logger.warning("%s holds a synthetic dataset with other parameters; regenerating it", root)
        staging = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
        logger.info("generating the synthetic dataset (%d train / %d val images) into %s",
                    config.num_train_images, config.num_val_images, root)
        started = time.perf_counter()
        try:
            write_synthetic_dataset(staging, config)
            _replace_directory(staging, root)
            logger.info("generated the synthetic dataset in %.1f s", time.perf_counter() - started)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    if _read_manifest(root) != expected:
        raise RuntimeError(f"{root} was changed by another process while the synthetic dataset was written")
    return root


def _replace_directory(staging: str, root: str) -> None:
    parent, name = os.path.split(root)
    if os.path.isdir(root) and not os.listdir(root):
        os.rmdir(root)
    if not os.path.exists(root):
        try:
            os.rename(staging, root)
            return
        except OSError:
            # Another process without a working lock got there first; its copy is complete.
            shutil.rmtree(staging, ignore_errors=True)
            return
    retired = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
    os.rename(root, os.path.join(retired, name))
    os.rename(staging, root)
    shutil.rmtree(retired, ignore_errors=True)


def object_size_counts(annotations: Iterable[dict]) -> Dict[str, int]:
    """COCO size classes of annotations by ``area``: small < 32^2 <= medium < 96^2 <= large."""
    counts = {"small": 0, "medium": 0, "large": 0}
    for annotation in annotations:
        area = annotation["area"]
        counts["small" if area < 32**2 else "medium" if area < 96**2 else "large"] += 1
    return counts
