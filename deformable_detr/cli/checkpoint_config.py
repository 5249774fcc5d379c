"""What the tools that read a checkpoint (eval, infer, visualize, export) share: the recipe the
checkpoint implies, completed by the command line, and the ``Detector`` built from it.

The command line wins where it speaks: ``experiment=NAME`` builds that experiment's model, and each
``model.KEY=VALUE`` changes that one key of the checkpoint's model (so a mismatch names it alone);
the rest of the model, the run's name and its dataset settings come from the checkpoint.
"""
import json
import logging
import os
from typing import Any, Dict, List, Optional

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from ..inference import CheckpointRecipe, Detector, read_recipe
from ..engine.precision import AMP_DTYPES
from ..data.category_diff import category_differences, describe_categories
from ..errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

def user_overrides() -> List[str]:
    return list(HydraConfig.get().overrides.task)


def overrode(overrides, *names) -> bool:
    """Whether the command line set any of ``names`` (a group or a key prefix)."""
    keys = [o.lstrip("+~").split("=", 1)[0] for o in overrides]
    return any(k == n or k.startswith(n + ".") or k.startswith(n + "@") for k in keys for n in names)


def experiment_given(overrides) -> Optional[str]:
    """The ``experiment=NAME`` of the command line, if any."""
    for override in overrides:
        key, _, value = override.partition("=")
        if key == "experiment":
            return value
    return None


def model_overrides(cfg: DictConfig, overrides) -> Dict[str, Any]:
    """The command line's ``model.KEY=VALUE`` changes, as {"KEY": value} with the config's typed values."""
    changes = {}
    for override in overrides:
        key = override.lstrip("+").split("=", 1)[0]
        if key.startswith("model.") and not override.startswith("~"):
            value = OmegaConf.select(cfg, key)
            changes[key[len("model."):]] = OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value
    return changes


def load_recipe(cfg: DictConfig) -> CheckpointRecipe:
    """``cfg.checkpoint`` and the recipe it implies, with the command line's experiment (its model as
    composed) or model keys."""
    overrides = user_overrides()
    experiment = experiment_given(overrides)
    if experiment is not None:
        return read_recipe(str(cfg.checkpoint), experiment=experiment, model_config=OmegaConf.to_container(cfg.model, resolve=True))
    return read_recipe(str(cfg.checkpoint), model_overrides=model_overrides(cfg, overrides))


def config_for_checkpoint(cfg: DictConfig, recipe: CheckpointRecipe, config_name: Optional[str] = None) -> DictConfig:
    """``cfg`` completed with what the checkpoint knows and the command line did not say: the model,
    the name, and the dataset settings (an official file's experiment's; this framework's saved
    ones). ``config_name``: the tool's root config (default the running tool's)."""
    overrides = user_overrides()
    if recipe.official and not overrode(overrides, "experiment"):
        # the experiment's dataset settings (evaluation resize, kind), not the default recipe's
        cfg = compose(config_name=config_name or HydraConfig.get().job.config_name, overrides=overrides + [f"experiment={recipe.name}"])
    saved = recipe.checkpoint.get("config") if not recipe.official else None
    with open_dict(cfg):
        cfg.model = OmegaConf.create(recipe.model_config)
        cfg.name = recipe.name
        if isinstance(saved, dict) and "dataset" in saved and not overrode(overrides, "dataset", "experiment"):
            cfg.dataset = OmegaConf.merge(cfg.dataset, saved["dataset"])
    return cfg


def detector_for(cfg: DictConfig, recipe: CheckpointRecipe, device) -> Detector:
    """The recipe's model as a ``Detector`` on ``device``, with the evaluation resize of ``cfg.dataset``,
    ``cfg.amp`` and ``cfg.postprocess`` (its ``num_select`` and category restriction)."""
    if cfg.get("amp") not in AMP_DTYPES:
        raise ConfigError(f"amp={cfg.amp} is not one of null, bf16, fp16")
    postprocess = cfg.get("postprocess") or {}
    if recipe.categories is None:
        logger.warning(
            "checkpoint=%s does not name its categories: labels are class indices and every class is kept", recipe.path)
    return Detector.from_recipe(
        recipe, device, precision=cfg.get("amp"), compile=bool(cfg.get("compile", False)),
        num_select=int(postprocess.get("num_select", 100)),
        restrict_to_categories=bool(postprocess.get("restrict_to_dataset_categories", True)),
        eval_size=cfg.dataset.eval_transforms.size, eval_max_size=cfg.dataset.eval_transforms.max_size,
    )


def check_dataset_categories(recipe: CheckpointRecipe, categories: List[Dict[str, Any]], where: str) -> None:
    """A dataset's categories [{id, name}] against the checkpoint's: an id the model has no logit for is
    refused (CheckpointError: it could never be predicted, and its AP would read 0); other
    differences (renamed, renumbered, missing categories) are a warning naming both lists."""
    beyond = [c for c in categories if recipe.layout.logit_index(c["id"]) is None]
    trained = describe_categories(recipe.categories) if recipe.categories is not None else f"{recipe.layout.num_logits} logits, names unknown"
    if beyond:
        raise CheckpointError(
            f"{where} has categories the model of checkpoint={recipe.path} has no logit for ({describe_categories(beyond)}); "
            f"the checkpoint predicts {trained}, the dataset has {describe_categories(categories)}; "
            "evaluate on data with the checkpoint's categories, or fine-tune it on this dataset (init_weights=)"
        )
    if recipe.categories is not None:
        differences = category_differences(recipe.categories, categories)
        if differences:
            logger.warning("the categories of %s differ from those checkpoint=%s was trained on: %s. The checkpoint's: %s; the dataset's: %s",
                           where, recipe.path, "; ".join(differences), trained, describe_categories(categories))


def categories_named_on_the_command_line(cfg: DictConfig) -> Optional[List[Dict[str, Any]]]:
    """The categories of the val annotation file of a dataset the command line named
    (``dataset.root=``, ``dataset.val_annotations=``), when it exists: what the user expects the
    checkpoint to detect."""
    if not overrode(user_overrides(), "dataset"):
        return None
    dataset = cfg.dataset
    annotations = dataset.get("val_annotations")
    if not annotations and not OmegaConf.is_missing(dataset, "root") and dataset.get("root"):
        annotations = os.path.join(os.path.expanduser(str(dataset.root)), "annotations", "instances_val2017.json")
    if not annotations or not os.path.isfile(annotations):
        return None
    with open(annotations) as f:
        return [{"id": int(c["id"]), "name": str(c["name"])} for c in json.load(f).get("categories", [])]

