"""The Triton implementation against the float64 reference: forward, every gradient, gradcheck,
awkward sizes, borders, non-finite locations, mixed (autocast) dtypes and torch.compile.

Runs on CUDA where Triton can (a GPU), and on the CPU in Triton's interpreter, which must be on
before the package is imported: tests/test_ops_triton_interpreter.py runs this file in a
subprocess with TRITON_INTERPRET=1. Without either, everything here is skipped.
"""
import warnings

import pytest
import torch

import deformable_detr_ops as ops
from deformable_detr_ops import ms_deform_attn, ms_deform_attn_reference
from deformable_detr_ops.testing import (
    ProjectedAttention,
    magnitude,
    make_inputs,
    outputs_and_gradients,
    widen,
    with_borders,
)

DEVICES = [device for device in ("cpu", "cuda") if ops.triton_available(device)]

pytestmark = pytest.mark.skipif(
    not DEVICES,
    reason="Triton cannot run here: no GPU, and the interpreter is off (tests/test_ops_triton_interpreter.py runs "
           "this file with TRITON_INTERPRET=1)",
)

# (spatial shapes, heads, channels per head, points, queries). Small: the interpreter is slow.
# Channel counts below, at and above one channel block (64), levels of unequal size, a level of
# one pixel, one-row and one-column levels, more queries than one program's block.
CASES = {
    "one-channel": ([(3, 5), (2, 2)], 2, 1, 4, 6),
    "three-channels": ([(4, 3), (1, 6), (6, 1)], 1, 3, 2, 5),
    "thirty-channels": ([(4, 3)], 1, 30, 1, 5),
    "thirty-two-channels": ([(5, 7), (3, 4), (1, 6), (6, 1)], 3, 32, 4, 7),
    "seventy-one-channels": ([(2, 9), (7, 2), (1, 1)], 2, 71, 2, 4),
    "seventy-queries": ([(6, 7), (3, 4)], 2, 5, 2, 70),  # several query blocks, the last one partial
}


def case_inputs(name, device, dtype=torch.float64, seed=0, margin=0.25, batch=2):
    shapes, heads, channels, points, queries = CASES[name]
    value, shapes, starts, locations, weights = make_inputs(
        shapes, batch=batch, heads=heads, channels=channels, queries=queries, points=points, dtype=dtype,
        device=device, margin=margin, seed=seed,
    )
    return value, shapes, starts, with_borders(locations), weights


def triton(*inputs):
    return ms_deform_attn(*inputs, implementation="triton")


def grad_output_for(inputs, seed=0):
    value, _, _, locations, _ = inputs
    generator = torch.Generator().manual_seed(seed)
    shape = (value.shape[0], locations.shape[1], value.shape[2] * value.shape[3])
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(value.device)


def assert_matches_reference(inputs, tolerance, grad_output=None):
    grad_output = grad_output_for(inputs) if grad_output is None else grad_output
    computed = outputs_and_gradients(triton, inputs, grad_output)
    expected = outputs_and_gradients(ms_deform_attn_reference, widen(inputs), grad_output)
    for what, a, b in zip(("output", "grad value", "grad locations", "grad weights"), computed, expected):
        assert a.shape == b.shape, what
        scale = max(1.0, magnitude(b))
        torch.testing.assert_close(a.double(), b, rtol=0, atol=tolerance * scale, msg=lambda m: f"{what}: {m}")
    return computed


@pytest.mark.parametrize("device", DEVICES)
def test_listed_as_available(device):
    assert "triton" in ops.available_implementations()[device]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_forward_and_gradients_match_reference(device, name, dtype, tolerance):
    inputs = case_inputs(name, device, dtype=dtype, seed=1)
    computed = assert_matches_reference(inputs, tolerance)
    assert computed[0].dtype == dtype and all(g.dtype == dtype for g in computed[1:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["one-channel", "seventy-one-channels"])
def test_gradcheck(device, name):
    value, shapes, starts, locations, weights = case_inputs(name, device, seed=2, batch=1)
    arguments = (value.requires_grad_(), locations.requires_grad_(), weights.requires_grad_())
    # value gradients are summed with atomics on a GPU: equal up to rounding, not bit for bit
    assert torch.autograd.gradcheck(lambda v, loc, w: triton(v, shapes, starts, loc, w), arguments,
                                    nondet_tol=1e-12, fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_every_element(device):
    value, shapes, starts, locations, weights = case_inputs("three-channels", device, seed=3, batch=1)
    arguments = (value.requires_grad_(), locations.requires_grad_(), weights.requires_grad_())
    assert torch.autograd.gradcheck(lambda v, loc, w: triton(v, shapes, starts, loc, w), arguments, nondet_tol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_exact_edges_far_outside_and_non_finite_locations(device):
    # power-of-two sizes, so that x * W - 0.5 lands exactly on -1, 0, W - 1 and W
    shapes = [(4, 8), (2, 4)]
    value, shapes, starts, locations, weights = make_inputs(shapes, batch=2, heads=2, channels=5, queries=6, points=4,
                                                            dtype=torch.float64, device=device, seed=4)
    sizes = shapes.flip(1).to(torch.float64)  # (L, 2): W, H
    # per level: pixel coordinates -1 (the last position that reads anything), 0, W - 1 and W (reads nothing)
    for point, pixel in enumerate((-1.0, 0.0, "last", "size")):
        for level in range(2):
            for axis in range(2):
                size = sizes[level, axis]
                coordinate = {"last": size - 1, "size": size}.get(pixel, pixel)
                locations[:, 0::2, :, level, point, axis] = (coordinate + 0.5) / size
    locations[:, 1, :, :, :, 0] = 7.5  # far right
    locations[:, 3, :, :, :, 1] = -4.0  # far above
    locations[0, 5, 0, 0, 0, 0] = float("nan")
    locations[1, 5, 1, 1, 2, 1] = float("inf")
    locations[1, 5, 0, 0, 1, 0] = -float("inf")
    inputs = (value, shapes, starts, locations, weights)
    output, grad_value, grad_locations, grad_weights = assert_matches_reference(inputs, 1e-12)
    assert not output[:, 1].any() and not output[:, 3].any()
    assert not grad_locations[:, 1].any() and not grad_weights[:, 3].any()
    dropped = ~torch.isfinite(locations).all(-1)
    assert not grad_locations[dropped].any() and not grad_weights[dropped].any()
    assert all(torch.isfinite(t).all() for t in (output, grad_value, grad_locations, grad_weights))


@pytest.mark.parametrize("device", DEVICES)
def test_no_queries_no_levels_and_one_image(device):
    assert_matches_reference(case_inputs("thirty-two-channels", device, seed=5, batch=1), 1e-12)
    shapes, heads, channels, points, _ = CASES["thirty-two-channels"]
    empty = make_inputs(shapes, batch=2, heads=heads, channels=channels, queries=0, points=points,
                        dtype=torch.float64, device=device)
    output, grad_value, grad_locations, grad_weights = assert_matches_reference(empty, 0.0)
    assert output.shape == (2, 0, heads * channels) and not grad_value.any() and grad_locations.numel() == 0

    value = torch.randn(2, 0, 2, 4, dtype=torch.float64, device=device, requires_grad=True)
    no_levels = torch.zeros(0, 2, dtype=torch.int64, device=device)
    locations = torch.rand(2, 3, 2, 0, 1, 2, dtype=torch.float64, device=device, requires_grad=True)
    weights = torch.rand(2, 3, 2, 0, 1, dtype=torch.float64, device=device, requires_grad=True)
    output = triton(value, no_levels, no_levels[:, 0], locations, weights)
    assert output.shape == (2, 3, 8) and not output.any()
    output.sum().backward()
    assert value.grad.shape == value.shape and weights.grad.shape == weights.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_half_value_with_float32_locations_as_under_autocast(device, dtype, tolerance):
    value, shapes, starts, locations, weights = case_inputs("thirty-two-channels", device, dtype=torch.float32, seed=6)
    value = value.to(dtype)
    inputs = (value, shapes, starts, locations, weights)
    grad_output = grad_output_for(inputs)
    computed = outputs_and_gradients(triton, inputs, grad_output)
    # the very numbers the kernels read, in float64
    expected = outputs_and_gradients(ms_deform_attn_reference, widen(inputs), grad_output)
    # promoted as by every implementation: a float32 result, each gradient in its input's dtype
    assert [t.dtype for t in computed] == [torch.float32, dtype, torch.float32, torch.float32]
    for what, a, b in zip(("output", "grad value", "grad locations", "grad weights"), computed, expected):
        # float32 sums; the value gradient is rounded to the half type once, at the end
        limit = tolerance if what == "grad value" else 1e-5
        assert (a.double() - b).abs().max().item() <= limit * max(magnitude(b), 1.0), what
    # and the same as promoting first, which the other implementations do
    promoted = outputs_and_gradients(triton, (value.float(), shapes, starts, locations, weights), grad_output)
    for a, b in zip(computed, promoted):
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=tolerance * max(magnitude(b), 1.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_half_types_throughout(device, dtype, tolerance):
    inputs = case_inputs("seventy-one-channels", device, dtype=dtype, seed=7)
    grad_output = grad_output_for(inputs).to(dtype)
    computed = outputs_and_gradients(triton, inputs, grad_output)
    expected = outputs_and_gradients(ms_deform_attn_reference, widen(inputs), grad_output.double())
    for a, b in zip(computed, expected):
        assert a.dtype == dtype
        assert (a.double() - b).abs().max().item() <= tolerance * max(magnitude(b), 1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs_and_gradient(device):
    value, shapes, starts, locations, weights = case_inputs("three-channels", device, seed=8)
    value_view = value.transpose(0, 2).contiguous().transpose(0, 2)
    locations_view = torch.cat([locations, locations], dim=-1)[..., :2]
    weights_view = weights.transpose(1, 3).contiguous().transpose(1, 3)
    views = (value_view, shapes, starts, locations_view, weights_view)
    grad_output = grad_output_for(views).transpose(0, 1).contiguous().transpose(0, 1)
    assert not any(t.is_contiguous() for t in (value_view, locations_view, weights_view, grad_output))
    assert_matches_reference(views, 1e-12, grad_output)


@pytest.mark.parametrize("device", DEVICES)
def test_value_without_gradient(device):
    value, shapes, starts, locations, weights = case_inputs("thirty-channels", device, seed=9)
    locations.requires_grad_()
    weights.requires_grad_()
    triton(value, shapes, starts, locations, weights).sum().backward()
    expected_locations, expected_weights = torch.autograd.grad(
        ms_deform_attn_reference(value, shapes, starts, locations, weights).sum(), (locations, weights))
    torch.testing.assert_close(locations.grad, expected_locations, rtol=0, atol=1e-12)
    torch.testing.assert_close(weights.grad, expected_weights, rtol=0, atol=1e-12)
    assert value.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_wrong_value_length_and_bad_arguments_are_rejected(device):
    value, shapes, starts, locations, weights = case_inputs("one-channel", device)  # S = 19
    with pytest.raises(ValueError, match="value has S = 20 tokens"):
        triton(torch.cat([value, value[:, :1]], dim=1), shapes, starts, locations, weights)
    with pytest.raises(ValueError, match="attention_weights must have shape"):
        triton(value, shapes, starts, locations, weights[..., :1])
    with pytest.raises(ValueError, match="sampling_locations must be floating point"):
        triton(value, shapes, starts, locations.int(), weights)


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_is_refused(device):
    value, shapes, starts, locations, weights = case_inputs("one-channel", device)
    value.requires_grad_()
    output = triton(value, shapes, starts, locations, weights)
    (grad,) = torch.autograd.grad(output.sum(), value, create_graph=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        grad.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_flop_counter_counts_the_op(device):
    from torch.utils.flop_counter import FlopCounterMode

    from deformable_detr_ops.flops import backward_flops, forward_flops

    value, shapes, starts, locations, weights = case_inputs("three-channels", device)
    value.requires_grad_()
    with FlopCounterMode(display=False) as counter:
        triton(value, shapes, starts, locations, weights).sum().backward()
    counts = {str(operator): count for operator, count in counter.get_flop_counts()["Global"].items()}
    assert counts == {
        "deformable_attention.ms_deform_attn_triton_forward": forward_flops(value.shape, locations.shape),
        "deformable_attention.ms_deform_attn_triton_backward": backward_flops(value.shape, locations.shape),
    }


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    module = ProjectedAttention(3, implementation="triton").to(device)
    # on a GPU Inductor compiles the Triton kernels into the graph; the interpreter's operators are opaque
    backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    inputs = case_inputs("three-channels", device, seed=10)
    grad_output = grad_output_for(inputs)
    for eager, traced in zip(outputs_and_gradients(module, inputs, grad_output),
                             outputs_and_gradients(compiled, inputs, grad_output)):
        torch.testing.assert_close(traced, eager, rtol=0, atol=1e-12)


@pytest.mark.skipif("cuda" not in DEVICES, reason="atomics are only nondeterministic on a GPU")
def test_deterministic_mode_warns_or_raises():
    inputs = case_inputs("three-channels", "cuda")
    grad_output = grad_output_for(inputs)
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outputs_and_gradients(triton, inputs, grad_output)
        assert any("does not have a deterministic implementation" in str(w.message) for w in caught)
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
            outputs_and_gradients(triton, inputs, grad_output)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU")
def test_auto_picks_triton_on_a_gpu_without_the_cuda_kernel(monkeypatch):
    monkeypatch.setattr(ops.dispatch, "kernel_available", lambda device="cpu", dtype=None: False)
    inputs = case_inputs("three-channels", "cuda", dtype=torch.float32)
    assert ops.implementation_for(inputs[0]) == "triton"
    monkeypatch.setattr(ops.dispatch, "ms_deform_attn_reference", None)  # the reference must not run
    assert ms_deform_attn(*inputs).shape == (2, 5, 3)
