"""The experiments of configs/ read without Hydra, for what needs a recipe's model outside the
command-line tools (``Detector.from_checkpoint`` on an official release file, say).

An experiment (``configs/experiment/NAME.yaml``) is a ``# @package _global_`` diff of the base
config; its ``model:`` part is merged into ``configs/model/deformable_detr.yaml`` and its
``dataset.eval_transforms`` into the library's evaluation defaults, exactly what Hydra composes
for those two nodes (tests/test_recipes.py checks every experiment against Hydra's composition).
Only the ``model`` and evaluation sizes are read here; training settings stay with the tools.
"""
import copy
import difflib
import os
from typing import Any, Dict, List, Tuple

import yaml

from .data.transforms import EVAL_MAX_SIZE, EVAL_SIZE
from .errors import ConfigError, MissingFileError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
BASE_MODEL = "deformable_detr"


def experiment_names() -> List[str]:
    """The experiments of configs/experiment, sorted."""
    directory = os.path.join(CONFIG_DIR, "experiment")
    if not os.path.isdir(directory):
        raise MissingFileError(f"{directory} does not exist: the recipes live in the repository's configs/ "
                               "(install the package from a clone with `pip install -e .`)")
    return sorted(name[: -len(".yaml")] for name in os.listdir(directory) if name.endswith(".yaml"))


def unknown_experiment(name: str, known: List[str]) -> str:
    """``experiment=NAME is not an experiment; did you mean X? (experiments: ...)``."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"experiment={name} is not an experiment; {hint}(experiments: {', '.join(known)})"


def _read(path: str) -> Dict[str, Any]:
    with open(path) as f:
        content = yaml.safe_load(f) or {}
    if not isinstance(content, dict):
        raise ConfigError(f"{path} is not a YAML mapping")
    return content


def _experiment(name: str) -> Dict[str, Any]:
    known = experiment_names()
    if name not in known:
        raise ConfigError(unknown_experiment(name, known))
    return _read(os.path.join(CONFIG_DIR, "experiment", f"{name}.yaml"))


def merge(base: Dict[str, Any], diff: Dict[str, Any]) -> Dict[str, Any]:
    """``base`` with ``diff`` merged in, mapping by mapping (a new dict; lists and values replace)."""
    merged = copy.deepcopy(base)
    for key, value in diff.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def experiment_model(name: str) -> Dict[str, Any]:
    """The ``model`` node of experiment ``name``: a ``_target_`` tree for ``builder.instantiate``."""
    base = _read(os.path.join(CONFIG_DIR, "model", f"{BASE_MODEL}.yaml"))
    return merge(base, _experiment(name).get("model") or {})


def experiment_eval_sizes(name: str) -> Tuple[int, int]:
    """(shorter side, longest side at most) of the experiment's evaluation resize."""
    transforms = ((_experiment(name).get("dataset") or {}).get("eval_transforms") or {})
    return int(transforms.get("size", EVAL_SIZE)), int(transforms.get("max_size", EVAL_MAX_SIZE))
