"""What a checkpoint file implies: its model, how to preprocess for it, its categories.

Two kinds of file: this framework's checkpoints carry their composed config (``config``), class
count and categories; the official release files carry the official ``args``, from which the
official experiment is recognized (as ``tools/eval.py`` does) and its recipe read from configs/.
A bare state_dict says nothing of its recipe: ``experiment=`` must name it.
"""
import argparse
import copy
import dataclasses
import json
import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from .. import recipes
from ..builder import instantiate
from ..data.coco_categories import COCO_CATEGORIES
from ..data.settings import built_in_categories
from ..data.transforms import EVAL_MAX_SIZE, EVAL_SIZE
from ..errors import CheckpointError, ConfigError, UserError
from ..utils.category_layout import CategoryLayout
from ..models.weights import (
    OFFICIAL_EXPERIMENTS,
    LoadReport,
    convert_official_state_dict,
    is_official,
    load_weights,
    read_checkpoint,
    recipe_of_state_dict,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class CheckpointRecipe:
    """A checkpoint and the recipe it implies.

    ``model_config``: the model's ``_target_`` tree (``builder.instantiate``); ``name``: the official
    experiment or the run's name; ``eval_size``, ``eval_max_size``: the evaluation resize;
    ``categories``: [{"id", "name"}] or None when unknown; ``epoch``, ``step``: training progress
    when the file records it.
    """

    path: str
    checkpoint: Dict[str, Any]
    official: bool
    name: str
    model_config: Dict[str, Any]
    num_classes: int
    eval_size: int
    eval_max_size: int
    categories: Optional[List[Dict[str, Any]]]
    epoch: Optional[int] = None
    step: Optional[int] = None

    @property
    def layout(self) -> CategoryLayout:
        """Which logit is which category (recorded by training; by id for official files)."""
        return CategoryLayout.from_dict(self.checkpoint.get("category_layout"), self.num_classes)

    def build_model(self, device="cpu") -> Tuple[torch.nn.Module, LoadReport]:
        """The model with the checkpoint's weights, in eval mode on ``device``, and what loading did."""
        model = instantiate(self.model_config, num_classes=self.num_classes)
        report = load_weights(model, self.path, allow_new_classes=False, checkpoint=self.checkpoint)
        return model.to(device).eval(), report


def read_recipe(path: str, experiment: Optional[str] = None, model_overrides: Optional[Mapping[str, Any]] = None,
                key: str = "checkpoint", model_config: Optional[Mapping[str, Any]] = None) -> CheckpointRecipe:
    """Read ``path`` and the recipe it implies.

    Args:
        path: this framework's checkpoint or an official release file.
        experiment: the experiment to build instead of the one the file implies (needed for a
            bare state_dict).
        model_overrides: dotted model keys to change, e.g. ``{"transformer.dropout": 0.0}``.
        key: how errors name the file (``checkpoint=PATH``).
        model_config: a model ``_target_`` tree to build instead (a tool's composed ``model`` for
            ``experiment``, which may come from another config directory).
    """
    checkpoint = read_checkpoint(path, key)
    official = is_official(checkpoint)
    saved = checkpoint.get("config") if isinstance(checkpoint.get("config"), Mapping) else None
    if experiment is None and official:
        experiment = official_experiment(checkpoint, path, key)
        logger.info("%s=%s is an official %s file: using experiment=%s", key, path, experiment, experiment)
    if model_config is not None:
        name, model_config = experiment or "model", copy.deepcopy(dict(model_config))
        eval_size, eval_max_size = EVAL_SIZE, EVAL_MAX_SIZE
    elif experiment is not None:
        name, model_config = experiment, recipes.experiment_model(experiment)
        eval_size, eval_max_size = recipes.experiment_eval_sizes(experiment)
    elif saved is not None and isinstance(saved.get("model"), Mapping):
        name, model_config = str(saved.get("name", "checkpoint")), copy.deepcopy(dict(saved["model"]))
        transforms = (saved.get("dataset") or {}).get("eval_transforms") or {}
        eval_size, eval_max_size = int(transforms.get("size", EVAL_SIZE)), int(transforms.get("max_size", EVAL_MAX_SIZE))
    else:
        raise CheckpointError(f"{key}={path} does not record its recipe (no config, not an official file); "
                              f"name it with experiment=NAME (one of {', '.join(recipes.experiment_names())})")
    model_config = with_overrides(model_config, model_overrides or {})
    # the checkpoint supplies every weight: never fetch ImageNet weights
    model_config.setdefault("backbone", {})["pretrained"] = False
    progress = checkpoint.get("epoch"), checkpoint.get("step")
    return CheckpointRecipe(
        path=path, checkpoint=checkpoint, official=official, name=name, model_config=model_config,
        num_classes=num_classes_of(checkpoint, path, key), eval_size=eval_size, eval_max_size=eval_max_size,
        categories=categories_of(checkpoint, saved),
        epoch=progress[0] if isinstance(progress[0], int) else None, step=progress[1] if isinstance(progress[1], int) else None,
    )


def official_experiment(checkpoint: Mapping[str, Any], path: str, key: str = "checkpoint") -> str:
    """The official experiment an official release file is, read off its keys and ``args``."""
    args = checkpoint.get("args")
    hints = vars(args) if isinstance(args, argparse.Namespace) else {}
    name = recipe_of_state_dict(convert_official_state_dict(checkpoint["model"]), hints).name()
    if name not in OFFICIAL_EXPERIMENTS:
        raise CheckpointError(f"{key}={path} is an official file of no official experiment ({name}); set experiment=NAME")
    return name


def with_overrides(config: Dict[str, Any], overrides: Mapping[str, Any]) -> Dict[str, Any]:
    """``config`` with each dotted key of ``overrides`` set; a key that is not in it is an error naming it."""
    config = copy.deepcopy(config)
    for dotted, value in overrides.items():
        node, parts = config, dotted.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                known = ", ".join(sorted(k for k in node if not str(k).startswith("_"))) if isinstance(node, dict) else ""
                prefix = ".".join(["model"] + parts[:depth])
                raise ConfigError(f"model.{dotted} is not a key of the model ({prefix} has: {known})")
            if depth == len(parts) - 1:
                node[part] = value
            else:
                node = node[part]
    return config


def num_classes_of(checkpoint: Mapping[str, Any], path: str, key: str = "checkpoint") -> int:
    """The class count: recorded by this framework, else read off the class head."""
    recorded = checkpoint.get("num_classes") or (checkpoint.get("recipe") or {}).get("num_classes")
    if recorded:
        return int(recorded)
    state = convert_official_state_dict(checkpoint["model"]) if is_official(checkpoint) else checkpoint["model"]
    found = recipe_of_state_dict(state).num_classes
    if not found:
        raise CheckpointError(f"{key}={path} does not tell its number of classes (no class_embed.0.weight)")
    return int(found)


def categories_of(checkpoint: Mapping[str, Any], saved: Optional[Mapping[str, Any]]) -> Optional[List[Dict[str, Any]]]:
    """The categories [{id, name}] the checkpoint was trained on, None when unknown.

    In order: the checkpoint's own ``categories``; the 80 COCO categories for official files; the
    synthetic dataset's shapes, or a YOLO dataset's data.yaml names when it is readable; the
    categories of the run's val annotation file when it exists.
    """
    stored = checkpoint.get("categories")
    if isinstance(stored, (list, tuple)) and all(isinstance(c, Mapping) and "id" in c for c in stored):
        return [{"id": int(c["id"]), "name": str(c.get("name", c["id"]))} for c in stored]
    if is_official(checkpoint):
        return [dict(c) for c in COCO_CATEGORIES]
    dataset = (saved or {}).get("dataset") or {}
    try:
        built_in = built_in_categories(dataset.get("kind"), dataset.get("root"))
    except UserError as error:
        logger.warning("could not read the categories of dataset.root=%s (%s)", dataset.get("root"), error)
        return None
    if built_in is not None:
        return built_in
    annotations = dataset.get("val_annotations")
    if not annotations and dataset.get("root"):
        annotations = os.path.join(os.path.expanduser(str(dataset["root"])), "annotations", "instances_val2017.json")
    if annotations and os.path.isfile(annotations):
        try:
            with open(annotations) as f:
                return [{"id": int(c["id"]), "name": str(c["name"])} for c in json.load(f)["categories"]]
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("could not read the categories of %s (%s)", annotations, error)
    return None


def class_rows_by_name(checkpoint: Mapping[str, Any], categories: Optional[List[Dict[str, Any]]],
                       layout: CategoryLayout, path: str = "", key: str = "init_weights") -> Optional[List[Tuple[int, int]]]:
    """[(checkpoint logit, model logit)] for fine-tuning a model of ``categories`` (in ``layout``) from
    ``checkpoint``: a category whose name (case and spacing aside) the checkpoint also has starts
    from its rows. None when the two have the same categories in the same logits (load as is) or
    when either does not name its categories (nothing to match)."""
    source = categories_of(checkpoint, checkpoint.get("config") if isinstance(checkpoint.get("config"), Mapping) else None)
    if source is None or categories is None:
        return None
    source_layout = CategoryLayout.from_dict(checkpoint.get("category_layout"), num_classes_of(checkpoint, path, key))
    if source_layout == layout and {(c["id"], c["name"]) for c in source} == {(c["id"], c["name"]) for c in categories}:
        return None

    def normalized(name) -> str:
        return " ".join(str(name).lower().split())

    source_logits = {normalized(c["name"]): source_layout.logit_index(c["id"]) for c in source}
    rows = []
    for category in categories:
        source_logit, target_logit = source_logits.get(normalized(category["name"])), layout.logit_index(category["id"])
        if source_logit is not None and target_logit is not None:
            rows.append((source_logit, target_logit))
    return rows

