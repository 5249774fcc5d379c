"""Running and composing the command-line tools from tests."""
import os
import subprocess
import sys

from hydra import compose, initialize_config_dir

import deformable_detr.cli.schema  # noqa: F401  (importing registers the schemas)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
TEST_CONFIGS = os.path.join(ROOT, "tests", "configs")


def compose_config(name="train", overrides=()):
    """The config the tool would compose, with the test-only configs on the search path."""
    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
        return compose(config_name=name, overrides=[f"hydra.searchpath=[file://{TEST_CONFIGS}]", *overrides])


def run_tool(tool, *overrides, timeout=600, env=None, launcher=None):
    """Run tools/<tool>.py (optionally under a launcher such as torchrun) and return the CompletedProcess."""
    command = list(launcher or [sys.executable]) + [os.path.join(TOOLS, f"{tool}.py"), f"hydra.searchpath=[file://{TEST_CONFIGS}]", *overrides]
    environment = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=environment)


class ToolResult:
    """What ``run_tool_in_process`` saw: ``returncode``, ``stdout``, ``stderr`` (as subprocess.CompletedProcess)."""

    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_tool_in_process(tool, *overrides):
    """Run tools/<tool>.py's task in this process (seconds instead of a fresh interpreter's start-up):
    the same config composition, run directory and error reporting as on the command line (the
    command-line check before composition is left out)."""
    import contextlib
    import importlib
    import io
    import logging

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    module = importlib.import_module(f"deformable_detr.cli.{tool}")
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    handlers = list(logging.getLogger().handlers)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
            cfg = compose(config_name=tool, overrides=[f"hydra.searchpath=[file://{TEST_CONFIGS}]", *overrides], return_hydra_config=True)
            with open_dict(cfg):
                cfg.hydra.runtime.output_dir = cfg.hydra.run.dir
            HydraConfig.instance().set_config(cfg)
            with open_dict(cfg):
                del cfg["hydra"]
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                try:
                    module.TOOL.task(cfg)
                except SystemExit as exit:
                    code = exit.code
    finally:
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
            if handler not in handlers:
                handler.close()
        for handler in handlers:
            root.addHandler(handler)
    return ToolResult(code, stdout.getvalue(), stderr.getvalue())


def tiny(run_dir, data_root, *extra):
    """Overrides of a run of the tiny test recipe on the CPU, with its synthetic set in ``data_root``."""
    return ["experiment=tiny_test", "device=cpu", f"dataset.root={data_root}", f"hydra.run.dir={run_dir}", *extra]


def assert_ok(result):
    """A tool's run succeeded; otherwise show the end of its output."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
