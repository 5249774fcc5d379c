"""The CUDA kernel against the float64 reference; skipped when no GPU is visible or
the library was built without CUDA."""
import pytest
import torch

import deformable_detr_ops as ops
from deformable_detr_ops import ms_deform_attn, ms_deform_attn_reference
from deformable_detr_ops.testing import magnitude, make_inputs, outputs_and_gradients, widen, with_borders

DEVICE = "cuda"

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible"),
    pytest.mark.skipif(
        torch.cuda.is_available() and not ops.kernel_available(DEVICE),
        reason=f"the CUDA kernel is not built (library: {ops.library_error() or 'built without CUDA'}). "
               f"{ops.BUILD_HINT}",
    ),
]

# (spatial shapes, heads, channels per head, points, queries); channel counts cover the
# vectorized (multiples of 8) and the per-channel paths, and more channels than a warp.
CASES = {
    "one-channel": ([(3, 5), (2, 2)], 2, 1, 4, 6),
    "thirty-channels": ([(4, 3)], 1, 30, 1, 5),
    "thirty-two-channels": ([(5, 7), (3, 4), (1, 6), (6, 1)], 3, 32, 4, 7),
    "seventy-one-channels": ([(2, 9), (7, 2), (1, 1)], 2, 71, 2, 4),
    "two-hundred-fifty-six-channels": ([(6, 5), (3, 3)], 1, 256, 2, 3),
}

# Largest error allowed, relative to the largest magnitude of the float64 reference result.
HALF_TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 3e-2}


def case_inputs(name, dtype, seed=0, margin=0.25):
    shapes, heads, channels, points, queries = CASES[name]
    value, shapes, starts, locations, weights = make_inputs(
        shapes, batch=2, heads=heads, channels=channels, queries=queries, points=points, dtype=dtype,
        device=DEVICE, margin=margin, seed=seed,
    )
    return value, shapes, starts, with_borders(locations), weights


def kernel(*inputs):
    return ms_deform_attn(*inputs, implementation="kernel")


def test_auto_dispatches_to_the_kernel(monkeypatch):

    def refuse(*args):
        raise AssertionError("the reference ran instead of the compiled kernel")

    monkeypatch.setattr(ops.dispatch, "ms_deform_attn_reference", refuse)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        inputs = case_inputs("one-channel", dtype)
        assert ops.implementation_for(inputs[0]) == "kernel"
        assert ms_deform_attn(*inputs).dtype == dtype


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_forward_and_gradients_match_reference(name, dtype, tolerance):
    inputs = case_inputs(name, dtype, seed=1)
    grad_output = torch.randn(inputs[0].shape[0], inputs[3].shape[1], inputs[0].shape[2] * inputs[0].shape[3],
                              dtype=torch.float64, device=DEVICE)
    computed = outputs_and_gradients(kernel, inputs, grad_output)
    expected = outputs_and_gradients(ms_deform_attn_reference, widen(inputs), grad_output)
    for a, b in zip(computed, expected):
        scale = max(1.0, magnitude(b))
        torch.testing.assert_close(a.double(), b, rtol=0, atol=tolerance * scale)


@pytest.mark.parametrize("name", ["one-channel", "thirty-two-channels", "seventy-one-channels"])
def test_gradcheck(name):
    value, shapes, starts, locations, weights = case_inputs(name, torch.float64, seed=2)
    arguments = (value.requires_grad_(), locations.requires_grad_(), weights.requires_grad_())
    # Value gradients are summed with atomics: equal up to rounding, not bit for bit.
    assert torch.autograd.gradcheck(lambda v, loc, w: kernel(v, shapes, starts, loc, w), arguments,
                                    nondet_tol=1e-12)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_match_float64_reference(name, dtype):
    inputs = case_inputs(name, dtype, seed=3)
    grad_output = torch.randn(inputs[0].shape[0], inputs[3].shape[1], inputs[0].shape[2] * inputs[0].shape[3],
                              device=DEVICE).to(dtype)
    computed = outputs_and_gradients(kernel, inputs, grad_output)
    # The reference sees the very same (rounded) numbers, in float64.
    expected = outputs_and_gradients(ms_deform_attn_reference, widen(inputs), grad_output.double())
    for a, b in zip(computed, expected):
        assert a.dtype == dtype
        scale = magnitude(b)
        assert (a.double() - b).abs().max().item() <= HALF_TOLERANCE[dtype] * max(scale, 1e-3)


def test_misaligned_and_non_contiguous_inputs():
    value, shapes, starts, locations, weights = case_inputs("thirty-two-channels", torch.float32, seed=4)
    shifted = torch.empty(value.numel() + 1, device=DEVICE)[1:].view(value.shape).copy_(value)
    transposed = value.transpose(0, 2).contiguous().transpose(0, 2)
    expected = ms_deform_attn_reference(*widen((value, shapes, starts, locations, weights)))
    for variant in (shifted, transposed):
        torch.testing.assert_close(kernel(variant, shapes.cpu(), starts.cpu(), locations, weights).double(), expected,
                                   rtol=0, atol=1e-5)


def test_batch_of_one_no_queries_and_many_groups():
    for batch, queries in ((1, 5), (2, 0), (3, 3000)):
        shapes, heads, channels, points, _ = CASES["thirty-two-channels"]
        inputs = make_inputs(shapes, batch=batch, heads=heads, channels=channels, queries=queries, points=points,
                             dtype=torch.float32, device=DEVICE, seed=5)
        grad_output = torch.randn(batch, queries, heads * channels, dtype=torch.float64, device=DEVICE)
        computed = outputs_and_gradients(kernel, inputs, grad_output)
        expected = outputs_and_gradients(ms_deform_attn_reference, widen(inputs), grad_output)
        for a, b in zip(computed, expected):
            assert a.shape == b.shape
            torch.testing.assert_close(a.double(), b, rtol=0, atol=1e-4 * max(1.0, magnitude(b)))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    inputs = case_inputs("thirty-two-channels", torch.float32, seed=6)
    grad_output = torch.randn(2, 7, 96, device=DEVICE)
    compiled = torch.compile(kernel, fullgraph=True, backend="aot_eager")
    for a, b in zip(outputs_and_gradients(compiled, inputs, grad_output),
                    outputs_and_gradients(kernel, inputs, grad_output)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_value_of_another_length_than_the_levels_is_rejected():
    value, shapes, starts, locations, weights = case_inputs("one-channel", torch.float32)  # S = 19
    with pytest.raises(ValueError, match="value has S = 20 tokens"):
        ms_deform_attn(torch.cat([value, value[:, :1]], dim=1), shapes, starts, locations, weights)
    # the count of a GPU spatial_shapes is remembered, but not past an in-place change
    ms_deform_attn(value, shapes, starts, locations, weights)
    shapes[1, 0] = 1  # S would now be 17
    with pytest.raises(ValueError, match=r"value has S = 19 tokens .* = 17"):
        ms_deform_attn(value, shapes, starts, locations, weights)


def test_non_finite_locations_read_zeros_with_zero_gradients():
    value, shapes, starts, locations, weights = case_inputs("thirty-two-channels", torch.float64, seed=5)
    locations.view(-1)[1::13] = float("nan")
    locations.view(-1)[4::17] = float("inf")
    results = []
    for implementation in ("kernel", "reference"):
        inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
        output = ms_deform_attn(inputs[0], shapes, starts, inputs[1], inputs[2], implementation=implementation)
        output.backward(torch.cos(output.detach()))
        results.append([output.detach()] + [t.grad for t in inputs])
    for computed, expected in zip(*results):
        assert torch.isfinite(computed).all()
        torch.testing.assert_close(computed, expected, rtol=0, atol=1e-10)
