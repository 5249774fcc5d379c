"""What the tools share: the run directory, logging, and data from the ``dataset`` config node."""
import functools
import logging
import os
import shutil
import sys
from typing import Iterable, Optional

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .. import recipes
from ..data import CocoDetection, ShardedSampler, build_coco_dataset, build_yolo_dataset, coco_split_paths, collate
from ..data.settings import DatasetSettings
from ..data.worker_signals import SignalSafeDataLoader
from ..data.yolo_layout import looks_like_yolo
from ..errors import ConfigError, MissingFileError, UserError
from ..utils import devices, distributed
from ..utils.category_layout import CategoryLayout

logger = logging.getLogger("deformable_detr")

CONFIG_DIR = recipes.CONFIG_DIR


def resolve_device(name: str) -> str:
    """``device=`` as a torch device string (see ``deformable_detr.utils.devices``)."""
    return str(devices.resolve_device(name))


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
    return build(node, _convert_="all")


def dataset_root(node) -> Optional[str]:
    """``dataset.root`` with ``~`` expanded; for the synthetic set, generated first if needed."""
    data = dataset_settings(node)
    if not data.root:
        if data.kind == "yolo":
            raise ConfigError("dataset.root is required: dataset=yolo dataset.root=DIR with DIR/data.yaml (names: [...]), "
                              "DIR/images/{train,val}/ and DIR/labels/{train,val}/ (or dataset.root=DIR/data.yaml)")
        if data.val_images and data.val_annotations:
            return None
        raise ConfigError(
            "dataset.root is required: dataset.root=DIR with DIR/{train2017,val2017}/ and "
            "DIR/annotations/instances_{train,val}2017.json (or set dataset.val_images and dataset.val_annotations)"
        )
    root = os.path.abspath(os.path.expanduser(str(data.root)))
    data.prepare(root)
    return root


def build_dataset(node, split: str, root: Optional[str], seed: int) -> CocoDetection:
    """The ``split`` ("train"/"val") dataset of the ``dataset`` config node; a YOLO folder read as
    COCO-format data (see ``deformable_detr.data.yolo``)."""
    data = dataset_settings(node)
    transforms = data.train_transforms.build() if split == "train" else data.eval_transforms.build()
    if data.kind == "yolo":
        return build_yolo_dataset(root, split, transforms, seed=seed, skip_unreadable=data.skip_unreadable, context="dataset.root")
    images, annotations = getattr(data, f"{split}_images"), getattr(data, f"{split}_annotations")
    if images or annotations:
        default_images = os.path.join(root, f"{split}2017") if root else None
        default_annotations = os.path.join(root, "annotations", f"instances_{split}2017.json") if root else None
        images, annotations = images or default_images, annotations or default_annotations
        if not images or not annotations:
            raise ConfigError(f"set both dataset.{split}_images and dataset.{split}_annotations (or dataset.root)")
        return CocoDetection(images, annotations, transforms, seed=seed, skip_unreadable=data.skip_unreadable, context=f"dataset.{split}_images")
    if data.kind == "coco" and not os.path.isfile(coco_split_paths(root, split)[1]) and looks_like_yolo(root):
        # said before the COCO layout's "no annotations/..." to a user who forgot dataset=yolo
        raise ConfigError(f"dataset.root={root} is a YOLO-format dataset (data.yaml, images/, labels/), not COCO: add dataset=yolo")
    return build_coco_dataset(root, split, transforms, seed=seed, skip_unreadable=data.skip_unreadable, context="dataset.root")


def make_loader(dataset, batch_size: int, num_workers: int, train: bool, seed: int, device: torch.device,
                group_window: int = 0, pad_multiple: int = 0):
    """A DataLoader over this rank's shard: shuffled, padded and drop_last for training; every
    image exactly once over all ranks for evaluation. ``group_window`` > 1 batches images of
    similar augmented size together (see ``ShardedSampler``); ``pad_multiple`` > 1 pads each
    batch's height and width up to a multiple of it (see ``pad_images``). Its workers leave SIGTERM
    and SIGINT to this process, which stops cleanly on them (see ``SignalSafeDataLoader``)."""
    if group_window < 0:
        raise ConfigError(f"dataset.size_group_window={group_window}: use 0 (shuffled batches) or a window of images, e.g. 64")
    if pad_multiple < 0:
        raise ConfigError(f"dataset.train_pad_multiple={pad_multiple}: use 0 (pad to the batch's largest image) or a multiple, e.g. 32")
    # datasets whose augmented sizes are unknown load in the shuffled order
    sizes = dataset.output_sizes if group_window > 1 and getattr(dataset, "predicts_sizes", False) else None
    sampler = ShardedSampler(len(dataset), shuffle=train, pad=train, seed=seed, sizes=sizes, group_window=group_window)
    loader = SignalSafeDataLoader(
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


def describe_categories(coco, layout: CategoryLayout) -> str:
    """E.g. ``6 categories (ids up to 21; 22 logits, one per id)`` or ``3 categories (ids up to 1042;
    3 logits, one per category)``."""
    ids = sorted(coco.getCatIds())
    if not ids:
        return f"no categories ({layout.num_logits} logits)"
    per = "one per id" if layout.by_id else "one per category"
    return f"{len(ids)} categories (ids up to {ids[-1]}; {layout.num_logits} logits, {per})"


def category_layout(node, *datasets) -> CategoryLayout:
    """The model's logits for the categories of ``datasets``, set on each of them (their targets then
    carry logit indices): see ``CategoryLayout.for_category_ids``."""
    data = dataset_settings(node)
    layout = CategoryLayout.for_category_ids({i for d in datasets for i in d.category_ids}, data.num_classes)
    for dataset in datasets:
        dataset.layout = layout
    return layout


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


def precision_name(amp: Optional[str]) -> str:
    """How a model computes under ``amp``: ``float32``, or ``bf16`` / ``fp16`` autocast."""
    return f"{amp} autocast" if amp else "float32"


def provenance(recipe, amp: Optional[str], dataset) -> dict:
    """What an evaluation measured, for ``metrics.json``: the checkpoint (path, recipe, epoch, step),
    the precision and the dataset (annotation file, images)."""
    return {
        "checkpoint": {"path": os.path.abspath(recipe.path), "recipe": recipe.name, "epoch": recipe.epoch, "step": recipe.step},
        "precision": amp or "float32",
        "dataset": {"annotations": os.path.abspath(dataset.annotation_file), "images": len(dataset)},
    }

