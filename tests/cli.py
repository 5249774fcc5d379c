"""Running and composing the command-line tools from tests, and writing the small datasets they read."""
import json
import os
import signal
import subprocess
import sys
import time

from hydra import compose, initialize_config_dir

import deformable_detr.cli.schema  # noqa: F401  (importing registers the schemas)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
TEST_CONFIGS = os.path.join(ROOT, "tests", "configs")
# torchrun as a module of this interpreter's torch: no console script on PATH needed
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def compose_config(name="train", overrides=()):
    """The config the tool would compose, with the test-only configs on the search path."""
    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
        return compose(config_name=name, overrides=[f"hydra.searchpath=[file://{TEST_CONFIGS}]", *overrides])


def run_tool(tool, *overrides, timeout=600, env=None, launcher=None):
    """Run tools/<tool>.py (optionally under a launcher such as torchrun) and return the CompletedProcess."""
    command = list(launcher or [sys.executable]) + [os.path.join(TOOLS, f"{tool}.py"), f"hydra.searchpath=[file://{TEST_CONFIGS}]", *overrides]
    environment = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=environment)


def signal_tool(tool, overrides, send, *, after, launcher=None, timeout=600):
    """Start tools/<tool>.py as ``run_tool`` does, in a session (a process group) of its own, as a
    scheduler starts a job; once a line of its output contains ``after``, call ``send(process)``
    (e.g. ``to_group(signal.SIGTERM)``). Returns the CompletedProcess, with stderr in ``stdout``,
    once every process of the group has ended."""
    command = list(launcher or [sys.executable]) + [os.path.join(TOOLS, f"{tool}.py"), f"hydra.searchpath=[file://{TEST_CONFIGS}]", *overrides]
    environment = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment,
                               start_new_session=True)
    lines, rest = [], ""
    try:
        for line in process.stdout:
            lines.append(line)
            if after in line:
                send(process)
                break
        rest, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    output = "".join(lines) + rest
    assert after in output, output[-3000:]
    assert not _group_outlives(process.pid), f"processes of the group of pid {process.pid} outlived it"
    return subprocess.CompletedProcess(command, process.returncode, output, "")


def to_group(signum):
    """For ``signal_tool``: ``signum`` to the whole process group, as SLURM, Kubernetes or Ctrl-C send it."""
    return lambda process: os.killpg(process.pid, signum)


def _group_outlives(pgid, seconds=10.0):
    """Whether a process of group ``pgid`` is still there after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.1)
    return True


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


def torchrun(processes, *options):
    """A ``launcher`` for ``run_tool`` and ``signal_tool``: torchrun --standalone with ``processes`` local processes."""
    return [*TORCHRUN, "--standalone", "--nproc_per_node", str(processes), *options]


def write_coco_split(root, split, count, categories, seed):
    """A COCO-format split under ``root``: ``{split}2017/`` with ``count`` random 64x80 PNGs (1.png, 2.png, ...;
    pixels from ``numpy.random.default_rng(seed)``), each with one 30x24 box of category
    ``categories[image_id % len(categories)]``, and ``annotations/instances_{split}2017.json``. Returns ``root``."""
    import numpy as np
    import PIL.Image

    os.makedirs(os.path.join(root, f"{split}2017"), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    generator = np.random.default_rng(seed)
    images, annotations = [], []
    for image_id in range(1, count + 1):
        PIL.Image.fromarray(generator.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(os.path.join(root, f"{split}2017", f"{image_id}.png"))
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 80, "height": 64})
        category = categories[image_id % len(categories)]["id"]
        annotations.append({"id": image_id, "image_id": image_id, "category_id": category, "bbox": [10, 8, 30, 24], "area": 720, "iscrowd": 0})
    with open(os.path.join(root, "annotations", f"instances_{split}2017.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return root
