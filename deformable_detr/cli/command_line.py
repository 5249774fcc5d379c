"""The command line checked before anything runs: each mistake is one ``error:`` line that names
the key and the fix (exit status 2), instead of Hydra's report or a traceback.

Caught here: a misspelled key (``trainer.epoch=1``), an unknown experiment or group option
(``experiment=r50_deformable_detr_singlescale``), a value of the wrong type (``score_threshold=high``),
a list given without brackets (``measure=params``), a key added with ``+`` that no schema or
``_target_`` knows, a required value left out (``checkpoint=``), and a run directory that cannot be
created or written (``hydra.run.dir=/read-only/run``).
"""
import difflib
import os
import re
import sys
import tempfile
from typing import List, Optional, Sequence

from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig, ListConfig, OmegaConf

from .. import recipes
from ..errors import ConfigError, UnwritableDirectoryError, UserError
from .checks import check_config

CONFIG_DIR = recipes.CONFIG_DIR


def config_groups() -> List[str]:
    return sorted(name for name in os.listdir(CONFIG_DIR) if os.path.isdir(os.path.join(CONFIG_DIR, name)))


def group_options(group: str) -> List[str]:
    directory = os.path.join(CONFIG_DIR, group)
    return sorted(name[: -len(".yaml")] for name in os.listdir(directory) if name.endswith(".yaml"))


def overrides_of(arguments: Sequence[str]) -> List[str]:
    """The ``KEY=VALUE`` arguments (Hydra's flags such as ``--cfg job`` are left to Hydra)."""
    return [a for a in arguments if "=" in a and not a.startswith("-")]


def check(config_name: str, arguments: Sequence[str], schema: type, usage: str, required: Sequence[str] = (),
          search_path: Optional[str] = None) -> DictConfig:
    """Composes ``config_name`` with the command line's overrides as the tool will and returns the
    config; raises ConfigError with the one line to print for the first mistake found."""
    overrides = _with_search_path(overrides_of(arguments), search_path)
    groups = set(config_groups())

    def is_group(override: str) -> bool:
        key = override.lstrip("+~").split("=", 1)[0].split("@", 1)[0]
        return key in groups or key.startswith("hydra") or "/" in key

    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key in groups and not override.startswith("~") and value not in group_options(key) and search_path is None:
            options = group_options(key)
            if key == "experiment":
                raise ConfigError(recipes.unknown_experiment(value, options))
            close = difflib.get_close_matches(value, options, n=1)
            hint = f"did you mean {key}={close[0]}? " if close else ""
            raise ConfigError(f"{key}={value} is not a {key} config; {hint}({key} options: {', '.join(options)})")

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        try:
            base = compose(config_name=config_name, overrides=[o for o in overrides if is_group(o)])
        except MissingConfigException as error:
            raise ConfigError(str(error).splitlines()[0]) from None
        for override in overrides:
            if not override.startswith(("+", "~")) and not is_group(override):
                _check_key(base, override)
        try:
            cfg = compose(config_name=config_name, overrides=overrides)
        except ConfigCompositionException as error:
            raise ConfigError(_composition_error(error, base)) from None
    missing = [key for key in required if OmegaConf.is_missing(cfg, key)]
    if missing:
        raise ConfigError(f"{' and '.join(f'{key}=' for key in missing)} {'is' if len(missing) == 1 else 'are'} required: {usage}")
    check_config(cfg, schema)
    return cfg


def _with_search_path(overrides: List[str], search_path: Optional[str]) -> List[str]:
    return overrides if search_path is None else [f"hydra.searchpath=[file://{search_path}]"] + overrides


# Hydra's flags after which it creates no run directory (it prints, completes or sweeps instead)
_NO_RUN_DIRECTORY = ("--cfg", "-c", "--info", "--hydra-help", "--shell-completion", "-sc", "--multirun", "-m")


def check_run_directory(config_name: str, arguments: Sequence[str], search_path: Optional[str] = None) -> None:
    """Hydra creates ``hydra.run.dir`` and writes its ``.hydra/`` there before the tool runs; one
    that cannot be created or written raises UnwritableDirectoryError here instead of ending in
    Hydra's traceback."""
    if any(argument in _NO_RUN_DIRECTORY for argument in arguments):
        return
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=_with_search_path(overrides_of(arguments), search_path), return_hydra_config=True)
        run_dir = str(cfg.hydra.run.dir)  # ${now:...} resolved: a second off Hydra's, with the same parents
    problem = unwritable_because(run_dir)
    if problem is not None:
        raise UnwritableDirectoryError(f"hydra.run.dir={run_dir} {problem}; choose another run directory with hydra.run.dir=DIR")


def unwritable_because(directory: str) -> Optional[str]:
    """Why ``directory`` cannot be created (parents included) or written, or None when it can. Tried
    by making and removing a directory in its nearest existing parent (or itself): read-only mounts
    and immutable directories refuse even root, whose permission bits say nothing."""
    path = os.path.abspath(directory)
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    verb = "written" if existing == path else "created"
    if not os.path.isdir(existing):
        what = "a broken symbolic link" if os.path.islink(existing) else "a file"
        return f"cannot be {verb}: {existing} is {what}, not a directory"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write_check_", dir=existing))
    except OSError as error:
        return f"cannot be {verb}: {existing} is not writable ({error.strerror or error})"
    return None


def _check_key(cfg: DictConfig, override: str) -> None:
    """A key that is not in the config: name it and the nearest known one."""
    key = override.split("=", 1)[0]
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig) or leaf in parent.keys():
        return
    close = difflib.get_close_matches(leaf, [str(k) for k in parent.keys()], n=1)
    prefix = f"{parent_key}." if parent_key else ""
    hint = f"did you mean {prefix}{close[0]}?" if close else f"known keys: {', '.join(map(str, parent.keys()))}"
    raise ConfigError(f"{key} is not a known key ({hint})")


# Hydra's words for the types it converts values to -> ours
_KINDS = {"Float": "a number", "Integer": "an integer", "Boolean": "true or false", "String": "a string"}
_EXAMPLES = {"Float": "0.5", "Integer": "1", "Boolean": "true", "String": "text"}


def _composition_error(error: ConfigCompositionException, base: DictConfig) -> str:
    """Hydra's refusal of an override as one line: the key, the type it takes and the corrected form."""
    message = f"{error} {error.__cause__ or ''}"
    ambiguous = re.search(r"Ambiguous value for argument '([^=']+)=([^']*)'", message)
    if ambiguous is not None:
        key, value = ambiguous.groups()
        if isinstance(OmegaConf.select(base, key, default=None), ListConfig):
            return f"{key} takes a list: write {key}=[{value}]"
        return f"{key}={value}: commas separate the values of a sweep (with --multirun); for one text value quote it: {key}='\"{value}\"'"
    override = re.search(r"Error merging override (\S+)=(\S*)", message)
    if override is None:
        return f"{str(error).splitlines()[0]}: {str(error.__cause__ or error).splitlines()[0]}"
    key, value = override.groups()
    if "is not a ListConfig" in message:
        items = ",".join(part.strip() for part in value.split(","))
        return f"{key} takes a list: write {key}=[{items}]"
    converted = re.search(r"could not be converted to (Float|Integer|Boolean|String)", message)
    if converted is None and re.search(r"is not a valid bool", message):
        converted = re.match(r"(Boolean)", "Boolean")
    if converted is not None:
        kind = converted.group(1)
        current = OmegaConf.select(base, key, default=None)
        example = str(current).lower() if isinstance(current, bool) else current
        example = example if example is not None and not isinstance(example, (DictConfig, ListConfig)) else _EXAMPLES[kind]
        return f"{key}={value} is not {_KINDS[kind]}: {key} takes {_KINDS[kind]}, e.g. {key}={example}"
    return f"{key}={value}: {str(error.__cause__ or error).splitlines()[0]}"


def report(error: UserError) -> None:
    """Print the one line and exit with status 2."""
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
