"""What tools/train.py and tools/eval.py share: device, run directory, logging, data from config."""
import logging
import os
import shutil
import sys
from typing import Callable, Optional, Tuple, Type

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from config_checks import ConfigError

from deformable_detr.data import (
    CocoDetection,
    ShardedSampler,
    SyntheticConfig,
    build_coco_dataset,
    collate,
    ensure_synthetic_dataset,
    make_eval_transforms,
    make_train_transforms,
)
from deformable_detr.engine.distributed import shutdown_distributed
from deformable_detr.errors import DeviceError
from deformable_detr.utils import distributed

logger = logging.getLogger("deformable_detr")


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError(f"device={name} is not one of auto, cpu, cuda")
    return name


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


def dataset_root(cfg: DictConfig) -> Optional[str]:
    """``dataset.root`` with ``~`` expanded; for the synthetic set, generated first if needed."""
    explicit = all(cfg.get(k) for k in ("train_images", "train_annotations", "val_images", "val_annotations"))
    if OmegaConf.is_missing(cfg, "root") or cfg.root is None:
        if explicit or (cfg.get("val_images") and cfg.get("val_annotations")):
            return None
        raise ConfigError(
            "dataset.root is required: dataset.root=DIR with DIR/{train2017,val2017}/ and "
            "DIR/annotations/instances_{train,val}2017.json (or set dataset.val_images and dataset.val_annotations)"
        )
    root = os.path.abspath(os.path.expanduser(str(cfg.root)))
    if cfg.kind == "synthetic":
        params = OmegaConf.to_container(cfg.synthetic, resolve=True) if cfg.synthetic is not None else {}
        params["size_probabilities"] = tuple(params.get("size_probabilities", SyntheticConfig.size_probabilities))
        ensure_synthetic_dataset(root, SyntheticConfig(**params))
    elif cfg.kind != "coco":
        raise ConfigError(f"dataset.kind={cfg.kind} is not one of coco, synthetic")
    return root


def build_dataset(cfg: DictConfig, split: str, root: Optional[str], seed: int) -> CocoDetection:
    """The ``split`` ("train"/"val") dataset of the ``dataset`` config node."""
    if split == "train":
        t = cfg.train_transforms
        transforms = make_train_transforms(list(t.scales), t.max_size, list(t.crop_resize_sizes), t.crop_min_size, t.crop_max_size)
    else:
        transforms = make_eval_transforms(cfg.eval_transforms.size, cfg.eval_transforms.max_size)
    images, annotations = cfg.get(f"{split}_images"), cfg.get(f"{split}_annotations")
    if images or annotations:
        default_images = os.path.join(root, f"{split}2017") if root else None
        default_annotations = os.path.join(root, "annotations", f"instances_{split}2017.json") if root else None
        images, annotations = images or default_images, annotations or default_annotations
        if not images or not annotations:
            raise ConfigError(f"set both dataset.{split}_images and dataset.{split}_annotations (or dataset.root)")
        return CocoDetection(images, annotations, transforms, seed=seed, skip_unreadable=cfg.skip_unreadable, context=f"dataset.{split}_images")
    return build_coco_dataset(root, split, transforms, seed=seed, skip_unreadable=cfg.skip_unreadable, context="dataset.root")


def make_loader(dataset, batch_size: int, num_workers: int, train: bool, seed: int, device: torch.device):
    """A DataLoader over this rank's shard: shuffled, padded and drop_last for training; every
    image exactly once over all ranks for evaluation."""
    sampler = ShardedSampler(len(dataset), shuffle=train, pad=train, seed=seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=train,
        collate_fn=collate,
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


def num_classes_of(cfg: DictConfig, *datasets) -> int:
    if cfg.num_classes is not None:
        return int(cfg.num_classes)
    return max(d.num_classes for d in datasets)


def run_reporting_errors(function: Callable[[DictConfig], object], cfg: DictConfig, expected: Tuple[Type[BaseException], ...]):
    """Run ``function(cfg)``. An ``expected`` error (a bad config key, a missing file) is a user's
    mistake, not a bug: it is logged and printed as one ``error:`` line and the process exits
    with status 2, without a traceback. The process group is shut down in every case."""
    try:
        return function(cfg)
    except expected as error:
        logger.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        shutdown_distributed()


def single_device(name: str) -> torch.device:
    """``device=`` for a one-process tool (infer, visualize): auto, cpu, cuda or cuda:N, checked to exist."""
    device = resolve_device(name)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device={name} but no CUDA GPU is visible; use device=cpu")
    return torch.device(device)
