"""What the tools share: the command-line check, device, run directory, logging, data from config,
and the one error path (a ``UserError`` is one line and exit status 2; anything else a traceback)."""
import difflib
import functools
import logging
import os
import shutil
import sys
from typing import Callable, Iterable, Optional, Tuple, Type

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from deformable_detr.errors import ConfigError, DeviceError, MissingFileError, UserError

from deformable_detr.data import (
    CocoDetection,
    ShardedSampler,
    SyntheticConfig,
    build_coco_dataset,
    collate,
    ensure_synthetic_dataset,
)
from deformable_detr.data.settings import DatasetSettings
from deformable_detr.engine.distributed import shutdown_distributed
from deformable_detr.utils import allocator, distributed

logger = logging.getLogger("deformable_detr")

# oneDNN, which runs the CPU convolutions and bfloat16 matrix products, compiles a primitive per
# input shape and keeps 1024 of them by default. Over the default recipe's batch shapes (bfloat16)
# a step took 0.262-0.270 s with 1024 and 0.219-0.221 s with 4096; padded to multiples of 32 px
# (dataset.train_pad_multiple), 0.227 s with 1024 and 0.220 s with 16384. Shapes that never
# recur fill any capacity within an epoch or two, so it helps most early in a run. oneDNN reads
# it at its first primitive, so it is set before any model runs; the environment's value wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "4096")

# freed blocks of 32 MiB and more stay in the process for the next step instead of being unmapped
# and faulted in again (deformable_detr/utils/allocator.py): the r50 recipe's CPU step took
# 3.66 s with glibc's defaults and 3.40-3.53 s with this; the environment's settings win
allocator.keep_freed_memory()


CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def resolve_device(name: str) -> str:
    """``device=`` as a torch device string; fails at once when the device is not there."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError(f"device={name} is not one of auto, cpu, cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device={name} but no CUDA GPU is visible (torch {torch.__version__}); use device=cpu")
    return name


def check_files_exist(cfg: DictConfig, keys: Iterable[str]) -> None:
    """Each of ``keys`` (e.g. ``resume``, ``init_weights``) that names a path must name an existing
    file; checked before any data or model is built."""
    for key in keys:
        path = OmegaConf.select(cfg, key)
        if path in (None, "auto", ""):
            continue
        if not os.path.isfile(os.path.expanduser(str(path))):
            fix = {"resume": "; resume=null starts over, resume=auto continues the run directory's last checkpoint"}.get(key, "")
            raise MissingFileError(f"{key}={path} does not exist (or is not a file){fix}")


def check_command_line(config_name: str, arguments: Iterable[str]) -> None:
    """Report a misspelled key override (``trainer.epoch=1``) as one line with a suggestion, as
    the checks do for ``+key=`` additions; Hydra itself only says the key is not in the struct."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    overrides = [a for a in arguments if "=" in a and not a.startswith("-")]
    groups = {name for name in os.listdir(CONFIG_DIR) if os.path.isdir(os.path.join(CONFIG_DIR, name))}

    def is_group(override: str) -> bool:
        key = override.lstrip("+~").split("=", 1)[0].split("@", 1)[0]
        return key in groups or key.startswith("hydra") or "/" in key

    plain = [o for o in overrides if not o.startswith(("+", "~")) and not is_group(o)]
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=[o for o in overrides if is_group(o)])
            if plain:
                _report_bad_key(cfg, plain)
            compose(config_name=config_name, overrides=overrides)
    except ConfigCompositionException as error:
        # e.g. trainer.epochs=abc: the typed schema refuses the value; one line instead of Hydra's report
        cause = str(error.__cause__ or error).splitlines()[0]
        print(f"error: {str(error).splitlines()[0]}: {cause}", file=sys.stderr)
        sys.exit(2)
    except Exception:
        return  # anything else Hydra reports itself, when it composes the config again


def _report_bad_key(cfg: DictConfig, plain: Iterable[str]) -> None:
    for override in plain:
        key = override.split("=", 1)[0]
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        if not isinstance(parent, DictConfig) or leaf in parent.keys():
            continue
        close = difflib.get_close_matches(leaf, [str(k) for k in parent.keys()], n=1)
        prefix = f"{parent_key}." if parent_key else ""
        hint = f"did you mean {prefix}{close[0]}?" if close else f"known keys: {', '.join(map(str, parent.keys()))}"
        print(f"error: {key} is not a known key ({hint})", file=sys.stderr)
        sys.exit(2)


def run_directory() -> str:
    """Hydra's run directory, the same on every rank (rank 0's): ``${now:...}`` can differ between
    processes started a second apart, so the other ranks drop theirs."""
    own = HydraConfig.get().runtime.output_dir
    chosen = distributed.all_gather_object(own)[0]
    if own != chosen:
        shutil.rmtree(own, ignore_errors=True)
    os.makedirs(chosen, exist_ok=True)
    return chosen


def setup_logging(run_dir: str, filename: str) -> None:
    """The main process logs INFO to the console and ``run_dir/filename``; others only warnings."""
    rank = distributed.get_rank()
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    fmt = "%(asctime)s %(levelname)s %(message)s" if rank == 0 else f"%(asctime)s [rank {rank}] %(levelname)s %(message)s"
    formatter = logging.Formatter(fmt, datefmt="%H:%M:%S")
    console = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    console.setFormatter(formatter)
    root.addHandler(console)
    if rank == 0:
        file_handler = logging.FileHandler(os.path.join(run_dir, filename))
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(file_handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def dataset_settings(node) -> DatasetSettings:
    """The ``dataset`` config node, built (a ``DatasetSettings``; passed through if it is one)."""
    if isinstance(node, DatasetSettings):
        return node
    settings = build(node, _convert_="all")
    if settings.kind not in ("coco", "synthetic"):
        raise ConfigError(f"dataset.kind={settings.kind} is not one of coco, synthetic")
    return settings


def dataset_root(node) -> Optional[str]:
    """``dataset.root`` with ``~`` expanded; for the synthetic set, generated first if needed."""
    data = dataset_settings(node)
    if not data.root:
        if data.val_images and data.val_annotations:
            return None
        raise ConfigError(
            "dataset.root is required: dataset.root=DIR with DIR/{train2017,val2017}/ and "
            "DIR/annotations/instances_{train,val}2017.json (or set dataset.val_images and dataset.val_annotations)"
        )
    root = os.path.abspath(os.path.expanduser(str(data.root)))
    if data.kind == "synthetic":
        ensure_synthetic_dataset(root, data.synthetic or SyntheticConfig())
    return root


def build_dataset(node, split: str, root: Optional[str], seed: int) -> CocoDetection:
    """The ``split`` ("train"/"val") dataset of the ``dataset`` config node."""
    data = dataset_settings(node)
    transforms = data.train_transforms.build() if split == "train" else data.eval_transforms.build()
    images, annotations = getattr(data, f"{split}_images"), getattr(data, f"{split}_annotations")
    if images or annotations:
        default_images = os.path.join(root, f"{split}2017") if root else None
        default_annotations = os.path.join(root, "annotations", f"instances_{split}2017.json") if root else None
        images, annotations = images or default_images, annotations or default_annotations
        if not images or not annotations:
            raise ConfigError(f"set both dataset.{split}_images and dataset.{split}_annotations (or dataset.root)")
        return CocoDetection(images, annotations, transforms, seed=seed, skip_unreadable=data.skip_unreadable, context=f"dataset.{split}_images")
    return build_coco_dataset(root, split, transforms, seed=seed, skip_unreadable=data.skip_unreadable, context="dataset.root")


def make_loader(dataset, batch_size: int, num_workers: int, train: bool, seed: int, device: torch.device,
                group_window: int = 0, pad_multiple: int = 0):
    """A DataLoader over this rank's shard: shuffled, padded and drop_last for training; every
    image exactly once over all ranks for evaluation. ``group_window`` > 1 batches images of
    similar augmented size together (see ``ShardedSampler``); ``pad_multiple`` > 1 pads each
    batch's height and width up to a multiple of it (see ``pad_images``)."""
    if group_window < 0:
        raise ConfigError(f"dataset.size_group_window={group_window}: use 0 (shuffled batches) or a window of images, e.g. 64")
    if pad_multiple < 0:
        raise ConfigError(f"dataset.train_pad_multiple={pad_multiple}: use 0 (pad to the batch's largest image) or a multiple, e.g. 32")
    # datasets whose augmented sizes are unknown load in the shuffled order
    sizes = dataset.output_sizes if group_window > 1 and getattr(dataset, "predicts_sizes", False) else None
    sampler = ShardedSampler(len(dataset), shuffle=train, pad=train, seed=seed, sizes=sizes, group_window=group_window)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=train,
        collate_fn=functools.partial(collate, pad_multiple=pad_multiple),
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),
    )
    if train and len(loader) == 0:
        raise ConfigError(
            f"the training set has {len(dataset)} images, fewer than one batch of dataset.batch_size={batch_size} "
            f"per process; lower dataset.batch_size"
        )
    return loader


def describe_grouping(loader) -> str:
    """For the data log line: ``, batched by size (windows of N images)`` when the training loader
    groups, else ``""`` (or why it cannot)."""
    sampler = loader.sampler
    if getattr(sampler, "group_window", 0) < 2:
        return ""
    if sampler.sizes is None:
        return ", not batched by size (dataset.size_group_window: the transforms cannot predict image sizes)"
    return f", batched by size (windows of {sampler.group_window} images)"


def describe_padding(pad_multiple: int) -> str:
    """For the data log line: ``, padded to multiples of N px`` when training batches are."""
    return f", padded to multiples of {pad_multiple} px" if pad_multiple > 1 else ""


def describe_categories(coco, num_classes: int) -> str:
    """E.g. ``6 categories (ids up to 21; 22 logits)``: class indices are category ids."""
    ids = sorted(coco.getCatIds())
    if not ids:
        return f"no categories ({num_classes} logits)"
    return f"{len(ids)} categories (ids up to {ids[-1]}; {num_classes} logits)"


def num_classes_of(node, *datasets) -> int:
    data = dataset_settings(node)
    if data.num_classes is not None:
        return int(data.num_classes)
    return max(d.num_classes for d in datasets)


def run_reporting_errors(function: Callable[[DictConfig], object], cfg: DictConfig,
                         expected: Tuple[Type[BaseException], ...] = (UserError,)):
    """Run ``function(cfg)``. A ``UserError`` (a bad key or value, a missing or unreadable file, an
    absent device, a checkpoint of another recipe) is the user's mistake, not a bug: it is logged
    and printed as one ``error:`` line and the process exits with status 2, without a traceback.
    Anything else keeps its traceback. The process group is shut down in every case."""
    try:
        return function(cfg)
    except expected as error:
        # the run's log file keeps the error too; the console gets exactly one line
        record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "%s", (error,), None)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        shutdown_distributed()


def build(node: DictConfig, **kwargs):
    """``instantiate(node, **kwargs)``, letting a ``UserError`` raised by the constructor (a value
    it refuses) through as itself rather than wrapped in Hydra's InstantiationException."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise

