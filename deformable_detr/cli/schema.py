"""Typed schemas of the root configs, their ``dataset`` node generated from the library's
``DatasetSettings`` (which holds the defaults). Registering them makes Hydra reject unknown keys,
including ``+key=value`` additions, with the key's name; the other groups are ``_target_`` nodes
checked against their callable's signature (see ``checks``)."""
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from deformable_detr.data.settings import DatasetSettings


def schema_of(cls: type, target: bool = False) -> type:
    """The Hydra schema of a plain dataclass of the library: its fields with their defaults (kept
    there, in one place), nested dataclasses likewise (as mutable copies, so overrides apply),
    and with ``target`` a ``_target_`` naming the class, so ``instantiate`` builds it."""
    fields = [("_target_", str, field(default=f"{cls.__module__}.{cls.__qualname__}"))] if target else []
    hints = typing.get_type_hints(cls)  # resolves annotations written as strings
    for f in dataclasses.fields(cls):
        default = {"default_factory": f.default_factory} if f.default_factory is not dataclasses.MISSING else {"default": f.default}
        if isinstance(default.get("default"), tuple):  # OmegaConf keeps lists
            default = {"default_factory": lambda value=default["default"]: list(value)}
        kind = _schema_type(hints[f.name])
        if dataclasses.is_dataclass(kind) and "default_factory" in default:
            default = {"default_factory": kind}  # the nested defaults, from the nested class
        fields.append((f.name, kind, field(**default)))
    return dataclasses.make_dataclass(f"{cls.__name__}Schema", fields)


def _schema_type(annotation):
    """Dataclass types (also inside Optional) -> their schema; tuples -> lists; others unchanged."""
    if dataclasses.is_dataclass(annotation):
        return schema_of(annotation)
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        return typing.Optional[_schema_type(next(a for a in arguments if a is not type(None)))]
    if origin is tuple:
        return List[arguments[0]] if arguments else List[Any]
    return annotation


DatasetNode = schema_of(DatasetSettings, target=True)


@dataclass
class RecipeConfig:
    """What every tool's root config holds: the run's name and seed, the device, and the groups
    that make up a recipe (model, criterion, post-processing, dataset, optimizer, schedule, trainer)."""

    name: str = "deformable_detr"
    seed: int = 42
    device: str = "auto"
    model: Any = MISSING
    criterion: Any = MISSING
    postprocess: Any = MISSING
    dataset: DatasetNode = field(default_factory=DatasetNode)
    optimizer: Any = MISSING
    schedule: Any = MISSING
    trainer: Any = MISSING


@dataclass
class TrainConfig(RecipeConfig):
    resume: Optional[str] = "auto"
    init_weights: Optional[str] = None
    overwrite: bool = False
    find_unused_parameters: bool = False


@dataclass
class EvalConfig(RecipeConfig):
    checkpoint: str = MISSING
    amp: Optional[str] = None
    compile: bool = False


@dataclass
class InferConfig(RecipeConfig):
    checkpoint: str = MISSING
    input: str = MISSING
    amp: Optional[str] = None
    compile: bool = False
    batch_size: int = 2
    num_workers: int = 2
    score_threshold: float = 0.3
    skip_unreadable: bool = False
    picture_format: str = "auto"


@dataclass
class VisualizeConfig(RecipeConfig):
    checkpoint: str = MISSING
    input: str = MISSING
    amp: Optional[str] = None
    layer: int = -1
    encoder_layer: int = -1
    top_k: int = 4
    queries: Optional[List[int]] = None
    points: Optional[List[Any]] = None  # [[x, y], ...]; checked by tools/visualize.py
    colour_by: str = "level"


@dataclass
class ProfileSettings:
    batch_size: int = 2
    image_size: List[int] = field(default_factory=lambda: [512, 683])
    precision: str = "fp32"
    warmup: int = 1
    steps: int = 2


@dataclass
class BenchmarkConfig(RecipeConfig):
    num_classes: Optional[int] = None
    image_size: Optional[List[int]] = None
    measure: List[str] = field(default_factory=lambda: ["params", "flops", "inference", "training"])
    precisions: List[str] = field(default_factory=lambda: ["fp32", "bf16"])
    compile: List[bool] = field(default_factory=lambda: [False])
    inference_batch_sizes: List[int] = field(default_factory=lambda: [1, 4])
    training_batch_size: int = 2
    warmup: int = 1
    iterations: int = 3
    threads: int = 0
    profile: ProfileSettings = field(default_factory=ProfileSettings)


@dataclass
class ExportConfig(RecipeConfig):
    device: str = "cpu"
    checkpoint: str = MISSING
    format: str = "onnx"
    input: Optional[str] = None
    num_images: int = 4
    batch_size: int = 2
    min_match: float = 0.99
    latency_runs: int = 5


def register() -> None:
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="eval_schema", node=EvalConfig)
    store.store(name="infer_schema", node=InferConfig)
    store.store(name="visualize_schema", node=VisualizeConfig)
    store.store(name="benchmark_schema", node=BenchmarkConfig)
    store.store(name="export_schema", node=ExportConfig)


register()
