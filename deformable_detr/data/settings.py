"""Where a run's data comes from and how it is batched and transformed: the ``dataset`` config node.

The defaults are the official COCO recipe; they live here and nowhere else (the Hydra schema of
the ``dataset`` group is generated from these classes, the YAML files only say what differs).
"""
import dataclasses
from typing import Dict, List, Mapping, Optional

from ..errors import ConfigError
from .synthetic import SyntheticConfig, ensure_synthetic_dataset
from .synthetic_shapes import SHAPE_CATEGORIES
from .transforms import (
    CROP_MAX_SIZE,
    CROP_MIN_SIZE,
    CROP_RESIZE_SIZES,
    EVAL_MAX_SIZE,
    EVAL_SIZE,
    TRAIN_MAX_SIZE,
    TRAIN_SCALES,
    Compose,
    make_eval_transforms,
    make_train_transforms,
)
from .yolo_layout import YoloLayout


@dataclasses.dataclass
class TrainTransformSettings:
    """Flip, then a resize of the shorter side to one of ``scales`` (longer at most ``max_size``),
    or a resize to one of ``crop_resize_sizes``, a random crop of sides in [crop_min_size,
    crop_max_size] and the same multi-scale resize."""

    scales: List[int] = dataclasses.field(default_factory=lambda: list(TRAIN_SCALES))
    max_size: int = TRAIN_MAX_SIZE
    crop_resize_sizes: List[int] = dataclasses.field(default_factory=lambda: list(CROP_RESIZE_SIZES))
    crop_min_size: int = CROP_MIN_SIZE
    crop_max_size: int = CROP_MAX_SIZE

    def build(self) -> Compose:
        return make_train_transforms(list(self.scales), self.max_size, list(self.crop_resize_sizes), self.crop_min_size, self.crop_max_size)


@dataclasses.dataclass
class EvalTransformSettings:
    """Shorter side ``size``, longer at most ``max_size``."""

    size: int = EVAL_SIZE
    max_size: int = EVAL_MAX_SIZE

    def build(self) -> Compose:
        return make_eval_transforms(self.size, self.max_size)


@dataclasses.dataclass
class DatasetSettings:
    """A COCO-format dataset (``kind="coco"``), a YOLO-format one (``kind="yolo"``, read as COCO-format
    data, see ``deformable_detr.data.yolo``) or the built-in synthetic one (``kind="synthetic"``, generated from
    ``synthetic`` into ``root``).

    ``root`` holds the standard layout ``train2017/``, ``val2017/``, ``annotations/instances_{train,val}2017.json``;
    ``train_images``/``train_annotations``/``val_images``/``val_annotations`` override its paths. A YOLO
    ``root`` holds ``data.yaml``, ``images/{train,val}/`` and ``labels/{train,val}/`` (or is the .yaml file).
    ``num_classes``: logits of the model (default: the largest category id + 1). ``batch_size``
    per process; ``skip_unreadable``: skip (and count) unreadable images instead of failing.
    ``size_group_window`` > 1: training batches images of similar augmented size, sorting every
    run of this many images of the epoch's shuffled order by shape (orientation, then area)
    before batching, so batches carry less padding and train faster; the same images and
    augmentations, in another order. 0 (default) keeps the shuffled order, as the reference
    implementation batches. ``train_pad_multiple`` > 1: training batches pad their height and
    width up to a multiple of it (32: the backbone's strides 8, 16 and 32 divide it), so that
    batch shapes repeat and the CPU's compiled convolution and matrix-product kernels are
    reused instead of compiled for almost every batch; 0 (default) pads to the batch maxima,
    as the reference implementation does. Evaluation batches always pad to their maxima.
    """

    kind: str = "coco"
    root: Optional[str] = None
    train_images: Optional[str] = None
    train_annotations: Optional[str] = None
    val_images: Optional[str] = None
    val_annotations: Optional[str] = None
    num_classes: Optional[int] = None
    batch_size: int = 2
    eval_batch_size: int = 2
    num_workers: int = 2
    size_group_window: int = 0
    train_pad_multiple: int = 0
    skip_unreadable: bool = False
    train_transforms: TrainTransformSettings = dataclasses.field(default_factory=TrainTransformSettings)
    eval_transforms: EvalTransformSettings = dataclasses.field(default_factory=EvalTransformSettings)
    synthetic: Optional[SyntheticConfig] = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"dataset.kind={self.kind} is not one of {', '.join(KINDS)}")
        paths = [f"dataset.{split}_{part}" for split in ("train", "val") for part in ("images", "annotations") if getattr(self, f"{split}_{part}")]
        if self.kind == "yolo" and paths:
            raise ConfigError(f"{paths[0]} is for COCO-format data; with dataset=yolo, dataset.root's data.yaml (train:, val:) "
                              "says where the images are: remove it")
        # built from a config, the nested settings arrive as plain dicts
        if isinstance(self.train_transforms, Mapping):
            self.train_transforms = TrainTransformSettings(**self.train_transforms)
        if isinstance(self.eval_transforms, Mapping):
            self.eval_transforms = EvalTransformSettings(**self.eval_transforms)
        if isinstance(self.synthetic, Mapping):
            self.synthetic = SyntheticConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.synthetic.items()})

    def prepare(self, root: str) -> None:
        """Make ``root`` ready to read: the built-in set is generated there the first time."""
        if self.kind == "synthetic":
            ensure_synthetic_dataset(root, self.synthetic or SyntheticConfig())

    def default_num_classes(self) -> int:
        """The class count a model of this dataset gets without reading its annotations:
        ``num_classes``, the built-in set's, a YOLO folder's names, or COCO's 91 logits."""
        if self.num_classes is not None:
            return int(self.num_classes)
        categories = built_in_categories(self.kind, self.root)
        return max(c["id"] for c in categories) + 1 if categories else COCO_LOGITS


KINDS = ("coco", "yolo", "synthetic")
COCO_LOGITS = 91  # class index = COCO category id, 1..90, and the unused 0


def built_in_categories(kind: Optional[str], root: Optional[str] = None) -> Optional[List[Dict[str, object]]]:
    """The categories [{id, name}] a dataset of ``kind`` has without reading its annotations: the
    synthetic set's shapes; a YOLO folder's data.yaml names at ``root`` (class k is id k; its
    errors when unreadable); None for a COCO-format dataset (its annotation file says)."""
    if kind == "synthetic":
        return [{"id": i, "name": name} for i, name in SHAPE_CATEGORIES]
    if kind == "yolo" and root:
        return YoloLayout.read(str(root)).categories()
    return None

