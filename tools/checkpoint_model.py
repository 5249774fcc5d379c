"""What tools/eval.py, tools/infer.py and tools/visualize.py share about checkpoints: the config a checkpoint
implies, its model with weights loaded, and the names of its categories."""
import argparse
import dataclasses
import json
import os
from typing import Callable, Dict, List, Optional

import torch
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

import runtime
from config_checks import check_config

from deformable_detr.data import make_eval_transforms
from deformable_detr.data.coco_categories import COCO_CATEGORIES
from deformable_detr.data.synthetic_shapes import SHAPE_CATEGORIES
from deformable_detr.engine.precision import AMP_DTYPES
from deformable_detr.errors import CheckpointError, ConfigError
from deformable_detr.models.category_mask import keep_categories
from deformable_detr.models.weights import (
    OFFICIAL_EXPERIMENTS,
    Recipe,
    convert_official_state_dict,
    is_official,
    load_weights,
    read_checkpoint,
    recipe_of_state_dict,
)

logger = runtime.logger


def user_overrides():
    return list(HydraConfig.get().overrides.task)


def overrode(overrides, *names) -> bool:
    """Whether the command line set any of ``names`` (a group or a key prefix)."""
    keys = [o.lstrip("+~").split("=", 1)[0] for o in overrides]
    return any(k == n or k.startswith(n + ".") or k.startswith(n + "@") for k in keys for n in names)


def config_for_checkpoint(cfg: DictConfig, checkpoint, config_name: Optional[str] = None) -> DictConfig:
    """Fill in what the checkpoint knows and the command line did not say (``config_name``: the tool's
    root config, default the running tool's)."""
    overrides = user_overrides()
    config_name = config_name or HydraConfig.get().job.config_name
    if is_official(checkpoint):
        if overrode(overrides, "experiment", "model"):
            return cfg
        args = checkpoint.get("args")
        hints = vars(args) if isinstance(args, argparse.Namespace) else {}
        state = convert_official_state_dict(checkpoint["model"])
        name = recipe_of_state_dict(state, hints).name()
        if name not in OFFICIAL_EXPERIMENTS:
            raise ConfigError(f"checkpoint={cfg.checkpoint} is an official file of no official experiment ({name}); set experiment= or model.*")
        logger.info("checkpoint is an official %s file: using experiment=%s", name, name)
        return compose(config_name=config_name, overrides=overrides + [f"experiment={name}"])
    saved = checkpoint.get("config")
    if not isinstance(saved, dict):
        return cfg
    keep_dataset = overrode(overrides, "dataset", "experiment")
    keep_model = overrode(overrides, "model", "experiment")
    with open_dict(cfg):
        if not keep_model and "model" in saved:
            cfg.model = OmegaConf.create(saved["model"])
            cfg.name = saved.get("name", cfg.name)
        if not keep_dataset and "dataset" in saved:
            cfg.dataset = OmegaConf.merge(cfg.dataset, saved["dataset"])
    return cfg


def checkpoint_num_classes(cfg: DictConfig, checkpoint, fallback: Optional[int] = None) -> Optional[int]:
    """The class count to build: the config's, else the checkpoint's, else read off its class head, else ``fallback``."""
    recipe = Recipe(**checkpoint["recipe"]) if "recipe" in checkpoint else None
    num_classes = cfg.dataset.num_classes or checkpoint.get("num_classes") or (recipe and recipe.num_classes)
    if not num_classes:
        state = convert_official_state_dict(checkpoint["model"]) if is_official(checkpoint) else checkpoint["model"]
        num_classes = recipe_of_state_dict(state).num_classes or fallback
    return num_classes


def build_model(cfg: DictConfig, checkpoint, device: torch.device, num_classes: int):
    """The model of ``cfg.model`` with the checkpoint's weights, in eval mode on ``device``; returns (model, LoadReport)."""
    # the checkpoint supplies every weight: never fetch ImageNet weights
    with open_dict(cfg):
        cfg.model.backbone.pretrained = False
    model = instantiate(cfg.model, num_classes=num_classes).to(device)
    report = load_weights(model, cfg.checkpoint, allow_new_classes=False, checkpoint=checkpoint)
    logger.info("loaded %s (%s%s) on %s", cfg.checkpoint, "official " if report.official else "", report.recipe.name(), device)
    return model.eval(), report


def checkpoint_categories(cfg: DictConfig, checkpoint) -> Optional[List[Dict]]:
    """The categories [{id, name}] the checkpoint was trained on, None when unknown.

    In order: the checkpoint's own ``categories``; the 80 COCO categories for official files; the
    synthetic dataset's shapes; the categories of the dataset's val annotation file when it exists.
    """
    stored = checkpoint.get("categories")
    if isinstance(stored, (list, tuple)) and all(isinstance(c, dict) and "id" in c for c in stored):
        return [{"id": int(c["id"]), "name": str(c.get("name", c["id"]))} for c in stored]
    if is_official(checkpoint):
        return list(COCO_CATEGORIES)
    dataset = cfg.dataset
    if dataset.get("kind") == "synthetic":
        return [{"id": i, "name": name} for i, name in SHAPE_CATEGORIES]
    annotations = dataset.get("val_annotations")
    if not annotations and not OmegaConf.is_missing(dataset, "root") and dataset.get("root"):
        annotations = os.path.join(os.path.expanduser(str(dataset.root)), "annotations", "instances_val2017.json")
    if annotations and os.path.isfile(annotations):
        try:
            with open(annotations) as f:
                return [{"id": int(c["id"]), "name": str(c["name"])} for c in json.load(f)["categories"]]
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("could not read the categories of %s (%s): predictions keep every class", annotations, error)
    return None


@dataclasses.dataclass
class Predictor:
    """A checkpoint ready to run on images: its config, model, categories and evaluation preprocessing."""

    cfg: DictConfig
    model: torch.nn.Module
    postprocess: torch.nn.Module
    categories: Optional[List[Dict]]
    restrict: bool
    transforms: Callable
    device: torch.device
    amp_dtype: Optional[torch.dtype]

    @property
    def names(self) -> Dict[int, str]:
        return {c["id"]: c["name"] for c in self.categories or []}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, masks: torch.Tensor) -> Dict:
        """The model's float32 outputs on a padded batch, logits of non-category ids at -inf when restricting."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            outputs = self.model(images.to(self.device), masks.to(self.device))
        outputs = {"pred_logits": outputs["pred_logits"].float(), "pred_boxes": outputs["pred_boxes"].float()}
        if self.restrict and self.categories:
            outputs["pred_logits"] = keep_categories(outputs["pred_logits"], [c["id"] for c in self.categories])
        return outputs


def load_predictor(cfg: DictConfig, config_name: str, schema: type) -> Predictor:
    """Read ``cfg.checkpoint``, complete ``cfg`` from it, check it against ``schema`` and build the model.

    Preprocessing is evaluation's: the recipe's ``dataset.eval_transforms`` (800 / 1333 for the official
    recipes). With ``postprocess.restrict_to_dataset_categories`` only the checkpoint's categories are predicted.
    """
    if cfg.amp not in AMP_DTYPES:
        raise ConfigError(f"amp={cfg.amp} is not one of null, bf16, fp16")
    device = torch.device(runtime.resolve_device(cfg.device))
    checkpoint = read_checkpoint(cfg.checkpoint)
    cfg = config_for_checkpoint(cfg, checkpoint, config_name)
    check_config(cfg, schema)
    restrict = bool(cfg.postprocess.get("restrict_to_dataset_categories", True))
    num_classes = checkpoint_num_classes(cfg, checkpoint)
    if not num_classes:
        raise CheckpointError(f"checkpoint={cfg.checkpoint} does not tell its number of classes; set dataset.num_classes")
    model, _ = build_model(cfg, checkpoint, device, num_classes)
    categories = checkpoint_categories(cfg, checkpoint)
    if categories is None:
        logger.warning("checkpoint=%s does not name its categories: labels are class indices and every class is kept", cfg.checkpoint)
    size, max_size = cfg.dataset.eval_transforms.size, cfg.dataset.eval_transforms.max_size
    # one category list for both: the masked logits rank the queries (visualize), PostProcess selects
    postprocess = instantiate(cfg.postprocess, category_ids=[c["id"] for c in categories] if categories else None)
    return Predictor(cfg, model, postprocess, categories, restrict, make_eval_transforms(size, max_size), device, AMP_DTYPES[cfg.amp])
