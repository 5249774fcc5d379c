"""MSDeformAttn's sampling locations against the official formula."""
import pytest
import torch

from deformable_detr.models import MSDeformAttn

SHAPES = torch.tensor([[22, 30], [11, 15], [6, 8], [3, 4]])


def official_locations(module, query, reference_points, spatial_shapes):
    """reference[:, :, None, :, None] + sampling_offsets(query) / (W_l, H_l), as the official code computes it."""
    N, Lq, _ = query.shape
    offsets = module.sampling_offsets(query).view(N, Lq, module.n_heads, module.n_levels, module.n_points, 2)
    normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
    return reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]


def module_and_inputs(dtype, seed=0):
    torch.manual_seed(seed)
    module = MSDeformAttn(d_model=32, n_levels=4, n_heads=4, n_points=3).to(dtype)
    # trained weights are not zero: give the offsets a real dependence on the query
    torch.nn.init.normal_(module.sampling_offsets.weight, std=0.3)
    query = torch.randn(2, 7, 32, dtype=dtype, requires_grad=True)
    reference_points = torch.rand(2, 7, 4, 2, dtype=dtype, requires_grad=True)
    return module, query, reference_points


def test_point_locations_are_the_official_function_with_its_gradients():
    module, query, reference_points = module_and_inputs(torch.float64)
    ours = module.point_locations(query, reference_points, SHAPES)
    theirs = official_locations(module, query, reference_points, SHAPES)
    assert ours.shape == (2, 7, 4, 4, 3, 2)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(ours)
    inputs = (query, reference_points, module.sampling_offsets.weight, module.sampling_offsets.bias)
    for a, b in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(theirs, inputs, grad)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_point_locations_gradcheck():
    module, query, reference_points = module_and_inputs(torch.float64, seed=1)
    assert torch.autograd.gradcheck(lambda q, r: module.point_locations(q, r, SHAPES), (query, reference_points))


def test_point_locations_float32_close_to_the_official_function():
    module, query, reference_points = module_and_inputs(torch.float32, seed=2)
    torch.testing.assert_close(
        module.point_locations(query, reference_points, SHAPES),
        official_locations(module, query, reference_points, SHAPES),
        rtol=1e-5, atol=1e-5,
    )


@pytest.mark.parametrize("query_dtype", [torch.float32, torch.bfloat16])
def test_point_locations_stay_float32_under_autocast(query_dtype):
    """bfloat16 would round reference points in [0, 1] to 1/256: a pixel on a 256-wide level."""
    module, query, reference_points = module_and_inputs(torch.float32, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        locations = module.point_locations(query.detach().to(query_dtype), reference_points, SHAPES)
    assert locations.dtype == torch.float32
    expected = official_locations(module, query.detach().to(query_dtype).float(), reference_points, SHAPES)
    torch.testing.assert_close(locations, expected, rtol=1e-5, atol=1e-5)


def test_forward_zeroes_padded_values_in_place_without_breaking_gradients():
    """The padding mask zeroes the value projection in place; the projection still gets its gradient."""
    torch.manual_seed(4)
    module = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2).double()
    shapes = torch.tensor([[3, 4], [2, 2]])
    level_start_index = torch.tensor([0, 12])
    query = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    reference_points = torch.rand(2, 3, 2, 2, dtype=torch.float64)
    value = torch.randn(2, 16, 8, dtype=torch.float64, requires_grad=True)
    padding_mask = torch.zeros(2, 16, dtype=torch.bool)
    padding_mask[1, 8:12] = padding_mask[1, 14:] = True
    assert torch.autograd.gradcheck(
        lambda v, q: module(q, reference_points, v, shapes, level_start_index, padding_mask), (value, query)
    )
    # padded values do not reach the output
    output = module(query, reference_points, value, shapes, level_start_index, padding_mask)
    (grad_value,) = torch.autograd.grad(output.sum(), value)
    assert grad_value[padding_mask].abs().max() == 0 and grad_value[~padding_mask].abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_weights_softmax_in_float32_or_better_under_autocast(dtype):
    """Under CPU autocast the weights' projection is bfloat16 but their softmax is float32 (its
    backward over 16-wide rows is far slower in bfloat16 there); float64 stays float64."""
    module, query, reference_points = module_and_inputs(dtype, seed=5)
    torch.nn.init.normal_(module.attention_weights.weight, std=0.3)
    level_start_index = torch.cat([SHAPES.new_zeros(1), SHAPES.prod(1).cumsum(0)[:-1]])
    value = torch.randn(2, int(SHAPES.prod(1).sum()), 32, dtype=dtype)
    module.recording = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        module(query.detach(), reference_points.detach(), value, SHAPES, level_start_index)
        logits = module.attention_weights(query.detach())
    weights = module.recording[0].attention_weights
    assert logits.dtype == (torch.bfloat16 if dtype == torch.float32 else dtype)
    assert weights.dtype == dtype
    expected = torch.softmax(logits.to(dtype).view(2, 7, 4, 12), -1).view(weights.shape)
    torch.testing.assert_close(weights, expected, rtol=0, atol=0)
