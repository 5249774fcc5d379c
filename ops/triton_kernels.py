"""Triton kernels of multi-scale deformable attention, forward and backward.

Importing this module imports Triton, and decorates the kernels: with ``TRITON_INTERPRET=1`` in the
environment at that moment they run in Triton's interpreter (on CPU tensors too), else they compile
for the GPU. ``triton_op.py`` launches them; nothing else should.

Legend: N batch, S = sum_l H_l * W_l value tokens, M heads, D channels per head, Lq queries,
L levels, P sampling points per level and head. A program owns BLOCK_Q queries of one (n, m) pair,
so the channels of a pixel (D consecutive elements of value) are read as rows of a
(BLOCK_Q, BLOCK_D) tile: coalesced loads, and coalesced atomics in the backward.

The per-sample arithmetic is the CUDA and CPU kernels' (ops/csrc/bilinear.h): grid_sample with
align_corners=False and zero padding, the same "near" test (which NaN and infinite coordinates
fail, so they read zeros and get zero gradients) and the same gradient formulas.
"""
import triton
import triton.language as tl


@triton.jit
def _bilinear(locations, weights, sample, valid_query, height, width, level_fits, ACC: tl.constexpr):
    """Corner pixels and weights of BLOCK_Q samples (``sample``: (BLOCK_Q,) indices into weights).

    Returns the top-left pixel index (h * W + w, int64), the fractions (frac_x, frac_y), the four
    corners' validity and their interpolation weights times the attention weight, the attention
    weight itself, and whether the sample reads anything ("near"). Weights are 0 where not valid,
    chosen with ``where`` rather than multiplied, so that an infinite attention weight of a sample
    that reads nothing stays out of the sums, as in the compiled kernels.
    """
    x = tl.load(locations + 2 * sample, mask=valid_query, other=0.0).to(ACC)
    y = tl.load(locations + 2 * sample + 1, mask=valid_query, other=0.0).to(ACC)
    attention = tl.load(weights + sample, mask=valid_query, other=0.0).to(ACC)
    w_im = x * width.to(ACC) - 0.5
    h_im = y * height.to(ACC) - 0.5
    # NaN fails every comparison; the lower bounds are inclusive (grid_sample's gradient at -1)
    near = (h_im >= -1.0) & (h_im < height.to(ACC)) & (w_im >= -1.0) & (w_im < width.to(ACC))
    # where, not &: Triton's interpreter mistypes a block & a scalar boolean
    near = tl.where(level_fits, near & valid_query, False)
    # keep far and non-finite coordinates out of the integer conversion
    h_im = tl.where(near, h_im, 0.0)
    w_im = tl.where(near, w_im, 0.0)
    h_floor = tl.floor(h_im)
    w_floor = tl.floor(w_im)
    top = h_floor.to(tl.int64)
    left = w_floor.to(tl.int64)
    frac_y = h_im - h_floor
    frac_x = w_im - w_floor
    rest_y = 1.0 - frac_y
    rest_x = 1.0 - frac_x
    top_in = near & (top >= 0)
    bottom_in = near & (top + 1 < height)
    left_in = left >= 0
    right_in = left + 1 < width
    valid0 = top_in & left_in
    valid1 = top_in & right_in
    valid2 = bottom_in & left_in
    valid3 = bottom_in & right_in
    weight0 = tl.where(valid0, rest_y * rest_x, 0.0)
    weight1 = tl.where(valid1, rest_y * frac_x, 0.0)
    weight2 = tl.where(valid2, frac_y * rest_x, 0.0)
    weight3 = tl.where(valid3, frac_y * frac_x, 0.0)
    pixel = top * width + left
    return (pixel, frac_x, frac_y, valid0, valid1, valid2, valid3, weight0, weight1, weight2, weight3,
            attention, near)


@triton.jit
def ms_deform_attn_forward_kernel(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, output,
    tokens, queries, heads, channels,
    LEVELS: tl.constexpr, POINTS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
    FLOAT64: tl.constexpr,
):
    """output[n, q, m, d] = sum_{l, p} a[n, q, m, l, p] * bilinear(value[n, level l, m, d], loc[n, q, m, l, p]).

    Grid: (cdiv(Lq, BLOCK_Q), N * M, cdiv(D, BLOCK_D)). All tensors contiguous; value (N, S, M, D) in
    any float dtype, locations (N, Lq, M, L, P, 2) and weights (N, Lq, M, L, P) in theirs, output
    (N, Lq, M, D) in its own; the sums are in float32, or float64 with FLOAT64.
    """
    ACC = tl.float64 if FLOAT64 else tl.float32
    block_q = tl.program_id(0)
    pair = tl.program_id(1).to(tl.int64)  # n * M + m
    block_d = tl.program_id(2)
    n = pair // heads
    m = pair % heads
    query = block_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    channel = block_d * BLOCK_D + tl.arange(0, BLOCK_D)
    valid_query = query < queries
    valid_channel = channel < channels
    pixel_stride = heads * channels  # elements between neighbouring pixels of one head
    # index of sample (l=0, p=0) of each query's group in attention_weights
    group_sample = ((n * queries + query) * heads + m) * (LEVELS * POINTS)
    total = tl.zeros((BLOCK_Q, BLOCK_D), dtype=ACC)
    for level in tl.static_range(LEVELS):
        height = tl.load(spatial_shapes + 2 * level)
        width = tl.load(spatial_shapes + 2 * level + 1)
        start = tl.load(level_start_index + level)
        # never read outside value, whatever spatial_shapes says (the wrapper has checked it when it could)
        level_fits = (height > 0) & (width > 0) & (start >= 0) & (start + height * width <= tokens)
        value_level = value + ((n * tokens + start) * heads + m) * channels
        for point in tl.static_range(POINTS):
            sample = group_sample + level * POINTS + point
            (pixel, frac_x, frac_y, valid0, valid1, valid2, valid3, weight0, weight1, weight2, weight3,
             attention, near) = _bilinear(sampling_locations, attention_weights, sample, valid_query,
                                          height, width, level_fits, ACC)
            corner = value_level + pixel[:, None] * pixel_stride + channel[None, :]
            pixel0 = tl.load(corner, mask=valid0[:, None] & valid_channel[None, :], other=0.0).to(ACC)
            pixel1 = tl.load(corner + pixel_stride, mask=valid1[:, None] & valid_channel[None, :], other=0.0).to(ACC)
            corner_below = corner + width * pixel_stride
            pixel2 = tl.load(corner_below, mask=valid2[:, None] & valid_channel[None, :], other=0.0).to(ACC)
            pixel3 = tl.load(corner_below + pixel_stride, mask=valid3[:, None] & valid_channel[None, :],
                             other=0.0).to(ACC)
            interpolated = (weight0[:, None] * pixel0 + weight1[:, None] * pixel1
                            + weight2[:, None] * pixel2 + weight3[:, None] * pixel3)
            total += tl.where(near[:, None], attention[:, None] * interpolated, 0.0)
    rows = ((n * queries + query) * heads + m) * channels
    target = output + rows[:, None] + channel[None, :]
    tl.store(target, total.to(output.dtype.element_ty), mask=valid_query[:, None] & valid_channel[None, :])


@triton.jit
def _scatter_corner(grad_value, corner, valid, coefficient, grad, valid_channel):
    """grad_value[corner rows] += coefficient * grad over a (BLOCK_Q, BLOCK_D) tile, with atomics:
    queries of other programs may sample the same pixel."""
    mask = valid[:, None] & valid_channel[None, :]
    tl.atomic_add(grad_value + corner, (coefficient[:, None] * grad).to(grad_value.dtype.element_ty), mask=mask,
                  sem="relaxed")


@triton.jit
def ms_deform_attn_backward_kernel(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output,
    grad_value, grad_sampling_locations, grad_attention_weights,
    tokens, queries, heads, channels,
    LEVELS: tl.constexpr, POINTS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
    FLOAT64: tl.constexpr, GRAD_VALUE: tl.constexpr,
):
    """Gradients of the forward for BLOCK_Q queries of one (n, m) pair, every channel.

    Grid: (cdiv(Lq, BLOCK_Q), N * M). Per sample, the four corner dot products
    dot_c = sum_d grad_output[d] * value_c[d] are accumulated in registers over the channel chunks
    and the location and weight gradients (linear in them, bilinear.h) are written once, without
    atomics and without zero-filling. With GRAD_VALUE, grad_value (N, S, M, D), zero-filled by the
    caller (float32 for half value types), receives the scattered a * w_c * grad_output with
    atomics along contiguous channels. Sums in float32, or float64 with FLOAT64.
    """
    ACC = tl.float64 if FLOAT64 else tl.float32
    block_q = tl.program_id(0)
    pair = tl.program_id(1).to(tl.int64)
    n = pair // heads
    m = pair % heads
    query = block_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    valid_query = query < queries
    pixel_stride = heads * channels
    group_sample = ((n * queries + query) * heads + m) * (LEVELS * POINTS)
    rows = ((n * queries + query) * heads + m) * channels
    for level in tl.static_range(LEVELS):
        height = tl.load(spatial_shapes + 2 * level)
        width = tl.load(spatial_shapes + 2 * level + 1)
        start = tl.load(level_start_index + level)
        level_fits = (height > 0) & (width > 0) & (start >= 0) & (start + height * width <= tokens)
        level_offset = ((n * tokens + start) * heads + m) * channels
        for point in tl.static_range(POINTS):
            sample = group_sample + level * POINTS + point
            (pixel, frac_x, frac_y, valid0, valid1, valid2, valid3, weight0, weight1, weight2, weight3,
             attention, near) = _bilinear(sampling_locations, attention_weights, sample, valid_query,
                                          height, width, level_fits, ACC)
            dot0 = tl.zeros((BLOCK_Q,), dtype=ACC)
            dot1 = tl.zeros((BLOCK_Q,), dtype=ACC)
            dot2 = tl.zeros((BLOCK_Q,), dtype=ACC)
            dot3 = tl.zeros((BLOCK_Q,), dtype=ACC)
            corner = level_offset + pixel * pixel_stride
            corner_below = corner + width * pixel_stride
            for first in range(0, channels, BLOCK_D):
                channel = first + tl.arange(0, BLOCK_D)
                valid_channel = channel < channels
                mask = valid_query[:, None] & valid_channel[None, :]
                grad = tl.load(grad_output + rows[:, None] + channel[None, :], mask=mask, other=0.0).to(ACC)
                offset0 = corner[:, None] + channel[None, :]
                offset2 = corner_below[:, None] + channel[None, :]
                pixel0 = tl.load(value + offset0, mask=valid0[:, None] & valid_channel[None, :], other=0.0).to(ACC)
                pixel1 = tl.load(value + offset0 + pixel_stride, mask=valid1[:, None] & valid_channel[None, :],
                                 other=0.0).to(ACC)
                pixel2 = tl.load(value + offset2, mask=valid2[:, None] & valid_channel[None, :], other=0.0).to(ACC)
                pixel3 = tl.load(value + offset2 + pixel_stride, mask=valid3[:, None] & valid_channel[None, :],
                                 other=0.0).to(ACC)
                dot0 += tl.sum(grad * pixel0, axis=1)
                dot1 += tl.sum(grad * pixel1, axis=1)
                dot2 += tl.sum(grad * pixel2, axis=1)
                dot3 += tl.sum(grad * pixel3, axis=1)
                if GRAD_VALUE:
                    _scatter_corner(grad_value, offset0, valid0, attention * weight0, grad, valid_channel)
                    _scatter_corner(grad_value, offset0 + pixel_stride, valid1, attention * weight1, grad, valid_channel)
                    _scatter_corner(grad_value, offset2, valid2, attention * weight2, grad, valid_channel)
                    _scatter_corner(grad_value, offset2 + pixel_stride, valid3, attention * weight3, grad, valid_channel)
            grad_attention = weight0 * dot0 + weight1 * dot1 + weight2 * dot2 + weight3 * dot3
            # derivatives of the interpolated value along the pixel axes, then per normalized coordinate
            along_x = (1.0 - frac_y) * (dot1 - dot0) + frac_y * (dot3 - dot2)
            along_y = (1.0 - frac_x) * (dot2 - dot0) + frac_x * (dot3 - dot1)
            grad_x = tl.where(near, attention * along_x * width.to(ACC), 0.0)
            grad_y = tl.where(near, attention * along_y * height.to(ACC), 0.0)
            grad_attention = tl.where(near, grad_attention, 0.0)
            tl.store(grad_attention_weights + sample, grad_attention.to(grad_attention_weights.dtype.element_ty),
                     mask=valid_query)
            location_type = grad_sampling_locations.dtype.element_ty
            tl.store(grad_sampling_locations + 2 * sample, grad_x.to(location_type), mask=valid_query)
            tl.store(grad_sampling_locations + 2 * sample + 1, grad_y.to(location_type), mask=valid_query)
