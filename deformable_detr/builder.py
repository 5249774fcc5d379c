"""Objects from ``_target_`` trees without Hydra: what the recipes of configs/ and a checkpoint's
saved config describe, e.g. ``{"_target_": "deformable_detr.models.Backbone", "name": "resnet50"}``.

The subset of ``hydra.utils.instantiate`` these trees use: nested ``_target_`` nodes are built
first and passed as arguments, lists and plain mappings pass through (their nodes built too),
``_partial_: true`` gives a ``functools.partial``. Only callables of this package can be named:
a checkpoint is data, and loading one must not import arbitrary modules.
"""
import copy
import functools
import importlib
from typing import Any, Mapping

from .errors import ConfigError

ALLOWED_PREFIX = "deformable_detr."


def locate(target: str):
    """The object a dotted ``_target_`` names (``deformable_detr.models.DeformableDETR``)."""
    if not isinstance(target, str) or not target.startswith(ALLOWED_PREFIX):
        raise ConfigError(f"_target_={target!r} is not a callable of deformable_detr; a recipe may only build the package's classes")
    # the longest importable prefix is the module; the rest are attributes (a nested class)
    parts = target.split(".")
    for end in range(len(parts) - 1, 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:end]))
        except ModuleNotFoundError:
            continue
        for name in parts[end:]:
            if not hasattr(found, name):
                raise ConfigError(f"_target_={target}: {'.'.join(parts[:end])} has no {name}")
            found = getattr(found, name)
        return found
    raise ConfigError(f"_target_={target}: no such module")


def instantiate(node: Any, **kwargs) -> Any:
    """``node`` built: a mapping with ``_target_`` becomes ``target(**arguments, **kwargs)`` with its
    arguments built first; other mappings and lists are copied with their nodes built; anything
    else is returned as is. ``kwargs`` apply to the top node only (e.g. ``num_classes``)."""
    if isinstance(node, Mapping) and "_target_" in node:
        arguments = {key: instantiate(value) for key, value in node.items() if not str(key).startswith("_")}
        arguments.update(kwargs)
        target = locate(node["_target_"])
        if node.get("_partial_", False):
            return functools.partial(target, **arguments)
        try:
            return target(**arguments)
        except TypeError as error:
            raise ConfigError(f"{node['_target_']}: {error}") from error
    if kwargs:
        raise ConfigError(f"cannot pass {sorted(kwargs)} to a node without _target_")
    if isinstance(node, Mapping):
        return {key: instantiate(value) for key, value in node.items()}
    if isinstance(node, (list, tuple)):
        return [instantiate(value) for value in node]
    return copy.deepcopy(node)
