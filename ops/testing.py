"""Inputs of ``ms_deform_attn`` for tests and benchmarks.

Legend: N batch, S = sum_l H_l * W_l value tokens, M heads, D channels per head,
Lq queries, L levels, P sampling points per level and head.
"""
import torch


def level_start_index(spatial_shapes):
    """(L, 2) int64 -> (L,) int64 offsets of each level in the flattened value."""
    areas = spatial_shapes.prod(1)
    return torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])


def token_centres(spatial_shapes):
    """(L, 2) -> (S, 2): normalized (x, y) centre of every token, level after level, as the
    reference points of encoder queries."""
    centres = []
    for height, width in spatial_shapes.tolist():
        y, x = torch.meshgrid(
            (torch.arange(height, dtype=torch.float64) + 0.5) / height,
            (torch.arange(width, dtype=torch.float64) + 0.5) / width,
            indexing="ij",
        )
        centres.append(torch.stack([x.flatten(), y.flatten()], dim=-1))
    return torch.cat(centres)


def make_inputs(spatial_shapes, *, batch=2, heads=8, channels=32, queries=100, points=4, dtype=torch.float32,
                device="cpu", reference_points=None, spread=None, margin=0.0, seed=0):
    """Random inputs, generated on the CPU in float64 so that all dtypes and devices see the same numbers.

    Args:
        spatial_shapes: list of (H, W) or an (L, 2) tensor.
        reference_points: (Lq, 2) normalized per-query centres for ``spread``; default uniform.
        spread: None for locations uniform in [-margin, 1 + margin]; else locations are the reference
            point plus Gaussian offsets of ``spread`` pixels of each level (how a trained model samples).
    Returns:
        value (N, S, M, D), spatial_shapes (L, 2) int64, level_start_index (L,) int64,
        sampling_locations (N, Lq, M, L, P, 2), attention_weights (N, Lq, M, L, P) softmaxed over L * P.
    """
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.as_tensor(spatial_shapes, dtype=torch.int64).reshape(-1, 2)
    levels = shapes.shape[0]
    tokens = int(shapes.prod(1).sum())

    def normal(*size):
        return torch.randn(*size, generator=generator, dtype=torch.float64)

    def uniform(*size):
        return torch.rand(*size, generator=generator, dtype=torch.float64)

    value = normal(batch, tokens, heads, channels)
    if spread is None:
        locations = uniform(batch, queries, heads, levels, points, 2) * (1 + 2 * margin) - margin
    else:
        if reference_points is None:
            reference_points = uniform(queries, 2)
        centres = reference_points.to(torch.float64).view(1, queries, 1, 1, 1, 2)
        # (W, H) per level, so that offsets are `spread` pixels of that level.
        sizes = shapes.flip(1).to(torch.float64).view(1, 1, 1, levels, 1, 2)
        locations = centres + normal(batch, queries, heads, levels, points, 2) * spread / sizes
    weights = normal(batch, queries, heads, levels * points).softmax(-1).view(batch, queries, heads, levels, points)
    cast = dict(dtype=dtype, device=device)
    return (
        value.to(**cast),
        shapes.to(device),
        level_start_index(shapes).to(device),
        locations.to(**cast),
        weights.to(**cast),
    )


def with_borders(locations):
    """A copy of sampling locations with some coordinates exactly on the borders 0 and 1 (half a
    pixel from the centres, where bilinear sampling is smooth)."""
    locations = locations.clone()
    flat = locations.view(-1)
    flat[0::7] = 0.0
    flat[3::11] = 1.0
    return locations


def outputs_and_gradients(function, inputs, grad_output):
    """[output, grad of value, of sampling_locations, of attention_weights] of ``function(*inputs)``
    (the op's five arguments) for ``grad_output``, on detached copies of the inputs."""
    value, shapes, starts, locations, weights = (t.detach().clone() for t in inputs)
    differentiable = (value.requires_grad_(), locations.requires_grad_(), weights.requires_grad_())
    output = function(value, shapes, starts, locations, weights)
    output.backward(grad_output.to(output.dtype))
    return [output.detach()] + [t.grad for t in differentiable]


def widen(inputs):
    """The floating tensors of ``inputs`` in float64 (the others as they are)."""
    return [t.double() if t.is_floating_point() else t for t in inputs]


def magnitude(tensor) -> float:
    """Largest absolute entry (0 for an empty tensor)."""
    return tensor.abs().max().item() if tensor.numel() else 0.0


class ProjectedAttention(torch.nn.Module):
    """A stand-in for a model layer, in float64: a value projection and a softmax around the op, so
    that gradients reach parameters through it. ``implementation`` as ``ms_deform_attn``'s."""

    def __init__(self, channels, implementation="auto"):
        super().__init__()
        self.value_projection = torch.nn.Linear(channels, channels, dtype=torch.float64)
        self.implementation = implementation

    def forward(self, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        from .dispatch import ms_deform_attn

        N, S, M, D = value.shape
        value = self.value_projection(value.flatten(2)).view(N, S, M, D)
        return ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights.softmax(-1),
                              implementation=self.implementation)
