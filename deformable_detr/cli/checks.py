"""Checks of a composed config that Hydra cannot do, so a mistake fails before anything runs,
naming the key: every ``_target_`` node's keys must be parameters of its callable and hold values
of the parameter's annotated type, and every node with a schema (see ``config_schema``) holds only
the schema's fields, even keys added with ``+key=value`` (which Hydra lets through)."""
import collections.abc
import dataclasses
import difflib
import inspect
import typing
from typing import Any, List

from hydra.utils import get_object
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
    if not isinstance(node, DictConfig):
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
            _check_schema(node[key], field_type, where, problems)


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
            child = node[key]
            if isinstance(child, (DictConfig, ListConfig)):
                _walk(child, f"{path}.{key}" if path else str(key), problems)
    elif isinstance(node, ListConfig):
        for index, child in enumerate(node):
            if isinstance(child, (DictConfig, ListConfig)):
                _walk(child, f"{path}[{index}]", problems)


def _check_node(node: DictConfig, path: str, target: str, problems: List[str]) -> None:
    try:
        obj = get_object(target)
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
    hints = _type_hints(obj)
    for key in node.keys():
        if key in _HYDRA_KEYS or any(p.startswith(f"{path}.{key} is not a known key") for p in problems):
            continue
        if key in accepted:
            if key in hints and not OmegaConf.is_missing(node, key) and not _matches(node[key], hints[key]):
                value = OmegaConf.to_container(node[key]) if isinstance(node[key], (DictConfig, ListConfig)) else node[key]
                kind = _describe(hints[key])
                example = _EXAMPLES.get(hints[key])
                fix = f": {path}.{key} takes {kind}, e.g. {path}.{key}={example}" if example else ""
                problems.append(f"{path}.{key}={value} is not {kind}{fix}")
            continue
        close = difflib.get_close_matches(str(key), accepted, n=1)
        hint = f" (did you mean {path}.{close[0]}?)" if close else f"; it accepts {', '.join(accepted)}"
        problems.append(f"{path}.{key} is not a parameter of {target}{hint}")


def _type_hints(obj) -> dict:
    """Parameter annotations of a callable (a class: of its ``__init__``), {} when unknown."""
    try:
        return typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
    except Exception:  # forward references that do not resolve: no checking
        return {}


def _matches(value, annotation) -> bool:
    """Whether a config value fits a simple annotation (int, float, bool, str, Optional, List,
    Tuple, Sequence); anything richer is accepted as is."""
    if annotation is Any:
        return True
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        return any(_matches(value, a) for a in arguments)
    if annotation is type(None):
        return value is None
    if origin in (list, tuple, collections.abc.Sequence):
        return isinstance(value, ListConfig) and all(_matches(item, _item_type(annotation)) for item in value)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return True


def _item_type(annotation):
    """The element type of List[X], Sequence[X] or Tuple[X, ...]; Any for other tuples."""
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is tuple:
        return arguments[0] if len(arguments) == 2 and arguments[1] is Ellipsis else Any
    return arguments[0] if arguments else Any


_EXAMPLES = {int: "1", float: "0.5", bool: "true", str: "text"}
_NAMES = {int: ("an integer", "integers"), float: ("a number", "numbers"), bool: ("true or false", "booleans"),
          str: ("a string", "strings"), type(None): ("null", "nulls")}


def _describe(annotation) -> str:
    """E.g. ``an integer``, ``a list of numbers``, ``null or an integer``."""
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        return " or ".join(_describe(a) for a in arguments)
    if origin in (list, tuple, collections.abc.Sequence):
        item = _item_type(annotation)
        return f"a list of {_NAMES[item][1]}" if item in _NAMES else "a list"
    return _NAMES.get(annotation, (getattr(annotation, "__name__", str(annotation)),))[0]
