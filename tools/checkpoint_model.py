"""What the tools that start from a checkpoint share (eval, export): the config the checkpoint
implies and the model built with its weights."""
import argparse
from typing import Callable, Optional, Tuple

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

import runtime
from config_checks import ConfigError

from deformable_detr.models.weights import (
    OFFICIAL_EXPERIMENTS,
    LoadReport,
    Recipe,
    convert_official_state_dict,
    is_official,
    load_weights,
    recipe_of_state_dict,
)

logger = runtime.logger


def user_overrides():
    return list(HydraConfig.get().overrides.task)


def overrode(overrides, *names) -> bool:
    """Whether the command line set any of ``names`` (a group or a key prefix)."""
    keys = [o.lstrip("+~").split("=", 1)[0] for o in overrides]
    return any(k == n or k.startswith(n + ".") or k.startswith(n + "@") for k in keys for n in names)


def config_for_checkpoint(cfg: DictConfig, checkpoint) -> DictConfig:
    """Fill in what the checkpoint knows and the command line did not say."""
    overrides = user_overrides()
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
        # the running tool's own root config (eval, export, ...) with the experiment added
        return compose(config_name=HydraConfig.get().job.config_name, overrides=overrides + [f"experiment={name}"])
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


def checkpoint_num_classes(cfg: DictConfig, checkpoint, dataset_classes: Callable[[], Optional[int]]) -> Optional[int]:
    """The model's class count: ``dataset.num_classes``, else what the checkpoint records or its class
    head's size, else ``dataset_classes()`` (the dataset's largest category id + 1)."""
    weights_recipe = Recipe(**checkpoint["recipe"]) if "recipe" in checkpoint else None
    num_classes = cfg.dataset.num_classes or checkpoint.get("num_classes") or (weights_recipe and weights_recipe.num_classes)
    if not num_classes:
        state = convert_official_state_dict(checkpoint["model"]) if is_official(checkpoint) else checkpoint["model"]
        num_classes = recipe_of_state_dict(state).num_classes or dataset_classes()
    return num_classes


def model_from_checkpoint(cfg: DictConfig, checkpoint, num_classes: int, device) -> Tuple[object, LoadReport]:
    """The ``cfg.model`` detector on ``device`` with every weight from ``checkpoint`` (read from
    ``cfg.checkpoint``); the class count must match."""
    # the checkpoint supplies every weight: never fetch ImageNet weights for it
    with open_dict(cfg):
        cfg.model.backbone.pretrained = False
    model = instantiate(cfg.model, num_classes=num_classes).to(device)
    report = load_weights(model, cfg.checkpoint, allow_new_classes=False, checkpoint=checkpoint)
    logger.info("loaded %s (%s%s) on %s", cfg.checkpoint, "official " if report.official else "", report.recipe.name(), device)
    return model, report
