"""Running and composing the command-line tools from tests."""
import os
import subprocess
import sys

import config_schema  # noqa: F401  (importing registers the schemas; tools/ is on pytest's pythonpath)
from hydra import compose, initialize_config_dir

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
