"""Data pipeline: COCO-format datasets (YOLO folders read as such), transforms, batching, sampling and the synthetic set."""
from .coco import CocoDetection, UnreadableImageError, build_coco_dataset, coco_split_paths
from .coco_annotations import AnnotationFormatError, load_coco_annotations
from .collate import collate, pad_images
from .sampler import ShardedSampler
from .synthetic import SyntheticConfig, ensure_synthetic_dataset
from .transforms import make_eval_transforms, make_train_transforms
from .yolo import build_yolo_dataset

__all__ = [
    "AnnotationFormatError",
    "CocoDetection",
    "ShardedSampler",
    "SyntheticConfig",
    "UnreadableImageError",
    "build_coco_dataset",
    "build_yolo_dataset",
    "coco_split_paths",
    "collate",
    "ensure_synthetic_dataset",
    "load_coco_annotations",
    "make_eval_transforms",
    "make_train_transforms",
    "pad_images",
]
