"""The pure-PyTorch reference of multi-scale deformable attention, checked against a
direct per-sample bilinear interpolation and by gradcheck."""
import math

import pytest
import torch

from deformable_detr_ops import ms_deform_attn_reference
from deformable_detr_ops.testing import level_start_index, make_inputs


def naive_attention(value, spatial_shapes, sampling_locations, attention_weights):
    """Loop-by-loop definition: bilinear interpolation with zero padding, pixel centres at (i + 0.5) / size."""
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    starts = level_start_index(spatial_shapes).tolist()
    output = torch.zeros(N, Lq, M, D, dtype=value.dtype)
    for n in range(N):
        for q in range(Lq):
            for m in range(M):
                for level, (height, width) in enumerate(spatial_shapes.tolist()):
                    for p in range(P):
                        x, y = sampling_locations[n, q, m, level, p].tolist()
                        w_im, h_im = x * width - 0.5, y * height - 0.5
                        left, top = math.floor(w_im), math.floor(h_im)
                        for row, col in ((top, left), (top, left + 1), (top + 1, left), (top + 1, left + 1)):
                            if 0 <= row < height and 0 <= col < width:
                                weight = (1 - abs(h_im - row)) * (1 - abs(w_im - col))
                                token = starts[level] + row * width + col
                                output[n, q, m] += attention_weights[n, q, m, level, p] * weight * value[n, token, m]
    return output.view(N, Lq, M * D)


def test_matches_naive_definition():
    inputs = make_inputs([(3, 4), (2, 1), (1, 3)], batch=2, heads=2, channels=3, queries=5, points=2,
                         dtype=torch.float64, margin=0.3, seed=3)
    value, shapes, _, locations, weights = inputs
    expected = naive_attention(value, shapes, locations, weights)
    torch.testing.assert_close(ms_deform_attn_reference(*inputs), expected, rtol=0, atol=1e-12)


def test_gradcheck():
    inputs = make_inputs([(3, 5), (1, 4), (4, 1)], batch=2, heads=2, channels=3, queries=4, points=2,
                         dtype=torch.float64, margin=0.2, seed=5)
    value, shapes, starts, locations, weights = (t.requires_grad_() if t.is_floating_point() else t for t in inputs)
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn_reference(v, shapes, starts, loc, w), (value, locations, weights)
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_on_cpu_compute_in_float32(dtype):
    inputs = make_inputs([(4, 6), (2, 3)], batch=1, heads=2, channels=8, queries=7, points=3, dtype=dtype, seed=2)
    output = ms_deform_attn_reference(*inputs)
    assert output.dtype == dtype
    widened = [t.float() if t.is_floating_point() else t for t in inputs]
    torch.testing.assert_close(output, ms_deform_attn_reference(*widened).to(dtype), rtol=0, atol=0)


def test_no_queries_and_no_levels():
    inputs = make_inputs([(3, 3)], batch=2, heads=2, channels=4, queries=0, points=2, dtype=torch.float64)
    assert ms_deform_attn_reference(*inputs).shape == (2, 0, 8)
    value = torch.randn(2, 0, 2, 4, dtype=torch.float64)
    empty = torch.zeros(0, 2, dtype=torch.int64)
    locations, weights = torch.rand(2, 3, 2, 0, 1, 2), torch.rand(2, 3, 2, 0, 1)
    output = ms_deform_attn_reference(value, empty, empty[:, 0], locations, weights)
    assert output.shape == (2, 3, 8) and not output.any()


def test_no_levels_output_is_connected_to_the_graph():
    value = torch.full((2, 0, 2, 4), float("inf"), dtype=torch.float64, requires_grad=True)
    empty = torch.zeros(0, 2, dtype=torch.int64)
    locations = torch.rand(2, 3, 2, 0, 1, 2, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(2, 3, 2, 0, 1, dtype=torch.float64, requires_grad=True)
    output = ms_deform_attn_reference(value, empty, empty[:, 0], locations, weights)
    assert output.grad_fn is not None and not output.any()
    output.sum().backward()
    assert [t.grad.shape for t in (value, locations, weights)] == [value.shape, locations.shape, weights.shape]


def test_value_longer_than_the_levels_is_a_value_error():
    value, shapes, starts, locations, weights = make_inputs([(3, 4), (2, 1)], batch=1, heads=2, channels=3, queries=2,
                                                            points=2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"value has S = 15 tokens .*spatial_shapes covers sum_l H_l \* W_l = 14"):
        ms_deform_attn_reference(torch.cat([value, value[:, :1]], dim=1), shapes, starts, locations, weights)


def test_non_finite_locations_contribute_nothing():
    value, shapes, starts, locations, weights = make_inputs([(3, 4)], batch=1, heads=1, channels=2, queries=2,
                                                            points=2, dtype=torch.float64)
    locations[0, 0, 0, 0, 1] = torch.tensor([float("nan"), 0.5])
    locations.requires_grad_()
    output = ms_deform_attn_reference(value, shapes, starts, locations, weights)
    expected = naive_attention(value, shapes, locations.detach().nan_to_num(nan=-5.0), weights)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-12)
    output.sum().backward()
    assert torch.isfinite(locations.grad).all() and not locations.grad[0, 0, 0, 0, 1].any()
