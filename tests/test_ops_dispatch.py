"""The public entry point: argument checks, dtype and device handling, odd but valid
inputs, and importing without a usable build."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import deformable_detr_ops as ops
from deformable_detr_ops import ms_deform_attn, ms_deform_attn_reference
from deformable_detr_ops.testing import make_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [(4, 5), (2, 3)]


def inputs(dtype=torch.float64, **overrides):
    options = dict(batch=2, heads=2, channels=4, queries=6, points=3, dtype=dtype, margin=0.1, seed=0)
    options.update(overrides)
    return list(make_inputs(SHAPES, **options))


@pytest.mark.parametrize(
    "index, bad, message",
    [
        (0, torch.zeros(2, 26, 8), "value must have shape"),
        (1, torch.tensor([[4, 5, 1], [2, 3, 1]]), "spatial_shapes must have shape"),
        (2, torch.tensor([0, 20, 26]), "level_start_index must have shape"),
        (3, torch.zeros(2, 6, 2, 2, 3), "sampling_locations must have shape"),
        (3, torch.zeros(2, 6, 3, 2, 3, 2), "sampling_locations must have shape"),
        (3, torch.zeros(1, 6, 2, 2, 3, 2), "sampling_locations must have shape"),
        (4, torch.zeros(2, 6, 2, 2, 4), "attention_weights must have shape"),
        (0, torch.zeros(2, 26, 2, 4, dtype=torch.int64), "value must be floating point"),
        (3, torch.zeros(2, 6, 2, 2, 3, 2, dtype=torch.int32), "sampling_locations must be floating point"),
        (4, torch.zeros(2, 6, 2, 2, 3, dtype=torch.bool), "attention_weights must be floating point"),
        (1, torch.tensor([[4.0, 5.0], [2.0, 3.0]]), "spatial_shapes must be an integer tensor"),
        (2, torch.tensor([0.0, 20.0]), "level_start_index must be an integer tensor"),
        (4, [[0.5]], "attention_weights must be a torch.Tensor"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(index, bad, message):
    arguments = inputs()
    arguments[index] = bad
    with pytest.raises(ValueError, match=message):
        ms_deform_attn(*arguments)


def implementations():
    return ["reference"] + (["kernel"] if ops.kernel_available("cpu", torch.float64) else [])


@pytest.mark.parametrize("implementation", implementations())
@pytest.mark.parametrize("extra_tokens", [1, -1])
def test_value_of_another_length_than_the_levels_is_rejected(implementation, extra_tokens):
    value, shapes, starts, locations, weights = inputs()  # S = 4 * 5 + 2 * 3 = 26
    longer_or_shorter = torch.randn(2, 26 + extra_tokens, 2, 4, dtype=torch.float64)
    message = rf"value has S = {26 + extra_tokens} tokens .* spatial_shapes covers sum_l H_l \* W_l = 26"
    with pytest.raises(ValueError, match=message):
        ms_deform_attn(longer_or_shorter, shapes, starts, locations, weights, implementation=implementation)


@pytest.mark.parametrize("implementation", implementations())
def test_non_finite_locations_read_zeros_with_zero_gradients(implementation):
    value, shapes, starts, locations, weights = inputs()
    locations = locations.clone()
    locations[0, 1, 0, 0, 0, 0] = float("nan")
    locations[1, 2, 1, 1, 2, 1] = float("inf")
    locations[1, 3, 0, 0, 1, 0] = -float("inf")
    dropped = ~torch.isfinite(locations).all(-1)  # (N, Lq, M, L, P)
    clean_weights = torch.where(dropped, 0.0, weights)  # the same samples, contributing nothing
    expected = ms_deform_attn_reference(value, shapes, starts, torch.where(dropped[..., None], 0.5, locations), clean_weights)

    value, locations, weights = (t.clone().requires_grad_() for t in (value, locations, weights))
    output = ms_deform_attn(value, shapes, starts, locations, weights, implementation=implementation)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-12)
    output.backward(torch.ones_like(output))
    for grad in (value.grad, locations.grad, weights.grad):
        assert torch.isfinite(grad).all()
    assert not locations.grad[dropped].any() and not weights.grad[dropped].any()
    assert locations.grad[~dropped].any() and weights.grad[~dropped].any()


@pytest.mark.parametrize("implementation", implementations())
def test_no_levels_gives_zeros_and_zero_gradients(implementation):
    value = torch.randn(2, 0, 2, 4, dtype=torch.float64, requires_grad=True)
    no_levels = torch.zeros(0, 2, dtype=torch.int64)
    locations = torch.rand(2, 3, 2, 0, 1, 2, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(2, 3, 2, 0, 1, dtype=torch.float64, requires_grad=True)
    output = ms_deform_attn(value, no_levels, no_levels[:, 0], locations, weights, implementation=implementation)
    assert output.shape == (2, 3, 8) and not output.any()
    output.sum().backward()
    assert value.grad.shape == value.shape and locations.grad.shape == locations.shape
    assert weights.grad.shape == weights.shape


def test_unknown_implementation_is_rejected():
    with pytest.raises(ValueError, match="implementation must be one of"):
        ms_deform_attn(*inputs(), implementation="fast")


def test_device_mismatch_is_rejected():
    arguments = inputs()
    arguments[3] = arguments[3].to("meta")
    with pytest.raises(ValueError, match="sampling_locations must be on value's device"):
        ms_deform_attn(*arguments)


@pytest.mark.parametrize("implementation", ["auto", "reference"])
def test_non_contiguous_inputs(implementation):
    value, shapes, starts, locations, weights = inputs()
    # The same numbers, laid out as transposed and sliced views.
    value_view = value.transpose(0, 2).contiguous().transpose(0, 2)
    locations_view = torch.cat([locations, locations], dim=-1)[..., :2]
    weights_view = weights.transpose(1, 3).contiguous().transpose(1, 3)
    shapes_view = torch.stack([shapes, shapes], dim=1)[:, 0]
    views = (value_view, shapes_view, locations_view, weights_view)
    assert not any(view.is_contiguous() for view in views)
    expected = ms_deform_attn_reference(value, shapes, starts, locations, weights)
    computed = ms_deform_attn(value_view, shapes_view, starts, locations_view, weights_view,
                              implementation=implementation)
    torch.testing.assert_close(computed, expected, rtol=0, atol=1e-12)


def test_non_contiguous_gradients():
    value, shapes, starts, locations, weights = (t.requires_grad_() if t.is_floating_point() else t
                                                 for t in inputs())
    output = ms_deform_attn(value, shapes, starts, locations, weights)
    grad_output = torch.randn(output.shape[::-1], dtype=output.dtype).permute(2, 1, 0)  # not contiguous
    grads = torch.autograd.grad(output, (value, locations, weights), grad_output)
    expected = torch.autograd.grad(ms_deform_attn_reference(value, shapes, starts, locations, weights),
                                   (value, locations, weights), grad_output)
    for computed, reference in zip(grads, expected):
        torch.testing.assert_close(computed, reference, rtol=0, atol=1e-10)


def test_misaligned_storage():
    value, shapes, starts, locations, weights = inputs(dtype=torch.float32, channels=8)
    shifted = torch.empty(value.numel() + 1)[1:].view(value.shape).copy_(value)
    torch.testing.assert_close(ms_deform_attn(shifted, shapes, starts, locations, weights),
                               ms_deform_attn_reference(value, shapes, starts, locations, weights),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("implementation", ["auto", "reference"])
def test_batch_of_one_and_no_queries(implementation):
    arguments = inputs(batch=1)
    torch.testing.assert_close(ms_deform_attn(*arguments, implementation=implementation),
                               ms_deform_attn_reference(*arguments), rtol=0, atol=1e-12)
    value, shapes, starts, locations, weights = (t.requires_grad_() if t.is_floating_point() else t
                                                 for t in inputs(queries=0))
    output = ms_deform_attn(value, shapes, starts, locations, weights, implementation=implementation)
    assert output.shape == (2, 0, 8)
    output.sum().backward()
    assert value.grad is not None and not value.grad.any()
    assert locations.grad.shape == locations.shape and weights.grad.shape == weights.shape


def test_mixed_dtypes_are_promoted():
    value, shapes, starts, locations, weights = inputs(dtype=torch.float32)
    output = ms_deform_attn(value.half(), shapes.int(), starts.int(), locations, weights)
    assert output.dtype == torch.float32
    expected = ms_deform_attn_reference(value.half().float(), shapes, starts, locations, weights)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_on_cpu_run_the_reference(dtype):
    arguments = inputs(dtype=dtype)
    assert ops.implementation_for(arguments[0]) == "reference"
    output = ms_deform_attn(*arguments)
    assert output.dtype == dtype
    torch.testing.assert_close(output, ms_deform_attn_reference(*arguments), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="no compiled kernel"):
        ms_deform_attn(*arguments, implementation="kernel")


def run_python(code, ops_parent, environment=None):
    """Runs `code` in a fresh interpreter that imports the op package from ops_parent; returns stdout."""
    env = {key: value for key, value in os.environ.items() if key != "MS_DEFORM_ATTN_NO_EXTENSION"}
    env.update(PYTHONPATH=ops_parent, **(environment or {}))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ops_parent, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


IMPORT_AND_RUN = """
    import warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import torch
        import deformable_detr_ops as ops
        from deformable_detr_ops.testing import make_inputs
        value, shapes, starts, locations, weights = make_inputs([(3, 4)], batch=1, heads=2, channels=3, queries=5,
                                                                points=2)
        value.requires_grad_()
        assert ops.implementation_for(value) == "reference"
        assert ops.available_implementations()["cpu"] == ["reference"]
        output = ops.ms_deform_attn(value, shapes, starts, locations, weights)
        output.sum().backward()
        assert torch.equal(output, ops.ms_deform_attn_reference(value, shapes, starts, locations, weights))
        assert value.grad.abs().sum() > 0
    messages = [str(w.message) for w in caught if "ms_deform_attn" in str(w.message)]
    print(len(messages))
    print(messages[0] if messages else "")
    print(ops.library_error())
"""


def copy_of_ops(directory):
    """A copy of ops/ without any compiled library, as directory/deformable_detr_ops."""
    shutil.copytree(os.path.join(ROOT, "ops"), os.path.join(directory, "deformable_detr_ops"),
                    ignore=shutil.ignore_patterns("_C*", "build", "__pycache__"))
    return str(directory)


def test_import_without_build_warns_once_and_uses_reference(tmp_path):
    count, message, error = run_python(IMPORT_AND_RUN, copy_of_ops(tmp_path)).splitlines()
    assert count == "1"
    assert "not built" in message and "pip install" in message
    assert error == "not built"


def test_import_with_broken_build_warns_once_and_uses_reference(tmp_path):
    import importlib.machinery

    parent = copy_of_ops(tmp_path)
    with open(os.path.join(parent, "deformable_detr_ops", "_C" + importlib.machinery.EXTENSION_SUFFIXES[0]), "wb") as library:
        library.write(b"not a shared library")
    count, message, error = run_python(IMPORT_AND_RUN, parent).splitlines()
    assert count == "1"
    assert "not loadable" in message and "pip install" in message
    assert error.startswith("not loadable")


def test_disabling_the_extension_is_silent():
    count, _, error = run_python(IMPORT_AND_RUN, ROOT, {"MS_DEFORM_ATTN_NO_EXTENSION": "1"}).splitlines()
    assert count == "0"
    assert "MS_DEFORM_ATTN_NO_EXTENSION" in error


def test_auto_picks_by_the_dtype_computed_in():
    # autocast hands the op a bfloat16 value next to float32 locations and weights: that computes in
    # float32, which the CPU kernel does
    value, shapes, starts, locations, weights = inputs(dtype=torch.float32)
    expected = "kernel" if ops.kernel_available("cpu", torch.float32) else "reference"
    assert ops.implementation_for(value.bfloat16(), torch.float32) == expected
    if expected == "kernel":
        with torch.no_grad():
            output = ms_deform_attn(value.bfloat16(), shapes, starts, locations, weights)
        assert output.dtype == torch.float32
        torch.testing.assert_close(output, ops.kernel.forward(value.bfloat16().float(), shapes, starts, locations, weights),
                                   rtol=0, atol=0)
