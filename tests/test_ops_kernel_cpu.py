"""The compiled CPU kernel against the reference: forward values, gradcheck and
gradients over awkward sizes. Skipped, with the build command, when not built."""
import glob
import importlib.machinery
import os
import subprocess
import sys

import pytest
import torch

import deformable_detr_ops as ops
from deformable_detr_ops import ms_deform_attn, ms_deform_attn_reference
from deformable_detr_ops.testing import make_inputs, with_borders

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILT = any(
    glob.glob(os.path.join(ROOT, "ops", "_C" + suffix)) for suffix in importlib.machinery.EXTENSION_SUFFIXES
)
DISABLED = os.environ.get("MS_DEFORM_ATTN_NO_EXTENSION", "").strip() not in ("", "0")
requires_kernel = pytest.mark.skipif(
    not BUILT or DISABLED,
    reason="the compiled kernels are disabled (MS_DEFORM_ATTN_NO_EXTENSION)" if DISABLED
    else f"the compiled kernels are not built. {ops.BUILD_HINT}",
)

# (spatial shapes, heads, channels per head, points, queries); small, as gradcheck evaluates
# the op twice per input element.
CASES = {
    "one-channel": ([(3, 5), (2, 2)], 2, 1, 4, 6),
    "thirty-channels": ([(4, 3)], 1, 30, 1, 5),
    "thirty-two-channels": ([(3, 4), (2, 3), (1, 3), (3, 1)], 2, 32, 4, 5),
    "seventy-one-channels": ([(2, 5), (4, 2), (1, 1)], 1, 71, 2, 4),
    "row-and-column-levels": ([(1, 8), (8, 1)], 2, 3, 3, 9),
}


def case_inputs(name, dtype=torch.float64, seed=0, margin=0.25):
    shapes, heads, channels, points, queries = CASES[name]
    value, shapes, starts, locations, weights = make_inputs(
        shapes, batch=2, heads=heads, channels=channels, queries=queries, points=points, dtype=dtype, margin=margin,
        seed=seed,
    )
    return value, shapes, starts, with_borders(locations), weights


def kernel(*inputs):
    return ms_deform_attn(*inputs, implementation="kernel")


@requires_kernel
def test_built_library_is_loaded():
    assert ops.library_loaded(), f"ops/_C exists but is not usable: {ops.library_error()}"
    assert ops.kernel_available("cpu", torch.float32) and ops.kernel_available("cpu", torch.float64)
    assert not ops.kernel_available("cpu", torch.float16)
    assert ops.available_implementations()["cpu"] == ["kernel", "reference"]


@requires_kernel
def test_auto_dispatches_to_the_kernel(monkeypatch):

    def refuse(*args):
        raise AssertionError("the reference ran instead of the compiled kernel")

    monkeypatch.setattr(ops.dispatch, "ms_deform_attn_reference", refuse)
    inputs = case_inputs("one-channel", dtype=torch.float32)
    assert ops.implementation_for(inputs[0]) == "kernel"
    assert ms_deform_attn(*inputs).shape == (2, 6, 2)
    with pytest.raises(AssertionError, match="reference ran"):
        ms_deform_attn(*inputs, implementation="reference")


@requires_kernel
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_forward_matches_reference(name, dtype, tolerance):
    inputs = case_inputs(name, dtype=dtype, seed=1)
    torch.testing.assert_close(kernel(*inputs), ms_deform_attn_reference(*inputs), rtol=0, atol=tolerance)


@requires_kernel
@pytest.mark.parametrize("name", sorted(CASES))
def test_gradcheck(name):
    value, shapes, starts, locations, weights = case_inputs(name, seed=2)
    arguments = (value.requires_grad_(), locations.requires_grad_(), weights.requires_grad_())
    assert torch.autograd.gradcheck(lambda v, loc, w: kernel(v, shapes, starts, loc, w), arguments)


@requires_kernel
@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_match_reference(name):
    inputs = case_inputs(name, seed=3)
    grad_output = torch.randn(inputs[0].shape[0], inputs[3].shape[1], inputs[0].shape[2] * inputs[0].shape[3],
                              dtype=torch.float64)
    gradients = []
    for implementation in (kernel, ms_deform_attn_reference):
        value, shapes, starts, locations, weights = (t.clone() for t in inputs)
        differentiable = (value.requires_grad_(), locations.requires_grad_(), weights.requires_grad_())
        implementation(value, shapes, starts, locations, weights).backward(grad_output)
        gradients.append([t.grad for t in differentiable])
    for computed, expected in zip(*gradients):
        torch.testing.assert_close(computed, expected, rtol=0, atol=1e-10)


@requires_kernel
def test_far_outside_samples_read_zeros_and_have_zero_gradients():
    value, shapes, starts, locations, weights = case_inputs("thirty-two-channels", seed=4)
    locations = torch.where(torch.rand_like(locations) < 0.5, locations + 3.0, locations - 3.0)
    locations.requires_grad_()
    output = kernel(value, shapes, starts, locations, weights)
    assert not output.any()
    output.sum().backward()
    assert not locations.grad.any()


# Many queries per value token make the kernel copy each head into a contiguous slice first;
# few make it work on value directly.
@requires_kernel
@pytest.mark.parametrize("queries", [11, 2])
def test_split_levels_path_when_threads_outnumber_head_pairs(queries):
    # One batch element and one head: fewer (n, m) pairs than threads, so the backward splits levels.
    inputs = make_inputs([(5, 4), (3, 3), (2, 1)], batch=1, heads=1, channels=5, queries=queries, points=3,
                         dtype=torch.float64, margin=0.2, seed=6)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        value, shapes, starts, locations, weights = (t.clone() for t in inputs)
        arguments = (value.requires_grad_(), locations.requires_grad_(), weights.requires_grad_())
        assert torch.autograd.gradcheck(lambda v, loc, w: kernel(v, shapes, starts, loc, w), arguments)
    finally:
        torch.set_num_threads(threads)


@requires_kernel
@pytest.mark.parametrize("queries", [5, 1])
def test_levels_that_leave_or_share_tokens(queries):
    # S = 3 * 4 + 2 * 3 = 18, but level 1 reuses level 0's tokens and the last six belong to no level.
    value = torch.randn(2, 18, 2, 3, dtype=torch.float64, requires_grad=True)
    shapes = torch.tensor([[3, 4], [2, 3]])
    starts = torch.tensor([0, 2])
    locations = torch.rand(2, queries, 2, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(2, queries, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    expected_output = torch.zeros(2, queries, 6, dtype=torch.float64)
    for level in range(2):
        # Each level on its own is an ordinary one-level input.
        height, width = shapes[level].tolist()
        part = value[:, starts[level]:starts[level] + height * width]
        expected_output = expected_output + ms_deform_attn_reference(
            part, shapes[level:level + 1], torch.zeros(1, dtype=torch.int64),
            locations[:, :, :, level:level + 1], weights[:, :, :, level:level + 1])
    torch.testing.assert_close(kernel(value, shapes, starts, locations, weights), expected_output, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda v, loc, w: kernel(v, shapes, starts, loc, w), (value, locations, weights))


@requires_kernel
def test_levels_outside_value_are_rejected():
    value, shapes, starts, locations, weights = case_inputs("one-channel")
    with pytest.raises(RuntimeError, match="does not fit"):
        kernel(value, shapes, starts + 1, locations, weights)


@requires_kernel
def test_value_of_another_length_than_the_levels_is_a_value_error_in_the_operator():
    # Called directly (as a compiled graph does), the operator checks what the Python wrapper checks.
    value, shapes, starts, locations, weights = case_inputs("one-channel")  # S = 3 * 5 + 2 * 2 = 19
    for tokens in (20, 18):
        resized = torch.zeros(2, tokens, *value.shape[2:], dtype=value.dtype)
        with pytest.raises(ValueError, match=f"value has S = {tokens} tokens .*spatial_shapes covers .* = 19"):
            torch.ops.deformable_attention.ms_deform_attn_forward(resized, shapes, starts, locations, weights)


@requires_kernel
def test_non_finite_locations_agree_with_the_reference():
    inputs = case_inputs("thirty-two-channels", seed=5)
    locations = inputs[3].clone()
    flat = locations.view(-1)
    flat[1::13] = float("nan")
    flat[4::17] = float("inf")
    flat[6::19] = -float("inf")
    results = []
    for implementation in (kernel, ms_deform_attn_reference):
        value, shapes, starts, _, weights = (t.clone() for t in inputs)
        differentiable = (value.requires_grad_(), locations.clone().requires_grad_(), weights.requires_grad_())
        output = implementation(value, shapes, starts, differentiable[1], weights)
        output.backward(torch.cos(output.detach()))
        results.append([output.detach()] + [t.grad for t in differentiable])
    for computed, expected in zip(*results):
        assert torch.isfinite(computed).all()
        torch.testing.assert_close(computed, expected, rtol=0, atol=1e-10)


@requires_kernel
def test_baseline_instruction_set_matches_reference():
    # The loops are also compiled for AVX2 and picked at run time; this runs the baseline copy.
    script = (
        "import torch\nimport deformable_detr_ops as ops\n"
        "from tests.test_ops_kernel_cpu import case_inputs, kernel\n"
        "from deformable_detr_ops import ms_deform_attn_reference\n"
        "for name in ('seventy-one-channels', 'thirty-two-channels'):\n"
        "    for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 1e-5)):\n"
        "        value, shapes, starts, locations, weights = case_inputs(name, dtype=dtype, seed=7)\n"
        "        outputs, grads = [], []\n"
        "        for run in (kernel, ms_deform_attn_reference):\n"
        "            v, loc, w = (t.clone().requires_grad_() for t in (value, locations, weights))\n"
        "            output = run(v, shapes, starts, loc, w)\n"
        "            output.backward(torch.ones_like(output))\n"
        "            outputs.append(output.detach()); grads.append((v.grad, loc.grad, w.grad))\n"
        "        torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=tolerance)\n"
        "        for a, b in zip(*grads):\n"
        "            torch.testing.assert_close(a, b, rtol=0, atol=tolerance * 10)\n"
        "print('baseline ok')\n"
    )
    environment = dict(os.environ, MS_DEFORM_ATTN_CPU_ISA="baseline", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=environment, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "baseline ok" in result.stdout


@requires_kernel
def test_gradient_at_the_edge_of_the_padding_matches_grid_sample():
    # y = -0.5 / H puts the sample exactly one pixel above the first row centre, where only the
    # zero-weight bottom row is inside: the value is 0 but grid_sample's location gradient is not.
    value, shapes, starts, locations, weights = make_inputs([(4, 8)], batch=1, heads=1, channels=3, queries=2,
                                                            points=1, dtype=torch.float64, seed=8)
    locations[..., 1] = -0.5 / 4
    gradients = []
    for implementation in (kernel, ms_deform_attn_reference):
        loc = locations.clone().requires_grad_()
        implementation(value, shapes, starts, loc, weights).sum().backward()
        gradients.append(loc.grad)
    assert gradients[1][..., 1].abs().min() > 0
    torch.testing.assert_close(gradients[0], gradients[1], rtol=0, atol=1e-12)


@requires_kernel
def test_double_backward_is_refused_clearly():
    value, shapes, starts, locations, weights = case_inputs("one-channel", seed=9)
    value.requires_grad_()
    (grad_value,) = torch.autograd.grad(kernel(value, shapes, starts, locations, weights).sum(), value,
                                        create_graph=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        grad_value.sum().backward()


@requires_kernel
def test_gradients_only_for_inputs_that_require_them():
    value, shapes, starts, locations, weights = case_inputs("thirty-channels", seed=10)
    locations.requires_grad_()
    kernel(value, shapes, starts, locations, weights).sum().backward()
    assert value.grad is None and weights.grad is None and locations.grad.shape == locations.shape


@requires_kernel
@pytest.mark.parametrize("batch, heads, queries", [(2, 4, 300), (1, 1, 3000)])
def test_inputs_large_enough_to_use_several_threads(batch, heads, queries):
    # Small inputs run on one thread; these are large enough for several (the second one with
    # fewer (n, m) pairs than threads, so that its backward also splits the levels).
    inputs = make_inputs([(20, 30), (10, 15), (5, 8)], batch=batch, heads=heads, channels=32, queries=queries,
                         points=4, dtype=torch.float64, margin=0.1, seed=11)
    grad_output = torch.randn(batch, queries, heads * 32, dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        results = []
        for implementation in (kernel, ms_deform_attn_reference):
            value, shapes, starts, locations, weights = (t.clone() for t in inputs)
            differentiable = (value.requires_grad_(), locations.requires_grad_(), weights.requires_grad_())
            output = implementation(value, shapes, starts, locations, weights)
            output.backward(grad_output)
            results.append([output.detach()] + [t.grad for t in differentiable])
    finally:
        torch.set_num_threads(threads)
    for computed, expected in zip(*results):
        torch.testing.assert_close(computed, expected, rtol=0, atol=1e-10)
