"""Checks of a composed config that Hydra cannot do, so a typo fails before anything runs,
naming the key: every ``_target_`` node's keys must be parameters of its callable, and every
node with a schema (see ``config_schema``) holds only the schema's fields, even keys added
with ``+key=value`` (which Hydra lets through)."""
import dataclasses
import difflib
import inspect
import typing
from typing import Any, List

from hydra._internal.utils import _locate
from omegaconf import DictConfig, ListConfig, OmegaConf

from deformable_detr.errors import ConfigError

_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


def check_config(cfg: DictConfig, schema: type) -> None:
    """Raise ConfigError listing every key unknown to its schema or ``_target_``."""
    problems: List[str] = []
    _check_schema(cfg, schema, "", problems)
    _walk(cfg, "", problems)
    if problems:
        raise ConfigError("; ".join(problems))


def _check_schema(node, schema: type, path: str, problems: List[str]) -> None:
    if not isinstance(node, DictConfig) or node._is_none():
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            prefix = f"{path}." if path else ""
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f"; known keys: {', '.join(fields)}"
            problems.append(f"{where} is not a known key{hint}")
            continue
        field_type = _dataclass_in(fields[key].type)
        if field_type is not None and not OmegaConf.is_missing(node, key):
            _check_schema(node._get_node(key), field_type, where, problems)


def _dataclass_in(annotation: Any):
    """The dataclass of a field annotation (also inside Optional[...]), else None."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    for argument in typing.get_args(annotation):
        if dataclasses.is_dataclass(argument):
            return argument
    return None


def _walk(node, path: str, problems: List[str]) -> None:
    if isinstance(node, DictConfig):
        target = node.get("_target_") if "_target_" in node else None
        if target is not None:
            _check_node(node, path, str(target), problems)
        for key in node.keys():
            if OmegaConf.is_missing(node, key):
                continue
            child = node._get_node(key)
            if isinstance(child, (DictConfig, ListConfig)) and not child._is_none():
                _walk(child, f"{path}.{key}" if path else str(key), problems)
    elif isinstance(node, ListConfig):
        for index, child in enumerate(node):
            if isinstance(child, (DictConfig, ListConfig)):
                _walk(child, f"{path}[{index}]", problems)


def _check_node(node: DictConfig, path: str, target: str, problems: List[str]) -> None:
    try:
        obj = _locate(target)
    except Exception as error:
        problems.append(f"{path}._target_={target} cannot be imported ({error})")
        return
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return
    parameters = signature.parameters
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = [name for name, p in parameters.items() if p.kind != inspect.Parameter.VAR_POSITIONAL]
    for key in node.keys():
        if key in _HYDRA_KEYS or key in accepted:
            continue
        close = difflib.get_close_matches(str(key), accepted, n=1)
        hint = f" (did you mean {path}.{close[0]}?)" if close else f"; it accepts {', '.join(accepted)}"
        problems.append(f"{path}.{key} is not a parameter of {target}{hint}")
