"""The Triton kernels on this CPU: tests/test_ops_triton.py in a subprocess with Triton's
interpreter switched on (TRITON_INTERPRET=1 only counts if set before anything imports Triton),
and what switching it on changes in the op's dispatch."""
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def interpreter_environment():
    environment = {key: value for key, value in os.environ.items() if key != "MS_DEFORM_ATTN_IMPLEMENTATION"}
    environment["TRITON_INTERPRET"] = "1"
    # the subprocess must run the kernels on the CPU even on a machine with a GPU
    environment["CUDA_VISIBLE_DEVICES"] = ""
    return environment


@pytest.mark.slow
def test_triton_kernels_in_the_interpreter():
    pytest.importorskip("triton")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
               os.path.join(ROOT, "tests", "test_ops_triton.py")]
    result = subprocess.run(command, cwd=ROOT, env=interpreter_environment(), capture_output=True, text=True,
                            timeout=1500)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-2000:]
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    # every CPU test ran (only the GPU-only ones may skip)
    assert passed >= 28 and "failed" not in summary and "error" not in summary, summary


def test_interpreter_is_listed_but_never_picked_by_auto():
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        import deformable_detr_ops as ops
        from deformable_detr_ops.testing import make_inputs
        assert ops.available_implementations()["cpu"][-2:] == ["triton", "reference"], ops.available_implementations()
        assert ops.triton_available("cpu") and not ops.triton_available("cuda")
        inputs = make_inputs([(3, 4)], batch=1, heads=2, channels=3, queries=5, points=2)
        assert ops.implementation_for(inputs[0]) in ("kernel", "reference")
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=interpreter_environment(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_without_the_interpreter_or_a_gpu_triton_is_not_imported_and_refused_in_one_line():
    code = textwrap.dedent("""
        import sys
        import torch
        import deformable_detr_ops as ops
        from deformable_detr_ops.testing import make_inputs
        assert not ops.triton_available("cpu") and "triton" not in ops.available_implementations()["cpu"]
        assert "deformable_detr_ops.triton_op" not in sys.modules
        try:
            ops.ms_deform_attn(*make_inputs([(3, 4)], batch=1, heads=2, channels=3, queries=5, points=2),
                               implementation="triton")
        except RuntimeError as error:
            print(error)
    """)
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environment, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    message = result.stdout.strip()
    assert "cannot run on cpu tensors" in message and "TRITON_INTERPRET=1" in message, message


def test_environment_variable_selects_the_implementation_of_auto(monkeypatch):
    import torch

    import deformable_detr_ops as ops
    from deformable_detr_ops.testing import make_inputs

    value = make_inputs([(3, 4)], batch=1, heads=2, channels=3, queries=5, points=2)[0]
    monkeypatch.setenv("MS_DEFORM_ATTN_IMPLEMENTATION", "reference")
    assert ops.implementation_for(value) == "reference"
    monkeypatch.setenv("MS_DEFORM_ATTN_IMPLEMENTATION", "fastest")
    with pytest.raises(ValueError, match="MS_DEFORM_ATTN_IMPLEMENTATION=fastest is not one of"):
        ops.implementation_for(value)
    monkeypatch.delenv("MS_DEFORM_ATTN_IMPLEMENTATION")
    assert ops.implementation_for(value) == ("kernel" if ops.kernel_available("cpu", torch.float32) else "reference")


def test_auto_on_a_gpu_prefers_the_cuda_kernel_then_triton_then_the_reference(monkeypatch):
    import torch

    import deformable_detr_ops as ops

    class GpuValue:
        device = torch.device("cuda")
        dtype = torch.bfloat16

    for kernel, triton, expected in ((True, True, "kernel"), (False, True, "triton"), (False, False, "reference")):
        monkeypatch.setattr(ops.dispatch, "kernel_available", lambda device="cpu", dtype=None, built=kernel: built)
        monkeypatch.setattr(ops.dispatch, "triton_available", lambda device="cuda", usable=triton: usable)
        assert ops.implementation_for(GpuValue()) == expected
