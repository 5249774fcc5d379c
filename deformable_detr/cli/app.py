"""One skeleton for every command-line tool: help, the command-line check, Hydra, run set-up and
the error path. A tool is a ``Tool`` (its config, usage and ``run(cfg)``); ``tools/<name>.py``
only calls ``Tool.main()``.

    Tool.main: --help -> help text | command line and run directory checked (one error line) ->
               Hydra composes -> run(cfg) -> a UserError is one error line (exit 2), anything else a traceback
    start_run: device (and the process group under torchrun), run directory, logging, seed
"""
import dataclasses
import logging
import os
import re
import sys
from typing import Any, Callable, List, Optional, Sequence, Tuple

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from .. import recipes
from ..engine.distributed import init_distributed, shutdown_distributed
from ..engine.rng import seed_everything
from ..engine.run_lock import RunLock
from ..errors import UserError
from ..utils import allocator, distributed
from . import command_line, runtime

logger = logging.getLogger("deformable_detr")

CONFIG_DIR = recipes.CONFIG_DIR

# oneDNN compiles a CPU kernel per input shape and keeps 1024 by default; multi-scale training
# meets more shapes than that (deformable_detr/utils/allocator.py keeps freed memory likewise)
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "4096")
allocator.keep_freed_memory()


@dataclasses.dataclass
class Tool:
    """A command-line tool.

    name: its config (configs/<name>.yaml) and script (tools/<name>.py). summary: one line.
    arguments: the usage after the script, e.g. ``checkpoint=PATH input=IMAGE|DIR|GLOB``.
    schema: the typed schema of its root config (see ``schema.py``). run: the tool itself.
    required: keys without a default. keys: (key, help) lines of the most used keys of the
    recipe groups, listed in --help after the tool's own keys (which come from its config).
    """

    name: str
    summary: str
    arguments: str
    schema: type
    run: Callable[[DictConfig], Any]
    required: Tuple[str, ...] = ()
    keys: Tuple[Tuple[str, str], ...] = ()

    @property
    def usage(self) -> str:
        return f"python tools/{self.name}.py {self.arguments} [KEY=VALUE ...]".replace("  ", " ")

    def main(self, argv: Optional[Sequence[str]] = None) -> None:
        """The command line: ``--help``, or check, compose and run (``argv``: default sys.argv[1:])."""
        arguments = list(sys.argv[1:] if argv is None else argv)
        if "--help" in arguments or "-h" in arguments:
            print(help_text(self))
            sys.exit(0)
        search_path = _search_path(arguments)
        try:
            command_line.check(self.name, arguments, self.schema, self.usage, self.required, search_path)
            command_line.check_run_directory(self.name, arguments, search_path)
        except UserError as error:
            command_line.report(error)
        if os.environ.get("RANK", "0") != "0":
            # under torchrun only the main process writes the run directory, Hydra's record (.hydra/) included
            arguments = arguments + ["hydra.output_subdir=null"]
        sys.argv = [sys.argv[0]] + arguments
        hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=self.name)(self.task)()

    def task(self, cfg: DictConfig):
        """What Hydra calls with the composed config (tests call it directly)."""
        return run_reporting_errors(self.run, cfg)


def _search_path(arguments: Sequence[str]) -> Optional[str]:
    """An extra config directory given as ``hydra.searchpath=[file://DIR]`` (tests add their recipes so)."""
    for argument in arguments:
        match = re.fullmatch(r"hydra\.searchpath=\[file://(.+)\]", argument)
        if match:
            return match.group(1)
    return None


def run_reporting_errors(function: Callable[[DictConfig], Any], cfg: DictConfig):
    """``function(cfg)``. A ``UserError`` (a bad key or value, a missing or unreadable file, an
    absent device, a checkpoint of another recipe, a recipe whose loss diverged) is the user's to
    fix, not a bug: it is logged and printed as one ``error:`` line and the process exits with
    status 2. Anything else keeps its traceback. The process group is shut down in every case."""
    try:
        return function(cfg)
    except UserError as error:
        # the run's log file keeps the error too; the console gets exactly one line
        record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "%s", (error,), None)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        shutdown_distributed()


@dataclasses.dataclass
class Run:
    """Where a tool runs: ``device`` and ``run_dir`` (the same on every rank), and the run directory's
    lock when the tool took it (``RunLock``, held by the main process)."""

    device: torch.device
    run_dir: str
    lock: Optional[RunLock] = None

    def save_config(self, cfg: DictConfig) -> None:
        """``run_dir/config.yaml``, resolved, from the main process: what the run used."""
        if distributed.is_main_process():
            OmegaConf.save(cfg, os.path.join(self.run_dir, "config.yaml"), resolve=True)


def start_run(cfg: DictConfig, log_name: str, *, processes: bool = False, device: Optional[str] = None,
              lock: bool = False) -> Run:
    """The set-up every tool shares: the device (``device`` or ``cfg.device``; with ``processes``, this
    rank's under torchrun, joining the process group), the run directory (with ``lock``, locked by
    the main process before anything is written there), logging to the console and
    ``run_dir/log_name``, and the seeds (``cfg.seed`` plus the rank)."""
    resolved = runtime.resolve_device(device or cfg.device)
    run_device = init_distributed(resolved) if processes else torch.device(resolved)
    run_dir = runtime.run_directory()
    held = RunLock(run_dir).acquire() if lock and distributed.is_main_process() else None
    runtime.setup_logging(run_dir, log_name)
    seed_everything(cfg.seed + distributed.get_rank())
    return Run(run_device, run_dir, held)


def help_text(tool: Tool) -> str:
    """--help: the usage line, what the tool does, its own keys with their defaults and comments
    (read from configs/<name>.yaml), the recipe keys, and where the run directory is."""
    lines = [f"usage: {tool.usage}", "", tool.summary, "", f"{tool.name} keys (KEY=VALUE):"]
    lines += [f"  {key:<30} {comment}" for key, comment in own_keys(tool.name)]
    if tool.keys:
        lines += ["", "recipe keys:"] + [f"  {key:<30} {comment}" for key, comment in tool.keys]
    experiments = ", ".join(recipes.experiment_names())
    lines += [
        "", f"  {'experiment=NAME':<30} the recipe: {experiments}",
        f"  {'hydra.run.dir=DIR':<30} the run directory (default {_default_run_dir(tool.name)})",
        "", "Every key of the composed config can be set (python tools/{0}.py --cfg job prints it); "
            "config groups: {1}.".format(tool.name, ", ".join(g for g in command_line.config_groups() if g != "experiment")),
    ]
    return "\n".join(lines)


def own_keys(name: str) -> List[Tuple[str, str]]:
    """(``key=default``, comment) of the keys configs/<name>.yaml sets itself (a block's keys as
    ``block.key``), in file order."""
    keys, block, skip = [], None, ("defaults", "hydra", "postprocess", "name")
    with open(os.path.join(CONFIG_DIR, f"{name}.yaml")) as f:
        for line in f:
            match = re.match(r"^(  )?([a-z_]+):\s*([^#\n]*?)\s*(?:#\s*(.*))?$", line)
            if not match:
                continue
            indent, key, value, comment = match.groups()
            if not indent:
                block = key if not value else None
                if key in skip or not value:
                    continue
            elif block is None or block in skip:
                continue
            else:
                key = f"{block}.{key}"
            value = "(required)" if value == "???" else value
            keys.append((f"{key}={value}", comment or ""))
    return keys


def _default_run_dir(name: str) -> str:
    with open(os.path.join(CONFIG_DIR, f"{name}.yaml")) as f:
        match = re.search(r"^\s+dir:\s*(\S+)", f.read(), flags=re.MULTILINE)
    return match.group(1).replace("${now:%Y-%m-%d_%H-%M-%S}", "DATE_TIME").replace("${name}", "NAME") if match else "outputs/..."
