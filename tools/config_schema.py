"""Typed schemas of the config nodes that are not built by ``instantiate`` (those are checked
against their callable's signature instead, see ``config_checks``). Registering them makes
Hydra reject unknown keys, including ``+key=value`` additions, with the key's name."""
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from deformable_detr.data.synthetic import SyntheticConfig


@dataclass
class TrainTransforms:
    scales: List[int] = field(default_factory=lambda: [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800])
    max_size: int = 1333
    crop_resize_sizes: List[int] = field(default_factory=lambda: [400, 500, 600])
    crop_min_size: int = 384
    crop_max_size: int = 600


@dataclass
class EvalTransforms:
    size: int = 800
    max_size: int = 1333


# The synthetic dataset's defaults live in ``SyntheticConfig``; this schema only types them for Hydra.
_SYNTHETIC = SyntheticConfig()


@dataclass
class SyntheticParams:
    seed: int = _SYNTHETIC.seed
    num_train_images: int = _SYNTHETIC.num_train_images
    num_val_images: int = _SYNTHETIC.num_val_images
    min_image_size: int = _SYNTHETIC.min_image_size
    max_image_size: int = _SYNTHETIC.max_image_size
    min_objects: int = _SYNTHETIC.min_objects
    max_objects: int = _SYNTHETIC.max_objects
    empty_image_fraction: float = _SYNTHETIC.empty_image_fraction
    min_visible_fraction: float = _SYNTHETIC.min_visible_fraction
    size_probabilities: List[float] = field(default_factory=lambda: list(_SYNTHETIC.size_probabilities))
    colour_by_category: bool = _SYNTHETIC.colour_by_category
    min_small_area: float = _SYNTHETIC.min_small_area


@dataclass
class DatasetConfig:
    kind: str = "coco"
    root: Optional[str] = MISSING
    train_images: Optional[str] = None
    train_annotations: Optional[str] = None
    val_images: Optional[str] = None
    val_annotations: Optional[str] = None
    num_classes: Optional[int] = None
    batch_size: int = 2
    eval_batch_size: int = 2
    num_workers: int = 2
    skip_unreadable: bool = False
    train_transforms: TrainTransforms = field(default_factory=TrainTransforms)
    eval_transforms: EvalTransforms = field(default_factory=EvalTransforms)
    synthetic: Optional[SyntheticParams] = None


@dataclass
class TrainConfig:
    name: str = "deformable_detr"
    seed: int = 42
    device: str = "auto"
    resume: Optional[str] = "auto"
    init_weights: Optional[str] = None
    find_unused_parameters: bool = False
    model: Any = MISSING
    criterion: Any = MISSING
    postprocess: Any = MISSING
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    optimizer: Any = MISSING
    schedule: Any = MISSING
    trainer: Any = MISSING


@dataclass
class EvalConfig:
    checkpoint: str = MISSING
    name: str = "deformable_detr"
    seed: int = 42
    device: str = "auto"
    amp: Optional[str] = None
    model: Any = MISSING
    criterion: Any = MISSING
    postprocess: Any = MISSING
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    optimizer: Any = MISSING
    schedule: Any = MISSING
    trainer: Any = MISSING


@dataclass
class ExportConfig:
    checkpoint: str = MISSING
    format: str = "onnx"
    input: Optional[str] = None
    num_images: int = 4
    batch_size: int = 2
    min_match: float = 0.99
    latency_runs: int = 5
    name: str = "deformable_detr"
    seed: int = 42
    device: str = "cpu"
    model: Any = MISSING
    criterion: Any = MISSING
    postprocess: Any = MISSING
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    optimizer: Any = MISSING
    schedule: Any = MISSING
    trainer: Any = MISSING


def register() -> None:
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="eval_schema", node=EvalConfig)
    store.store(name="export_schema", node=ExportConfig)


register()
