"""glibc's malloc keeping freed memory (deformable_detr/utils/allocator.py): large blocks are reused
instead of being mapped and faulted in again, the environment's settings win, and the setting
can be undone for memory measurements. Each case runs in a fresh process (mallopt is global)."""
import os
import subprocess
import sys

import pytest

from deformable_detr.utils import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
requires_glibc = pytest.mark.skipif(allocator._glibc() is None, reason="glibc's malloc only")

# page faults of ten "steps" that each allocate, touch and free three 64 MiB tensors, after `setup`
SCRIPT = """
import resource, sys
import torch
from deformable_detr.utils import allocator
{setup}
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():
    a = torch.empty(1 << 24).fill_(1)
    b = a * 2
    return float(torch.relu(b)[0])
for _ in range(30):
    step()  # the heap grows to the steps' peak (and its fragments) over the first steps
start = faults()
for _ in range(10):
    step()
print(faults() - start)
"""
# each fresh 64 MiB mapping faults 16,384 pages in
FRESH = 10 * 3 * 16_384


def faults_after(setup: str, **environment) -> int:
    env = {key: value for key, value in os.environ.items() if key not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    env.update(environment)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", SCRIPT.format(setup=setup)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1])


@requires_glibc
def test_freed_blocks_are_reused_without_faults():
    assert faults_after("") > FRESH * 0.9
    assert faults_after("assert allocator.keep_freed_memory()") < FRESH * 0.05


@requires_glibc
def test_return_freed_memory_undoes_it():
    setup = "assert allocator.keep_freed_memory()\nassert allocator.return_freed_memory()"
    assert faults_after(setup) > FRESH * 0.9


@requires_glibc
def test_the_environments_malloc_settings_win():
    setup = "assert not allocator.keep_freed_memory()"
    assert faults_after(setup, GLIBC_TUNABLES="glibc.malloc.mmap_threshold=1048576") > FRESH * 0.9


def test_tuned_by_environment_names_the_variable():
    assert allocator.tuned_by_environment({}) == ""
    assert allocator.tuned_by_environment({"GLIBC_TUNABLES": "glibc.rtld.nns=2"}) == ""
    assert allocator.tuned_by_environment({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}) == "GLIBC_TUNABLES"
    assert allocator.tuned_by_environment({"MALLOC_MMAP_THRESHOLD_": "33554432"}) == "MALLOC_MMAP_THRESHOLD_"
    assert allocator.tuned_by_environment({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) == "LD_PRELOAD"
    assert allocator.tuned_by_environment({"LD_PRELOAD": "/usr/lib/libfoo.so"}) == ""


def test_the_tools_apply_it():
    """deformable_detr/cli/app.py, which every tool imports, applies it at import (and the benchmark's
    worker times with it, as training runs)."""
    env = {key: value for key, value in os.environ.items() if key not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.join(ROOT, "tools"), ROOT, env.get("PYTHONPATH")]))
    script = (
        "from deformable_detr.utils import allocator\n"
        "calls = []\n"
        "allocator.keep_freed_memory = lambda: calls.append(1) or True\n"
        "import deformable_detr.cli.app\n"
        "print(len(calls))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.split()[-1] == "1", result.stderr
    with open(os.path.join(ROOT, "deformable_detr", "cli", "benchmark_worker.py")) as worker:
        assert "allocator.keep_freed_memory()" in worker.read()
